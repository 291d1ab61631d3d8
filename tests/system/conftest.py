# The training tests' fixtures, shared with the process tests here.
import pytest
from test_trainingmanager import assets  # noqa: F401


@pytest.fixture(autouse=True)
def one_thread_each(one_thread):
    """Every process test here compares runs bit for bit: one thread (tests/conftest.py)."""
    yield
