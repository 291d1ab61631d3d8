import compileall
import signal
import sys
from pathlib import Path

import pytest
import torch

# Tests import the top-level modules (tokenizer, architecture, ...) and their helpers directly.
ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# A suite started in the background (a shell's `pytest &` without job control) inherits Ctrl-C
# ignored, and so does every process it starts; the tests of stopping send it as a terminal does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The suite's models are toys: one thread avoids oversubscribing the 2-core CI machine, where
# a second thread makes a tiny generate 30-100x slower under load. Tests that need more set it.
torch.set_num_threads(1)


def pytest_sessionstart(session):
    """The project's sources compiled once, before any test: the scripts and workers the tests
    start (hundreds) would each compile them anew where PYTHONDONTWRITEBYTECODE keeps Python
    from caching them, about a second a process. A pytest-xdist worker leaves it to the
    controller, which compiles before it starts them."""
    if hasattr(session.config, "workerinput"):
        return
    compileall.compile_dir(ROOT, maxlevels=0, quiet=1)  # the scripts
    for package in ("codelm", "scraping", "tests"):
        compileall.compile_dir(ROOT / package, quiet=1)


@pytest.fixture(autouse=True)
def own_problem_checks(tmp_path_factory, monkeypatch):
    """Each test keeps the sandbox checks of its problems files in a directory of its own (in
    this process; a test's subprocess gets a CODELM_CACHE of its own): what one test (or an
    earlier run of the suite) kept would spare the next the sandbox runs it counts or fakes."""
    from codelm.evaluation.tasks import passk

    kept = tmp_path_factory.mktemp("problem-checks")
    checks_path = passk.checks_path
    monkeypatch.setattr(passk, "checks_path",
                        lambda problems, sandbox: kept / checks_path(problems, sandbox).name)


@pytest.fixture
def hangup_at_default():
    """SIGHUP at its default for a test that hangs up its own process: a pytest started with it
    ignored (``nohup``) passes that on, and the scripts rightly keep an ignored SIGHUP ignored."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in a temporary HF_HOME, offline, for this process and the
    processes it starts (``tiny_hf.hub_cache`` fills it)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


@pytest.fixture
def email_with_drops(tmp_path) -> Path:
    """The stdlib's email package with an exact copy, a copy only after cleaning (CRLF), a file
    too small and one too large: drops before cleaning and in it."""
    import shutil

    from codelm.data.sources import stdlib_root

    email = stdlib_root() / "email"
    src = tmp_path / "src"
    shutil.copytree(email, src)
    (src / "copy.py").write_text((email / "utils.py").read_text("utf-8"))
    (src / "crlf.py").write_bytes((email / "utils.py").read_bytes().replace(b"\n", b"\r\n"))
    (src / "short.py").write_text("x = 1\n")
    (src / "huge.py").write_text("x = 1\n" * 200_000)
    return src


@pytest.fixture
def one_thread():
    """Bit-exact comparisons between processes need the same reduction order: one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
