"""sandbox.py: limits hold, nothing escapes the working directory, the evaluator survives."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sandbox import SandboxConfig, kill_running, run_python

FAST = SandboxConfig(timeout_s=3.0, memory_mb=256)


def test_plain_program_passes_and_output_is_captured():
    result = run_python("print('hello', 6 * 7)", FAST)
    assert result.passed and result.returncode == 0
    assert result.stdout == "hello 42\n"


def test_failing_program_fails_with_its_traceback():
    result = run_python("assert 1 + 1 == 3, 'arithmetic'", FAST)
    assert result.status == "failed"
    assert "AssertionError: arithmetic" in result.stderr


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", SandboxConfig(timeout_s=1.0))
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert 1.0 <= result.duration_s < 3.0 and elapsed < 4.0


def test_sleeping_program_is_killed_at_the_time_limit():
    result = run_python("import time\ntime.sleep(60)", SandboxConfig(timeout_s=1.0))
    assert result.status == "timeout" and result.duration_s < 3.0


def test_kill_running_ends_a_run_that_another_thread_waits_on():
    # An interrupt reaches only the main thread; the evaluator's workers wait on their runs.
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(run_python, "import time\ntime.sleep(60)", SandboxConfig(timeout_s=60))
        start = time.monotonic()
        while not future.done() and time.monotonic() - start < 10:
            kill_running()  # until the run has started and is killed
            time.sleep(0.05)
        result = future.result(timeout=1)
    assert result.status == "killed" and time.monotonic() - start < 10


@pytest.mark.parametrize("bomb", [
    "x = bytearray(10 ** 11)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))",
    "s = 'x'\nwhile True:\n    s = s + s",
])
def test_memory_bomb_is_stopped(bomb):
    result = run_python(bomb, SandboxConfig(timeout_s=10.0, memory_mb=256))
    assert result.status == "memory", result.stderr


def test_output_flood_is_capped():
    result = run_python("while True:\n    print('y' * 1000)", SandboxConfig(timeout_s=10.0, file_mb=1))
    assert result.status in ("killed", "failed") and not result.passed
    assert len(result.stdout) <= FAST.max_output_chars


def test_writes_inside_the_working_directory_work():
    program = (
        "import os, tempfile\n"
        "open('a.txt', 'w').write('x')\n"
        "os.mkdir('d'); os.rename('a.txt', 'd/b.txt')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('ok')\n"
        "open(os.devnull, 'w').write('discarded')\n"
        "print(open('d/b.txt').read())\n"
    )
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    assert result.stdout == "x\n"


@pytest.mark.parametrize("attempt", [
    "open(TARGET, 'w').write('pwned')",
    "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path(TARGET).write_text('pwned')",
    "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('pwned')",
    "import os\nd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\n"
    "os.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=d)",
    "import shutil\nopen('a', 'w').write('pwned')\nshutil.move('a', TARGET)",
    "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > ' + TARGET])",
    "import os\nos.system('echo pwned > ' + TARGET)",
])
def test_writing_outside_the_working_directory_fails(tmp_path, attempt):
    target = tmp_path / "outside.txt"
    result = run_python(f"TARGET = {str(target)!r}\n{attempt}", FAST)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr or "not allowed" in result.stderr
    assert not target.exists()


def test_deleting_outside_the_working_directory_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    result = run_python(f"import os\nos.remove({str(victim)!r})", FAST)
    assert result.status == "failed"
    assert victim.read_text() == "precious"


def test_kernel_confinement_holds_when_the_audit_hook_is_fooled(tmp_path):
    probe = run_python("pass", FAST)
    if not probe.landlock:
        pytest.skip("this kernel does not offer Landlock; only the in-process guard is active")
    target = tmp_path / "outside.txt"
    # Make the guard's path resolution claim every path is inside the working directory.
    program = (
        "import os, posixpath\n"
        "posixpath._joinrealpath = lambda *a: (os.getcwd() + '/x', True)\n"
        f"open({str(target)!r}, 'w').write('pwned')\n"
    )
    result = run_python(program, FAST)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr and "sandbox:" not in result.stderr
    assert not target.exists()


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("CODELM_TEST_SECRET", "s3cr3t-value")
    direct = run_python("import os\nprint(os.environ['CODELM_TEST_SECRET'])", FAST)
    assert direct.status == "failed" and "KeyError" in direct.stderr
    dump = run_python("import os\nprint(dict(os.environ))", FAST)
    assert dump.passed and "s3cr3t-value" not in dump.stdout
    assert set(eval(dump.stdout)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"}
    parent = run_python(
        "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())", FAST)
    assert parent.status == "failed" and "s3cr3t-value" not in parent.stdout


def test_evaluator_survives_hostile_samples():
    hostile = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "import os\nos.fork()",
        "import sys\nsys.exit(3)",
        "raise SystemExit('bye')",
        "import os\nos._exit(0)",  # exits 0 before any test ran: passes, harmlessly
    ]
    statuses = [run_python(source, FAST).status for source in hostile]
    assert statuses == ["failed"] * 5 + ["passed"]
    assert run_python("print('still here')", FAST).stdout == "still here\n"
    assert os.getpid() > 0  # this process is alive to run the assertion


def test_completion_is_signalled_only_when_the_program_ran_to_its_end():
    done = run_python("print('hello')", FAST)
    assert done.passed and done.completed
    assert done.stdout == "hello\n" and done.stderr == ""  # the signal is not in the output
    for early in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"):
        result = run_python(early + "\nprint('never')", FAST)
        assert result.passed and not result.completed, early
    assert not run_python("1 / 0", FAST).completed


def test_completion_token_cannot_be_read_by_the_program():
    # Every place a program could look for the token: its file, argv, environment, stdin. Each
    # candidate is echoed both on stdout and in the exact form of the completion signal.
    program = (
        "import os, re, sys\n"
        "seen = open(__file__).read() + ' '.join(sys.argv) + str(os.environ)\n"
        "for name in ('environ', 'cmdline'):\n"
        "    seen += open(f'/proc/self/{name}', 'rb').read().decode('latin-1')\n"
        "seen += os.read(0, 4096).decode('latin-1') + open('/proc/self/fd/0').read()\n"
        "for token in set(re.findall('[0-9a-f]{32}', seen)):\n"
        "    print(token, flush=True)\n"
        "    sys.stderr.write(f'\\nsandbox: completed {token}\\n')\n"
        "sys.stderr.flush()\n"
        "os._exit(0)\n"
    )
    result = run_python(program, FAST)
    assert result.passed and not result.completed, result.stderr
