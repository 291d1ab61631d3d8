"""codelm.runtime.process: what its pools report, its progress lines and its atomic writes."""

import json
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import pytest

from codelm.runtime import console, process


class PathError(Exception):
    """An error whose constructor takes two arguments: pickled, it cannot be rebuilt."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")


def _fails_unreadably(item: int) -> int:
    if item == 2:
        raise PathError("/data/f.py", "not UTF-8")
    return item


def test_a_worker_error_the_parent_cannot_rebuild_is_not_called_a_dead_worker():
    """A worker that raised an error the parent fails to unpickle did not die: the pool's error
    carries that cause, never WorkerDied's "out of memory? kill -9?"."""
    with pytest.raises(BrokenProcessPool) as err:
        with process.worker_pool(2) as pool:
            list(process.ordered_map(pool, _fails_unreadably, range(6), limit=4))
    assert not isinstance(err.value, process.WorkerDied)
    assert "PathError" in repr(err.value.__cause__) or "PathError" in str(err.value.__cause__)


class _BrokenAfterOneTask:
    """A pool whose first task failed for a reason its error carries, and which takes no more
    (as a process pool does once its manager has seen the failure)."""

    def __init__(self):
        self.sent = 0

    def submit(self, function, *args):
        self.sent += 1
        if self.sent > 1:
            raise BrokenProcessPool("the pool is not usable anymore")
        error = BrokenProcessPool("a task's result could not be read")
        error.__cause__ = ValueError("PathError: the worker's own error")
        future = Future()
        future.set_exception(error)
        return future


def test_a_pool_that_broke_while_tasks_were_out_gives_the_first_tasks_error():
    """A task sent after the pool broke meets a bare BrokenProcessPool; the map raises the
    error of the task sent first instead, whose cause says what broke it."""
    with pytest.raises(BrokenProcessPool) as err:
        list(process.ordered_map(_BrokenAfterOneTask(), abs, range(6), limit=4))
    assert "PathError" in str(err.value.__cause__)


def _no_tokenizer() -> None:
    raise RuntimeError("tokenizer file missing")


def test_a_worker_whose_initializer_raises_says_so_not_out_of_memory(capfd):
    """A pool whose workers cannot start (their initializer raised) is reported as that, its
    traceback on stderr; not as a worker killed for memory."""
    with pytest.raises(process.WorkerDied) as err:
        with process.worker_pool(1, _no_tokenizer) as pool:
            list(process.ordered_map(pool, abs, range(4), limit=2))
    assert "initializer raised" in str(err.value) and "out of memory" not in str(err.value)
    assert "tokenizer file missing" in capfd.readouterr().err


def test_a_heartbeat_counts_in_plain_figures():
    """Large counts read as numbers, not 1.23457e+06."""
    beat = console.Heartbeat("tokenize train", total=5_000_000, unit="text", clock=lambda: 90.0)
    beat.n = 1_234_567
    assert beat.line(90.0).startswith("tokenize train: 1234567/5000000 texts")
    beat.n = 2.5
    assert "2.5/5000000" in beat.line(90.0)


@pytest.mark.parametrize("text", ["{", "[]", '{"format_version": 2, "files": {}}',
                                  '{"format_version": 1, "files": []}', '{"format_version": 1}'])
def test_a_manifest_of_another_shape_is_named_unreadable_not_raised(tmp_path, text):
    """A manifest that is no JSON object, of another format version, or whose files are no
    mapping is named unreadable, under ``python -O`` too (the check asserts nothing)."""
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / process.MANIFEST_FILE).write_text(text)
    assert process.manifest_problem(tmp_path) == f"{process.MANIFEST_FILE} is not a readable manifest"


def test_a_manifest_records_a_nested_file_named_as_manifests_are(tmp_path):
    """Only the directory's own manifest is left out of it: a sub-directory's manifest.json is
    a file like any other, and a change to it is found."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "sub" / process.MANIFEST_FILE).write_text("{}")
    process.write_manifest(tmp_path)
    listed = json.loads((tmp_path / process.MANIFEST_FILE).read_text())["files"]
    assert sorted(listed) == ["a.bin", f"sub/{process.MANIFEST_FILE}"]
    (tmp_path / "sub" / process.MANIFEST_FILE).write_text('{"x": 1}')
    assert process.manifest_problem(tmp_path) is not None


@pytest.mark.parametrize("existing", ["empty directory", "file"])
def test_a_directory_written_without_replace_keeps_any_existing_target(tmp_path, existing):
    """replace=False: the first publisher wins, whatever the target is (an empty directory,
    which a rename would replace, or a file): False, the target as it was."""
    target = tmp_path / "entry"
    if existing == "file":
        target.write_text("kept")
    else:
        target.mkdir()
    published = process.write_dir_atomically(target, lambda d: (d / "f").write_text("new"),
                                             replace=False)
    assert published is False
    if existing == "file":
        assert target.read_text() == "kept"
    else:
        assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_process_forked_after_its_parent_hashed_hashes_on_its_own_thread(tmp_path):
    """BLAKE3's thread pool lives in the process that started it: a fork of a process that
    hashed (a test worker, a data worker) hashes on one thread and finishes, with the same
    digest, where waiting on the parent's pool would hang."""
    import multiprocessing

    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: BLAKE3 splits it across threads
    digest = process.file_digest(path)
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(
        target=lambda: queue.put(process.file_digest(path)))
    child.start()
    try:
        child.join(timeout=60)
        assert child.exitcode == 0 and queue.get(timeout=5) == digest
    finally:
        child.kill()
