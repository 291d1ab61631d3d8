"""How every script starts, stops and writes files: Ctrl-C, SIGTERM and SIGHUP end it the same
way (one line, the shell's exit code, ``finally`` blocks run); files and directories are written
whole or not at all, and what killed writers left is settled by the next writer. A long phase
shows a progress bar on a terminal, else a plain line every 30 s (``Heartbeat``)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, NoReturn

if TYPE_CHECKING:
    import torch

# The signals that stop a script, each ending it with the shell's code 128 + its number: Ctrl-C's
# SIGINT (130), SIGTERM (143: ``kill``, a scheduler), SIGHUP (129: the terminal hung up). An
# ignored signal stays ignored everywhere (nohup's SIGHUP, ``cmd &``'s SIGINT).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class WorkerDied(ChildProcessError):
    """A pool's worker process ended in the middle of the work (killed: the out-of-memory
    killer, kill -9; or crashed), or could not start (its initializer raised): the work it held
    is lost, so the pool's results cannot be complete. An OSError, so a script reports it as one
    line."""


@contextlib.contextmanager
def worker_pool(processes: int, initializer: Callable | None = None,
                initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor of ``processes`` workers, forked where the platform can (they
    inherit the parent's objects instead of unpickling them), ended on leaving: shut down after
    its work (each worker takes its last task and exits), its workers terminated at once on an
    exception or a stop. A worker that dies fails the pool's pending results: ``WorkerDied``
    (a multiprocessing Pool would wait for them for ever). See ``_worker_start`` for the
    workers' signals and their end with the parent."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_start,
                               initargs=(initializer, initargs))
    with _stop_signals_blocked():  # the workers (and the pool's thread) start with them blocked
        pool.submit(int)  # a forking pool starts every worker at its first task
    workers = list(pool._processes.values())  # no public handle on them before Python 3.14
    try:
        yield pool
    except BrokenProcessPool as broken:
        pool.shutdown(wait=True)
        if broken.__cause__ is not None:  # a worker's result or error the parent cannot read:
            raise  # its cause says which, and no worker died
        raise WorkerDied(_death_message(workers)) from None
    except BaseException:
        for worker in workers:
            worker.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# A pool worker's exit status where its initializer raised (the traceback is on stderr).
INITIALIZER_FAILED = 77


def _death_message(workers: Sequence[multiprocessing.process.BaseProcess]) -> str:
    """One line on a pool's dead worker: how it ended, and what to do."""
    if any(worker.exitcode == INITIALIZER_FAILED for worker in workers):
        return ("a worker process could not start: its initializer raised (the traceback "
                "above); fix that cause, then run the same command again")
    how = "ended abruptly"
    for worker in workers:
        code = worker.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:  # the pool ends the rest
            how = f"was killed by {signal.Signals(-code).name}"
            break
        if code is not None and code > 0:
            how = f"exited with code {code}"
            break
    return (f"a worker process {how} (out of memory? kill -9?) and its work is lost; run the "
            f"same command again, with fewer workers if memory is short")


def ordered_map(pool: Executor, function: Callable, items: Iterable, limit: int,
                cost: Callable[[object], int] = lambda item: 1, chunksize: int = 1) -> Iterator:
    """``function`` of each of ``items`` on ``pool``'s workers, the results in the items' order.
    Items are taken as the results are consumed, ``chunksize`` a task, while the items out
    (sent, their results not yet taken) cost under ``limit`` (a large item goes alone): a
    corpus is never read whole into the pool's queue. A pool that broke while items were out
    raises the error of the first task sent, which says why (a worker's error the parent cannot
    read), not the bare one a new task meets."""
    out: deque[_Sent] = deque()
    held = 0
    for chunk in _chunks(items, chunksize):
        chunk_cost = sum(map(cost, chunk))
        try:
            future = pool.submit(_map_chunk, function, chunk)
        except BrokenProcessPool:
            for sent in out:
                sent.future.result()
            raise
        out.append(_Sent(future, chunk_cost))
        held += chunk_cost
        while out and held >= limit:
            sent = out.popleft()
            held -= sent.cost
            yield from sent.future.result()
    while out:
        yield from out.popleft().future.result()


class _Sent(NamedTuple):
    """A task sent to a pool: its future, and what its items cost."""

    future: Future
    cost: int


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _map_chunk(function: Callable, chunk: list) -> list:
    """``function`` of each item of a task's chunk (in a worker)."""
    return [function(item) for item in chunk]


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Within: this thread holds the stop signals (STOP_SIGNALS) pending (a process forked here inherits the
    block). Where the platform has no signal masks, nothing."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_start(initializer: Callable | None, initargs: tuple) -> None:
    """A pool worker's signals: SIGTERM at its default, so the pool's terminate ends the worker
    wherever it waits (a Python handler inherited from the parent misses a signal that lands
    between a lock's quick try and its blocking wait, and the pool then waits for ever); Ctrl-C
    and a hangup, which reach the whole process group, ignored: the parent takes them and ends
    the pool. The worker was forked with them blocked: a SIGTERM sent while the fork still
    returns (a pool terminated at once, on a busy machine) would be caught by the parent's
    handler and its flag cleared by Python's after-fork reset, lost; blocked, it waits for
    these dispositions and is delivered on the unblock. A worker ends with its parent: kill -9
    runs no cleanup in the parent, and the pool's queue, whose writing end the workers hold
    too, would keep them waiting for ever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_gone, args=(parent,), daemon=True,
                         name="codelm-parent-watch").start()
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:  # the pool would only see a worker gone
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(INITIALIZER_FAILED)


def _exit_when_gone(parent: multiprocessing.process.BaseProcess) -> None:
    """Wait until ``parent`` has ended (its sentinel reads the end), then end this process."""
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def free_memory(device: torch.device) -> float:
    """Bytes free for a new allocation on ``device`` (a torch.device) now: the GPU's, else the
    system's (MemAvailable), inf where the system does not say."""
    if device.type == "cuda":
        import torch  # a CUDA device was made by torch, already loaded

        return float(torch.cuda.mem_get_info(device)[0])
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return math.inf
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return math.inf


def worker_count(requested: int | None) -> int:
    """The worker processes to use: ``requested``, or every usable core; one in a daemon process
    (a DataLoader worker), which can start none."""
    if multiprocessing.current_process().daemon:
        return 1
    return requested if requested is not None else usable_cores()


def leave_terminal_on_hangup(signum: int) -> None:
    """On SIGHUP, point stdout and stderr at /dev/null unless they are files: a hung-up terminal
    or a pipe whose reader the hangup ended fails every write, and the next progress bar would
    end the process before its cleanup."""
    if signum != signal.SIGHUP:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            if stat.S_ISREG(os.fstat(fd).st_mode):
                continue
        except (AttributeError, OSError, ValueError):  # replaced (pytest's capture) or closed
            continue
        _to_devnull(fd)


def _to_devnull(fd: int) -> None:
    """Point file descriptor ``fd`` at /dev/null: what is written to it is dropped."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def _flush_quietly() -> None:
    """Flush stdout and stderr, whatever became of them (closed, hung up): an exit still comes."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()


def _handle_stops(handler: Callable) -> dict[int, Callable | int | None]:
    """``handler`` for each stop signal not ignored (nohup's SIGHUP stays ignored); the
    handlers it replaced."""
    replaced = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            replaced[sig] = signal.signal(sig, handler)
    return replaced


@contextlib.contextmanager
def _handling(signals: tuple, handler: Callable, take_ignored: tuple = ()) -> Iterator[None]:
    """Within: ``handler`` for each of ``signals`` not ignored (or in ``take_ignored``); only the
    main thread may set handlers, elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals
                if sig in take_ignored or signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, previous_handler in previous.items():
            signal.signal(sig, previous_handler)


_STOP_UNDER_WAY: list[str] = []  # the signal of the stop being carried out, if one is


def note_stop(name: str) -> None:
    """A stop is under way (a checkpoint, a cleanup): a later SIGTERM or SIGHUP leaves it, and
    its exit code, as they are, until ``interrupt_on_sigterm`` ends."""
    if not _STOP_UNDER_WAY:
        _STOP_UNDER_WAY.append(name)


def forget_stop() -> None:
    """No stop is under way: the next SIGTERM or SIGHUP stops the process again."""
    _STOP_UNDER_WAY.clear()


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within: SIGTERM or SIGHUP raises ``KeyboardInterrupt("SIGTERM")`` (``"SIGHUP"``) as Ctrl-C
    does (``"SIGINT"``), so ``finally`` blocks run; a SIGHUP ignored by nohup stays ignored. Once
    a stop is under way a later SIGTERM or SIGHUP changes nothing (a scheduler sends them twice
    and a closed terminal follows): the cleanup runs and the exit code is the stop's; a Ctrl-C
    still interrupts at once."""
    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:  # a forked pool worker (its pool ends it with SIGTERM): die
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        leave_terminal_on_hangup(signum)
        if _STOP_UNDER_WAY and signum != signal.SIGINT:
            return
        name = signal.Signals(signum).name
        note_stop(name)
        raise KeyboardInterrupt(name)

    forget_stop()  # one left by a run outside this context is over
    try:
        with _handling(STOP_SIGNALS, handle, take_ignored=(signal.SIGTERM,)):
            yield
    finally:
        forget_stop()


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Within: a stop waits and lands on leaving, so what it would interrupt is done whole (a
    handler, not a signal mask: the OS may deliver the signal to any of torch's threads)."""
    caught: list[int] = []

    def defer(signum, frame):
        leave_terminal_on_hangup(signum)  # now: what it would interrupt may write
        caught.append(signum)

    try:
        with _handling(STOP_SIGNALS, defer):
            yield
    finally:
        if caught:
            signal.raise_signal(caught[0])


class StopWatcher:
    """Carries out a stop that the main thread cannot reach in time. Python runs a signal's
    handler in the main thread, between operations: one long operation (a long block's
    attention is one call, minutes long) holds the stop back, but the signal still wakes this
    watcher's thread (``signal.set_wakeup_fd``). A stop that finds the main thread inside a
    ``window`` and still there ``grace_s`` later is handed to the window's ``take_over`` on this
    thread, while the main thread is held where it would leave the window; the process then
    ends with the exit code ``take_over`` returns. Made in the main thread, after the stop
    signals' handlers are set (the wakeup is written for signals that have one)."""

    _CLOSE = b"\0"  # what ``close`` writes: no signal has number 0

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # as set_wakeup_fd requires
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._window = threading.Condition()
        self._take_over: Callable[[str], int] | None = None  # the open window's
        self._thread = threading.Thread(target=self._watch, name="stop-watcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def window(self, take_over: Callable[[str], int]) -> Iterator[None]:
        """Within: a stop not acted on (the block not left) within ``grace_s`` is carried out by
        ``take_over(signal name)``, which returns the process's exit code."""
        with self._window:
            self._take_over = take_over
        try:
            yield
        finally:
            with self._window:  # held for good by a take-over: here the process ends
                self._take_over = None
                self._window.notify_all()

    def _watch(self) -> None:
        names = {sig.value: sig.name for sig in STOP_SIGNALS}
        while (woken := os.read(self._read, 1)) != self._CLOSE:
            if woken[0] not in names:
                continue
            with self._window:
                if not self._window.wait_for(lambda: self._take_over is None, self.grace_s):
                    _end_process(self._take_over, names[woken[0]])

    def close(self) -> None:
        """Stop watching (main thread): the previous wakeup fd back, the thread ended."""
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._write, self._CLOSE)
        self._thread.join()
        os.close(self._read)
        os.close(self._write)


def _end_process(take_over: Callable[[str], int], stop: str) -> NoReturn:
    """``take_over(stop)``, then the process's end with the exit code it returns (1 if it
    fails: the main thread waits for the end, so a failure must not leave it waiting)."""
    try:
        code = take_over(stop)
    except BaseException:
        traceback.print_exc()
        code = 1
    _flush_quietly()
    os._exit(code)


_START_UP_REPLACED: dict[int, Callable | int | None] = {}  # what quiet_start_up_stops replaced


def quiet_start_up_stops(quiet: bool = False) -> None:
    """A script's first statement: a stop while torch loads ends it with one line (``quiet``:
    none) and its exit code, not a traceback from inside an import, until ``run_main``."""
    _START_UP_REPLACED.update(_handle_stops(partial(_stopped_while_starting, quiet)))


def is_rank_zero() -> bool:
    """Whether this process reports for its job: not one of torchrun's ranks past the first
    (readable before the process group is joined)."""
    return os.environ.get("RANK", "0") == "0"


def _stopped_while_starting(quiet: bool, signum: int, frame) -> None:
    """``os._exit``: a SystemExit raised into an import can be swallowed by an extension's init
    (torch's of numpy) or abort it from C++. Nothing is written yet."""
    if not quiet and is_rank_zero():
        with contextlib.suppress(OSError, ValueError):  # closed, hung up: the exit still comes
            sys.stderr.write("interrupted while starting: nothing was written\n")
            sys.stderr.flush()
    os._exit(interrupted_exit_code(signal.Signals(signum).name))


def exit_with_parent(parent: int, poll_s: float = 1.0, grace_s: float = 5.0,
                     notice: str | None = None) -> None:
    """End this process once ``parent``, the process that started it, is no longer its parent
    (it died, even by kill -9): ``notice`` on stderr, SIGTERM, which a run answers with a
    checkpoint, then SIGKILL ``grace_s`` later. A watcher thread looks at each multiple of
    ``poll_s`` on the clock, so the processes of one parent notice at the same moment: a
    torchrun's ranks stopped apart would find their peers gone mid-collective."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s - time.time() % poll_s)
        if notice is not None:
            with contextlib.suppress(OSError):  # closed, hung up: the stop still comes
                os.write(2, f"{notice}\n".encode())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# What torchrun's agent sets in the environment of each process it starts.
TORCHRUN_RUN_ID = "TORCHELASTIC_RUN_ID"
# torchrun's own wait between its SIGTERM to its processes and their SIGKILL (30 s by default).
TORCHRUN_SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def exit_with_torchrun() -> None:
    """Under torchrun: stop this process as torchrun's own stop does (SIGTERM, SIGKILL after
    torchrun's shutdown timeout) once torchrun, its parent, is gone, even by kill -9: torchrun
    starts each process in a session of its own, which nothing else stops. Rank 0 says why.
    Called first thing: a torchrun killed before the call leaves an orphan already."""
    if TORCHRUN_RUN_ID not in os.environ:
        return
    grace_s = float(os.environ.get(TORCHRUN_SHUTDOWN_TIMEOUT, "30"))
    notice = None
    if os.environ.get("RANK", "0") == "0":
        notice = "torchrun is gone: its processes stop as on its SIGTERM"
    exit_with_parent(os.getppid(), grace_s=grace_s, notice=notice)


def run_main(main: Callable[[], int | None]) -> int | None:
    """Run a script's ``main`` once its imports are done (see ``quiet_start_up_stops``); at the
    interpreter's exit, a stop ends the process at once with ``main``'s exit code."""
    while _START_UP_REPLACED:
        signal.signal(*_START_UP_REPLACED.popitem())
    try:
        code = main()
    except BrokenPipeError:  # `script | head` stopped reading: no traceback, no second one
        _to_devnull(sys.stdout.fileno())  # at exit's flush
        code = 1
    atexit.register(_exit_at_a_stop, code)  # the last registered: the first to run
    return code


def _exit_at_a_stop(code: int | None) -> None:
    """From here to the end of the exit, a stop ends the process with ``code``, quietly: not a
    KeyboardInterrupt inside another exit handler ("Exception ignored in atexit callback")."""

    def exit_now(signum, frame) -> None:
        _flush_quietly()
        os._exit(code or 0)

    _handle_stops(exit_now)


def run_tool(work: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """The main of a small command: ``work``'s exit code (None: 0), or one line and 2 for a
    user's mistake (ValueError, OSError), or ``interrupted`` and the stop's exit code."""
    try:
        with interrupt_on_sigterm():
            return work() or 0
    except KeyboardInterrupt as stop:
        print(interrupted, file=sys.stderr)
        return interrupted_exit_code(stop)
    except BrokenPipeError:  # the reader of stdout went away: run_main's to end quietly
        raise
    except (OSError, ValueError) as err:
        print(f"error: {os_error_message(err) if isinstance(err, OSError) else err}",
              file=sys.stderr)
        return 2


def stop_signal(stop: KeyboardInterrupt) -> signal.Signals:
    """The signal behind a KeyboardInterrupt (``interrupt_on_sigterm`` names it), else SIGINT."""
    names = [sig.name for sig in STOP_SIGNALS]
    named = stop.args[0] if stop.args and stop.args[0] in names else "SIGINT"
    return signal.Signals[named]


def interrupted_exit_code(stop: str | KeyboardInterrupt) -> int:
    """The shell's code for a stop (130, 143 or 129), from the signal's name or its interrupt."""
    sig = stop_signal(stop) if isinstance(stop, KeyboardInterrupt) else signal.Signals[stop]
    return 128 + sig.value


# Temp files and directories are named after the process that made them (``owner_tag``), so a
# later process removes what dead ones left (SIGKILL and power loss run no cleanup) and never what
# a live one is writing. A PID names a process only on its machine and in its PID namespace
# (containers may share a disk and a host name), so a tag names all three.
OWNER_PATTERN = r"(?P<pid>\d+)@(?P<host>[^@]*)@(?P<pidns>\d*)@"


def pid_namespace() -> str:
    """This process's PID namespace ("" where there is no /proc): a pid names one process within
    it."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS): PIDs are machine-wide
        return ""


def locked_fd(path: str | Path, flags: int, mode: int = 0o644) -> int | None:
    """``path`` opened with ``flags`` and locked exclusively (flock), held until the descriptor
    closes (or the process dies); None where another holds the lock. An OSError where the file
    cannot be opened or its filesystem has no such locks (NFS)."""
    fd = os.open(path, flags, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def owner_tag() -> str:
    """``PID@HOST@PIDNS@`` of this process, for the names of the temp entries it makes."""
    return f"{os.getpid()}@{socket.gethostname()}@{pid_namespace()}@"


def owner_is_dead(match: re.Match) -> bool:
    """Whether an ``OWNER_PATTERN`` match's process has ended (False: another machine or PID
    namespace's, which cannot be told)."""
    if match["host"] != socket.gethostname() or match["pidns"] != pid_namespace():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _dead_owners(directory: str | Path, pattern: re.Pattern, every_owner_gone: bool = False
                 ) -> list[tuple[Path, re.Match]]:
    """(entry, match) of ``directory``'s entries ``pattern`` names whose owner died (or any)."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:  # no such directory yet, or unreadable: nothing of ours
        return []
    orphaned = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and (every_owner_gone or owner_is_dead(match)):
            orphaned.append((entry, match))
    return orphaned


def _remove(entry: Path, remove_dir: Callable[[Path], None] | None = None) -> None:
    """Remove a file, link or directory (``remove_dir``: instead of rmtree); gone is fine."""
    if entry.is_dir() and not entry.is_symlink():
        (remove_dir or partial(shutil.rmtree, ignore_errors=True))(entry)
    else:
        with contextlib.suppress(OSError):  # another process removed it first
            entry.unlink()


def remove_dead_owners(directory: str | Path, before: str,
                       remove_dir: Callable[[Path], None] | None = None) -> None:
    """Remove ``directory``'s entries named ``<before><owner tag>...`` (``before`` a regex) whose
    owner has died."""
    for entry, _ in _dead_owners(directory, re.compile(before + OWNER_PATTERN)):
        _remove(entry, remove_dir)


# A write in progress lies beside its target NAME: ``.NAME.tmp-<owner tag>`` is the new file or
# directory, ``.NAME.old-<owner tag>`` the directory it replaces, between its two renames. A
# directory's names end in a random suffix too (two threads may write the same target).
PARTIAL_WRITE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-" + OWNER_PATTERN)


def partial_path(target: Path, kind: str, suffix: str = "") -> Path:
    """Where this process writes ``target`` (``kind`` "tmp") or keeps what it replaces ("old")."""
    return target.with_name(f".{target.name}.{kind}-{owner_tag()}{suffix}")


def recover_partial_writes(directory: str | Path, every_owner_gone: bool = False) -> None:
    """Settle what dead writers (any, with ``every_owner_gone``: under a lock all writers hold)
    left in ``directory``: temporaries go, a directory moved aside whose replacement never landed
    is put back."""
    for entry, match in _dead_owners(directory, PARTIAL_WRITE, every_owner_gone):
        if not (match["kind"] == "old" and _put_back(entry, entry.with_name(match["name"]))):
            _remove(entry)


def _put_back(old: Path, target: Path) -> bool:
    """Rename ``old`` back to ``target`` unless ``target`` is there (its replacement landed)."""
    if os.path.lexists(target):
        return False
    try:
        os.rename(old, target)
    except OSError:  # another writer published target meanwhile
        return False
    return True


def write_dir_atomically(target: str | Path, build: Callable[[Path], object],
                         replace: bool = True) -> bool:
    """``build`` fills a temporary directory that is fsynced and renamed to ``target``: a reader,
    a kill or a power loss sees the old directory or the new one. Without ``replace`` the first
    complete publisher wins (a cache entry): False when ``target`` exists."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_partial_writes(target.parent)
    suffix = os.urandom(4).hex()
    tmp = partial_path(target, "tmp", suffix)
    tmp.mkdir()
    try:
        build(tmp)
        _fsync_tree(tmp)
        return _publish(tmp, target, partial_path(target, "old", suffix) if replace else None)
    finally:  # gone once published; else a failed, interrupted or losing write's copy
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path, old: Path | None) -> bool:
    """Rename ``tmp`` to ``target``, an existing one moved to ``old`` first (None: kept, False).
    Where the system swaps two names at once (Linux), an existing ``target`` and ``tmp`` are
    swapped: a kill at any moment leaves ``target`` whole, old or new (``tmp`` then holds the
    old one, which its writer removes)."""
    if old is None and os.path.lexists(target):
        return False  # kept: rename would replace an empty directory
    if old is not None and os.path.lexists(target) and _exchange(tmp, target):
        _fsync(target.parent)
        _remove(tmp)  # the old entry now (a link too, which rmtree leaves)
        return True
    replaced = old is not None and os.path.lexists(target)
    if replaced:
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException as err:
        if replaced and not _put_back(old, target):
            _remove(old)
        if old is None and getattr(err, "errno", None) in (errno.ENOTEMPTY, errno.EEXIST,
                                                          errno.ENOTDIR):
            return False  # another process published target first: its entry stays
        raise
    _fsync(target.parent)
    if replaced:
        _remove(old)
    return True


_RENAME_EXCHANGE = 2  # renameat2's flag: swap the two names
_AT_FDCWD = -100  # paths relative to the working directory


@cache
def _renameat2() -> Callable | None:
    """libc's renameat2 (Linux, glibc 2.28 or later), or None."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` in one step; False where the system or the filesystem
    cannot (then nothing moved)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def is_disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of room (the disk, or the user's quota)."""
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def _fsync_tree(root: Path) -> None:
    """fsync everything under ``root``: else a power loss can leave the new name over empty files."""
    for parent, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(Path(parent, name)):
                _fsync(Path(parent, name))
        _fsync(Path(parent))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WrittenAt(NamedTuple):
    """File content that ``write`` writes at the path it is given: for a writer that opens its
    file itself (gguf's)."""

    write: Callable[[Path], object]


# What write_atomic writes: text (as UTF-8), bytes, a function writing into the open binary file
# (a stream too large to hold in memory, such as model weights), or a ``WrittenAt``.
FileContent = str | bytes | Callable[[BinaryIO], object] | WrittenAt


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(value: object) -> str:
    """``value`` as JSON, its text as it is but for a lone surrogate (JSON carries one, as a
    loaded generation or problem can hold it; UTF-8 has none): that as its ``\\u`` escape, the
    form json.dumps's ASCII output gives it, so the text reads back the same."""
    text = json.dumps(value, ensure_ascii=False)
    return _SURROGATE.sub(lambda found: f"\\u{ord(found[0]):04x}", text)


def write_atomic(path: str | Path, data: FileContent) -> None:
    """Write ``data`` beside ``path`` and rename it over: a kill or a full disk leaves the old
    file whole."""
    write_atomic_files({path: data})


def write_atomic_files(files: Mapping[str | Path, FileContent]) -> None:
    """``write_atomic`` for files that belong together (weights and config): all are fsynced
    before the first rename (in the mapping's order), so a failed write changes none; its OSError
    names the file."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            remove_dead_owners(path.parent, re.escape(f".{path.name}.tmp-"))
            tmp = partial_path(path, "tmp")
            temps.append((path, tmp))  # from here on removed if anything fails
            with _naming(path, tmp):
                _write_temp(tmp, data)
        with stops_deferred():  # a Ctrl-C between two renames would leave a mixed set
            for path, tmp in temps:
                with _naming(path, tmp):
                    os.replace(tmp, path)
    except BaseException:
        for _, tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


def _write_temp(tmp: Path, data: FileContent) -> None:
    """Write ``data`` to ``tmp`` and fsync it."""
    if isinstance(data, WrittenAt):
        data.write(tmp)
        _fsync(tmp)
        return
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _naming(path: Path, tmp: Path) -> Iterator[None]:
    """Re-raise an OSError about the temporary file (or no file) as one about ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename in (None, str(tmp)):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise


MANIFEST_FILE = "manifest.json"  # each file's size and BLAKE3 digest, written last


_THREADED_IN: int | None = None  # the process whose BLAKE3 thread pool runs (a fork has none)


def file_digest(path: str | Path) -> str:
    """The BLAKE3 digest of a file's bytes: multithreaded, at about file-read speed; on one
    thread in a process forked after its parent hashed (its parent's pool is not there: waiting
    on it would hang)."""
    import blake3

    global _THREADED_IN
    if _THREADED_IN is None:
        _THREADED_IN = os.getpid()
    threads = blake3.blake3.AUTO if _THREADED_IN == os.getpid() else 1
    hasher = blake3.blake3(max_threads=threads)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def _manifest_entry(path: Path) -> dict:
    """What a manifest records of one file: its size and digest."""
    return {"bytes": path.stat().st_size, "blake3": file_digest(path)}


def write_manifest(directory: Path) -> None:
    """Record the size and digest of every file beneath ``directory`` in its manifest."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path != directory / MANIFEST_FILE:
            files[path.relative_to(directory).as_posix()] = _manifest_entry(path)
    write_atomic(directory / MANIFEST_FILE, json.dumps({"format_version": 1, "files": files},
                                                       indent=1))


def update_manifest(directory: Path, names: Iterable[str]) -> None:
    """Where ``directory`` holds a readable manifest: the entries of ``names`` (relative paths)
    recorded anew from the files as they are now, those no longer there dropped; the other
    entries kept as they are, so that a file changed by anyone else is still found."""
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):  # none, or unreadable: manifest_problem names the latter
        return
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return
    for name in names:
        file = directory / name
        if file.is_file():
            files[name] = _manifest_entry(file)
        else:
            files.pop(name, None)
    write_atomic(path, json.dumps(manifest, indent=1))


def manifest_problem(directory: Path, names: Sequence[str] | None = None,
                     sizes_only: bool = False) -> str | None:
    """Why ``directory``'s files (``names``, or all it lists) differ from its manifest, or None
    (``sizes_only``: their sizes, not their digests: a look that reads no file)."""
    unreadable = f"{MANIFEST_FILE} is not a readable manifest"
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except (OSError, ValueError):
        return unreadable
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
        return unreadable
    files = manifest.get("files")
    if not isinstance(files, dict):
        return unreadable
    for name in files if names is None else names:
        path, want = directory / name, files.get(name)
        if not isinstance(want, dict):
            return f"{name}: not in {MANIFEST_FILE}"
        if not path.is_file():
            return f"{name}: missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return (f"{name}: its bytes differ from those {MANIFEST_FILE} recorded ({size} "
                    f"bytes, not {want.get('bytes')})")
        if not sizes_only and file_digest(path) != want.get("blake3"):
            return f"{name}: its bytes differ from those {MANIFEST_FILE} recorded"
    return None


def os_error_message(e: OSError) -> str:
    """A file-system failure as one line naming the path (no traceback)."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {e.strerror}" if paths and e.strerror else str(e)
