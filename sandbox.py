"""Run untrusted Python (model-generated code, its tests) in a separate, limited subprocess.

What each run gets, and what it guarantees:

- **A separate process** (``python -I -S -B``: no site-packages, no user site, no ``PYTHON*``
  variables, no bytecode written) in **its own process group**, killed as a group with SIGKILL
  at the wall-clock limit, and once more after it exits so nothing it started outlives it (also
  when the caller is interrupted; ``kill_running()`` ends the runs other threads wait on).
- **rlimits set in the child before user code**: CPU seconds, address space (a memory bomb gets
  ``MemoryError`` or dies), file size (also caps what it can print), no core dumps.
- **A fresh temporary working directory** (also its ``HOME`` and ``TMPDIR``), removed afterwards.
- **A minimal environment**: only ``PATH``, ``HOME``, ``TMPDIR``, ``LANG``; nothing of the
  evaluator's environment (tokens, keys) is inherited.
- **A completion signal the program cannot forge by reading**: a random token reaches the
  bootstrap through a pipe on stdin (never a file, ``argv`` or the environment; stdin is /dev/null
  again before the program starts), and the bootstrap writes it to stderr only if the program
  ran to its end. ``SandboxResult.completed`` says so; an early ``os._exit(0)`` exits 0 without
  it. Code that walks the interpreter's own frames or memory could still find the token: the
  same limit as the audit hook below.
- **Writes confined to the working directory**, by two layers:
  1. Landlock (Linux >= 5.13, unprivileged, kernel-enforced) when the kernel offers it: no file
     may be created, written, truncated, removed or renamed outside the working directory, by the
     sample or anything it runs; it also cannot ptrace/read ``/proc/<pid>/environ`` of processes
     outside its domain, open TCP connections (Landlock ABI >= 4), or signal the evaluator
     (ABI >= 6).
  2. A Python audit hook installed before user code (always): refuses opens for writing outside
     the working directory, directory opens outside it (so ``dir_fd`` tricks have nothing to
     start from), file-system changes outside it, reading another process's ``/proc/<pid>``,
     starting processes, sockets, signals, and ``ctypes``.
  ``SandboxResult.landlock`` says whether layer 1 was active.

What it does *not* guarantee: reads are not confined (a sample can read any file the evaluator's
user can read); disk use is bounded per file, not in total; without Landlock, the audit hook is
an in-process guard that deliberately hostile code can defeat (e.g. by monkeypatching
``posixpath`` internals before writing), and forks are refused only by that hook (RLIMIT_NPROC
does not bind root). It is no substitute for a container or VM when running code from an
adversary. It is built for code from our own models: buggy, looping, memory-hungry or careless,
not malicious. Imports of ``subprocess``, ``multiprocessing`` and ``ctypes`` fail by design.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Exit status the bootstrap uses when the sample ran out of memory.
EXIT_MEMORY = 113
# Smallest sensible address-space limit: the interpreter alone maps about 15 MB before any test.
MIN_MEMORY_MB = 64

_BOOTSTRAP = r'''
import builtins, json, os, resource, sys, types

def _read_token():
    """The completion token, from the pipe on stdin; stdin is /dev/null again afterwards."""
    token = b""
    while chunk := os.read(0, 64):
        token += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return token.decode().strip()

def _limits(cfg):
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = cfg["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = cfg["file_bytes"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _landlock(workdir):
    """Kernel-enforced: writes only beneath workdir. Returns the ABI version, 0 if unavailable."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        create, add_rule, restrict = 444, 445, 446  # same numbers on x86_64 and aarch64
        abi = syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
        if abi < 1:
            return 0
        write_rights = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) \
            | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
        if abi >= 2:
            write_rights |= 1 << 13  # REFER: linking/renaming across directories
        if abi >= 3:
            write_rights |= 1 << 14  # TRUNCATE

        class RulesetAttr(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64),
                        ("scoped", ctypes.c_uint64)]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        attr = RulesetAttr(write_rights, 0, 0)
        size = 8
        if abi >= 4:
            attr.net, size = 1 | 2, 16  # no TCP bind, no TCP connect
        if abi >= 6:
            attr.scoped, size = 1 | 2, 24  # no abstract unix sockets, no signals outside
        ruleset = syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if ruleset < 0:
            return 0
        file_rights = (1 << 1) | ((1 << 14) if abi >= 3 else 0)  # WRITE_FILE, TRUNCATE
        ok = True
        for path, rights in ((workdir, write_rights), (os.devnull, file_rights)):
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path == workdir else 0))
            rule = PathBeneath(rights, fd)
            ok = ok and syscall(add_rule, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) == 0
            os.close(fd)
        ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        ok = ok and syscall(restrict, ruleset, ctypes.c_uint32(0)) == 0
        os.close(ruleset)
        return abi if ok else 0
    except (OSError, AttributeError):
        return 0
    finally:
        for name in [m for m in sys.modules if "ctypes" in m]:
            del sys.modules[name]

def _install_guard(workdir):
    realpath, isdir, fsdecode, getpid = os.path.realpath, os.path.isdir, os.fsdecode, os.getpid
    prefix = workdir + os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
              "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
              "socket.__new__", "os.chroot"}
    denied_imports = {"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing"}
    # event -> indices of path arguments that must stay inside the working directory
    path_events = {"os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.mkdir": (0,),
                   "os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,),
                   "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
                   "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,),
                   "os.removexattr": (0,)}

    def inside(path):
        real = realpath(fsdecode(path))
        return real == workdir or real.startswith(prefix)

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def guard(event, args):
        if event == "open":
            path, _, flags = args
            if path is None or isinstance(path, int):
                return
            real = realpath(fsdecode(path))
            if real.startswith("/proc/"):
                pid = real.split("/")[2]
                if pid.isdigit() and int(pid) != getpid():
                    deny(f"reading another process's {real}")
            if real == workdir or real.startswith(prefix) or real == os.devnull:
                return
            if flags & write_flags:
                deny(f"writing {real} (outside the working directory)")
            if isdir(real):
                deny(f"opening directory {real} (outside the working directory)")
        elif event in path_events:
            for i in path_events[event]:
                if isinstance(args[i], int) or not inside(args[i]):
                    deny(f"{event} on {args[i]!r} (outside the working directory)")
            if event in ("os.link", "os.rename") and any(fd not in (None, -1) for fd in args[2:]):
                deny(f"{event} with dir_fd")
        elif event in denied or event.startswith("ctypes."):
            deny(event)
        elif event == "import" and args[0] in denied_imports:
            deny(f"importing {args[0]}")

    sys.addaudithook(guard)

def _main():
    token = _read_token()
    program, cfg_json = sys.argv[1], sys.argv[2]
    cfg = json.loads(cfg_json)
    with open(program, encoding="utf-8") as f:
        source = f.read()
    workdir = os.path.realpath(os.getcwd())
    abi = _landlock(workdir)
    sys.stderr.write(f"sandbox: landlock={abi}\n")
    sys.stderr.flush()
    _limits(cfg)
    _install_guard(workdir)
    sys.argv = [program]
    code = compile(source, program, "exec")
    main = types.ModuleType("__main__")  # the sample is __main__, as under `python program.py`
    main.__file__, main.__builtins__ = program, builtins
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except MemoryError:
        os._exit(EXIT_MEMORY)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"\nsandbox: completed {token}\n".encode())

EXIT_MEMORY = __EXIT_MEMORY__
_main()
'''.replace("__EXIT_MEMORY__", str(EXIT_MEMORY))


@dataclass
class SandboxConfig:
    """Limits for one sandboxed run."""

    timeout_s: float = 5.0  # wall clock; the process group is killed at this point
    memory_mb: int = 1024  # address-space limit (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write, stdout/stderr included (RLIMIT_FSIZE)
    max_output_chars: int = 20_000  # tail of stdout/stderr kept in the result


@dataclass
class SandboxResult:
    """How a sandboxed run ended. ``status``: passed, failed, timeout, memory or killed."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    landlock: bool
    completed: bool = False  # the program ran to its end (no early exit of any kind)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - limit * 4, 0))
        return f.read().decode("utf-8", errors="replace")[-limit:]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_RUNNING: set[int] = set()  # process groups of the runs in flight, in any thread
_RUNNING_LOCK = threading.Lock()


def kill_running() -> None:
    """Kill every run in flight. A KeyboardInterrupt reaches only the main thread, so an
    evaluator whose worker threads wait on runs calls this to end them now, not at their
    timeouts (and not after it has exited: each run is in its own session)."""
    with _RUNNING_LOCK:
        for pgid in _RUNNING:
            _kill_group(pgid)


def run_python(source: str, config: SandboxConfig | None = None) -> SandboxResult:
    """Execute ``source`` as a Python program under the limits of ``config``; never raises for
    anything the program does. ``completed`` in the result tells a run that reached the end of
    ``source`` from one that exited early."""
    cfg = config or SandboxConfig()
    limits = {
        "cpu_s": math.ceil(cfg.timeout_s) + 1,
        "memory_bytes": cfg.memory_mb * 2**20,
        "file_bytes": cfg.file_mb * 2**20,
    }
    token = secrets.token_hex(16)  # only the bootstrap learns it, through stdin
    with tempfile.TemporaryDirectory(prefix="codelm-sandbox-") as control:
        control_dir = Path(control)
        workdir = control_dir / "work"
        workdir.mkdir()
        (control_dir / "bootstrap.py").write_text(_BOOTSTRAP, encoding="utf-8")
        (control_dir / "program.py").write_text(source, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8"}
        command = [sys.executable, "-I", "-S", "-B", str(control_dir / "bootstrap.py"),
                   str(control_dir / "program.py"), json.dumps(limits)]
        with open(control_dir / "stdout", "wb") as out, open(control_dir / "stderr", "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, start_new_session=True)
            with _RUNNING_LOCK:
                _RUNNING.add(proc.pid)
            timed_out = False
            try:
                try:  # a few bytes into an empty pipe: never blocks
                    proc.stdin.write(token.encode() + b"\n")
                    proc.stdin.close()
                except OSError:  # the interpreter died at startup; its status says so
                    pass
                proc.wait(timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # at the timeout, on an interrupt, and whatever it left running
                _kill_group(proc.pid)
                proc.wait()
                with _RUNNING_LOCK:
                    _RUNNING.discard(proc.pid)
            duration = time.monotonic() - start
        stdout = _tail(control_dir / "stdout", cfg.max_output_chars)
        with open(control_dir / "stderr", "rb") as f:
            landlock = f.readline().strip() not in (b"sandbox: landlock=0", b"")
        stderr = _tail(control_dir / "stderr", cfg.max_output_chars)
        stderr = re.sub(r"\Asandbox: landlock=\d+\n", "", stderr)
        marker = f"\nsandbox: completed {token}\n"
        completed = marker in stderr
        stderr = stderr.replace(marker, "")
        # Samples can leave read-only files or directories behind; make them removable.
        os.chmod(workdir, 0o700)
        for root, dirs, files in os.walk(workdir):
            for name in dirs + files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o700)
        shutil.rmtree(workdir, ignore_errors=True)
    code = proc.returncode
    if timed_out:
        status = "timeout"
    elif code == 0:
        status = "passed"
    elif code == EXIT_MEMORY or (code == 1 and "MemoryError" in stderr):
        status = "memory"
    elif code < 0 and -code in (signal.SIGXCPU,):
        status = "timeout"
    elif code < 0:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, code, stdout, stderr, duration, landlock, completed)
