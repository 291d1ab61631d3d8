"""Data for codelm: sources -> cleaning -> split -> task examples -> cached token files.

Main path: ``prepare(DataConfig(...), tokenizer)`` (at the end of the file) loads the cleaned,
split corpus (``codelm.data.splits.load_corpus``), builds the task's token files (``_build_lm`` or
``_build_supervised``, from the examples of ``codelm.data.examples`` encoded by
``codelm.data.encoding``) and returns torch Datasets (``codelm.data.datasets``); both steps are
cached by what decides them (``codelm.data.cache``). The default corpus is the Python standard
library's source: present on every machine.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import shlex
import shutil
import sys
import time
import typing
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields, replace
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from codelm.data.cache import (
    building,
    cache_writes,
    hash_json,
    make_cache_dir,
    publish_cache_entry,
    sweep_cache,
    usable_entry,
)
from codelm.data.config import (
    BPE_SPECIAL_TOKENS,
    CHOICES,
    REFACTOR_TEMPLATE,
    SPLITS,
    TOKENIZER_KINDS,
    TOKENIZER_RANGES,
    DataConfig,
    DataError,
    TokenizerTraining,
    checkpoint_context,
    docstring_template,
)
from codelm.data.datasets import LMWindows, PreparedData, SupervisedExamples
from codelm.data.encoding import (
    encode,
    ended,
    fim_pairs,
    fitted_prompt,
    prompt_prefix,
    reads_special_tokens,
    special_token_text,
    template_start_length,
    template_writes_start,
    token_dtype,
    tokenize_examples,
    tokenizer_cache_dir,
    tokenizer_fingerprint,
    truncate_pair,
    window_pairs,
)
from codelm.data.examples import (
    REFACTOR_HEADER,
    Example,
    SamplePrompt,
    chat_examples,
    examples_for,
    held_out_prompt,
)
from codelm.data.project import Pair, project_pairs, repository_name
from codelm.data.shards import SHARD_FORMAT_VERSION, python_only_note, split_fell_back
from codelm.data.sources import Doc, plain_text
from codelm.data.splits import Corpus, Texts, corpus_key, load_corpus, lopsided_note
from codelm.kernels import IGNORE_INDEX
from codelm.runtime import process, settings
from codelm.runtime.console import parts_of_a_phase, progress_bar
from codelm.tokenization.batching import BatchEncoder, text_batches
from codelm.tokenization.bpe import BPETokenizer
from tokenizer import CodeTokenizer, load_tokenizer


def _task_options(cfg: DataConfig) -> dict:
    """The options of ``cfg.task`` (a part of its cache key)."""
    opts = {"task": cfg.task, "block_size": cfg.block_size, "seed": cfg.seed}
    if cfg.task != "lm":
        opts.update(add_eos=cfg.add_eos, max_prompt_tokens=cfg.max_prompt_tokens,
                    max_completion_tokens=cfg.max_completion_tokens)
    if cfg.task not in ("lm", "fim"):  # body_span: bump when a prompt's body span moves
        opts.update(body_span=2)
    if cfg.task == "completion":
        opts.update(style=cfg.completion_style)
        if cfg.completion_style == "window":
            # window_cut: bump when window_pairs's windows change (rebuilds these entries)
            opts.update(p=cfg.window_prompt_tokens, c=cfg.window_completion_tokens,
                        s=cfg.window_stride, window_cut=2)
        else:
            opts.update(lines_per_file=cfg.lines_per_file)
    if cfg.task == "docstring":
        # sample_cut: bump when meta.json's sample prompt changes (rebuilds docstring entries)
        opts.update(targets=cfg.docstring_targets, min_tokens=cfg.docstring_min_tokens,
                    code_tokens=cfg.docstring_code_tokens,
                    prompt=docstring_template(cfg.docstring_prompt), sample_cut=2)
    if cfg.task == "refactor":
        opts.update(template=REFACTOR_TEMPLATE)
    if cfg.task == "project":
        # project_cut: bump when the examples' ids change (rebuilds the project entries only)
        opts.update(composer=cfg.project_composer, lines_per_file=cfg.lines_per_file,
                    project_cut=3)
    if cfg.task == "fim":
        # fim_cut: bump when the PSM cut changes the ids (rebuilds the fim entries only)
        opts.update(fim_rate=cfg.fim_rate, fim_cut=5)
    if reads_special_tokens(cfg.task, cfg.pair_special_tokens):
        opts.update(pair_special_tokens=True)
    return opts


# --- The lm task: token shards ---

# The lm task tokenizes a split's texts, and a supervised task builds a split's examples from
# its documents, in shards of about this many characters, each written when done (its ids: 8-16
# bytes a character while encoded): what an interrupt loses.
TOKEN_SHARD_CHARS = 8_000_000


def _build_lm(corpus: Corpus, tokenizer, cfg: DataConfig, out: Path, work: Path) -> dict:
    """Each split's packed token file, concatenated from its token shards under ``work``."""
    if tokenizer.eos_id is None:
        raise DataError("the lm task packs files with EOS between them; the tokenizer has no eos_id")
    dtype = token_dtype(tokenizer)
    meta = {"dtype": dtype, "n_tokens": {}}
    # One pool of workers for every split: their piece caches stay warm from shard to shard.
    with tokenizer.batch_encoder(cfg.workers) as encoder:
        for s in SPLITS:
            shards = _token_shards(Texts(getattr(corpus, s)), tokenizer, encoder, cfg, work, s)
            with open(out / f"{s}.bin", "wb") as f:
                for shard in shards:
                    with open(shard.path, "rb") as part:
                        shutil.copyfileobj(part, f)
            meta["n_tokens"][s] = (out / f"{s}.bin").stat().st_size // np.dtype(dtype).itemsize
    return meta


def _token_shards(texts: Texts, tokenizer, encoder: BatchEncoder, cfg: DataConfig, work: Path,
                  split: str) -> list[_TaskShard]:
    """One split's packed ids (``packed_document``) in shards of TOKEN_SHARD_CHARS under
    ``work``, continuing after the last whole shard an earlier build left."""
    dtype = token_dtype(tokenizer)
    done = _whole_task_shards(work, split, ".bin")
    skip = sum(shard.manifest["texts"] for shard in done)
    started = time.perf_counter()
    chars = 0
    with progress_bar(total=len(texts), initial=skip, desc=f"tokenize {split}", unit="text",
                      enabled=cfg.progress) as bar:
        for chunk in text_batches(texts.after(skip), TOKEN_SHARD_CHARS):
            data = _packed_documents(encoder.arrays(chunk, split_special_tokens=True), tokenizer,
                                     dtype)
            path = _task_shard_path(work, split, len(done), ".bin")
            done.append(_write_task_shard(path, data, {"texts": len(chunk)}))
            chars += sum(map(len, chunk))
            bar.update(len(chunk))
    _say_throughput(f"tokenize {split}", chars, started, cfg, (skip, len(texts), "texts"))
    return done


def _packed_documents(encoded: list[array], tokenizer, dtype: str) -> bytes:
    """The bytes of texts' ids packed as ``packed_document`` packs one, in ``dtype``."""
    start = np.asarray(tokenizer.template_prefix, dtype)
    end = np.asarray([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype)
    parts = []
    for ids in encoded:
        parts += [start, np.frombuffer(ids, np.uint32).astype(dtype), end]
    return np.concatenate(parts).tobytes()


class _TaskShard(typing.NamedTuple):
    """A whole shard of a task's build (the lm task's ``.bin`` of ids, a supervised task's
    ``.npz`` of ``_Examples``) and its manifest: what it holds (``texts`` or ``docs`` read, and
    counts), its ``bytes`` and ``blake3``."""

    path: Path
    manifest: dict


def _task_shard_path(work: Path, split: str, index: int, suffix: str) -> Path:
    return work / f"{split}-{index:05d}{suffix}"


def _whole_task_shards(work: Path, split: str, suffix: str) -> list[_TaskShard]:
    """The whole shards of a split an earlier build left, up to the first that is not."""
    done: list[_TaskShard] = []
    while True:
        path = _task_shard_path(work, split, len(done), suffix)
        manifest = _whole_task_shard(path)
        if manifest is None:
            return done
        done.append(_TaskShard(path, manifest))


def _write_task_shard(path: Path, data: bytes, holds: dict) -> _TaskShard:
    """``data`` written atomically as ``path`` with its manifest (``.json``: ``holds``, then
    the bytes' count and digest) beside it."""
    import blake3

    manifest = {"format_version": SHARD_FORMAT_VERSION, **holds, "bytes": len(data),
                "blake3": blake3.blake3(data).hexdigest()}
    with cache_writes(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        process.write_atomic_files({path: data, path.with_suffix(".json"): json.dumps(manifest)})
    return _TaskShard(path, manifest)


def _say_throughput(stage: str, chars: int, started: float, cfg: DataConfig,
                    done_before: tuple[int, int, str]) -> None:
    """A stage's throughput line (with progress on, when it built anything); ``done_before``:
    (items an earlier, interrupted build left done, of all items, what they are)."""
    if cfg.progress and chars:
        seconds = time.perf_counter() - started
        earlier, total, items = done_before
        resumed = (f"; {earlier} of the {total} {items} were done by an earlier build, "
                   "continued here" if earlier else "")
        print(f"{stage}: {chars / 1e6:.1f} M characters in {seconds:.1f} s "
              f"({chars / 1e6 / seconds:.2f} M/s, {cfg.workers} workers){resumed}",
              file=sys.stderr)


def _whole_task_shard(path: Path) -> dict | None:
    """The manifest of a task shard written whole (its bytes as its manifest says), else
    None."""
    try:
        manifest = json.loads(path.with_suffix(".json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format_version") != SHARD_FORMAT_VERSION:
        print(f"note: shard {path}: format_version {manifest.get('format_version')}, not "
              f"{SHARD_FORMAT_VERSION}; it is built again", file=sys.stderr)
        return None
    if not path.is_file() or path.stat().st_size != manifest["bytes"] or (
            process.file_digest(path) != manifest["blake3"]):
        print(f"note: shard {path} differs from its manifest; it is built again",
              file=sys.stderr)
        return None
    return manifest


# --- Supervised tasks: example shards ---

def _split_pairs(docs: list[Doc], tokenizer, cfg: DataConfig, s: str, events: Counter,
                 encoder: BatchEncoder | None = None) -> list[Pair]:
    """The examples of split ``s``'s documents ``docs`` (its consecutive ones in
    ``_example_order``), counting skipped examples in ``events``."""
    pairs = []
    if _encodes_files(cfg):
        code = [d for d in docs if d.target is None]  # a conversation: its text, as lm reads it
        encoded = encode(tokenizer, [plain_text(d) for d in code], cfg, f"tokenize {s}",
                          encoder=encoder)
        if cfg.task == "fim":
            files = fim_pairs([(ids, d.id) for d, ids in zip(code, encoded)], tokenizer, cfg,
                               f"fim parts {s}", encoder)
            for file_pairs in files:
                for prompt, completion in file_pairs:  # no prompt: a plain stretch of the file
                    pairs.append(Pair(prompt, completion, eos_follows=bool(prompt)))
        else:
            for ids in encoded:
                for prompt, completion in window_pairs(ids, cfg):
                    pairs.append(Pair(prompt, completion, eos_follows=False))
        examples = [Example(d.text, d.target, pair=True) for d in docs if d.target is not None]
    elif cfg.task == "project":
        room = cfg.block_size - len(prompt_prefix(tokenizer, cfg.task))
        pairs = project_pairs(docs, tokenizer, cfg, room)
        examples = [Example(d.text, d.target, pair=True) for d in docs if d.target is not None]
    elif cfg.task == "chat":
        examples = chat_examples(docs, tokenizer, cfg, s, events)
    else:
        examples = [e for d in progress_bar(docs, desc=f"{cfg.task} {s}", enabled=cfg.progress)
                    for e in examples_for(d, cfg, events)]
    tokenized = tokenize_examples(examples, tokenizer, cfg, f"tokenize {s}", encoder)
    for prompt, completion, span in tokenized:
        if cfg.task == "docstring" and len(completion) < cfg.docstring_min_tokens:
            events["skipped_docstring_too_short"] += 1
            continue
        # a chat answer that ends with its template's end-of-turn token gets no EOS after it
        marked = cfg.task == "chat" and bool(completion) and tokenizer.is_special(completion[-1])
        pairs.append(Pair(prompt, completion, eos_follows=not marked, code_span=span))
    return pairs


def _build_supervised(corpus: Corpus, tokenizer, cfg: DataConfig, out: Path, work: Path) -> dict:
    """The examples of each split, joined from its example shards under ``work``
    (``_example_shards``): the files a build of the split's examples at once would write."""
    if cfg.task == "fim" and None in (tokenizer.fim_prefix_id, tokenizer.fim_middle_id,
                                      tokenizer.fim_suffix_id):
        raise DataError("the fim task needs a tokenizer with FIM tokens (fim_prefix/middle/suffix)")
    dtype = token_dtype(tokenizer)
    meta: dict = {"dtype": dtype, "examples": {}, "tokens": {}, "events": {}}
    in_train = None  # the keys of the train examples, once the train shards are written
    # One pool of workers for every split: their piece caches stay warm from shard to shard.
    with tokenizer.batch_encoder(cfg.workers) as encoder:
        for s in SPLITS:
            shards = _example_shards(getattr(corpus, s), encoder, cfg, work, s, in_train)
            if s == "train":
                in_train = _train_keys(shards)
            meta["examples"][s], meta["tokens"][s] = _join_example_shards(shards, out, s, dtype)
            events: Counter = sum((Counter(shard.manifest["events"]) for shard in shards),
                                  Counter())
            meta["events"][s] = {k: v for k, v in sorted(events.items()) if v}
    if meta["examples"]["train"] == 0:
        raise DataError(f"task {cfg.task!r} built no training examples from {len(corpus.train)} "
                        f"train documents; {_no_examples_hint(meta['events']['train'], cfg)}")
    return meta


def _no_examples_hint(events: dict[str, int], cfg: DataConfig) -> str:
    """Why a split built no examples, as its events count it, and what to change."""
    other_languages = events.get("not_python_file", 0)
    if other_languages:
        return (f"{cfg.task} targets come from Python files (named .py), and {other_languages} "
                "of them are not: train this language with --task lm, fim or completion")
    too_short = events.get("skipped_docstring_too_short", 0)
    if too_short:
        others = {"class": " (docstring_targets both takes functions' too)",
                  "function": " (docstring_targets both takes classes' too)"}
        return (f"{too_short} docstring(s) (docstring_targets {cfg.docstring_targets}) were "
                f"shorter than docstring_min_tokens, {cfg.docstring_min_tokens}: lower it "
                f"(dataset.py --docstring-min-tokens N; trainingmanager.py --data-options "
                f"'{{\"docstring_min_tokens\": N}}'){others.get(cfg.docstring_targets, '')}")
    skipped = [f"{count} {event.removeprefix('skipped_').replace('_', ' ')}"
               for event, count in events.items() if event.startswith("skipped_") and count]
    said = f"skipped: {', '.join(skipped)}; " if skipped else ""
    return f"{said}check the sources and task options (dataset.py --help lists them)"


class _Examples(typing.NamedTuple):
    """Consecutive examples of a split, as its final files hold them."""

    ids: np.ndarray  # the token dtype: the examples' ids back to back
    offsets: np.ndarray  # int64: where each example starts in ``ids``, then its end (from 0)
    prompt_lens: np.ndarray  # int32: each example's prompt tokens (with ``prompt_prefix``)
    keys: np.ndarray  # S16: the examples' sorted unique ``_example_key`` (train shards only)


def _example_key(seq: Sequence[int], prompt_len: int) -> bytes:
    """What tells two examples apart: the hash of their prompt length and ids."""
    return hashlib.blake2b(np.asarray([prompt_len, *seq], np.int64), digest_size=16).digest()


def _encodes_files(cfg: DataConfig) -> bool:
    """Whether the task encodes code files whole and cuts pairs from their ids (fim, window
    completion): ``_split_pairs`` gives those before the examples of pair records."""
    return cfg.task == "fim" or (cfg.task == "completion" and cfg.completion_style == "window")


def _example_order(docs: Sequence[Doc], cfg: DataConfig) -> Iterator[Doc]:
    """A split's documents in the order of their examples: ``_split_pairs`` of consecutive runs
    of them, joined, are ``_split_pairs`` of the whole split; for the project task each
    repository's files together, in the order of its first (two sources may each hold some of
    a repository's files: a scraper's file a language)."""
    if cfg.task == "project":
        by_repository: dict[str, list[int]] = {}
        for i, doc in enumerate(docs):
            by_repository.setdefault(repository_name(doc), []).append(i)
        return (docs[i] for indices in by_repository.values() for i in indices)
    if not _encodes_files(cfg):
        return iter(docs)
    return chain((d for d in docs if d.target is None), (d for d in docs if d.target is not None))


def _doc_chars(doc: Doc) -> int:
    return len(plain_text(doc))


def _document_chunks(docs: Iterable[Doc], cfg: DataConfig) -> Iterator[list[Doc]]:
    """Consecutive documents in chunks of about TOKEN_SHARD_CHARS characters; for the project
    task each chunk ends where a repository does (its examples compose the whole repository,
    so they never depend on where a shard ends)."""
    if cfg.task != "project":
        yield from text_batches(docs, TOKEN_SHARD_CHARS, _doc_chars)
        return
    runs = (list(run) for _, run in itertools.groupby(docs, key=repository_name))
    for runs_chunk in text_batches(runs, TOKEN_SHARD_CHARS, lambda run: sum(map(_doc_chars, run))):
        yield list(chain.from_iterable(runs_chunk))


def _example_shards(docs: Sequence[Doc], encoder: BatchEncoder, cfg: DataConfig, work: Path,
                    split: str, in_train: np.ndarray | None) -> list[_TaskShard]:
    """One split's examples in shards of about TOKEN_SHARD_CHARS characters of documents under
    ``work``, continuing after the last whole shard an earlier build left; val/test examples
    whose key is in ``in_train`` are dropped."""
    done = _whole_task_shards(work, split, ".npz")
    skip = sum(shard.manifest["docs"] for shard in done)
    quiet = replace(cfg, progress=False)  # one bar a split: this one
    started = time.perf_counter()
    chars = 0
    with progress_bar(total=len(docs), initial=skip, desc=f"{cfg.task} {split}", unit="doc",
                      enabled=cfg.progress) as bar:
        ordered = itertools.islice(_example_order(docs, cfg), skip, None)
        for chunk in _document_chunks(ordered, cfg):
            with parts_of_a_phase():
                examples, events = _chunk_examples(chunk, encoder, quiet, split, in_train)
            path = _task_shard_path(work, split, len(done), ".npz")
            done.append(_write_example_shard(path, examples, len(chunk), events))
            chars += sum(map(_doc_chars, chunk))
            bar.update(len(chunk))
    _say_throughput(f"{cfg.task} {split}", chars, started, cfg, (skip, len(docs), "documents"))
    return done


def _chunk_examples(docs: list[Doc], encoder: BatchEncoder, cfg: DataConfig, split: str,
                    in_train: np.ndarray | None) -> tuple[_Examples, Counter]:
    """The examples of consecutive documents of a split, truncated and filtered as the task's
    options say, and the events counted on them (examples skipped or truncated, by reason)."""
    tokenizer = encoder.tokenizer
    eos = tokenizer.eos_id if cfg.add_eos else None
    start = [] if template_writes_start(cfg.task) else prompt_prefix(tokenizer, cfg.task)
    events: Counter = Counter()
    special_text = special_token_text(tokenizer)
    if special_text is not None:
        events["pair_holds_special_token_text"] = sum(
            bool(special_text.search(d.text) or special_text.search(d.target))
            for d in docs if d.target is not None)
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    for prompt, completion, ends, code_span in _split_pairs(docs, tokenizer, cfg, split, events,
                                                            encoder):
        n_target = len(completion)
        head = start
        if template_writes_start(cfg.task):  # its own start (a BOS) stays when history goes
            own = template_start_length(prompt, tokenizer)
            head, prompt = prompt[:own], prompt[own:]
            code_start, code_end = code_span
            code_span = (max(0, code_start - own), max(0, code_end - own))
        # A plain LM chunk of the fim task, or a piece of the project task's repository
        # sequences, is not cut: its cut tokens would be in no example.
        limit = cfg.max_completion_tokens if prompt or cfg.task not in ("fim", "project") else None
        whole = ended(completion, eos, ends)
        completion = ended(completion, eos, ends, limit)
        kept_prompt, kept_completion = truncate_pair(
            prompt, completion, cfg.block_size - len(head), None, cfg.max_prompt_tokens,
            code_span)
        if not kept_completion[:n_target]:  # nothing to learn (an EOS alone is no target)
            events["skipped_empty_completion"] += 1
            continue
        events["prompt_truncated"] += len(kept_prompt) < len(prompt)
        events["completion_truncated"] += len(kept_completion) < len(whole)
        seqs.append(head + kept_prompt + kept_completion)
        prompt_lens.append(len(head) + len(kept_prompt))
    keys = np.array([_example_key(seq, n) for seq, n in zip(seqs, prompt_lens)], "S16")
    # Different files can hold the same code: such an example stays in train only.
    if in_train is not None:
        kept = ~_in_sorted(keys, in_train)
        events["skipped_same_as_train"] += int((~kept).sum())
        seqs = list(itertools.compress(seqs, kept))
        prompt_lens = list(itertools.compress(prompt_lens, kept))
    ids = np.fromiter(chain.from_iterable(seqs), token_dtype(tokenizer))
    offsets = np.cumsum([0, *map(len, seqs)], dtype=np.int64)
    own_keys = np.unique(keys) if split == "train" else np.zeros(0, "S16")
    return _Examples(ids, offsets, np.asarray(prompt_lens, np.int32), own_keys), events


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each of ``keys`` is in the sorted array ``sorted_keys``."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), bool)
    # each key's insertion point, kept inside the array for a key past the last one
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _write_example_shard(path: Path, examples: _Examples, docs: int, events: Counter
                         ) -> _TaskShard:
    """``examples`` of ``docs`` documents written as a task shard, their counts in its
    manifest."""
    buffer = io.BytesIO()
    np.savez(buffer, **examples._asdict())
    holds = {"docs": docs, "examples": len(examples.prompt_lens), "tokens": len(examples.ids),
             "events": {k: v for k, v in sorted(events.items()) if v}}
    return _write_task_shard(path, buffer.getvalue(), holds)


def _train_keys(shards: Sequence[_TaskShard]) -> np.ndarray:
    """The sorted unique keys of the train examples in ``shards`` (16 bytes each)."""
    keys = [np.zeros(0, "S16")]
    for shard in shards:
        with np.load(shard.path) as arrays:
            keys.append(arrays["keys"])
    return np.unique(np.concatenate(keys))


def _join_example_shards(shards: Sequence[_TaskShard], out: Path, split: str, dtype: str
                         ) -> tuple[int, int]:
    """A split's final files (``{split}.ids.npy``, ``.offsets.npy``, ``.prompt_lens.npy``, as
    np.save writes them) filled from its shards one at a time; its examples and tokens."""
    n_examples = sum(shard.manifest["examples"] for shard in shards)
    n_tokens = sum(shard.manifest["tokens"] for shard in shards)
    ids = _npy_to_fill(out / f"{split}.ids.npy", dtype, n_tokens)
    offsets = _npy_to_fill(out / f"{split}.offsets.npy", np.int64, n_examples + 1)
    prompt_lens = _npy_to_fill(out / f"{split}.prompt_lens.npy", np.int32, n_examples)
    offsets[0] = 0
    examples = tokens = 0
    for shard in shards:
        with np.load(shard.path) as arrays:  # not "keys": _train_keys reads those
            part_ids = arrays["ids"]
            part_offsets = arrays["offsets"]
            part_lens = arrays["prompt_lens"]
        n = len(part_lens)
        ids[tokens : tokens + len(part_ids)] = part_ids
        offsets[examples + 1 : examples + n + 1] = part_offsets[1:] + tokens
        prompt_lens[examples : examples + n] = part_lens
        examples, tokens = examples + n, tokens + len(part_ids)
    for filled in (ids, offsets, prompt_lens):
        if isinstance(filled, np.memmap):
            filled.flush()
    return n_examples, n_tokens


def _npy_to_fill(path: Path, dtype, length: int) -> np.ndarray:
    """A new ``.npy`` file of ``length`` zeros, mapped to be filled (an empty one: written)."""
    if length == 0:
        np.save(path, np.zeros(0, dtype))
        return np.zeros(0, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(length,))


# --- Prepare ---

def prepare(cfg: DataConfig, tokenizer: CodeTokenizer | BPETokenizer | None = None
            ) -> PreparedData:
    """Build (or load from cache) the three splits of ``cfg.task``; ``tokenizer=None`` returns
    the cleaned split texts (to train a tokenizer on ``.train``)."""
    cfg.validate()
    if tokenizer is None:
        corpus = load_corpus(cfg)
        texts = [Texts(getattr(corpus, s)) for s in SPLITS]  # read as iterated
        cached = Path(cfg.cache_dir) / f"corpus-{corpus.key}" if cfg.use_cache else None
        return PreparedData(*texts, task=cfg.task, cache_path=cached,
                            stats={"corpus": corpus.stats, "cache_hit": corpus.stats["cache_hit"]})
    if cfg.task in ("method", "docstring") and getattr(tokenizer, "strip_comments", False):
        raise DataError(f"the {cfg.task} task needs the docstrings a tokenizer with "
                        "strip_comments=True deletes from its prompts; use a tokenizer with "
                        "strip_comments=False")
    key = hash_json({"corpus": corpus_key(cfg), "tokenizer": tokenizer_fingerprint(tokenizer),
                      "task": _task_options(cfg)})
    path = Path(cfg.cache_dir) / f"{cfg.task}-{key}"
    sweep_cache(cfg.cache_dir)
    cache_hit = cfg.use_cache and usable_entry(path, "meta.json")
    meta: dict = json.loads((path / "meta.json").read_text()) if cache_hit else {}
    if not cache_hit:
        corpus = load_corpus(cfg)
        build = _build_lm if cfg.task == "lm" else _build_supervised
        with building(path, fresh=not cfg.use_cache, final_errors=(DataError,)) as work:

            def write(tmp: Path) -> None:
                meta.update(corpus=corpus.stats, task=build(corpus, tokenizer, cfg, tmp, work))
                held_out = chain(corpus.val, corpus.test, corpus.train)
                fitted = partial(fitted_prompt, tokenizer=tokenizer)  # as training cuts it
                meta["sample_prompt"] = held_out_prompt(held_out, cfg, fitted)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

            publish_cache_entry(path, write, replace=not cfg.use_cache, marker="meta.json")
    if process.is_rank_zero():  # every rank of a torchrun job prepares the data
        _note_pairs_as_text(cfg, meta)
        _note_cut_prompts(cfg, meta)
    task = meta["task"]
    if cfg.task == "lm":
        splits = {s: LMWindows(path / f"{s}.bin", task["dtype"], task["n_tokens"][s],
                               cfg.block_size, 1 if s == "train" else cfg.block_size)
                  for s in SPLITS}
    else:
        splits = {s: SupervisedExamples(path, s) for s in SPLITS}
    sample_prompt = meta.get("sample_prompt")
    if sample_prompt is not None:
        sample_prompt = SamplePrompt(*sample_prompt)
    for split in ("train", "val"):
        check_next_token_labels(splits[split], split)
    stats = {key: value for key, value in meta.items() if key != "sample_prompt"}
    return PreparedData(**splits, task=cfg.task, stats={**stats, "cache_hit": cache_hit},
                        cache_path=path, sample_prompt=sample_prompt)


BPE_UNCAPPED = 2**31  # max_vocab None: a BPE merges until no pair is seen min_freq times


def trained_tokenizer(cfg: DataConfig, training: TokenizerTraining, log: typing.TextIO | None = None
                      ) -> CodeTokenizer | BPETokenizer:
    """A tokenizer as ``training`` says, trained on ``cfg``'s train split, or read from the
    cache (``tokenizer_cache_dir``) where one was; it says which, and how big, on ``log``
    (default: stdout)."""
    cached = tokenizer_cache_dir(cfg, training.tokenizer_min_freq, training.tokenizer_max_vocab,
                                 training.tokenizer_kind)
    if cfg.use_cache and usable_entry(cached, "tokenizer.json"):
        tok = load_tokenizer(cached)
        print(f"tokenizer: {tok.vocab_size:,} tokens, the {training.describe()}, from the cache",
              file=log)
        return tok
    texts = progress_bar(prepare(cfg, None).train, desc="train tokenizer", unit="text",
                         enabled=cfg.progress)
    if training.tokenizer_kind == "bpe":
        learned = training.tokenizer_max_vocab or BPE_UNCAPPED
        tok = BPETokenizer.train(texts, len(BPE_SPECIAL_TOKENS) + 256 + learned,
                                 pretokenizer="starcoder", special_tokens=BPE_SPECIAL_TOKENS,
                                 min_frequency=training.tokenizer_min_freq)
    else:
        tok = CodeTokenizer.train(texts, min_freq=training.tokenizer_min_freq,
                                  max_vocab=training.tokenizer_max_vocab, num_workers=cfg.workers)
    if cfg.use_cache:  # the first complete entry stays: another run may be loading it
        with contextlib.suppress(OSError):  # a read-only cache: the tokenizer is used uncached
            publish_cache_entry(cached, tok.save, marker="tokenizer.json")
    print(f"tokenizer: {tok.vocab_size:,} tokens, the {training.describe()}", file=log)
    return tok


def _note_pairs_as_text(cfg: DataConfig, meta: dict) -> None:
    """Notes on pair records that train as plain text: one per pairs source under the lm task,
    and one where pairs hold a special token's text and ``pair_special_tokens`` is off
    (chat-formatted records then do not train the chat format)."""
    # By position: the note names each source as given now, however the cache spelled it.
    for (_, source), n in zip(cfg.sources_by_split(), meta["corpus"]["pairs"]):
        if n and cfg.task == "lm":
            print(f"note: {source} holds {n} input/output pairs; the lm task trains on each as "
                  "plain text (input, newline, output; the loss on both): another task, e.g. "
                  "--task refactor, trains on the output only", file=sys.stderr)
    headed = _event_total(meta, "input_holds_refactor_header")
    if headed:
        print(f"note: {headed} refactor input(s) open with the template's header "
              f"({REFACTOR_HEADER!r}), which the template writes before each input: they hold "
              "it twice; an input is the code alone", file=sys.stderr)
    n = _event_total(meta, "pair_holds_special_token_text")
    if n and not cfg.pair_special_tokens:
        print(f"note: {n} input/output pair(s) hold the text of a special token of the tokenizer "
              "(e.g. <|eot_id|>), encoded as text: to read it as the token, as transformers' "
              "tokenizer(text) does, use --pair-special-tokens or --data-options "
              "'{\"pair_special_tokens\": true}'", file=sys.stderr)


def _note_cut_prompts(cfg: DataConfig, meta: dict) -> None:
    """A note where a tenth or more of the examples of a task whose prompt is meant whole
    (the code to document or refactor, a method's header) lost part of it to block_size or
    max_prompt_tokens."""
    if cfg.task not in ("method", "docstring", "refactor"):
        return
    cut = _event_total(meta, "prompt_truncated")
    total = sum(meta["task"]["examples"].values())
    if not total or cut * 10 < total:
        return
    limits = f"block_size {cfg.block_size}"
    if cfg.max_prompt_tokens is not None:
        limits += f" and max_prompt_tokens {cfg.max_prompt_tokens}"
    print(f"note: {cut} of {total} {cfg.task} examples lost part of their prompt to {limits}: "
          "a larger --block-size (or max_prompt_tokens) keeps them whole", file=sys.stderr)


def _event_total(meta: dict, event: str) -> int:
    """How often ``event`` was counted over the splits' builds (a cache entry's meta)."""
    return sum(events.get(event, 0) for events in meta["task"].get("events", {}).values())


def check_next_token_labels(examples: Dataset, split: str, n: int = 8) -> None:
    """On a split's first examples: every counted label is the next input token, and some count."""
    for i in range(min(n, len(examples))):
        ids, labels = examples[i]["input_ids"], examples[i]["labels"]
        counted = labels[:-1] != IGNORE_INDEX
        if not bool((labels != IGNORE_INDEX).any()) or not torch.equal(
                labels[:-1][counted], ids[1:][counted]):
            raise DataError(f"{split} example {i}: its labels are not the next input tokens "
                             "(labels[t] must equal input_ids[t + 1]): a data bug")


# --- CLI ---

# trainingmanager.py's spellings of the sources, taken here too.
TRAINING_SPELLINGS = {"sources": ["--data"], "val_sources": ["--val-data"],
                      "test_sources": ["--test-data"]}


def as_flags(options: dict) -> str:
    """DataConfig keys as dataset.py's flags: --split-by file --train-frac 1."""
    return " ".join(f"{settings.flag_of(key)} {value}" for key, value in options.items())


def training_flags(flags: dict, tokenizer_flags: list[str], block_size: int | None) -> str:
    """trainingmanager.py's flags for the data dataset.py's ``flags`` prepare (its --data, --task,
    the other DataConfig keys given as --data-options; where a tokenizer built the examples,
    ``tokenizer_flags`` (``tokenizer_words``) and the examples' context, ``block_size``, which
    keys them), so that a run reads this preparation from the cache: --no-use-cache, which
    rebuilt it, is not passed on."""
    options = {key: value for key, value in flags.items()
               if key not in ("sources", "val_sources", "test_sources", "task", "block_size",
                              "progress", "use_cache")}
    words = ["--data", *map(shlex.quote, flags.get("sources", ["stdlib"]))]
    for key, flag in (("val_sources", "--val-data"), ("test_sources", "--test-data")):
        if flags.get(key):
            words += [flag, *map(shlex.quote, flags[key])]
    if "task" in flags:
        words += ["--task", flags["task"]]
    if block_size is not None:  # the task's examples are cut to it: a run's own would differ
        words += ["--block-size", str(block_size)]
    if options:
        words += ["--data-options", shlex.quote(json.dumps(options))]
    return " ".join(words + tokenizer_flags)


def shown_examples(examples: Dataset, tokenizer: CodeTokenizer | BPETokenizer, n: int) -> str:
    """The first ``n`` of ``examples`` as they train, decoded with their special tokens: a
    supervised example's prompt, then its completion (the tokens the loss counts); an lm
    window whole, the first ``n`` that do not overlap (training starts one at any token)."""
    parts = []
    step = examples.block_size if isinstance(examples, LMWindows) and examples.stride == 1 else 1
    for i in range(0, min(n * step, len(examples)), step):
        ids = examples[i]["input_ids"].tolist()
        labels = examples[i]["labels"].tolist()
        first = next((j for j, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        name = f"window at token {i}" if step > 1 else f"example {i}"
        if first == 0:  # every next token counts
            parts.append(f"--- train {name}: {len(ids)} tokens, every next token "
                         f"counted ---\n{tokenizer.decode(ids)}")
            continue
        prompt = ids[: first + 1]
        completion = [t for t in labels[first:] if t != IGNORE_INDEX]
        parts.append(f"--- train example {i}: its prompt, {len(prompt)} tokens ---\n"
                     f"{tokenizer.decode(prompt)}\n--- its completion, the {len(completion)} "
                     f"tokens the loss counts ---\n{tokenizer.decode(completion)}")
    return "\n".join(parts)


def printed_stats(stats: dict, cfg: DataConfig) -> dict:
    """``stats`` as dataset.py prints them: the pair records read from each source named by
    that source (``stats`` holds them as a list in the order of ``cfg.sources_by_split``)."""
    corpus = dict(stats["corpus"])
    by_source = {}
    for (split, source), n in zip(cfg.sources_by_split(), corpus["pairs"]):
        by_source[f"{split}: {source}" if split else source] = n
    corpus["pairs"] = by_source
    return {**stats, "corpus": corpus}


TOKENIZER_FLAGS = {f.name: settings.flag_of(f.name) for f in fields(TokenizerTraining)}


def _tokenizer_training(parser: argparse.ArgumentParser, flags: dict,
                        tokenizer_path: str | None) -> TokenizerTraining | None:
    """The tokenizer --train-tokenizer trains (its --tokenizer-* flags popped from ``flags``);
    None without it. A setting that trains nothing is a usage error."""
    given = {key: flags.pop(key) for key in TOKENIZER_FLAGS if key in flags}
    if not flags.pop("train_tokenizer", False):
        if given:
            parser.error(f"{TOKENIZER_FLAGS[next(iter(given))]} sets the tokenizer "
                         "--train-tokenizer trains: give that too")
        return None
    if tokenizer_path is not None:
        parser.error("--tokenizer names a tokenizer, --train-tokenizer trains one: give one")
    training = TokenizerTraining(**given)
    try:
        settings.check_ranges(training, TOKENIZER_RANGES)
    except ValueError as err:
        parser.error(str(err))
    return training


def tokenizer_words(tokenizer_path: str | None, training: TokenizerTraining | None
                    ) -> list[str]:
    """trainingmanager.py's flags for the tokenizer dataset.py built the examples with: the one
    named, or those that train the same one (trainingmanager's own defaults left out)."""
    if tokenizer_path is not None:
        return ["--tokenizer", shlex.quote(tokenizer_path)]
    if training is None:
        return []
    words = []
    for f in fields(TokenizerTraining):
        value = getattr(training, f.name)
        if value != f.default:
            words += [TOKENIZER_FLAGS[f.name], "none" if value is None else str(value)]
    return words


def main(argv: list[str] | None = None) -> int:
    parser = settings.ArgumentParser(
        description="Prepare a codelm dataset: read sources, clean, split, build a task, cache "
        "it, and print counts per stage (JSON).", argument_default=argparse.SUPPRESS)
    tokenizers = parser.add_argument_group("the tokenizer of the task's examples")
    tokenizers.add_argument("--tokenizer",
                            help="tokenizer file/dir; without one (or --train-tokenizer) only "
                                 "the cleaned corpus is built")
    tokenizers.add_argument("--train-tokenizer", action="store_true",
                            help="train a tokenizer on the train split (--tokenizer-kind, "
                                 "--tokenizer-min-freq, --tokenizer-max-vocab), cached where "
                                 "trainingmanager.py's run on this data takes it, and build "
                                 "the task's examples with it")
    printed = parser.add_argument_group("what is printed besides the counts")
    printed.add_argument("--show", type=int, metavar="N",
                        help="print the first N training examples on stderr as they train: a "
                             "prompt, then the completion the loss counts; lm's first N "
                             "windows that do not overlap (with --tokenizer)")
    settings.add_config_flags(parser, TokenizerTraining, {"tokenizer_kind": TOKENIZER_KINDS})
    settings.add_config_flags(parser, DataConfig, CHOICES, aliases=TRAINING_SPELLINGS)
    flags = vars(parser.parse_args(argv))
    tokenizer_path = flags.pop("tokenizer", None)
    show = flags.pop("show", 0)
    training = _tokenizer_training(parser, flags, tokenizer_path)
    if show < 0:
        parser.error(f"--show {show}: give how many examples to print (0 or more)")
    if show and tokenizer_path is None and training is None:
        parser.error("--show prints examples a tokenizer built: give --tokenizer (or "
                     "--train-tokenizer) too")

    def work() -> None:
        context = checkpoint_context(tokenizer_path) if tokenizer_path else None
        if "block_size" not in flags and context is not None:  # a model's directory
            flags["block_size"] = context
            print(f"note: block_size {context}: the context of {tokenizer_path}, as a run "
                  "--init-from it takes (--block-size sets another)", file=sys.stderr)
        cfg = settings.config_from_dict(DataConfig, flags, "command line", CHOICES)
        if cfg.use_cache:
            make_cache_dir(cfg.cache_dir, "--cache-dir" if "cache_dir" in flags else None)
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        if training is not None:
            tokenizer = trained_tokenizer(cfg, training, log=sys.stderr)  # stdout: the JSON
            if cfg.use_cache:
                place = tokenizer_cache_dir(cfg, training.tokenizer_min_freq,
                                            training.tokenizer_max_vocab, training.tokenizer_kind)
                print(f"tokenizer kept at {place}", file=sys.stderr)
            else:
                print("note: --no-use-cache: the tokenizer is not kept (a run trains its own "
                      "again); --use-cache keeps it", file=sys.stderr)
        data = prepare(cfg, tokenizer)
        print(json.dumps(printed_stats(data.stats, cfg), indent=1))  # the counts of every stage
        by_fraction = not (cfg.val_sources or cfg.test_sources)
        if by_fraction and (lopsided := lopsided_note(data.stats["corpus"], cfg, as_flags)):
            print(f"note: {lopsided}", file=sys.stderr)
        if python_only := python_only_note(data.stats["corpus"]):
            print(f"note: {python_only}", file=sys.stderr)
        if why := split_fell_back(data.stats["corpus"]):
            print(f"note: split by file, not repo: {why}; --split-by file asks for that",
                  file=sys.stderr)
        if tokenizer is not None and show:
            print(shown_examples(data.train, tokenizer, show), file=sys.stderr)
        if tokenizer is None:
            print(f"note: the cleaned corpus only: the {cfg.task} task's examples are built "
                  "with a tokenizer (--tokenizer FILE_OR_DIR: a model's, or a run's runs/NAME; "
                  "or --train-tokenizer: the one a model from scratch trains with)",
                  file=sys.stderr)
        if data.cache_path is not None:
            print(f"cached at {data.cache_path}", file=sys.stderr)  # stdout: the JSON alone
            same = training_flags(flags, tokenizer_words(tokenizer_path, training),
                                  None if tokenizer is None else cfg.block_size)
            print(f"trainingmanager.py prepares the same: {same}", file=sys.stderr)

    return process.run_tool(work, "interrupted: whole shards are kept, no half-built cache "
                                  "entry; the same command continues from them")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
