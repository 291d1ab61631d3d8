# The training tests' fixtures, shared with the process tests here.
from test_trainingmanager import assets, one_thread  # noqa: F401
