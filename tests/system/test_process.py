"""process: how scripts stop (Ctrl-C, SIGTERM, SIGHUP) and write files whole."""

import signal
import subprocess
from pathlib import Path

import pytest

from codelm.runtime import process

ROOT = Path(__file__).resolve().parents[2]  # the repository: scripts import process from it

@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_is_an_interrupt_with_its_own_exit_code(name, code, capsys):
    """So is SIGHUP, a dropped SSH session's or closed terminal's (capsys: a hangup would point
    a terminal running pytest -s at /dev/null)."""
    import os
    import signal
    import time

    sig = signal.Signals[name]
    inherited = signal.signal(sig, signal.SIG_DFL)  # pytest under nohup ignores SIGHUP
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            with process.interrupt_on_sigterm():
                os.kill(os.getpid(), sig)
                time.sleep(5)  # not reached: the handler raises first
        assert signal.getsignal(sig) is signal.SIG_DFL  # put back
    finally:
        signal.signal(sig, inherited)
    assert process.interrupted_exit_code(stopped.value) == code
    assert process.stop_signal(stopped.value) == sig
    assert process.interrupted_exit_code(KeyboardInterrupt()) == 130  # Ctrl-C


def test_a_hangup_ignored_by_nohup_stays_ignored_under_interrupt_on_sigterm():
    """A SIGHUP ignored by nohup stays ignored inside interrupt_on_sigterm and stops_deferred and
    after them: a run started under nohup survives its terminal closing."""
    import os
    import signal

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with process.interrupt_on_sigterm():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
        with process.stops_deferred():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_hangup_points_a_terminal_at_dev_null_and_leaves_files_alone(tmp_path, monkeypatch):
    """A hung-up terminal fails every write (EIO), and os.isatty says False of it: the next
    print after a hangup would end a run before its checkpoint. Other output is left as it is."""
    import os
    import signal

    hung_up_side, hung_up = os.openpty()
    live_side, live = os.openpty()
    stdout, stderr = os.fdopen(hung_up, "w"), os.fdopen(live, "w")
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    os.close(hung_up_side)  # the terminal's other end goes away: the kernel hangs this one up
    with pytest.raises(OSError):
        os.write(hung_up, b"x")
    null = os.stat(os.devnull).st_rdev
    process.leave_terminal_on_hangup(signal.SIGTERM)  # no hangup: left as it is
    assert os.fstat(live).st_rdev != null and os.isatty(live)
    process.leave_terminal_on_hangup(signal.SIGHUP)
    assert os.fstat(hung_up).st_rdev == null and os.fstat(live).st_rdev == null
    print("the stop's message", file=stdout, flush=True)  # goes nowhere, and raises nothing
    log = open(tmp_path / "log", "w")  # noqa: SIM115 (closed below)
    monkeypatch.setattr("sys.stdout", log)
    process.leave_terminal_on_hangup(signal.SIGHUP)
    assert os.path.sameopenfile(log.fileno(), os.open(tmp_path / "log", os.O_RDONLY))
    for f in (stdout, stderr, log):
        f.close()
    os.close(live_side)


def test_a_hangup_leaves_a_pipe(monkeypatch):
    """``cmd 2>&1 | tee log`` over SSH: the hangup ends tee with the run, and every later write
    to the pipe fails (BrokenPipeError: the progress bar's next refresh), which would end the
    stop before its checkpoint."""
    import os
    import signal

    gone_r, gone_w = os.pipe()
    stdout = os.fdopen(gone_w, "w")
    monkeypatch.setattr("sys.stdout", stdout)
    os.close(gone_r)  # tee, ended by the same hangup
    process.leave_terminal_on_hangup(signal.SIGHUP)
    assert os.fstat(gone_w).st_rdev == os.stat(os.devnull).st_rdev
    print("the stop's message", file=stdout, flush=True)  # goes nowhere, and raises nothing
    stdout.close()


def test_each_stop_handler_leaves_a_hung_up_terminal_before_its_stop(monkeypatch):
    """interrupt_on_sigterm and stops_deferred each take a hangup: each points a hung-up stdout
    at /dev/null at once, before the stop's message or save writes to it (the start-up guard
    writes its one line, or fails to, and exits)."""
    import os
    import signal
    import time

    null = os.stat(os.devnull).st_rdev

    def hung_up_stdout():
        side, fd = os.openpty()
        stream = os.fdopen(fd, "w")
        monkeypatch.setattr("sys.stdout", stream)
        os.close(side)  # the terminal's other end goes away
        return stream

    before = {sig: signal.getsignal(sig) for sig in process.STOP_SIGNALS}
    streams = []
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # pytest under nohup: not ignored here
        streams.append(hung_up_stdout())
        with pytest.raises(KeyboardInterrupt, match="SIGHUP"):
            with process.interrupt_on_sigterm():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)  # not reached: the handler raises first
        assert os.fstat(streams[-1].fileno()).st_rdev == null
        taken = []
        signal.signal(signal.SIGHUP, lambda signum, frame: taken.append(signum))
        streams.append(hung_up_stdout())
        with process.stops_deferred():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)  # the handler has run by now
            assert os.fstat(streams[-1].fileno()).st_rdev == null and taken == []
        assert taken == [signal.SIGHUP]  # landed on leaving
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for stream in streams:
            stream.close()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_forked_worker_ends_on_sigterm_without_a_traceback(capfd, name):
    """A fork pool's worker that gets SIGTERM or SIGHUP dies of that signal, with no traceback: the
    parent's handler it inherits does not turn it into a KeyboardInterrupt."""
    # multiprocessing ends a fork pool's workers with SIGTERM: a worker must die of it, not raise
    # the parent's KeyboardInterrupt (a traceback per worker). A hangup's SIGHUP: dies of that.
    import multiprocessing
    import os
    import signal
    import time

    sig = signal.Signals[name]

    def worker():
        os.kill(os.getpid(), sig)
        time.sleep(5)

    inherited = signal.signal(sig, signal.SIG_DFL)  # pytest under nohup ignores SIGHUP
    try:
        with process.interrupt_on_sigterm():
            child = multiprocessing.get_context("fork").Process(target=worker)
            child.start()
            child.join()
    finally:
        signal.signal(sig, inherited)
    assert child.exitcode == -sig
    assert "Traceback" not in capfd.readouterr().err


def _signal_dispositions(_) -> tuple:
    return tuple(signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))


def test_pool_workers_take_sigterm_at_its_default_and_leave_stops_of_the_group_to_the_parent():
    """A worker with a Python SIGTERM handler (inherited from a parent under
    interrupt_on_sigterm) misses a SIGTERM landing between a lock's quick try and its blocking
    wait, and the pool's terminate then waits for it for ever: workers take SIGTERM at its
    default. Ctrl-C and a hangup reach the whole group: workers ignore them, the parent ends
    the pool."""
    with process.interrupt_on_sigterm(), process.worker_pool(2) as pool:
        seen = list(pool.map(_signal_dispositions, range(4)))
    assert set(seen) == {(signal.SIG_DFL, signal.SIG_IGN, signal.SIG_IGN)}


def _blocked_at_start(path: Path, real_start):
    """A pool worker's start that first writes which stop signals the worker was forked with
    blocked."""
    def start(initializer, initargs):
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        path.write_text(" ".join(sorted(signal.Signals(s).name for s in blocked)))
        real_start(initializer, initargs)
    return start


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks")
def test_pool_workers_are_forked_with_the_stop_signals_blocked(tmp_path, monkeypatch):
    """A SIGTERM that reaches a worker while its fork still returns would be caught by the
    parent's handler and cleared by Python's after-fork reset: lost, and the pool's terminate
    would wait for the worker for ever. Workers start with the stop signals blocked, unblocked
    once SIGTERM is at its default (then a pending one ends them); the parent's mask is
    unchanged."""
    marker = tmp_path / "blocked"
    monkeypatch.setattr(process, "_worker_start", _blocked_at_start(marker, process._worker_start))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with process.worker_pool(1) as pool:
        blocked_in_worker = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result()
    assert marker.read_text() == "SIGHUP SIGINT SIGTERM"
    assert not {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} & set(blocked_in_worker)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def _mark_then_sleep(path: Path) -> None:
    import time

    path.touch()
    time.sleep(600)


def test_a_pool_is_joined_after_its_work_and_terminated_on_an_error(tmp_path):
    """Leaving the pool's context after its work: every worker took its last task and exited
    (code 0); on an exception: the workers are ended at once, in the middle of their tasks."""
    import time

    with process.worker_pool(2) as pool:
        assert list(pool.map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]
        workers = list(pool._processes.values())
    assert [worker.exitcode for worker in workers] == [0, 0]
    started = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(RuntimeError), process.worker_pool(2) as pool:
        for path in started:
            pool.submit(_mark_then_sleep, path)
        workers = list(pool._processes.values())
        deadline = time.monotonic() + 60
        while not all(path.exists() for path in started):  # both workers are in a task
            assert time.monotonic() < deadline
            time.sleep(0.01)
        raise RuntimeError("the consumer failed")
    assert [worker.exitcode for worker in workers] == [-signal.SIGTERM] * 2


_POOLS_UNDER_LOAD = """
import sys
from codelm.runtime import process

def stop_early(pool):
    for n in process.ordered_map(pool, abs, range(1000), 8, chunksize=4):
        if n == 500:
            raise ValueError(n)

with process.interrupt_on_sigterm():  # the handlers a script's pools are started under
    for round in range(int(sys.argv[1])):
        try:
            with process.worker_pool(2) as pool:
                if round % 2:
                    stop_early(pool)
                else:
                    sum(process.ordered_map(pool, abs, range(1000), 8, chunksize=4))
        except ValueError:
            pass
print("done", flush=True)
"""


@pytest.mark.parametrize("rounds", [20, pytest.param(40, marks=pytest.mark.slow)])
def test_pools_started_and_ended_many_times_under_cpu_burners_never_hang(rounds):
    """Pools ended after their work and on an error, ``rounds`` times (half each way) while 3
    processes burn the CPU (a busy machine widens every race): the script ends, within a
    generous watchdog."""
    import sys

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        done = subprocess.run([sys.executable, "-c", _POOLS_UNDER_LOAD, str(rounds)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr


_KILLED_WORKER = """
import os, signal
from codelm.runtime import process

def work(n):
    if n == 37:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return n

try:
    with process.worker_pool(2) as pool:
        workers = list(pool._processes.values())
        print(sum(process.ordered_map(pool, work, range(200), 8, chunksize=4)))
except process.WorkerDied as died:
    print(isinstance(died, OSError), sorted(w.exitcode for w in workers), flush=True)
    print(died)
"""


def test_a_worker_killed_in_a_task_fails_the_pool_with_one_error_instead_of_a_wait():
    """A killed worker's tasks never return: the pool's results raise WorkerDied (an OSError,
    so a script prints its one line), naming the signal, and every worker is ended; the
    script ends within a generous watchdog."""
    import sys

    done = subprocess.run([sys.executable, "-c", _KILLED_WORKER], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    handled, message = done.stdout.splitlines()
    assert handled.startswith("True [") and f"-{signal.SIGKILL.value}" in handled
    assert "None" not in handled
    assert "SIGKILL" in message and "again" in message


def _count_taken(items, taken: list):
    for item in items:
        taken.append(item)
        yield item


def test_ordered_map_keeps_the_order_and_takes_items_only_up_to_its_limit_ahead():
    """Results come in the items' order; before the first result is taken, the items sent cost
    the limit (here two chunks of four), not the whole input."""
    taken: list[int] = []
    with process.worker_pool(2) as pool:
        results = process.ordered_map(pool, abs, _count_taken(range(0, -100, -1), taken), 8,
                                      chunksize=4)
        assert next(results) == 0
        assert len(taken) == 8
        assert list(results) == list(range(1, 100))
        costly = process.ordered_map(pool, len, _count_taken(["a" * 5, "b", "c"], taken := []),
                                     5, cost=len)
        assert next(costly) == 5 and taken == ["a" * 5]  # a large item goes alone
        assert list(costly) == [1, 1]


_POOL_PARENT = """
import os, sys, time
from codelm.runtime import process

def pid(_):
    time.sleep(0.5)  # the other worker takes the second task
    return os.getpid()

with process.worker_pool(2) as pool:
    print(*pool.map(pid, range(2)), flush=True)
    time.sleep(600)  # killed here
"""


def test_pool_workers_end_when_their_parent_is_killed():
    """kill -9 runs no cleanup in the parent: its pool's workers see it gone and end, within
    seconds, instead of waiting on the pool's queue for ever."""
    import os
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from procs import exited

    parent = subprocess.Popen([sys.executable, "-c", _POOL_PARENT], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        assert len(set(workers)) == 2, workers
        parent.kill()
        parent.wait(timeout=60)
        deadline = time.monotonic() + 60  # a bound for a loaded machine; it takes about 1 s
        while not all(exited(pid) for pid in workers):
            assert time.monotonic() < deadline, "pool workers outlived their parent"
            time.sleep(0.05)
    finally:
        for pid in workers:
            if not exited(pid):
                os.kill(pid, signal.SIGKILL)


def test_only_dead_processes_of_this_machine_and_pid_namespace_are_dead_owners():
    """An owner tag is dead only where its process is gone on this machine in this PID namespace:
    another machine's or container's process may live, so its lock or temp is kept."""
    import os
    import re
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pattern = re.compile(process.OWNER_PATTERN)
    tag = process.owner_tag()
    pid, host, ns, _ = tag.split("@")
    assert int(pid) == os.getpid() and host == socket.gethostname()

    def dead_owner(name: str) -> bool:
        return process.owner_is_dead(pattern.fullmatch(name))

    assert dead_owner(f"{dead}@{host}@{ns}@")
    assert not dead_owner(tag)  # this process
    assert not dead_owner(f"{dead}@other-{host}@{ns}@")  # another machine's
    assert not dead_owner(f"{dead}@{host}@{ns}9@")  # a container's: its PIDs are not ours


def test_write_atomic_removes_what_killed_writers_left_never_a_live_writers_temp(tmp_path):
    """The next atomic write of a file removes the temp a killed writer left and keeps a live
    writer's temp, so killed runs leave no litter and a concurrent write is never broken."""
    # SIGKILL runs no cleanup: a writer killed mid-write leaves its temp. Temp names carry the
    # owner tag, and the next write of the file removes dead owners' temps only.
    import multiprocessing
    import os
    import signal

    target = tmp_path / "results.json"

    def killed_writer():
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # written, not yet renamed
        process.write_atomic(target, "half")

    child = multiprocessing.get_context("fork").Process(target=killed_writer)
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    [left] = tmp_path.iterdir()
    assert left.name.startswith(f".results.json.tmp-{child.pid}@")
    _, host, ns, _ = process.owner_tag().split("@")
    live = tmp_path / f".results.json.tmp-{os.getppid()}@{host}@{ns}@"  # this test's parent's
    live.write_text("another worker is writing")
    process.write_atomic(target, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "results.json"]
    assert target.read_text() == "whole"


def test_write_atomic_files_replace_none_of_a_set_when_one_write_fails(tmp_path):
    """Files that belong together (weights and their config) are all written before the first is
    renamed: a full disk on the last leaves every earlier file as it was, and no temp behind.
    Content may be a function that streams into the file (weights too large for memory)."""
    import errno

    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(b"old weights")
    config.write_text("old config")

    def disk_full(f) -> None:
        f.write(b"half a config")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        process.write_atomic_files({weights: lambda f: f.write(b"new weights"),
                                      config: disk_full})
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(config))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (weights.read_bytes(), config.read_text()) == (b"old weights", "old config")
    process.write_atomic_files({weights: lambda f: f.write(b"new weights"),
                                  config: "new config"})
    assert (weights.read_bytes(), config.read_text()) == (b"new weights", "new config")


def test_a_file_its_writer_opens_itself_is_written_whole_or_not_at_all(tmp_path):
    """``WrittenAt``: a library that opens its output by path (gguf's writer) writes at the
    temporary name, and any exception it raises, not only a stop, removes that file."""
    out = tmp_path / "model.gguf"
    seen = []

    def write(path: Path) -> None:
        seen.append(path.name)
        path.write_bytes(b"header")
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        process.write_atomic_files({out: process.WrittenAt(write), tmp_path / "Modelfile": "F"})
    assert seen == [f".model.gguf.tmp-{process.owner_tag()}"]
    assert list(tmp_path.iterdir()) == []
    process.write_atomic(out, process.WrittenAt(lambda path: path.write_bytes(b"whole")))
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert out.read_bytes() == b"whole"


def test_write_dir_atomically_replaces_or_lets_the_first_publisher_win(tmp_path):
    """One home for directory publishing: trainingmanager replaces its checkpoints, best/ and
    export/; a cache entry (dataset, the tokenizer cache) is published once, and a concurrent
    builder's copy of the same key is discarded."""
    target = tmp_path / "entry"
    assert process.write_dir_atomically(target, lambda d: (d / "a").write_text("1"))
    assert process.write_dir_atomically(target, lambda d: (d / "a").write_text("2"))
    assert (target / "a").read_text() == "2"

    def raced(d: Path) -> None:
        (d / "a").write_text("loser")
        process.write_dir_atomically(target, lambda d: (d / "a").write_text("winner"))

    assert not process.write_dir_atomically(target, raced, replace=False)
    assert (target / "a").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    fresh = tmp_path / "deeper" / "fresh"
    assert process.write_dir_atomically(fresh, lambda d: (d / "a").write_text("1"),
                                          replace=False)
    assert (fresh / "a").read_text() == "1"


def test_replacing_a_directory_whose_new_copy_fails_to_land_puts_the_old_one_back(tmp_path,
                                                                                 monkeypatch):
    """Where no swap of two names is to be had: the old copy is moved aside, then the new one's
    rename fails (an I/O error, a Ctrl-C): the old copy is back under its name and nothing else
    is left beside it."""
    import errno
    import os

    target = tmp_path / "entry"
    process.write_dir_atomically(target, lambda d: (d / "a").write_text("old"))
    monkeypatch.setattr(process, "_exchange", lambda a, b: False)
    rename = os.rename

    def failing(src, dst):
        if ".entry.tmp-" in Path(src).name:  # the new copy's rename, after the move aside
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    for _ in range(2):  # the second sees a clean directory: nothing was left to settle
        with pytest.raises(OSError, match="Input/output error"):
            process.write_dir_atomically(target, lambda d: (d / "a").write_text("new"))
        assert (target / "a").read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_a_replaced_directory_is_swapped_in_one_step_so_no_moment_lacks_it(tmp_path,
                                                                          monkeypatch):
    """On Linux the new copy and the old trade names at once (renameat2 RENAME_EXCHANGE): a
    kill at any moment leaves the target whole, old or new (no rename that moves the old copy
    aside runs), and the old copy goes with the temporary."""
    import os

    if process._renameat2() is None:
        pytest.skip("no renameat2 here")
    target = tmp_path / "entry"
    process.write_dir_atomically(target, lambda d: (d / "a").write_text("old"))

    def no_rename(src, dst):
        raise AssertionError(f"rename {src} -> {dst}: a moment without {target.name}")

    monkeypatch.setattr(os, "rename", no_rename)
    assert process.write_dir_atomically(target, lambda d: (d / "a").write_text("new"))
    assert (target / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_recover_partial_writes_settles_dead_owners_only(tmp_path):
    """A dead writer's temp is removed and the directory it had moved aside put back when its
    replacement never landed (else removed); a live writer's names, and another machine's, are
    left, unless every owner is known to be gone (under a lock all writers hold)."""
    import os
    import socket
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    _, host, ns, _ = process.owner_tag().split("@")
    assert host == socket.gethostname()
    dead_tag, live_tag = f"{dead}@{host}@{ns}@ab12", f"{os.getppid()}@{host}@{ns}@cd34"
    names = {
        f".lost.old-{dead_tag}": "put back",  # killed between its two renames
        f".landed.old-{dead_tag}": "removed",  # killed after the new copy landed
        "landed": "new",
        f".landed.tmp-{dead_tag}": "removed",
        f".landed.tmp-{live_tag}": "kept",
        f".landed.tmp-{dead}@other-{host}@{ns}@": "kept",
    }
    for name, text in names.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "a").write_text(text)
    (tmp_path / f".f.json.tmp-{dead_tag}").write_text("half")
    process.recover_partial_writes(tmp_path)
    left = {p.name: (p / "a").read_text() for p in tmp_path.iterdir()}
    assert left == {"lost": "put back", "landed": "new", f".landed.tmp-{live_tag}": "kept",
                    f".landed.tmp-{dead}@other-{host}@{ns}@": "kept"}
    process.recover_partial_writes(tmp_path, every_owner_gone=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landed", "lost"]


def test_write_dir_atomically_syncs_the_tree_before_the_rename(tmp_path, monkeypatch):
    """Every file and directory of the new copy (nested ones too) reaches the disk before its
    name does, and the rename itself after (its parent directory)."""
    import os

    events: list[str] = []
    fsync, rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        Path(os.readlink(f"/proc/self/fd/{fd}")).name), fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), rename(a, b))[1])

    def build(d: Path) -> None:
        (d / "sub").mkdir()
        (d / "sub" / "b").write_text("b")
        (d / "a").write_text("a")

    process.write_dir_atomically(tmp_path / "out" / "entry", build)
    tmp = next(e for e in events if e.startswith(".entry.tmp-"))
    assert sorted(events[:4]) == sorted(["a", "b", "sub", tmp]) and events[3] == tmp
    assert events[4:] == ["rename", "out"]


def test_an_owner_another_user_runs_is_alive(monkeypatch):
    """os.kill(pid, 0) on another user's live process raises PermissionError: its temp files
    must be kept, not removed as a dead owner's."""
    import os
    import re

    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_permitted)
    match = re.fullmatch(process.OWNER_PATTERN, "1@" + process.owner_tag().split("@", 1)[1])
    assert match and not process.owner_is_dead(match)


def test_remove_dead_owners_removes_a_dead_owners_directories_and_files_only(tmp_path):
    """What a killed process left under its owner tag goes, directories too (a killed
    scraper's clone), through ``remove_dir`` when given; a live owner's entry stays."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _, host, ns, _ = process.owner_tag().split("@")
    dead_dir = tmp_path / f"clone-{dead}@{host}@{ns}@a"
    live_dir = tmp_path / f"clone-{os.getpid()}@{host}@{ns}@b"
    for d in (dead_dir, live_dir):
        d.mkdir()
        (d / "f.py").write_text("x")
    (tmp_path / f"clone-{dead}@{host}@{ns}@c.txt").write_text("half")
    other = tmp_path / f"other-{dead}@{host}@{ns}@d"
    other.mkdir()
    process.remove_dead_owners(tmp_path, "clone-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_dir.name, other.name])
    removed = []
    process.remove_dead_owners(tmp_path, "other-", remove_dir=removed.append)
    assert removed == [other]


def test_write_atomic_files_renames_in_the_mappings_order(tmp_path, monkeypatch):
    """The renames go in the mapping's order (the config after the weights it describes), so
    a kill between two renames leaves new weights under an old config, never the reverse."""
    import os

    landed: list[str] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (landed.append(Path(b).name), replace(a, b))[1])
    files = {tmp_path / "z.safetensors": b"w", tmp_path / "a.json": "{}", tmp_path / "m": "m"}
    process.write_atomic_files(files)
    assert landed == ["z.safetensors", "a.json", "m"]


@pytest.mark.parametrize("swaps", [True, False], ids=["swap", "two-renames"])
def test_replacing_a_directory_syncs_its_parent_after_the_rename(tmp_path, monkeypatch, swaps):
    """Replacing an existing directory: the new copy's rename (a swap of the two names where
    the system has one, else two renames) reaches the disk (its parent directory is fsynced)
    before the old copy is removed."""
    import os

    target = tmp_path / "out" / "entry"
    process.write_dir_atomically(target, lambda d: (d / "a").write_text("1"))
    events: list[str] = []
    fsync, rename, exchange = os.fsync, os.rename, process._exchange
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        Path(os.readlink(f"/proc/self/fd/{fd}")).name), fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), rename(a, b))[1])
    monkeypatch.setattr(process, "_exchange", lambda a, b: (
        events.append("swap"), swaps and exchange(a, b))[1])
    process.write_dir_atomically(target, lambda d: (d / "a").write_text("2"))
    if swaps and process._renameat2() is not None:
        assert events[-2:] == ["swap", "out"]
    else:
        assert events[-3:] == ["rename", "rename", "out"]
    assert (target / "a").read_text() == "2"
    assert os.listdir(target.parent) == ["entry"]


def test_write_dir_atomically_publishes_a_dangling_symlink_as_a_link(tmp_path):
    """Links in the new copy are published as they are, not followed (a dangling one, which
    an fsync through it could not open, included)."""
    import os

    def build(d: Path) -> None:
        (d / "a").write_text("a")
        os.symlink("a", d / "to-a")
        os.symlink("missing", d / "dangling")

    target = tmp_path / "entry"
    assert process.write_dir_atomically(target, build)
    assert os.readlink(target / "dangling") == "missing" and (target / "to-a").read_text() == "a"


def _raise_system_exit(code: int):
    """``os._exit`` for a test calling the start-up guard's handler in pytest's own process."""
    raise SystemExit(code)


def test_start_up_stops_keep_an_ignored_signal_and_run_main_puts_the_handlers_back(monkeypatch):
    """A signal the parent ignores (``cmd &``) stays ignored through start-up; a Ctrl-C while
    the imports load exits 130; main runs under the handlers the process started with."""
    import os
    import signal

    before = {sig: signal.getsignal(sig) for sig in process.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup's
        process.quiet_start_up_stops(quiet=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        monkeypatch.setattr(os, "_exit", _raise_system_exit)
        with pytest.raises(SystemExit) as stopped:
            signal.getsignal(signal.SIGTERM)(signal.SIGINT, None)
        assert stopped.value.code == 130
        seen = process.run_main(lambda: (signal.getsignal(signal.SIGINT),
                                           signal.getsignal(signal.SIGTERM),
                                           signal.getsignal(signal.SIGHUP)))
        assert seen == (signal.SIG_IGN, signal.SIG_DFL, signal.SIG_IGN)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_write_dir_atomically_replaces_a_dangling_symlink_at_the_target(tmp_path):
    """A target that is a link to nothing (a removed cache, say) is replaced by the new
    directory, not renamed onto (which fails: a directory cannot replace a non-directory)."""
    import os

    target = tmp_path / "entry"
    os.symlink("gone", target)
    assert process.write_dir_atomically(target, lambda d: (d / "a").write_text("1"))
    assert not target.is_symlink() and (target / "a").read_text() == "1"
    assert os.listdir(tmp_path) == ["entry"]  # the link moved aside is gone too


@pytest.fixture
def ctrl_c_raises():
    """SIGINT at Python's own handler (KeyboardInterrupt) whatever pytest inherited: started with
    SIGINT ignored (`nohup pytest ... &` in a script), Python installs none, and a test's Ctrl-C
    is ignored, as process keeps an ignored signal ignored."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_stop_within_stops_deferred_lands_on_leaving_whole_work_done(ctrl_c_raises):
    """A signal to the process (its kernel may hand it to any thread) waits for the block's end,
    then lands as the handler in place before takes it: here Ctrl-C's KeyboardInterrupt."""
    import os
    import signal
    import time

    done = []
    with pytest.raises(KeyboardInterrupt):
        with process.stops_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now
            done.append("saved")
    assert done == ["saved"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_reader_that_stops_reading_ends_a_script_quietly():
    """`python tokenizer.py ... | head`: exit 1 and nothing on stderr, not a BrokenPipeError
    traceback (and a second one when Python flushes stdout at exit)."""
    import subprocess
    import sys

    script = ("import sys\n"
              "from codelm.runtime import process\n"
              "sys.exit(process.run_main(lambda: process.run_tool(\n"
              "    lambda: [print('x' * 100) for _ in range(10**6)])))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"x" * 100 + b"\n"
    proc.stdout.close()
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""


_SWALLOWING_IMPORT = """
import atexit, os, signal, sys
from codelm.runtime import process
process.quiet_start_up_stops()
atexit.register(lambda: print("exit handler ran"))
try:  # an extension's init that clears any error, as torch's of numpy does
    os.kill(os.getpid(), signal.SIGINT)
except BaseException:
    pass
sys.exit(process.run_main(lambda: print("main ran")))
"""


def test_a_stop_at_start_up_ends_the_script_even_where_the_import_swallows_errors():
    """A Ctrl-C while torch loads ends the process there, although a SystemExit raised into the
    import under way would be cleared by torch's numpy init (the script running on) or abort
    pybind11 with a C++ dump."""
    import sys

    from procs import popen

    proc = popen([sys.executable, "-c", _SWALLOWING_IMPORT], cwd=ROOT, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "interrupted while starting: nothing was "
                                           "written\n")


def test_a_ctrl_c_between_the_renames_of_a_set_lands_after_the_last(tmp_path, monkeypatch,
                                                                  ctrl_c_raises):
    """Ctrl-C (or SIGTERM under interrupt_on_sigterm) right after the weights' rename must not
    leave them under the previous config: the set is renamed whole, then the stop lands."""
    import os
    import signal

    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    process.write_atomic_files({weights: b"old weights", config: "old config"})
    replace = os.replace

    def replace_then_ctrl_c(src, dst):
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        process.write_atomic_files({weights: b"new weights", config: "new config"})
    assert (weights.read_bytes(), config.read_text()) == (b"new weights", "new config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


_ORPHAN = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from codelm.runtime import process
if sys.argv[2] == "ignore":  # a child that never answers SIGTERM: SIGKILL ends it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
process.exit_with_parent(os.getppid(), poll_s=0.05, grace_s=0.5)
print("ready", flush=True)
time.sleep(600)
"""

_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]],
                         start_new_session=True, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize("answer", ["sigterm", "ignore"])
def test_a_child_dies_with_its_parent_even_after_kill_9(answer):
    """A sweep worker in a session of its own outlives its main process's kill -9 unless it
    watches it: exit_with_parent ends it (SIGTERM, or SIGKILL when that is ignored) once its
    parent is gone, within seconds."""
    import signal
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from procs import exited

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _ORPHAN, str(ROOT), answer],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
        deadline = time.monotonic() + 60  # a bound for a loaded machine; it takes well under 1 s
        while not exited(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        if not exited(child):
            import os

            os.kill(child, signal.SIGKILL)


_MIXED_STOPS = """
import os, signal, sys, time
from codelm.runtime import process

def work():
    try:
        os.kill(os.getpid(), signal.SIG{first})
        time.sleep(60)  # not reached: the stop raises first
    finally:
        os.kill(os.getpid(), signal.SIG{second})  # another stop while the cleanup runs
        with open(sys.argv[1], "w") as f:  # a file: a hangup sends stdout to /dev/null
            f.write("cleanup done")

sys.exit(process.run_main(lambda: process.run_tool(work)))
"""


@pytest.mark.parametrize("first, second, code", [("TERM", "HUP", 143), ("TERM", "TERM", 143),
                                                 ("INT", "TERM", 130), ("HUP", "TERM", 129)])
def test_a_stop_during_the_cleanup_of_another_leaves_its_cleanup_and_exit_code(first, second,
                                                                               code, tmp_path):
    """TERM, then HUP while its finally blocks run (a scheduler's second signal, a terminal
    closing): the cleanup completes and the exit code is the first stop's."""
    import sys

    script = _MIXED_STOPS.format(first=first, second=second)
    done = tmp_path / "done"
    # SIGHUP handled by default in the child even where the suite runs under nohup (which
    # ignores it, and an ignored SIGHUP stays ignored)
    proc = subprocess.run([sys.executable, "-c", script, str(done)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    assert proc.returncode == code, proc.stderr
    assert done.read_text() == "cleanup done"


_STOP_AT_EXIT = """
import atexit, os, signal, sys, time
from codelm.runtime import process

def exit_handler():  # another library's, run after run_main's own
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)  # not reached: the Ctrl-C ends the process

def main():
    atexit.register(exit_handler)
    return 3

sys.exit(process.run_main(main))
"""


def test_a_ctrl_c_during_the_exit_ends_the_process_quietly_with_mains_code():
    """A second Ctrl-C while the interpreter runs its exit handlers: the process ends at once
    with main's exit code, not with a KeyboardInterrupt printed from inside an exit handler."""
    import sys

    proc = subprocess.run([sys.executable, "-c", _STOP_AT_EXIT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3
    assert "Exception ignored" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
