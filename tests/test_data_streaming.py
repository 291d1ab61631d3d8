"""dataset.py's streaming preparation: the corpus, the lm task's token files and the supervised
tasks' examples built in shards, the same bytes whatever the worker count or the shard size, an
interrupted build continued after its whole shards, and memory bounded by a shard, not by the
corpus. References: a build in one shard, a one-worker build, and the tokenizer's own encode of
every text."""

import ast
import dataclasses
import faulthandler
import json
import multiprocessing
import os
import shutil
import signal
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import test_chat

import dataset
from codelm.data import shards
from codelm.data.config import DataConfig
from codelm.data.encoding import packed_document
from codelm.data.sources import stdlib_root
from codelm.data.splits import corpus_key, load_corpus
from codelm.runtime import console, process
from codelm.tokenization.batching import BatchEncoder
from dataset import prepare
from tokenizer import CodeTokenizer, load_tokenizer

EMAIL = stdlib_root() / "email"  # 29 real stdlib files, about 380 KB


@pytest.fixture
def source(email_with_drops) -> Path:
    return email_with_drops


@pytest.fixture(scope="module")
def tokenizer() -> CodeTokenizer:
    return CodeTokenizer.train(p.read_text("utf-8") for p in sorted(EMAIL.glob("*.py")))


def config(cache: Path, src: Path, **kw) -> DataConfig:
    return DataConfig(sources=[str(src)], cache_dir=str(cache), progress=False, **kw)


def entry_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a cache entry but its counts (meta.json, stats.json) and the manifest
    that records them, by name."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.name not in ("meta.json", "stats.json", "manifest.json")}


def small_shards(monkeypatch, docs: int = 4, chars: int = 40_000) -> None:
    """Shards of a few documents, and cleaning workers started after the first 50 KB."""
    monkeypatch.setattr(shards, "SHARD_DOCS", docs)
    monkeypatch.setattr(dataset, "TOKEN_SHARD_CHARS", chars)
    monkeypatch.setattr(shards, "POOL_AFTER_BYTES", 50_000)


def test_one_and_two_workers_and_any_shard_size_write_the_same_bytes(tmp_path, source, tokenizer,
                                                                     monkeypatch):
    """The corpus entry and the lm token files: identical at 1 and 2 workers in small shards,
    and to a build in one shard; the token file is the tokenizer's encode of each text, packed."""
    whole = prepare(config(tmp_path / "whole", source), tokenizer)
    small_shards(monkeypatch)
    one = prepare(config(tmp_path / "one", source, num_workers=1), tokenizer)
    two = prepare(config(tmp_path / "two", source, num_workers=2), tokenizer)
    corpus = {name: load_corpus(config(tmp_path / name, source))
              for name in ("whole", "one", "two")}
    corpus_dirs = {name: Path(c.train.path).parent for name, c in corpus.items()}
    assert entry_bytes(corpus_dirs["one"]) == entry_bytes(corpus_dirs["two"]) == entry_bytes(
        corpus_dirs["whole"])
    assert corpus["one"].stats == corpus["two"].stats
    dropped = corpus["one"].stats["dropped"]
    assert dropped["duplicate"] == 2 and dropped["too_few_lines"] == dropped["too_large"] == 1
    assert entry_bytes(one.cache_path) == entry_bytes(two.cache_path) == entry_bytes(
        whole.cache_path)
    for split in ("train", "val", "test"):
        texts = corpus["one"].texts(split)
        expected = [t for text in texts
                    for t in packed_document(tokenizer, tokenizer.encode(text))]
        got = np.fromfile(one.cache_path / f"{split}.bin", dtype=one.stats["task"]["dtype"])
        assert got.tolist() == expected
    assert not list(tmp_path.glob("*/*.shards"))  # the shards go once the entry is published


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, module, name: str, n: int) -> list:
    """Make ``module.<name>`` raise on its call number ``n + 1``; the calls' first arguments."""
    real = getattr(module, name)
    calls: list = []

    def counted(*args, **kwargs):
        if len(calls) == n:
            raise Interrupted
        calls.append(args[1] if name == "_write_shard" else args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_an_interrupted_corpus_build_continues_after_its_whole_shards(tmp_path, source,
                                                                      monkeypatch):
    """Stopped after 3 shards, the next build writes only the shards after them (the first are
    the same files, untouched), and its entry and counts equal an uninterrupted build's."""
    small_shards(monkeypatch)
    reference = load_corpus(config(tmp_path / "ref", source, num_workers=2))
    c = config(tmp_path / "cache", source, num_workers=2)
    real = shards._write_shard
    interrupt_after(monkeypatch, shards, "_write_shard", 3)
    with pytest.raises(Interrupted):
        load_corpus(c)
    work = next((tmp_path / "cache").glob("corpus-*.shards"))
    assert sorted(p.name for p in work.glob("*.json")) == [
        "shard-00000.json", "shard-00001.json", "shard-00002.json"]
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.iterdir()}
    written = []

    def check_and_write(directory, shard):
        now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.iterdir()
               if p.name in first}
        assert now == first  # the whole shards are the same files, not written again
        written.append(shard.index)
        return real(directory, shard)

    monkeypatch.setattr(shards, "_write_shard", check_and_write)
    corpus = load_corpus(c)
    assert written[0] == 3 and len(written) > 3
    assert entry_bytes(Path(corpus.train.path).parent) == entry_bytes(
        Path(reference.train.path).parent)
    assert {**corpus.stats, "cache_hit": None} == {**reference.stats, "cache_hit": None}
    assert not work.exists()


def test_the_read_and_clean_lines_count_the_records_read_fresh_or_continued(tmp_path,
                                                                           monkeypatch, capsys):
    """The read-and-clean phase's lines (bar hidden; a line at each update here: HEARTBEAT_S 0)
    end at the files and records the corpus's stats say were read, malformed records skipped
    (skip_bad) among them, in a fresh build and in one continued after whole shards."""
    monkeypatch.setattr(console, "HEARTBEAT_S", 0)
    records = [{"repo": f"r{i % 5}", "path": f"f{i}.py", "text": f"def f{i}(x):\n    return x\n"}
               for i in range(40)]
    lines = ["{bad" if i % 4 == 0 else json.dumps(r) for i, r in enumerate(records)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    small_shards(monkeypatch)

    def read_and_clean_lines(c: DataConfig) -> tuple[list[str], int]:
        capsys.readouterr()
        corpus = load_corpus(c)
        err = capsys.readouterr().err.splitlines()
        counts = [line.split(",")[0] for line in err if line.startswith("read and clean: ")]
        return counts, corpus.stats["read"]["files"]

    options = {"sources": [str(tmp_path / "a.jsonl")], "skip_bad": True, "progress": False}
    counts, read = read_and_clean_lines(DataConfig(cache_dir=str(tmp_path / "ref"), **options))
    assert read == 40 and counts[-1] == "read and clean: 40 files"
    c = DataConfig(cache_dir=str(tmp_path / "cache"), **options)
    real = shards._write_shard
    interrupt_after(monkeypatch, shards, "_write_shard", 3)
    with pytest.raises(Interrupted):
        load_corpus(c)
    monkeypatch.setattr(shards, "_write_shard", real)
    counts, read = read_and_clean_lines(c)
    assert read == 40 and counts[-1] == "read and clean: 40 files"


def _killing_on(name: str, real, cache: Path):
    """shards.clean_one that, in a worker, kills its own process on the document ``name`` (as
    the out-of-memory killer would) once the build has written its first whole shard under
    ``cache`` (waited for: the kill comes after a shard, whatever the workers' pace), else
    cleans."""
    def clean(item):
        if item[0].id.endswith(name) and multiprocessing.parent_process() is not None:
            deadline = time.monotonic() + 120
            while (not any(cache.glob("corpus-*.shards/shard-00000.json"))
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(item)
    return clean


def test_a_cleaning_worker_killed_mid_build_ends_the_build_with_one_error_and_a_rerun_finishes(
        tmp_path, source, monkeypatch):
    """A worker killed while it cleans (the out-of-memory killer, kill -9) loses its documents:
    the build raises WorkerDied (an OSError: the script's one line) naming the signal, within
    the watchdog's minutes, never waits for them; the whole shards before it are kept, and the
    same build run again finishes with an uninterrupted build's entry."""
    small_shards(monkeypatch)
    reference = load_corpus(config(tmp_path / "ref", source, num_workers=2))
    c = config(tmp_path / "cache", source, num_workers=2)
    real = shards.clean_one
    monkeypatch.setattr(shards, "clean_one",
                        _killing_on("/quoprimime.py", real, tmp_path / "cache"))
    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the test, never stalls it
    try:
        with pytest.raises(process.WorkerDied, match="SIGKILL") as died:
            load_corpus(c)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert isinstance(died.value, OSError)
    work = next((tmp_path / "cache").glob("corpus-*.shards"))
    assert list(work.glob("shard-00000.json"))
    monkeypatch.setattr(shards, "clean_one", real)
    corpus = load_corpus(c)
    assert entry_bytes(Path(corpus.train.path).parent) == entry_bytes(
        Path(reference.train.path).parent)


def test_an_interrupted_lm_build_continues_after_its_whole_token_shards(tmp_path, source,
                                                                        tokenizer, monkeypatch,
                                                                        capsys):
    """Stopped while tokenizing, the next build encodes only the texts after the whole token
    shards, and its token files equal an uninterrupted build's; it says how many were done."""
    small_shards(monkeypatch, docs=2000)
    reference = prepare(config(tmp_path / "ref", source), tokenizer)
    c = config(tmp_path / "cache", source)
    prepare(c, None)  # the corpus first: only the token shards are interrupted
    encoded: list = []
    real = BatchEncoder.arrays

    def arrays(self, texts, **options):
        if len(encoded) == 3:
            raise Interrupted
        encoded.append(len(texts))
        return real(self, texts, **options)

    monkeypatch.setattr(BatchEncoder, "arrays", arrays)
    with pytest.raises(Interrupted):
        prepare(c, tokenizer)
    work = next((tmp_path / "cache").glob("lm-*.shards"))
    whole = sorted(p.name for p in work.glob("*.bin"))
    assert len(whole) == 3
    texts = sum(json.loads(p.with_suffix(".json").read_text())["texts"]
                for p in work.glob("*.bin"))
    counted: list = []
    monkeypatch.setattr(BatchEncoder, "arrays",
                        lambda self, t, **kw: counted.append(len(t)) or real(self, t, **kw))
    data = prepare(dataclasses.replace(c, progress=True), tokenizer)
    n_texts = sum(len(getattr(load_corpus(c), s)) for s in ("train", "val", "test"))
    assert sum(counted) == n_texts - texts  # the whole shards' texts are not encoded again
    assert entry_bytes(data.cache_path) == entry_bytes(reference.cache_path)
    train = len(load_corpus(c).train)  # its throughput line says what was done before
    assert f"; {texts} of the {train} texts were done by an earlier build" in \
        capsys.readouterr().err


def synthetic_corpus(root: Path, files: int, size: int) -> Path:
    """``files`` distinct Python files of about ``size`` bytes each."""
    root.mkdir()
    for i in range(files):
        lines = [f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(size // 36)]
        (root / f"m{i:04d}.py").write_text("".join(lines))
    return root


def test_memory_follows_the_shard_not_the_corpus(tmp_path, monkeypatch):
    """Python's allocations at their peak while the corpus is cleaned and split (one worker:
    all in this process) stay near a shard's size, far below the corpus's 3.4 MB (34 shards)."""
    src = synthetic_corpus(tmp_path / "src", 150, 20_000)
    corpus_bytes = sum(p.stat().st_size for p in src.iterdir())
    monkeypatch.setattr(shards, "SHARD_DOCS", 5)  # about 100 KB a shard
    tracemalloc.start()
    try:
        corpus = load_corpus(config(tmp_path / "cache", src, num_workers=1,
                                    **dataset_whole()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert corpus.stats["kept"]["files"] == 150
    assert peak < corpus_bytes / 4, (peak, corpus_bytes)


def dataset_whole() -> dict:
    return dict(train_frac=1.0, val_frac=0.0, test_frac=0.0)


KILLED_CHILD = """
import sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import dataset
from codelm.data import shards
from codelm.data.config import DataConfig
from codelm.runtime import process
from tokenizer import load_tokenizer
stage, source, cache, tokenizer, ready = sys.argv[2:7]
shards.SHARD_DOCS, dataset.TOKEN_SHARD_CHARS, shards.POOL_AFTER_BYTES = 4, 40_000, 50_000
cfg = DataConfig(sources=[source], cache_dir=cache, num_workers=2, progress=False)
if stage == "tokens":
    dataset.prepare(cfg, None)  # the whole corpus first: the kill comes while tokenizing
real = process.write_atomic_files
cut = []

def write_then_wait(files):
    # The third shard is cut between its files' renames; then the process waits for its kill.
    if Path(next(iter(files))).name.startswith("shard-" if stage == "corpus" else "train-"):
        cut.append(files)
        if len(cut) == 3:
            real(dict([next(iter(files.items()))]))
            Path(ready).touch()
            threading.Event().wait()
    real(files)

process.write_atomic_files = write_then_wait
dataset.prepare(cfg, None if stage == "corpus" else load_tokenizer(tokenizer))
"""


# [tokens] is slow; quick cover: [corpus] (the same shard renames) and
# test_an_interrupted_lm_build_continues_after_its_whole_token_shards (the token shards)
@pytest.mark.parametrize("stage", ["corpus", pytest.param("tokens", marks=pytest.mark.slow)])
def test_a_build_killed_with_sigkill_continues_after_its_whole_shards(tmp_path, source, tokenizer,
                                                                      monkeypatch, stage):
    """SIGKILL (no handler runs) while a third shard's files are half renamed: the next build
    keeps the two whole shards as they are, builds the third again, and its entry equals an
    uninterrupted build's."""
    import signal
    import subprocess
    import sys

    import procs

    small_shards(monkeypatch)
    reference = prepare(config(tmp_path / "ref", source), tokenizer)
    tokenizer_path = tokenizer.save(tmp_path / "tokenizer.json")
    ready = tmp_path / "ready"
    root = Path(dataset.__file__).parent
    child = procs.popen([sys.executable, "-c", KILLED_CHILD, str(root), stage, str(source),
                         str(tmp_path / "cache"), str(tokenizer_path), str(ready)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.signal_when(child, ready.exists, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    pattern = "corpus-*.shards" if stage == "corpus" else "lm-*.shards"
    work = next((tmp_path / "cache").glob(pattern))
    manifests = sorted(work.glob("shard-*.json" if stage == "corpus" else "train-*.json"))
    assert len(manifests) == 2  # the third shard's first file only, no manifest
    def whole_shards() -> dict:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.iterdir()
                if p.name.split(".")[0].endswith(("00000", "00001"))}

    kept = whole_shards()
    written = []
    real = process.write_atomic_files

    def check_and_write(files):
        name = Path(next(iter(files))).name
        if name.startswith("shard-" if stage == "corpus" else "train-"):
            assert whole_shards() == kept  # the whole shards are the same files
            written.append(name)
        real(files)

    monkeypatch.setattr(process, "write_atomic_files", check_and_write)
    data = prepare(config(tmp_path / "cache", source, num_workers=2), tokenizer)
    assert written[0].split(".")[0].endswith("00002")
    assert entry_bytes(data.cache_path) == entry_bytes(reference.cache_path)
    corpus_dir = Path(load_corpus(config(tmp_path / "cache", source)).train.path).parent
    reference_dir = Path(load_corpus(config(tmp_path / "ref", source)).train.path).parent
    assert entry_bytes(corpus_dir) == entry_bytes(reference_dir)
    assert not work.exists()  # published: the shards go
    assert kept and len(kept) == (6 if stage == "corpus" else 4)


KILLED_AFTER_PUBLISHING = """
import sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import dataset
from codelm.data import shards
from codelm.data.config import DataConfig
from codelm.runtime import process
from tokenizer import load_tokenizer
stage, source, cache, tokenizer, ready = sys.argv[2:7]
shards.SHARD_DOCS, dataset.TOKEN_SHARD_CHARS, shards.POOL_AFTER_BYTES = 4, 40_000, 50_000
task = "lm" if stage == "corpus" else stage
cfg = DataConfig(sources=[source], cache_dir=cache, task=task, num_workers=2,
                 progress=False)
real = process.write_dir_atomically

def publish_then_wait(target, build, replace=True):
    # The stage's entry is published and its shards are not yet removed: the process waits for
    # its kill.
    published = real(target, build, replace)
    if Path(target).name.startswith(stage + "-"):
        Path(ready).touch()
        threading.Event().wait()
    return published

process.write_dir_atomically = publish_then_wait
dataset.prepare(cfg, None if stage == "corpus" else load_tokenizer(tokenizer))
"""


def files_of(directory: Path) -> dict:
    """Each file's inode and mtime, by name: the same files, not written again."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.parametrize("stage", [
    "corpus", "lm",
    # quick cover: [lm] (the same sweep and task shard writer) and
    # test_an_interrupted_supervised_build_continues_after_its_whole_shards (example shards)
    pytest.param("method", marks=pytest.mark.slow)])
def test_the_shards_a_kill_left_beside_a_published_entry_go_with_the_next_run(
        tmp_path, source, tokenizer, monkeypatch, stage):
    """SIGKILL after an entry is published and before its shards are removed: the next run, a
    cache hit, removes them (and a removal a kill cut short); the shards of a build not yet
    published stay, the same files, and its next run continues after them."""
    import signal
    import subprocess
    import sys

    import procs

    small_shards(monkeypatch)
    cache = tmp_path / "cache"
    task = "lm" if stage == "corpus" else stage
    use = None if stage == "corpus" else tokenizer
    tokenizer_path = tokenizer.save(tmp_path / "tokenizer.json")
    ready = tmp_path / "ready"
    child = procs.popen([sys.executable, "-c", KILLED_AFTER_PUBLISHING,
                         str(Path(dataset.__file__).parent), stage, str(source), str(cache),
                         str(tokenizer_path), str(ready)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.signal_when(child, ready.exists, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    orphan = next(cache.glob(f"{stage}-*.shards"))
    assert orphan.with_suffix("").is_dir() and any(orphan.iterdir())  # published, shards left
    _, host, ns, _ = process.owner_tag().split("@")
    cut_short = cache / f".{orphan.name}.tmp-{child.pid}@{host}@{ns}@ab12"  # the dead child's
    shutil.copytree(orphan, cut_short)

    hit = prepare(config(cache, source, task=task), use)
    assert hit.stats["cache_hit"]
    assert not orphan.exists() and not cut_short.exists()

    other = config(cache, source, task=task, seed=1)  # another key, interrupted before publishing
    module, writer = ((shards, "_write_shard") if stage == "corpus"
                      else (dataset, "_write_task_shard"))
    real = getattr(module, writer)
    interrupt_after(monkeypatch, module, writer, 2)
    with pytest.raises(Interrupted):
        prepare(other, use)
    monkeypatch.setattr(module, writer, real)
    unpublished = next(cache.glob("*.shards"))
    assert not unpublished.with_suffix("").exists()
    kept = files_of(unpublished)
    assert prepare(config(cache, source, task=task), use).stats["cache_hit"]
    assert files_of(unpublished) == kept
    written = interrupt_after(monkeypatch, module, writer, 10**6)
    prepare(other, use)
    first = written[0].index if stage == "corpus" else written[0].name
    assert first in (2, "train-00002.bin", "train-00002.npz")
    assert not list(cache.glob("*shards*"))


def test_a_build_that_fails_on_its_data_and_shards_untouched_for_a_week_leave_nothing(
        tmp_path, monkeypatch):
    """A build that stops at a bad record (a DataError: the same inputs fail the same way, and
    the corrected ones have another key) removes its shards; an unfinished build's shards that
    no build has added to for SHARDS_KEPT_DAYS go with the next lookup of the cache, and
    fresher ones stay for their build to continue."""
    from codelm.data import cache as data_cache
    from codelm.data.config import DataError

    small_shards(monkeypatch, docs=2)
    records = tmp_path / "code.jsonl"
    good = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(9)]
    records.write_text("\n".join([*good, "{not json", *good[:2]]) + "\n")
    store = tmp_path / "cache"
    with pytest.raises(DataError, match="code.jsonl:10"):
        load_corpus(config(store, records, min_lines=1))
    assert not list(store.glob("*shards*"))

    interrupt_after(monkeypatch, shards, "_write_shard", 2)
    with pytest.raises(Interrupted):
        load_corpus(config(store, records, min_lines=1, skip_bad=True))
    stale = next(store.glob("corpus-*.shards"))
    fresh = stale.with_name("corpus-" + "0" * 24 + ".shards")
    shutil.copytree(stale, fresh)
    week_ago = time.time() - (data_cache.SHARDS_KEPT_DAYS + 1) * 86400
    for path in (*stale.iterdir(), stale):
        os.utime(path, (week_ago, week_ago))
    data_cache.sweep_cache(store)
    assert not stale.exists() and fresh.exists()


def test_the_shards_of_a_build_under_way_stay_until_its_process_is_gone(tmp_path, source,
                                                                         monkeypatch):
    """Another live process building the same entry (marked beside its shards): the build that
    publishes the entry first, and each later lookup of the cache, leave the shards to it; once
    that process has died the next lookup removes them and its mark."""
    import os
    import subprocess
    import sys

    small_shards(monkeypatch)
    c = config(tmp_path / "cache", source)
    entry = tmp_path / "cache" / f"corpus-{corpus_key(c)}"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    _, host, ns, _ = process.owner_tag().split("@")
    mark = f".{entry.name}.shards.tmp-{{}}@{host}@{ns}@building-ab12"
    live = entry.parent / mark.format(os.getppid())
    entry.parent.mkdir()
    live.touch()

    assert not load_corpus(c).stats["cache_hit"]
    work = entry.with_name(f"{entry.name}.shards")
    assert entry.is_dir() and any(work.glob("shard-*.json"))  # left to the live builder
    assert load_corpus(c).stats["cache_hit"] and work.is_dir()
    live.rename(entry.parent / mark.format(dead))
    assert load_corpus(c).stats["cache_hit"]
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]


def test_a_fresh_build_leaves_the_shards_of_a_live_build_of_the_same_data(tmp_path, source,
                                                                          monkeypatch):
    """use_cache False removes an earlier build's shards first, but never those another live
    process is building from (the same inputs): that build would lose its files mid-way."""
    import os

    small_shards(monkeypatch)
    c = config(tmp_path / "cache", source, use_cache=False)
    entry = tmp_path / "cache" / f"corpus-{corpus_key(c)}"
    _, host, ns, _ = process.owner_tag().split("@")
    entry.parent.mkdir()
    (entry.parent / f".{entry.name}.shards.tmp-{os.getppid()}@{host}@{ns}@building-ab12").touch()
    work = entry.with_name(f"{entry.name}.shards")
    work.mkdir()
    (work / "in-use").write_text("the live build's")
    load_corpus(c)
    assert (work / "in-use").read_text() == "the live build's"


def _workers_in_a_daemon(queue) -> None:
    queue.put(DataConfig(sources=["stdlib"]).workers)


def test_data_workers_default_to_every_usable_core_and_one_in_a_daemon(tmp_path, monkeypatch):
    """num_workers unset: as many workers as the cores this process may use; set: that many; in
    a daemon process (a DataLoader worker, which can start no processes): one. A corpus under
    POOL_AFTER_BYTES is cleaned without starting a pool."""
    import multiprocessing
    import os

    assert DataConfig(sources=["stdlib"]).workers == len(os.sched_getaffinity(0))
    assert DataConfig(sources=["stdlib"], num_workers=3).workers == 3
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_workers_in_a_daemon, args=(queue,), daemon=True)
    child.start()
    assert queue.get(timeout=60) == 1
    child.join(timeout=30)

    def no_pool(*args, **kwargs):
        raise AssertionError("a pool started for a small corpus")

    monkeypatch.setattr(multiprocessing.context.ForkContext, "Pool", no_pool)
    src = synthetic_corpus(tmp_path / "src", 20, 2_000)
    corpus = load_corpus(config(tmp_path / "cache", src, num_workers=2))
    assert corpus.stats["kept"]["files"] == 20


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Input/output pair records: each top-level function of the email package, and the same
    function indented by two spaces (a file the tests only read)."""
    records = []
    for path in sorted(EMAIL.glob("*.py")):
        text = path.read_text("utf-8")
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef):
                code = ast.get_source_segment(text, node)
                records.append({"input": code, "output": code.replace("    ", "  ")})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def count_shards(monkeypatch) -> Counter:
    """The example shards each split writes from here on, counted."""
    written: Counter = Counter()
    real = dataset._write_example_shard

    def counted(path, *args, **kwargs):
        written[path.name.split("-")[0]] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "_write_example_shard", counted)
    return written


def entry_and_counts(c: DataConfig, tokenizer, monkeypatch, chars: int
                     ) -> tuple[dict[str, bytes], dict, Counter]:
    """A task's cache entry built in shards of ``chars`` characters, then removed (the corpus
    stays): its files, its task counts and sample prompt, and its shards by split."""
    monkeypatch.setattr(dataset, "TOKEN_SHARD_CHARS", chars)
    written = count_shards(monkeypatch)
    data = prepare(c, tokenizer)
    files = entry_bytes(data.cache_path)
    shutil.rmtree(data.cache_path)
    return files, {"task": data.stats["task"], "sample": data.sample_prompt}, Counter(written)


SUPERVISED = {  # task options, and whether the pair records come first among the sources
    "completion": (dict(task="completion"), False),
    "window completion, pairs first": (
        dict(task="completion", completion_style="window"), True),
    "method": (dict(task="method"), False),
    "docstring": (dict(task="docstring"), False),
    "refactor": (dict(task="refactor", block_size=256), None),  # the pairs alone
    "fim, pairs first": (dict(task="fim", block_size=96, fim_rate=0.5), True),
}
# quick cover: [method], whose examples come from the same parsed Python files through the same
# example shards
SLOW_SUPERVISED = {"docstring"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_SUPERVISED else name
    for name in SUPERVISED])
def test_a_supervised_task_writes_the_same_bytes_in_small_shards_and_in_one(
        tmp_path, source, pairs, tokenizer, monkeypatch, name):
    """Each split's examples, built from a few documents a shard, are the files and counts of one
    shard a split. Window completion and fim take every code file's examples before the pair
    records', wherever these are among the documents."""
    options, pairs_first = SUPERVISED[name]
    sources = {None: [pairs], True: [pairs, source], False: [source]}[pairs_first]
    c = DataConfig(sources=[str(p) for p in sources], cache_dir=str(tmp_path / "cache"),
                   progress=False, **options)
    whole, whole_counts, one = entry_and_counts(c, tokenizer, monkeypatch, 10**9)
    small, small_counts, several = entry_and_counts(c, tokenizer, monkeypatch, 8_000)
    assert small == whole and small_counts == whole_counts
    assert max(one.values()) == 1 and min(several[s] for s in ("train", "val", "test")) >= 2
    assert whole_counts["task"]["examples"]["train"] > 20


def test_a_supervised_build_with_hidden_bars_counts_each_split_in_its_own_lines(
        tmp_path, source, tokenizer, monkeypatch, capsys):
    """With its bars hidden (--no-progress, a log; a line at each update here: HEARTBEAT_S 0), a
    supervised build's lines count each split's documents, up to all of them; what it does a
    shard at a time (the shard's texts tokenized) gives no line, whose count would be a
    shard's, not the split's."""
    monkeypatch.setattr(console, "HEARTBEAT_S", 0)
    small_shards(monkeypatch)
    c = config(tmp_path / "cache", source, task="completion")
    train = len(load_corpus(c).train)
    capsys.readouterr()
    prepare(c, tokenizer)
    lines = capsys.readouterr().err.splitlines()
    counted = [line.split(",")[0] for line in lines if line.startswith("completion train: ")]
    assert len(counted) > 2 and counted[-1] == f"completion train: {train}/{train} docs"
    assert not [line for line in lines if line.startswith("tokenize ")]


instruct = test_chat.instruct  # a tiny instruct model and its conversation records


def test_the_chat_task_writes_the_same_bytes_in_small_shards_and_in_one(tmp_path, instruct,
                                                                        monkeypatch):
    """Conversations, a few a shard, give the files and counts of one shard a split."""
    root, conversations = instruct
    c = DataConfig(task="chat", sources=[str(conversations)], block_size=128, split_by="file",
                   min_bytes=0, min_lines=0, cache_dir=str(tmp_path), progress=False)
    whole, whole_counts, one = entry_and_counts(c, load_tokenizer(root), monkeypatch, 10**9)
    small, small_counts, several = entry_and_counts(c, load_tokenizer(root), monkeypatch, 200)
    assert small == whole and small_counts == whole_counts
    assert max(one.values()) == 1 and min(several[s] for s in ("train", "val", "test")) >= 2


def method_files(root: Path, names: list[str], shared: str = "") -> Path:
    """Python files of two documented functions each (``shared``'s text first in m00.py)."""
    root.mkdir()
    for i, name in enumerate(names):
        own = "".join(f'def {name}_{j}(x):\n    """Scale by {j}."""\n    return x * {j} + {i}\n\n\n'
                      for j in range(2))
        (root / f"{name}.py").write_text((shared if name == "m00" else "") + own)
    return root


def test_an_interrupted_supervised_build_continues_after_its_whole_shards(tmp_path, tokenizer,
                                                                          monkeypatch):
    """Stopped after 2 example shards, the next build writes only the shards after them (the
    first are the same files, untouched), and its files and counts equal an uninterrupted
    build's: the val example equal to one of the first train shard's is dropped from val."""
    shared = 'def shared(x):\n    """Add one."""\n    return x + 1\n\n\n'
    train = method_files(tmp_path / "train", [f"m{i:02d}" for i in range(8)], shared)
    val = method_files(tmp_path / "val", ["v"])
    (val / "v.py").write_text(shared + (val / "v.py").read_text())
    options = dict(task="method", val_sources=[str(val)], **dataset_whole())
    reference = prepare(config(tmp_path / "ref", train, **options), tokenizer)
    assert reference.stats["task"]["events"]["val"] == {"skipped_same_as_train": 1}
    monkeypatch.setattr(dataset, "TOKEN_SHARD_CHARS", 200)  # 2 files a shard
    c = config(tmp_path / "cache", train, **options)
    assert load_corpus(c).train[0].id.endswith("m00.py")  # in the first train shard
    real = dataset._write_example_shard
    interrupt_after(monkeypatch, dataset, "_write_example_shard", 2)
    with pytest.raises(Interrupted):
        prepare(c, tokenizer)
    work = next((tmp_path / "cache").glob("method-*.shards"))
    assert sorted(p.name for p in work.iterdir()) == [
        "train-00000.json", "train-00000.npz", "train-00001.json", "train-00001.npz"]
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.iterdir()}
    written = []

    def check_and_write(path, *args):
        now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.iterdir()
               if p.name in first}
        assert now == first  # the whole shards are the same files, not written again
        written.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(dataset, "_write_example_shard", check_and_write)
    data = prepare(c, tokenizer)
    assert written == ["train-00002.npz", "train-00003.npz", "val-00000.npz"]
    assert entry_bytes(data.cache_path) == entry_bytes(reference.cache_path)
    assert data.stats["task"] == reference.stats["task"]
    assert not work.exists()


ENCODING_WAITS = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import dataset
import codelm.tokenization.batching as batching
batching.MIN_PARALLEL_CHARS = 0  # the email corpus is encoded on the pool
dataset.TOKEN_SHARD_CHARS = 40_000
ready, argv = Path(sys.argv[2]), sys.argv[3:]
packed = dataset._packed_documents

def pack_then_wait(*args):
    ready.touch()  # the workers have encoded a shard and wait for the next
    time.sleep(60)

dataset._packed_documents = pack_then_wait
sys.exit(dataset.main(argv))
"""


def test_ctrl_c_to_the_process_group_while_workers_encode_says_one_line(tmp_path, source,
                                                                         tokenizer):
    """A terminal's Ctrl-C reaches every process of the group: the workers leave it to their
    parent, which ends the pool and exits 130 with one line (no worker tracebacks), and no
    worker is left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import procs

    tokenizer.save(tmp_path / "tok.json")
    ready = tmp_path / "ready"
    argv = ["--task", "lm", "--sources", str(source), "--tokenizer", str(tmp_path / "tok.json"),
            "--cache-dir", str(tmp_path / "cache"), "--num-workers", "2", "--no-progress"]
    child = procs.popen([sys.executable, "-c", ENCODING_WAITS, str(Path(dataset.__file__).parent),
                         str(ready), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline and child.poll() is None, child.communicate()
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("interrupted:"), err
    with pytest.raises(ProcessLookupError):  # the group is empty: the workers are gone
        os.killpg(child.pid, 0)
