"""Stopping a script's process at a chosen moment, as a user's Ctrl-C or a scheduler's kill does."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def signal_when(proc: subprocess.Popen, ready: Callable[[], bool], sig: int,
                timeout: float = 120) -> tuple[str, str]:
    """Send ``sig`` to ``proc`` once ``ready()`` holds, then return its (stdout, stderr); the
    process is killed whatever happens, so a failing test leaves none behind."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
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
