"""Stopping a script's process at a chosen moment, as a user's Ctrl-C or a scheduler's kill does."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_TERMINALS_DEFAULTS = (signal.SIGINT, signal.SIGHUP)


def _terminals_defaults() -> None:
    for sig in _TERMINALS_DEFAULTS:
        signal.signal(sig, signal.SIG_DFL)


def popen(args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` whose child starts with SIGINT and SIGHUP at their defaults, as a
    command started from a terminal does, so that a test's SIGINT is its Ctrl-C and its SIGHUP
    its hangup. A pytest started with them ignored (``nohup ... &``, some CI supervisors) passes
    SIG_IGN on to its children, and Python then installs no KeyboardInterrupt handler: the
    test's signal would never arrive."""
    if any(signal.getsignal(sig) is signal.SIG_IGN for sig in _TERMINALS_DEFAULTS):
        kwargs["preexec_fn"] = _terminals_defaults  # else exec resets them already
    return subprocess.Popen(args, **kwargs)


def ignores(pid: int, sig: int) -> bool:
    """Whether process ``pid`` ignores ``sig`` (SIG_IGN), as /proc shows it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone
        return False
    for line in status.splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def signal_when(proc: subprocess.Popen, ready: Callable[[], bool], sig: int,
                timeout: float = 120) -> tuple[str, str]:
    """Send ``sig`` to ``proc`` once ``ready()`` holds, then return its (stdout, stderr); the
    process is killed whatever happens, so a failing test leaves none behind."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert not ignores(proc.pid, sig), (
            f"the child ignores {signal.Signals(sig).name}, as this pytest does: start it with "
            "procs.popen")
        proc.send_signal(sig)
        return proc.communicate(timeout=60)
    finally:
        proc.kill()


def exited(pid: int) -> bool:
    """Gone, or a zombie (a container's init may never reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, as /proc shows them."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
