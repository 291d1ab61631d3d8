"""The cleaned corpus split without leaks (a repo or a file never crosses splits) and cached:
``load_corpus(cfg)`` -> ``Corpus`` (train, val, test: documents read as iterated)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from codelm.data.cache import (
    building,
    hash_json,
    publish_cache_entry,
    sweep_cache,
    usable_entry,
)
from codelm.data.config import CLEANING_FIELDS, SPLIT_FIELDS, SPLITS, DataConfig, DataError
from codelm.data.dedupe import doc_digest, minhash_version
from codelm.data.shards import build_corpus_shards, corpus_stats, shard_docs
from codelm.data.sources import Doc, plain_text, sources_fingerprint

# The data cache's format version, a part of every cache key: bump it when cleaning or task
# building changes what a cache holds.
PIPELINE_VERSION = 30


LOPSIDED_TRAIN_SHARE = 0.75  # a train split under this share of train_frac is noted


def data_options_flag(options: dict) -> str:
    """DataConfig keys as trainingmanager.py and eval.py take them: --data-options '{...}'."""
    return f"--data-options '{json.dumps(options)}'"


def lopsided_note(corpus_stats: dict, cfg: DataConfig,
                  spelled: Callable[[dict], str] = data_options_flag) -> str | None:
    """A note where the train split holds far less than train_frac of the files, or of the
    text (a corpus of a few files or repositories, or one repository far larger than the
    others: val and test take whole ones, at least one each), naming the fixes as ``spelled``
    writes DataConfig keys (a script's flags); None where it is near train_frac."""
    counts = corpus_stats["split"]
    kept = sum(counts.values())
    least = round(LOPSIDED_TRAIN_SHARE * cfg.train_frac, 9)  # 0.6 at 0.8, not 0.6000000000000001
    sizes = corpus_stats.get("split_bytes")  # a cache entry written without it has none
    text = sum(sizes.values()) if sizes else 0
    if counts["train"] < least * kept:
        held = f"{counts['train']} of {kept} files/records"
    elif text and sizes["train"] < least * text:
        held = (f"{sizes['train'] / text:.0%} of the corpus's bytes ({counts['train']} of "
                f"{kept} files/records)")
    else:
        return None
    unit = corpus_stats.get("split_by", "file")
    whole = spelled({"train_frac": 1, "val_frac": 0, "test_frac": 0})
    by_file = (f"; or {spelled({'split_by': 'file'})} splits the repositories' files"
               if unit == "repo" else "")
    return (f"the train split holds {held}, not about train_frac {cfg.train_frac:g} of "
            f"it: val and test take whole {unit}s, at least one each; add data, or give "
            f"--val-data DIR with {whole} to train on all of it{by_file}")


def split_key(doc: Doc, split_by: str) -> str:
    """The unit that never crosses splits: the repo where known (and asked for), else the file."""
    return doc.repo if split_by == "repo" and doc.repo else doc.id


def assign_splits(keys: Iterable[str], fracs: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 42) -> dict[str, str]:
    """key -> "train"/"val"/"test": keys ordered by a seeded SHA-256 and cut at the fractions
    (val and test get at least one key each when there are 3 keys and their fraction is > 0)."""
    unique = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())
    n = len(unique)
    n_val, n_test = (max(round(n * f), int(n >= 3 and f > 0)) for f in fracs[1:])
    n_train = max(0, n - n_val - n_test)
    return {k: "train" if i < n_train else "val" if i < n_train + n_val else "test"
            for i, k in enumerate(unique)}


class DocFile(Sequence[Doc]):
    """One split of a cached corpus, its JSONL read as iterated: memory holds one document.
    Indexing seeks through the lines' offsets (found on the first index)."""

    def __init__(self, path: Path, length: int):
        self.path = Path(path)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Doc]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield Doc(**json.loads(line))

    @cached_property
    def offsets(self) -> list[int]:
        starts = [0]
        with open(self.path, "rb") as f:
            for line in f:
                starts.append(starts[-1] + len(line))
        return starts[:-1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i % len(self)])
            return Doc(**json.loads(f.readline()))

    def __add__(self, other: Iterable[Doc]) -> list[Doc]:
        return [*self, *other]

    def __radd__(self, other: Iterable[Doc]) -> list[Doc]:
        return [*other, *self]


class Texts(Sequence[str]):
    """The plain texts of a split's documents (``Corpus.texts``), made as iterated."""

    def __init__(self, docs: Sequence[Doc]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __iter__(self) -> Iterator[str]:
        return map(plain_text, self.docs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(map(plain_text, self.docs[i]))
        return plain_text(self.docs[i])

    def after(self, n: int) -> Iterator[str]:
        """The texts after the first ``n``, made as iterated."""
        return itertools.islice(self, n, None)


@dataclass
class Corpus:
    """Cleaned documents split without leaks, with per-stage counts."""

    train: Sequence[Doc]
    val: Sequence[Doc]
    test: Sequence[Doc]
    stats: dict
    key: str

    def texts(self, split: str = "train") -> list[str]:
        """Plain texts of one split (pairs as prompt + completion): what a tokenizer trains on."""
        return list(Texts(getattr(self, split)))


class DocKey(typing.NamedTuple):
    """What splitting reads of a document."""

    id: str
    repo: str | None
    split: str | None  # given by val_sources/test_sources; None: by fraction


def split_assignment(keys: Sequence[DocKey], cfg: DataConfig) -> tuple[dict[str, str], str]:
    """split key -> split of the documents without a given split, and the unit used: a corpus
    of too few repos is split by file."""
    given = {"val": bool(cfg.val_sources), "test": bool(cfg.test_sources)}
    fracs = tuple(0.0 if given.get(s) else f
                  for s, f in zip(SPLITS, (cfg.train_frac, cfg.val_frac, cfg.test_frac)))
    rest = [k for k in keys if not k.split]
    unit = cfg.split_by
    if unit == "repo":
        n_keys = len({split_key(k, "repo") for k in rest})
        if n_keys < sum(f > 0 for f in fracs) or not any(k.repo for k in rest):
            unit = "file"
    return assign_splits((split_key(k, unit) for k in rest), fracs, cfg.seed), unit


def split_corpus(docs: Sequence[Doc], cfg: DataConfig) -> tuple[dict[str, list[Doc]], str]:
    """Docs by split, and the unit used (``split_assignment``)."""
    which, unit = split_assignment([DocKey(d.id, d.repo, d.split) for d in docs], cfg)
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for d in docs:
        out[d.split or which[split_key(d, unit)]].append(d)
    return out, unit


def corpus_key(cfg: DataConfig) -> str:
    opts = {k: v for k, v in asdict(cfg).items() if k in CLEANING_FIELDS | SPLIT_FIELDS}
    for name in ("sources", "val_sources", "test_sources"):
        opts[name] = sources_fingerprint(getattr(cfg, name), cfg.extensions)
    if cfg.near_dedupe:  # its signatures are datasketch's hashes: another major, other values
        opts["minhash"] = minhash_version()
    return hash_json({"v": PIPELINE_VERSION, "corpus": opts})


def load_corpus(cfg: DataConfig) -> Corpus:
    """Cleaned, split corpus (cached by sources + cleaning + split options); ``cfg`` validated.
    Built through shards beside the entry (``corpus-KEY.shards``): an interrupted build continues
    after its last whole shard; the shards go once the entry is published (``sweep_cache``)."""
    sweep_cache(cfg.cache_dir)
    key = corpus_key(cfg)
    path = Path(cfg.cache_dir) / f"corpus-{key}"
    if cfg.use_cache and usable_entry(path, "stats.json"):
        stats = json.loads((path / "stats.json").read_text())
        stats["cache_hit"] = True
        return _corpus_at(path, stats, key)
    with building(path, fresh=not cfg.use_cache, final_errors=(DataError,)) as work:
        stats = _publish_corpus(cfg, path, work)
    stats["cache_hit"] = False
    return _corpus_at(path, stats, key)


def _publish_corpus(cfg: DataConfig, path: Path, work: Path) -> dict:
    """Build the corpus entry ``path`` through its shards under ``work``; its stats."""
    manifests = build_corpus_shards(cfg, work)
    stats = corpus_stats(manifests, cfg)
    keys = [DocKey(*k) for m in manifests for k in m["keys"]]
    which, unit = split_assignment(keys, cfg)
    stats["repositories"] = len({k.repo for k in keys if k.repo and not k.split})
    routes = [k.split or which[split_key(k, unit)] for k in keys]
    del keys
    if not cfg.dedupe:  # the copies it keeps: each in its first copy's split
        routes = _copies_together(work, manifests, routes)
    stats["split"] = {s: routes.count(s) for s in SPLITS}
    stats["split_by"] = unit
    stats["split_by_asked"] = cfg.split_by
    _check_splits(stats, cfg)

    def write(tmp: Path) -> None:
        with contextlib.ExitStack() as stack:
            out = {s: stack.enter_context(open(tmp / f"{s}.jsonl", "w", encoding="utf-8"))
                   for s in SPLITS}
            for (line, _), split in zip(shard_docs(work, manifests), routes, strict=True):
                out[split].write(line)
        stats["split_bytes"] = {s: (tmp / f"{s}.jsonl").stat().st_size for s in SPLITS}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))

    publish_cache_entry(path, write, replace=not cfg.use_cache, marker="stats.json")
    return stats


def _copies_together(work: Path, manifests: Sequence[dict], routes: list[str]) -> list[str]:
    """``routes`` (each kept document's split, in shard order) with every exact copy of a
    document in its first copy's split, whatever its file or repo drew: with dedupe off no
    text is in two splits either (a test file's copy trained on would flatter the test)."""
    first: dict[bytes, str] = {}
    together = []
    for (line, _), route in zip(shard_docs(work, manifests), routes, strict=True):
        digest = doc_digest(Doc(**json.loads(line)))
        together.append(first.setdefault(digest, route))
    return together


def _corpus_at(path: Path, stats: dict, key: str) -> Corpus:
    splits = {s: DocFile(path / f"{s}.jsonl", stats["split"][s]) for s in SPLITS}
    return Corpus(**splits, stats=stats, key=key)


def _check_splits(stats: dict, cfg: DataConfig) -> None:
    """A DataError when the train split, or a split given by val/test sources, is empty."""
    splits = stats["split"]
    if not splits["train"]:  # every kept document is a val/test one
        copies = stats["dropped"].get("duplicate") and (cfg.val_sources or cfg.test_sources)
        raise DataError(
            f"sources {cfg.sources} left no train documents (kept: {splits}, dropped: "
            f"{stats['dropped'] or 'none'}); add data" + (
                " (a training document identical to a val/test one is dropped as a duplicate: "
                "a val/test source must not also be a training source)" if copies else ""))
    for split, given in (("val", cfg.val_sources), ("test", cfg.test_sources)):
        if given and not splits[split]:
            raise DataError(f"{split}_sources {given} left no {split} documents after cleaning "
                            f"(dropped: {stats['dropped'] or 'none'})")
