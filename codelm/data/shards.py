"""The corpus as shards: the sources read, cleaned (on worker processes) and deduplicated in
order, and written a shard at a time (``build_corpus_shards``), so that memory follows a shard
and an interrupted build continues after its last whole shard."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
import tempfile
import time
import typing
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from codelm.data.cache import cache_writes
from codelm.data.cleaning import clean_one
from codelm.data.config import CLEANING_FIELDS, DataConfig, DataError
from codelm.data.dedupe import NearDuplicateIndex, doc_digest, is_duplicate, signature, stored
from codelm.data.sources import Doc, iter_sources, no_files_error, plain_text
from codelm.runtime import process
from codelm.runtime.console import progress_bar

# A corpus shard closes after this many documents read, or bytes read: what cleaning holds at
# once, and what an interrupt loses. The cut depends on the sources alone, never on the workers.
SHARD_DOCS = 2000
SHARD_BYTES = 32_000_000
IN_FLIGHT_BYTES = 64_000_000  # read but not yet cleaned, at most (a larger file goes alone)
POOL_AFTER_BYTES = 1 << 20  # cleaned in the reading process before the workers start
# The shards' manifest format (shard-N.json); shards of another version are built again.
SHARD_FORMAT_VERSION = 1
_SPLIT_CODES = {None: 0, "val": 1, "test": 2}  # a document's given split, in a shard's arrays
_SPLIT_NAMES = dict(map(reversed, _SPLIT_CODES.items()))


class _Read(typing.NamedTuple):
    """A document as read, and what reading found, in source order."""

    doc: Doc | None  # to clean; None: dropped while read (``reason``), or the closing item
    reason: str | None  # "too_large" or "duplicate"
    size: int  # bytes read (as stored; a pair's two texts)
    skipped: dict[str, int]  # records skipped since the previous document, by reason
    pair_source: int | None  # the source (index in sources_by_split) of a pair record
    raw_key: tuple[bytes, str | None] | None  # (digest, split) it added to the read dedupe
    last: bool = False  # the closing item: the sources are read to their end


class _Cleaned(typing.NamedTuple):
    read: _Read  # without its document
    doc: Doc | None  # None: dropped in cleaning (``reason``)
    reason: str | None
    mods: list[str]
    signature: np.ndarray | None  # the MinHash values of a kept document (near_dedupe)


def _read_sources(cfg: DataConfig, seen_raw: dict[bytes, str | None], skip: int
                  ) -> Iterator[_Read]:
    """Every document of the sources in order, with what reading found: too large, or a copy of
    an earlier one (``seen_raw``: digest -> split); then one closing item with the records
    skipped after the last. The first ``skip`` documents are passed over (finished shards)."""
    skipped: Counter = Counter()
    pairs = [0] * len(cfg.sources_by_split())
    sources = iter_sources(cfg, skipped, pairs)
    for _ in zip(range(skip), sources):
        pass
    skipped.clear()
    counted = pairs[:]
    for raw in sources:
        size = None if raw.text is None else len(stored(raw.text))  # None: a file left unread
        read_bytes = (size or 0) + (0 if raw.target is None else len(stored(raw.target)))
        pair_source = None
        if pairs != counted:
            pair_source = next(i for i, (a, b) in enumerate(zip(pairs, counted)) if a != b)
            counted = pairs[:]
        reason = raw_key = None
        if raw.target is None and (size is None or size > cfg.max_bytes):  # pairs: any size
            reason = "too_large"
        else:
            key = doc_digest(raw)
            raw_key = None if key in seen_raw else (key, raw.split)
            if is_duplicate(key, raw.split, seen_raw, cfg.dedupe):  # cleaned once
                reason = "duplicate"
        yield _Read(None if reason else raw, reason, read_bytes, dict(skipped), pair_source,
                    raw_key)
        skipped.clear()
    yield _Read(None, None, 0, dict(skipped), None, None, last=True)


def _read_cost(item: _Read) -> int:
    """What a document read costs while it waits to be cleaned: its bytes (many small files:
    their objects count too)."""
    return max(1024, item.size)


def _clean_read(item: _Read, opt: dict) -> _Cleaned:
    """Clean one document read (in a worker): the document, or why it went, and its MinHash."""
    if item.doc is None:
        return _Cleaned(item, None, None, [], None)
    doc, reason, mods = clean_one((item.doc, opt))
    sig = signature(plain_text(doc)) if doc is not None and opt["near_dedupe"] else None
    return _Cleaned(item._replace(doc=None), doc, reason, mods, sig)


@contextlib.contextmanager
def _cleaned_in_order(cfg: DataConfig, items: Iterator[_Read]) -> Iterator[Iterator[_Cleaned]]:
    """``items`` cleaned in their order: the first POOL_AFTER_BYTES as read, in this process (a
    small corpus starts no pool), the rest by ``cfg.workers`` processes a bounded window ahead
    of the consumer."""
    opt = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in CLEANING_FIELDS}
    clean = functools.partial(_clean_read, opt=opt)
    workers = cfg.workers

    def cleaned() -> Iterator[_Cleaned]:
        read = 0
        for item in items:
            yield clean(item)
            read += _read_cost(item)
            if workers > 1 and read >= POOL_AFTER_BYTES:
                break
        else:
            return
        chunksize = 1 if cfg.autopep8 else 16  # autopep8 files vary a lot in cost
        with process.worker_pool(workers) as pool:
            yield from process.ordered_map(pool, clean, items, IN_FLIGHT_BYTES, _read_cost,
                                           chunksize)

    results = cleaned()
    try:
        yield results
    finally:
        results.close()  # a pool still at work (an error, a stop) is terminated


@dataclass
class _Shard:
    """A corpus shard as it fills: the documents kept from its inputs, and their counts."""

    index: int
    n_sources: int
    inputs: int = 0  # documents read (and the closing item)
    last: bool = False
    files: int = 0
    bytes: int = 0
    dropped: Counter = field(default_factory=Counter)
    modified: Counter = field(default_factory=Counter)
    pairs: list[int] = field(default_factory=list)
    docs: list[Doc] = field(default_factory=list)
    raw_keys: list[tuple[bytes, str | None]] = field(default_factory=list)
    clean_keys: list[tuple[bytes, str | None]] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        self.pairs = self.pairs or [0] * self.n_sources

    @property
    def full(self) -> bool:
        return self.last or self.inputs >= SHARD_DOCS or self.bytes >= SHARD_BYTES

    def count_read(self, read: _Read) -> None:
        self.inputs += 1
        self.last = read.last
        self.dropped.update(read.skipped)
        self.files += sum(read.skipped.values())  # read and skipped: read = kept + dropped
        if read.last:
            return
        self.files += 1
        self.bytes += read.size
        if read.pair_source is not None:
            self.pairs[read.pair_source] += 1
        if read.raw_key is not None:
            self.raw_keys.append(read.raw_key)
        if read.reason:
            self.dropped[read.reason] += 1


class _Dedupe:
    """What deduplication has seen: digests of documents read and cleaned (-> the split of the
    first copy), and the near-duplicate index of kept documents."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.raw: dict[bytes, str | None] = {}
        self.clean: dict[bytes, str | None] = {}
        self.near = NearDuplicateIndex(cfg.near_dedupe_threshold) if cfg.near_dedupe else None

    def keep(self, cleaned: _Cleaned, shard: _Shard) -> None:
        """Count ``cleaned`` into ``shard``, and keep its document unless it repeats one (the
        rewrites counted are the kept documents')."""
        doc = cleaned.doc
        if doc is None:
            if cleaned.reason:
                shard.dropped[cleaned.reason] += 1
            return
        key = doc_digest(doc)
        new = key not in self.clean
        if is_duplicate(key, doc.split, self.clean, self.cfg.dedupe):  # cleaning made a copy
            shard.dropped["duplicate"] += 1
            return
        if new:
            shard.clean_keys.append((key, doc.split))
        if self.near is not None:
            if not self.near.keep_if_new(cleaned.signature):
                shard.dropped["near_duplicate"] += 1
                return
            shard.signatures.append(cleaned.signature)
        shard.docs.append(doc)
        shard.modified.update(cleaned.mods)

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Add what a finished shard saw (its ``_shard_arrays``)."""
        for name, seen in (("raw", self.raw), ("clean", self.clean)):
            codes = arrays[f"{name}_splits"].tolist()
            for key, code in zip(arrays[f"{name}_keys"], codes):
                seen[key.tobytes()] = _SPLIT_NAMES[code]
        if self.near is not None:
            for sig in arrays["signatures"]:
                self.near.add(sig)


def _shard_arrays(shard: _Shard) -> dict[str, np.ndarray]:
    """What a shard's deduplication saw, as arrays: digests (n x 32 bytes) with their split
    codes, and the kept documents' MinHash values."""
    arrays = {}
    for name, keys in (("raw", shard.raw_keys), ("clean", shard.clean_keys)):
        digests = b"".join(key for key, _ in keys)
        arrays[f"{name}_keys"] = np.frombuffer(digests, np.uint8).reshape(len(keys), 32)
        arrays[f"{name}_splits"] = np.asarray([_SPLIT_CODES[s] for _, s in keys], np.int8)
    signatures = np.zeros((len(shard.signatures), NearDuplicateIndex.NUM_PERM), np.uint32)
    signatures[:] = shard.signatures or signatures
    arrays["signatures"] = signatures
    return arrays


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _write_shard(work: Path, shard: _Shard) -> dict:
    """Write a full shard: its documents (the corpus entry's JSONL lines), its dedupe arrays,
    then its manifest (counts, keys, digests): a shard without a manifest is not trusted."""
    import blake3

    name = _shard_name(shard.index)
    lines = "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in shard.docs)
    docs = lines.encode("utf-8")
    buffer = io.BytesIO()
    np.savez(buffer, **_shard_arrays(shard))
    arrays = buffer.getvalue()
    manifest = {
        "format_version": SHARD_FORMAT_VERSION, "inputs": shard.inputs, "last": shard.last,
        "read": {"files": shard.files, "bytes": shard.bytes},
        "dropped": dict(shard.dropped), "modified": dict(shard.modified), "pairs": shard.pairs,
        "kept": {"files": len(shard.docs),
                 "bytes": sum(len((d.text + (d.target or "")).encode("utf-8"))
                              for d in shard.docs)},
        "keys": [[d.id, d.repo, d.split] for d in shard.docs],
        "blake3": {f"{name}.jsonl": blake3.blake3(docs).hexdigest(),
                   f"{name}.npz": blake3.blake3(arrays).hexdigest()},
    }  # fmt: skip
    try:
        with cache_writes(work):
            work.mkdir(parents=True, exist_ok=True)
            process.write_atomic_files({work / f"{name}.jsonl": docs, work / f"{name}.npz": arrays,
                                        work / f"{name}.json": json.dumps(manifest)})
    except BaseException:
        with contextlib.suppress(OSError):  # a directory of no whole shard goes
            work.rmdir()
        raise
    return manifest


def _finished_shards(work: Path, dedupe: _Dedupe) -> list[dict]:
    """The manifests of the shards a build before this one finished, in order, up to the first
    missing or not whole (its bytes differ from its manifest's digests); their dedupe state is
    restored into ``dedupe``."""
    done: list[dict] = []
    while not (done and done[-1]["last"]):
        name = _shard_name(len(done))
        try:
            manifest = json.loads((work / f"{name}.json").read_text("utf-8"))
        except (OSError, ValueError):
            break
        problem = None
        if manifest.get("format_version") != SHARD_FORMAT_VERSION:
            problem = f"format_version {manifest.get('format_version')}, not {SHARD_FORMAT_VERSION}"
        else:
            for file, digest in manifest["blake3"].items():
                if not (work / file).is_file() or process.file_digest(work / file) != digest:
                    problem = f"{file} differs from its manifest"
        if problem:
            print(f"note: corpus shard {work / name}: {problem}; it is built again",
                  file=sys.stderr)
            break
        with np.load(work / f"{name}.npz") as arrays:
            dedupe.restore(dict(arrays))
        done.append(manifest)
    return done


def build_corpus_shards(cfg: DataConfig, work: Path) -> list[dict]:
    """Read, clean and deduplicate the sources into shards under ``work`` (see ``_write_shard``),
    continuing after the last whole shard an earlier build left; their manifests, in order."""
    dedupe = _Dedupe(cfg)
    done = _finished_shards(work, dedupe)
    if done and done[-1]["last"]:
        return done
    n_sources = len(cfg.sources_by_split())
    skip = sum(m["inputs"] for m in done)
    items = _read_sources(cfg, dedupe.raw, skip)
    shard = _Shard(len(done), n_sources)
    already = sum(m["read"]["files"] for m in done)
    first = len(done)
    started = time.perf_counter()
    with (_cleaned_in_order(cfg, items) as results,
          progress_bar(desc="read and clean", unit="file", initial=already,
                       enabled=cfg.progress) as bar):
        for cleaned in results:
            counted = shard.files
            shard.count_read(cleaned.read)
            dedupe.keep(cleaned, shard)
            bar.update(shard.files - counted)  # the files and records read, as the stats count
            if shard.full:
                done.append(_write_shard(work, shard))
                shard = _Shard(len(done), n_sources)
    if cfg.progress:
        read = sum(m["read"]["bytes"] for m in done[first:]) / 1e6
        seconds = time.perf_counter() - started
        print(f"read and clean: {read:.1f} MB in {seconds:.1f} s ({read / seconds:.2f} MB/s, "
              f"{cfg.workers} workers, {len(done)} shards)", file=sys.stderr)
    return done


def corpus_stats(manifests: Sequence[dict], cfg: DataConfig) -> dict:
    """The counts of every stage over a corpus's shards; a DataError when nothing is left."""
    read, kept = Counter(), Counter()
    dropped, modified = Counter(), Counter()
    pairs = [0] * len(cfg.sources_by_split())
    for m in manifests:
        read.update(m["read"])
        kept.update(m["kept"])
        dropped.update(m["dropped"])
        modified.update(m["modified"])
        pairs = [a + b for a, b in zip(pairs, m["pairs"])]
    if cfg.near_dedupe:  # counted when on, found or not
        dropped["near_duplicate"] += 0
    stats = {
        "read": {"files": read["files"], "bytes": read["bytes"]},
        "dropped": dict(sorted(dropped.items())),
        "modified": dict(sorted(modified.items())),
        "kept": {"files": kept["files"], "bytes": kept["bytes"]},
        "pairs": pairs,
    }
    if not kept["files"] and not read["files"]:
        raise no_files_error(cfg)
    if not kept["files"]:
        raise DataError(f"no data left after cleaning sources {cfg.sources}: read "
                        f"{read['files']} files/records, dropped {stats['dropped'] or 'none'}; "
                        f"check the sources, extensions {cfg.extensions} and the "
                        "size/line/literal limits")
    return stats


def describe_corpus(stats: dict, splits: bool = True) -> str:
    """One line of a corpus's counts (``corpus_stats``): kept of all read (a record skipped as
    malformed, ``skip_bad``, too), each drop's reason, the non-Python files the Python-only
    options left as they were, and the splits (``splits`` False: a reader of every split)."""
    dropped = ", ".join(f"{reason} {n}" for reason, n in stats["dropped"].items() if n)
    kept = stats["kept"]["files"]
    line = (f"{kept} of {kept + sum(stats['dropped'].values())} files/records kept "
            f"(dropped: {dropped or 'none'})")
    if note := python_only_note(stats):
        line += f"; {note}"
    if not splits:
        return line
    unit = stats.get("split_by")
    by = f" by {unit}" if unit else ""
    if why := split_fell_back(stats):
        by += f" ({why})"
    return f"{line}; split {', '.join(f'{s} {n}' for s, n in stats['split'].items())}{by}"


def split_fell_back(stats: dict) -> str | None:
    """Why a corpus of code asked to split by repository was split by file (too few
    repositories to fill the splits); None where it was not, or where its sources name no
    repository to split by (the standard library, pair records)."""
    if stats.get("split_by_asked", stats.get("split_by")) == stats.get("split_by"):
        return None
    if stats.get("repositories") == 0:  # the standard library, records without one: no choice
        return None
    return "the sources hold fewer repositories than splits"


def python_only_note(stats: dict) -> str | None:
    """What a corpus's files not in Python kept of the options that read Python alone
    (strip_comments, strip_docstrings, autopep8), or None where none was asked or met."""
    n = stats["modified"].get("not_python_kept_as_is", 0)
    if not n:
        return None
    kept = "file kept as it is" if n == 1 else "files kept as they are"
    return (f"{n} non-Python {kept} (strip_comments, strip_docstrings and autopep8 read "
            "Python only)")


def shard_docs(work: Path, manifests: Sequence[dict]) -> Iterator[tuple[str, list]]:
    """(JSONL line, [id, repo, given split]) of every kept document of the shards, in order."""
    for i, manifest in enumerate(manifests):
        with open(work / f"{_shard_name(i)}.jsonl", encoding="utf-8") as f:
            yield from zip(f, manifest["keys"], strict=True)


def clean_corpus(cfg: DataConfig) -> tuple[list[Doc], dict]:
    """(kept docs in source order, stats) of one streaming read-and-clean pass over the sources
    (``build_corpus_shards`` in a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="codelm-corpus-") as work:
        manifests = build_corpus_shards(cfg, Path(work))
        stats = corpus_stats(manifests, cfg)
        docs = [Doc(**json.loads(line)) for line, _ in shard_docs(Path(work), manifests)]
    return docs, stats
