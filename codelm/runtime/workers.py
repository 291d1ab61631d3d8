"""A worker process as other processes tell it (a sweep's trials name theirs): its id, and
whether it lives. Its mark, a file it holds locked while it lives (the kernel lets go of the
lock when it dies, whatever PID namespace it ran in), tells first where one is kept; else its
pid on this machine, checked against the pid's start (a reused pid is another process)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from codelm.runtime import process


def worker_id() -> str:
    """This process as a worker: host, pid, the pid's start and its PID namespace (one process,
    however its pid is reused, in whichever container of one host name: a restarted
    container's entry process is pid 1 again)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}:{process.pid_namespace()}"


def process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (Linux's /proc/PID/stat, its
    22nd field); "" where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # the fields after the name start at the 3rd


def mark_path(marks: Path, worker: str) -> Path:
    """The mark of ``worker`` in the directory ``marks``."""
    return marks / f"{worker}.lock"


@contextlib.contextmanager
def worker_mark(marks: Path) -> Iterator[None]:
    """This worker's mark in ``marks``, held locked while the block runs, then removed; none
    where the filesystem has no locks (some NFS): the pid tells, as without marks."""
    path = mark_path(marks, worker_id())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = process.locked_fd(path, os.O_CREAT | os.O_RDWR)
    except OSError:
        fd = None
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # an unlocked mark would read as a dead worker's
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)


def mark_held(mark: Path) -> bool | None:
    """Whether a worker's mark is locked (its worker lives); None where there is no mark (its
    worker ended meanwhile), it cannot be opened, or its filesystem has no locks."""
    try:
        fd = process.locked_fd(mark, os.O_RDONLY)
    except OSError:
        return None
    if fd is None:
        return True
    os.close(fd)
    return False


def worker_alive(worker: str, marks: Path | None = None) -> bool | None:
    """Whether ``worker`` (a ``worker_id``) lives: its mark in ``marks`` tells first; else its pid,
    where it ran on this machine in this PID namespace; None where it cannot be told (another
    machine's, another container's of the same host name)."""
    if marks is not None and worker:
        held = mark_held(mark_path(marks, worker))
        if held is not None:
            return held
    host, pid, started, namespace = [*worker.split(":"), "", "", ""][:4]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if namespace and namespace != process.pid_namespace():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, unless its pid was reused
        pass
    now = process_start(int(pid))
    return not started or not now or now == started  # unreadable (/proc's hidepid): alive
