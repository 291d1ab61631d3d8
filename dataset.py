"""Data for codelm: sources -> cleaning -> split -> task examples -> cached token files.

Main path: ``prepare(DataConfig(...), tokenizer)`` (at the end of the file) loads the cleaned,
split corpus (``load_corpus``), builds the task's token files (``_build_lm`` or
``_build_supervised``) and returns torch Datasets; both steps are cached by what decides them.
The default corpus is the Python standard library's source: present on every machine.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import argparse
import ast
import bz2
import contextlib
import copy
import functools
import gzip
import hashlib
import io
import itertools
import json
import lzma
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import tokenize
import typing
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from itertools import accumulate, chain, groupby
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from codelm.kernels import IGNORE_INDEX
from codelm.runtime import hub, process, settings
from codelm.runtime.process import progress_bar
from codelm.tokenization.batching import BatchEncoder, text_batches
from codelm.tokenization.bpe import BPETokenizer
from codelm.tokenization.source import (
    PYTHON_PARSE_ERRORS,
    docstring_statement,
    source_lines,
    strip_comments_and_docstrings,
)
from dataconfig import (
    _CHOICES,
    _CLEANING_FIELDS,
    _SPLIT_FIELDS,
    DOCSTRING_PROMPTS,
    FIM_SENTINELS,
    REFACTOR_TEMPLATE,
    SPLITS,
    DataConfig,
    DataError,
)
from scraping.common import decode_source, has_extension, is_utf8, source_files
from tokenizer import ENCODING_VERSION, CodeTokenizer, chat_turns, load_tokenizer

if typing.TYPE_CHECKING:
    import datasketch

# The data cache's format version, a part of every cache key: bump it when cleaning or task
# building changes what a cache holds.
PIPELINE_VERSION = 12


def stdlib_root() -> Path:
    """Directory holding this interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library (not site-packages), sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    return source_files(root, (".py",))


# --- Sources ---

@dataclass
class Doc:
    """One unit of the corpus: a code file, or a prompt/completion pair (``target`` set)."""

    id: str  # unique, stable: "repo/path", a file path, or "file.jsonl:line"
    text: str  # before cleaning as read: bytes, or None for a file over max_bytes (unread)
    repo: str | None = None
    target: str | None = None  # the completion of a pair; None for code files
    raw_pair: bool = False  # a {"prompt","completion"} pair: used verbatim, no template
    split: str | None = None  # "val"/"test" from val_sources/test_sources; None: by fraction
    chat: bool = False  # a conversation: ``text`` holds its messages as JSON

    @property
    def is_python(self) -> bool:
        return self.target is None and not self.chat and has_extension(self.id, (".py",))

    @property
    def messages(self) -> list[dict]:
        """A conversation's [{"role", "content"}, ...]."""
        return json.loads(self.text)


class SourceFiles(typing.NamedTuple):
    """A data source's files: record files, or code files named relative to ``root``."""

    records: bool  # JSONL, parquet, a datasets directory or a Hugging Face dataset id
    root: Path | None  # code: the directory its files' names are relative to
    files: list[Path]  # deterministic order


def _source_listing(source: str, extensions: Sequence[str]) -> SourceFiles:
    """The files of ``source``: its records (``_record_files``), or its code files (of
    ``extensions``: the stdlib, or a directory)."""
    records = _record_files(source)
    if records is not None:
        return SourceFiles(records=True, root=None, files=records)
    if source == "stdlib":
        return SourceFiles(records=False, root=stdlib_root(), files=stdlib_files())
    root = Path(source).expanduser()
    # The user's own directory: links to files are read (an HF hub snapshot's point into blobs/).
    files = source_files(root, extensions, follow_symlinks=True)
    return SourceFiles(records=False, root=root, files=files)


def _record_files(source: str) -> list[Path] | None:
    """The files of a record source (JSONL, parquet, a datasets ``save_to_disk`` directory, a
    Hugging Face dataset id: its train split's files, or all); None for code (stdlib, a folder).
    A source that is none of these is refused here, naming the fix."""
    if source == "stdlib":
        return None
    if hub.is_hub_id(source):  # not a local path
        try:
            snapshot = hub.checkpoint_dir(source, "data source", repo_type="dataset")
        except ValueError as e:
            raise DataError(str(e)) from None
        files = sorted(p for p in snapshot.rglob("*") if p.suffix in (".parquet", ".jsonl"))
        return [p for p in files if "train" in p.relative_to(snapshot).as_posix()] or files
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {source}")
    if path.is_file():
        if path.suffix not in (".jsonl", ".parquet"):
            raise DataError(f"data source {source}: a file source must be JSONL (*.jsonl) or "
                            "parquet (*.parquet)")
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"data source {source}: a datasets DatasetDict (splits {splits}); name "
                        f"one split's directory, e.g. {path / (splits or ['train'])[0]}")
    if not (path / "state.json").is_file():
        return None
    state = settings.read_json_object(path / "state.json", "datasets state")
    files = state.get("_data_files")
    if not (isinstance(files, list) and all(
            isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files)):
        raise DataError(f"{path / 'state.json'}: no '_data_files' list of {{filename}}, as "
                        "datasets' save_to_disk writes it; save the dataset again")
    return [path / f["filename"] for f in files]


def _read_records(path: Path, cfg: DataConfig, counts: Counter) -> Iterator[Doc]:
    """The code or pair records of a JSONL, parquet or datasets Arrow file, as documents."""
    rows = jsonl_lines(path) if path.suffix == ".jsonl" else _table_rows(path, cfg)
    for number, where, record in rows:
        try:
            record = json_object(record, where) if isinstance(record, bytes) else record
            doc = _record_to_doc(record, cfg, f"{path.name}:{number}", where)
        except DataError as exc:
            if not cfg.skip_bad:
                raise DataError(f"{exc} (skip such records with --skip-bad, or the data "
                                "option skip_bad)") from None
            counts["bad_jsonl_line" if path.suffix == ".jsonl" else "bad_record"] += 1
            continue
        yield doc


# A compressed file's first bytes, and how to open it: gzip, bz2, xz.
COMPRESSED_MAGIC = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


def jsonl_lines(path: Path, what: str = "JSONL file") -> Iterator[tuple[int, str, bytes]]:
    """(line number, "file:line", its bytes) of each non-blank line; ``json_object`` reads one.
    A gzip, bz2 or xz file (its bytes say so, whatever its name) is read decompressed; one that
    does not read or decompress is a DataError naming it (``what``) and the lines read."""
    with settings.reading(path, what, DataError) as place:
        with open(path, "rb") as f:
            head = f.read(max(map(len, COMPRESSED_MAGIC)))
        opener = next((o for magic, o in COMPRESSED_MAGIC.items() if head.startswith(magic)), open)
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                place.count = lineno
                if raw.strip():  # rstrip: else an error at the line's end is json's "line 2"
                    yield lineno, f"{path}:{lineno}", raw.rstrip(b"\r\n")


def _table_rows(file: Path, cfg: DataConfig) -> Iterator[tuple[int, str, dict]]:
    """A parquet or datasets Arrow file's rows, streamed a batch at a time, the named columns;
    a damaged file is a DataError naming it and the rows read."""
    kind = "parquet" if file.suffix == ".parquet" else "Arrow"
    with settings.reading(file, f"{kind} file", DataError, "row") as place:
        for number, where, row in _arrow_rows(file, cfg):
            place.count = number
            yield number, where, row


def _arrow_rows(file: Path, cfg: DataConfig) -> Iterator[tuple[int, str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.suffix == ".parquet":
        table = pq.ParquetFile(file, pre_buffer=False)  # pre-buffering holds every row group
        names = table.schema_arrow.names
    else:  # datasets' Arrow stream files, memory-mapped
        table = pa.ipc.open_stream(pa.memory_map(str(file)))
        names = table.schema.names
    named = _named_columns(cfg)
    if missing := [c for c in named if c not in names]:
        raise DataError(f"{file}: no column {missing[0]!r} (its columns: {', '.join(names)}); "
                        "set the data options text_column, or input_column and output_column")
    if file.suffix == ".parquet":
        wanted = [*named, *(c for c in ("repo", "path") if c in names)] if named else None
        table = table.iter_batches(batch_size=64, columns=wanted)
    rows = (row for batch in table for row in batch.to_pylist())
    for number, row in enumerate(rows, start=1):
        yield number, f"{file}: row {number}", row


def _named_columns(cfg: DataConfig) -> list[str]:
    return [c for c in (cfg.text_column, cfg.input_column, cfg.output_column) if c]


# A code record's text: the scrapers' key, then that of some published corpora.
TEXT_KEYS = ("text", "file_text")


def json_object(raw: bytes, where: str) -> dict:
    """One JSONL line's object; a DataError names ``where`` (file:line) and the column."""
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as exc:
        end = " (the end of the line)" if exc.pos >= len(exc.doc) else ""
        raise DataError(f"{where}: malformed JSON at column {exc.pos + 1}{end}: {exc.msg}") from None
    except (UnicodeDecodeError, RecursionError) as exc:  # json recurses once per nesting level
        raise DataError(f"{where}: malformed JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _record_to_doc(rec: dict, cfg: DataConfig, name: str, where: str) -> Doc:
    """One record's Doc (``name``: its id without a path); a DataError names ``where``, the key."""
    if named := _named_columns(cfg):  # the columns the data options name, as codelm's keys
        if missing := [c for c in named if c not in rec]:
            raise DataError(f"{where}: no key {missing[0]!r}, which the data options name")
        rec = ({"text": rec[named[0]], "repo": rec.get("repo"), "path": rec.get("path")}
               if cfg.text_column else {"input": rec[named[0]], "output": rec[named[1]]})
    # Every string a record contributes must be valid UTF-8 (JSON can spell lone surrogates).
    for key in (*TEXT_KEYS, "repo", "path", "input", "output", "prompt", "completion"):
        if isinstance(rec.get(key), str) and not is_utf8(rec[key]):
            raise DataError(f"{where}: key {key!r} holds a lone surrogate (not valid UTF-8)")
    if "messages" in rec:
        return Doc(name, json.dumps(_checked_messages(rec["messages"], where),
                                    ensure_ascii=False), chat=True)
    for a, b in (("input", "output"), ("prompt", "completion")):
        if a in rec or b in rec:
            if not (isinstance(rec.get(a), str) and isinstance(rec.get(b), str)):
                raise DataError(f"{where}: a pair needs string keys {a!r} and {b!r}")
            return Doc(name, rec[a], target=rec[b], raw_pair=a == "prompt")
    key = next((k for k in TEXT_KEYS if k in rec), None)
    if key is None:
        raise DataError(f"{where}: record has none of the keys 'text' (or 'file_text'), "
                        "'input'/'output', 'prompt'/'completion'")
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: key {key!r} must be a string")
    repo = rec.get("repo") if isinstance(rec.get("repo"), str) else None
    rel = rec.get("path") if isinstance(rec.get("path"), str) else name
    return Doc(f"{repo}/{rel}" if repo else rel, rec[key], repo=repo)


def _checked_messages(messages: object, where: str) -> list[dict]:
    """A conversation record's messages: [{"role": str, "content": str}, ...] with an
    assistant's turn (what the chat task trains on); a DataError names ``where``."""
    if not (isinstance(messages, list) and messages):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and "
                            "'content'")
        if not is_utf8(message["content"]):
            raise DataError(f"{where}: messages[{i}] holds a lone surrogate (not valid UTF-8)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no 'assistant' message: nothing for the chat task to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _iter_sources(cfg: DataConfig, counts: Counter, pairs: list[int]) -> Iterator[Doc]:
    """Every document of every source, at most ``max_docs`` per role, counting each source's
    pair records in ``pairs``. A file over ``max_bytes`` is left unread (``text`` None)."""
    taken: Counter = Counter()  # documents yielded per role
    for i, (split, source) in enumerate(cfg.sources_by_split()):
        listing = _source_listing(source, cfg.extensions)
        if listing.records:
            docs = (doc for f in listing.files for doc in _read_records(f, cfg, counts))
        else:
            docs = _read_files(source, listing, cfg, counts)
        for raw in docs:
            if cfg.max_docs is not None and taken[split] >= cfg.max_docs:
                break
            taken[split] += 1
            if raw.target is not None:
                pairs[i] += 1
            raw.split = split
            yield raw


def _read_files(source: str, listing: SourceFiles, cfg: DataConfig, counts: Counter
                ) -> Iterator[Doc]:
    prefix = "stdlib" if source == "stdlib" else listing.root.name
    for p in listing.files:
        doc_id = f"{prefix}/{p.relative_to(listing.root).as_posix()}"
        if not is_utf8(doc_id):  # os.walk spells undecodable name bytes as surrogates
            counts["not_utf8_name"] += 1
            continue
        yield Doc(doc_id, p.read_bytes() if p.stat().st_size <= cfg.max_bytes else None)


def _sources_fingerprint(sources: Sequence[str], extensions: Sequence[str]) -> list:
    """What the cache key knows of the sources: every file's path, size and mtime."""
    out = []
    for source in sources:
        # Every build computes its key first: sources are checked here.
        listing = _source_listing(source, extensions)
        if listing.records:
            out += [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                    for f in listing.files]
            continue
        names = hashlib.sha256()
        for p in listing.files:
            st = p.stat()
            entry = f"{p.relative_to(listing.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
            names.update(entry.encode("utf-8", "surrogateescape"))  # a non-UTF-8 name: its bytes
        where = source if source == "stdlib" else str(listing.root.resolve())
        out.append([where, names.hexdigest()])
    return out


# --- Cleaning ---

_LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|spdx-license|all rights reserved", re.I)
_ENCODING_LINE = re.compile(r"^[ \t\f]*#.*?coding[:=]")
# A quoted one-line literal or, outside one, a `//` or `#` comment start; a number.
_STRING_OR_COMMENT = re.compile(r"\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|//|#")
_NUMBER_LITERAL = re.compile(r"(?<![\w.])\d[\w.]*")
# Python tokens that are literals (Python 3.12 splits f-strings: their text is FSTRING_MIDDLE).
_LITERAL_TOKENS = {tokenize.STRING, tokenize.NUMBER, getattr(tokenize, "FSTRING_MIDDLE", -1)}


def strip_license_header(text: str) -> tuple[str, bool]:
    """Remove a leading comment block that mentions copyright/licence (``#``, ``//`` or
    ``/* */``), keeping a shebang and an encoding line. Returns (text, removed)."""
    lines = source_lines(text, keepends=True)
    keep: list[str] = []
    i = 0
    while i < min(2, len(lines)) and ((i == 0 and lines[i].startswith("#!"))
                                      or _ENCODING_LINE.match(lines[i])):
        keep.append(lines[i])
        i += 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    start = i
    rest = []  # code after the closing */ on its line (`/* (c) X, MIT */ package a`): kept
    if i < len(lines) and lines[i].lstrip().startswith("/*"):
        while i < len(lines) and "*/" not in lines[i]:
            i += 1
        if i < len(lines) and (after := lines[i].partition("*/")[2].lstrip(" \t")).strip():
            rest = [after]
        i += 1
    else:
        marker = "#" if lines[i : i + 1] and lines[i].lstrip().startswith("#") else "//"
        while i < len(lines) and lines[i].lstrip().startswith(marker):
            i += 1
    block = "".join(lines[start:i])
    if i == start or not _LICENSE_WORDS.search(block):
        return text, False
    while not rest and i < len(lines) and not lines[i].strip():
        i += 1
    return "".join(keep + rest + lines[i:]), True


# Credential shapes specific enough to redact in code without false hits: (pattern, placeholder,
# markers; a text holding none of the markers is not searched, which keeps the scan fast).
SECRET_PATTERNS: tuple[tuple[re.Pattern, str, tuple[str, ...]], ...] = (
    (re.compile(r"(-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY)-----)"
                r"(?:[A-Za-z0-9+/=\s:,.-]|\\[nr]){16,}?(-----END \2-----)"),
     r"\1<PRIVATE_KEY>\3", ("PRIVATE KEY-----",)),
    (re.compile(r"\b(?:AKIA|ASIA)(?![0-9A-Z]{0,9}EXAMPLE)[0-9A-Z]{16}\b"), "<AWS_ACCESS_KEY_ID>",
     ("AKIA", "ASIA")),  # not AWS's documentation ones (AKIAIOSFODNN7EXAMPLE): no one's key
    (re.compile(r"(?i)(aws_?secret_?(?:access_?)?key\W{1,6})[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
     r"\1<AWS_SECRET_ACCESS_KEY>", ("secret", "SECRET", "Secret")),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{80,})\b"),
     "<GITHUB_TOKEN>", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}|\bhttps://hooks\.slack\.com/services/"
                r"[A-Za-z0-9/]+"), "<SLACK_TOKEN>", ("xox", "hooks.slack.com")),
    (re.compile(r"(://(?<=[A-Za-z0-9+.-]://)[^\s:@/\"'{}<>\[\]]+:)"
                r"(?![%$]|(?i:\*+|x+|p|pass|passwd|password|pwd|secret|token|tiger)@)"
                r"[^\s:@/\"'{}<>\[\]]+@"),
     r"\1<PASSWORD>@", ("://",)),  # not a %s or $VAR a template fills in, a mask (***) or a
    #   documentation's placeholder (user:pass, scott:tiger); no [ ] (a syntax's "[user:pw@]")
)
# Not a matrix product calling a method (q@k.transpose(-2, -1)) nor git's user@host:path.
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
                   r"(?!\(|:[\w~/])")


def redact_secrets(text: str) -> tuple[str, int]:
    """Replace each credential SECRET_PATTERNS finds with its placeholder (a private key keeps its
    BEGIN/END lines, a URL its user). Returns (text, credentials replaced)."""
    total = 0
    for pattern, placeholder, markers in SECRET_PATTERNS:
        if any(marker in text for marker in markers):
            text, n = pattern.subn(placeholder, text)
            total += n
    return text, total


def _shares_line(lines: Sequence[str], node: ast.AST) -> bool:
    """Whether code stands beside ``node`` on its first or last line (ast columns count bytes)."""
    before = lines[node.lineno - 1].encode("utf-8")[: node.col_offset]
    after = lines[node.end_lineno - 1].encode("utf-8")[node.end_col_offset :]
    return bool(before.strip() or after.decode("utf-8", "replace").split("#")[0].strip())


def longest_literal(text: str, at_least: int = 0, python: bool = False) -> int:
    """Length of the longest one-line string literal or number (exact above ``at_least``); Python
    through ``tokenize``, other text by a pattern that stops at a comment."""
    lines = [line for line in source_lines(text) if len(line) > at_least]
    if lines and python:
        with contextlib.suppress(*PYTHON_PARSE_ERRORS):
            tokens = tokenize.generate_tokens(io.StringIO(text).readline)
            return max((len(t.string) for t in tokens
                        if t.type in _LITERAL_TOKENS and t.start[0] == t.end[0]), default=0)
    longest = 0
    for line in lines:
        code = line
        for m in _STRING_OR_COMMENT.finditer(line):
            if m.group() in ("//", "#"):
                code = line[: m.start()]
                break
            longest = max(longest, len(m.group()))
        longest = max([longest] + [len(m.group()) for m in _NUMBER_LITERAL.finditer(code)])
    return longest


def _autopep8(text: str) -> tuple[str, str | None]:
    """autopep8's formatting, and the modification: ``autopep8_changed``, ``autopep8_failed`` or
    None. No time limit: a file autopep8 takes minutes over stalls the build."""
    import autopep8

    try:
        fixed = autopep8.fix_code(text)
    except Exception:  # autopep8 itself fails on some odd files; keep them as they are
        return text, "autopep8_failed"
    return fixed, "autopep8_changed" if fixed != text else None


def _redact(texts: list[str], opt: dict) -> tuple[list[str], list[str]]:
    """``texts`` (a document, or a pair's two) with credentials (and e-mails) replaced; the mods."""
    mods = []
    if opt["redact_secrets"]:
        texts, counts = zip(*map(redact_secrets, texts))
        if any(counts):
            mods.append("secrets_redacted")
    if opt["redact_emails"] and any("@" in t for t in texts):
        texts, counts = zip(*(EMAIL.subn("<EMAIL>", t) for t in texts))
        if any(counts):
            mods.append("emails_redacted")
    return list(texts), mods


def _clean_one(args: tuple[Doc, dict]) -> tuple[Doc | None, str | None, list[str]]:
    """Clean one document. Returns (doc or None, drop reason, list of modifications)."""
    raw, opt = args
    mods: list[str] = []
    if raw.target is not None:  # a pair: checked and redacted, never otherwise rewritten
        if not raw.text.strip() or not raw.target.strip():
            return None, "empty_pair", mods
        (prompt, target), mods = _redact([raw.text, raw.target], opt)
        return replace(raw, text=prompt, target=target), None, mods
    if raw.chat:  # a conversation: its messages redacted, never otherwise rewritten
        messages = raw.messages
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return None, "empty_chat", mods
        contents, mods = _redact([m["content"] for m in messages], opt)
        redacted = [{**m, "content": c} for m, c in zip(messages, contents)]
        return replace(raw, text=json.dumps(redacted, ensure_ascii=False)), None, mods
    text, reason = decode_source(raw.text)
    if text is None:
        return None, reason, mods
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if len(text.encode("utf-8")) < opt["min_bytes"]:
        return None, "too_small", mods
    if opt["strip_license"]:
        text, removed = strip_license_header(text)
        if removed:
            mods.append("license_header_removed")
    (text,), redacted = _redact([text], opt)
    mods += redacted
    is_python = raw.is_python  # pairs returned above
    if is_python and (opt["strip_comments"] or opt["strip_docstrings"]):
        try:
            text = strip_comments_and_docstrings(text, opt["strip_comments"],
                                                 opt["strip_docstrings"], strict=True)
            mods.append("comments_or_docstrings_stripped")
        except PYTHON_PARSE_ERRORS:
            return None, "syntax_error", mods
    if is_python and opt["autopep8"]:
        text, changed = _autopep8(text)
        mods += [changed] if changed else []
    lines = source_lines(text)
    if sum(map(bool, map(str.strip, lines))) < opt["min_lines"]:
        return None, "too_few_lines", mods
    if max(map(len, lines), default=0) > opt["max_line_length"]:
        return None, "long_line", mods
    limit = opt["max_literal_length"]
    if longest_literal(text, limit, python=is_python) > limit:
        return None, "long_literal", mods
    return replace(raw, text=text), None, mods


def _stored(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")


def _doc_digest(doc: Doc) -> bytes:
    """The SHA-256 of a document as stored (a pair's target too): what exact dedupe compares."""
    h = hashlib.sha256(_stored(doc.text))
    if doc.target is not None:
        h.update(b"\0target\0" + _stored(doc.target))
    return h.digest()


def _is_duplicate(key: bytes, split: str | None, seen: dict[bytes, str | None], dedupe: bool
                  ) -> bool:
    """Whether the document of digest ``key`` repeats an earlier one (``seen``: digest -> split
    of the first copy, which a first copy joins). A copy in another split always does, so no
    document sits in two; ``dedupe`` decides the rest."""
    if key not in seen:
        seen[key] = split
        return False
    return dedupe or seen[key] != split


_SHINGLE_WORDS = re.compile(r"\w+|[^\w\s]")
def shingles(text: str, shingle: int = 5) -> set[str]:
    """The word ``shingle``-grams of a text: the sets whose Jaccard MinHash estimates."""
    words = _SHINGLE_WORDS.findall(text)
    return {" ".join(words[j : j + shingle]) for j in range(max(1, len(words) - shingle + 1))}


def minhash(text: str, num_perm: int = 64) -> datasketch.MinHash:
    """datasketch's MinHash of the text's shingles (a fixed seed: the same text, the same one)."""
    import datasketch  # half a second to import; near-dedupe is off by default

    signature = datasketch.MinHash(num_perm=num_perm, seed=1)
    signature.update_batch([s.encode() for s in shingles(text)])
    return signature


def signature(text: str, num_perm: int = 64) -> np.ndarray:
    """The MinHash values of ``text`` as uint32 (datasketch's are below 2**32): 4 bytes a value."""
    return minhash(text, num_perm).hashvalues.astype(np.uint32)


class NearDuplicateIndex:
    """MinHash LSH over the kept texts' signatures, as datasketch's MinHashLSH with bands of 4
    rows: the candidates of a signature are the kept ones equal to it in a whole band, and a
    candidate whose estimated Jaccard (equal values / values) reaches ``threshold`` makes it a
    near duplicate. Signatures are rows of one uint32 array, a band a dict of 16-byte keys:
    a kept file costs about 2 KB (64 values), not a MinHash object."""

    ROWS = 4  # values per band
    NUM_PERM = 64  # values per signature, unless given

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        self.threshold = threshold
        self.num_perm = num_perm
        self.bands: list[dict[bytes, int | list[int]]] = [{} for _ in range(num_perm // self.ROWS)]
        self.signatures = np.empty((0, num_perm), np.uint32)
        self.n = 0

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[b * self.ROWS : (b + 1) * self.ROWS].tobytes() for b in range(len(self.bands))]

    def is_near_duplicate(self, sig: np.ndarray) -> bool:
        candidates: set[int] = set()
        for band, key in zip(self.bands, self._band_keys(sig)):
            found = band.get(key)
            if found is not None:
                candidates.update(found if isinstance(found, list) else (found,))
        return any(np.count_nonzero(self.signatures[j] == sig) / self.num_perm >= self.threshold
                   for j in candidates)

    def add(self, sig: np.ndarray) -> None:
        if self.n == len(self.signatures):  # grown by half: amortised appends
            grown = np.empty((max(1024, self.n * 3 // 2), self.num_perm), np.uint32)
            grown[: self.n] = self.signatures[: self.n]
            self.signatures = grown
        self.signatures[self.n] = sig
        for band, key in zip(self.bands, self._band_keys(sig)):
            found = band.get(key)
            if found is None:
                band[key] = self.n
            elif isinstance(found, list):
                found.append(self.n)
            else:
                band[key] = [found, self.n]
        self.n += 1

    def keep_if_new(self, sig: np.ndarray) -> bool:
        """Whether ``sig`` is no near duplicate of a kept one; a new one is kept."""
        if self.is_near_duplicate(sig):
            return False
        self.add(sig)
        return True


def near_duplicates(texts: Sequence[str], threshold: float = 0.85, num_perm: int = 64) -> set[int]:
    """Indices of texts whose estimated Jaccard similarity to an earlier kept text is >=
    threshold (LSH bands find candidates, the full signature confirms them)."""
    index = NearDuplicateIndex(threshold, num_perm)
    return {i for i, text in enumerate(texts) if not index.keep_if_new(signature(text, num_perm))}


# --- The corpus as shards: read, cleaned and deduplicated in order, written as it streams ---

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
    sources = _iter_sources(cfg, skipped, pairs)
    for _ in zip(range(skip), sources):
        pass
    skipped.clear()
    counted = pairs[:]
    for raw in sources:
        size = None if raw.text is None else len(_stored(raw.text))  # None: a file left unread
        read_bytes = (size or 0) + (0 if raw.target is None else len(_stored(raw.target)))
        pair_source = None
        if pairs != counted:
            pair_source = next(i for i, (a, b) in enumerate(zip(pairs, counted)) if a != b)
            counted = pairs[:]
        reason = raw_key = None
        if raw.target is None and (size is None or size > cfg.max_bytes):  # pairs: any size
            reason = "too_large"
        else:
            key = _doc_digest(raw)
            raw_key = None if key in seen_raw else (key, raw.split)
            if _is_duplicate(key, raw.split, seen_raw, cfg.dedupe):  # cleaned once
                reason = "duplicate"
        yield _Read(None if reason else raw, reason, read_bytes, dict(skipped), pair_source,
                    raw_key)
        skipped.clear()
    yield _Read(None, None, 0, dict(skipped), None, None, last=True)


def _clean_read(item: _Read, opt: dict) -> _Cleaned:
    """Clean one document read (in a worker): the document, or why it went, and its MinHash."""
    if item.doc is None:
        return _Cleaned(item, None, None, [], None)
    doc, reason, mods = _clean_one((item.doc, opt))
    sig = signature(_plain_text(doc)) if doc is not None and opt["near_dedupe"] else None
    return _Cleaned(item._replace(doc=None), doc, reason, mods, sig)


class _InFlight:
    """Bytes read and not yet cleaned, bounded: the reader waits while ``limit`` are out (a
    worker pool's feeder reads as fast as it can otherwise, the whole corpus into its queue)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.closed = False
        self.changed = threading.Condition()

    @staticmethod
    def cost(item: _Read) -> int:
        return max(1024, item.size)  # many small files: their objects count too

    def take(self, items: Iterable[_Read]) -> Iterator[_Read]:
        for item in items:
            cost = self.cost(item)
            with self.changed:
                self.changed.wait_for(lambda cost=cost: self.closed or not self.held
                                      or self.held + cost <= self.limit)
                if self.closed:
                    return
                self.held += cost
            yield item

    def give(self, item: _Read) -> None:
        with self.changed:
            self.held -= self.cost(item)
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


@contextlib.contextmanager
def _cleaned_in_order(cfg: DataConfig, items: Iterator[_Read]) -> Iterator[Iterator[_Cleaned]]:
    """``items`` cleaned in their order: the first POOL_AFTER_BYTES as read, in this process (a
    small corpus starts no pool), the rest by ``cfg.workers`` processes a bounded window ahead
    of the consumer."""
    opt = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in _CLEANING_FIELDS}
    clean = functools.partial(_clean_read, opt=opt)
    window = _InFlight(IN_FLIGHT_BYTES)
    workers = cfg.workers

    def cleaned() -> Iterator[_Cleaned]:
        read = 0
        for item in items:
            yield clean(item)
            read += window.cost(item)
            if workers > 1 and read >= POOL_AFTER_BYTES:
                break
        else:
            return
        chunksize = 1 if cfg.autopep8 else 16  # autopep8 files vary a lot in cost
        with process.worker_pool(workers) as pool:
            try:
                for result in pool.imap(clean, window.take(items), chunksize=chunksize):
                    window.give(result.read)
                    yield result
            finally:
                window.close()  # the feeder thread stops: the pool's ending joins it

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
        """Count ``cleaned`` into ``shard``, and keep its document unless it repeats one."""
        shard.modified.update(cleaned.mods)
        doc = cleaned.doc
        if doc is None:
            if cleaned.reason:
                shard.dropped[cleaned.reason] += 1
            return
        key = _doc_digest(doc)
        new = key not in self.clean
        if _is_duplicate(key, doc.split, self.clean, self.cfg.dedupe):  # cleaning made a copy
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
            shard.count_read(cleaned.read)
            dedupe.keep(cleaned, shard)
            bar.update(not cleaned.read.last)
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
        raise DataError(f"sources {cfg.sources} hold no files with extensions {cfg.extensions} "
                        "and no JSONL records (an empty .jsonl: a scrape that kept nothing?)")
    if not kept["files"]:
        raise DataError(f"no data left after cleaning sources {cfg.sources}: read "
                        f"{read['files']} files/records, dropped {stats['dropped'] or 'none'}; "
                        f"check the sources, extensions {cfg.extensions} and the "
                        "size/line/literal limits")
    return stats


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


# --- Splits ---

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
        return map(_plain_text, self.docs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(map(_plain_text, self.docs[i]))
        return _plain_text(self.docs[i])

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


def _plain_text(doc: Doc) -> str:
    if doc.chat:
        return "\n".join(m["content"] for m in doc.messages)
    return doc.text if doc.target is None else doc.text + "\n" + doc.target


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


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def corpus_key(cfg: DataConfig) -> str:
    opts = {k: v for k, v in asdict(cfg).items() if k in _CLEANING_FIELDS | _SPLIT_FIELDS}
    for name in ("sources", "val_sources", "test_sources"):
        opts[name] = _sources_fingerprint(getattr(cfg, name), cfg.extensions)
    return _hash_json({"v": PIPELINE_VERSION, "corpus": opts})


# A build keeps its shards beside its cache entry ENTRY, in ``ENTRY.shards``, until ENTRY is
# published; then they are garbage. Publishing and removing them are two steps, and a kill
# between them leaves the shards for the next lookup of the cache (``sweep_cache``) to remove.
_SHARDS_OF = re.compile(r"(?P<entry>[a-z]+-[0-9a-f]{24})\.shards")
# A process building ENTRY marks it with an empty file named as its temporaries are
# (``.ENTRY.shards.tmp-<owner tag>building-...``): a later writer removes it once that process
# has died, and until then no other process removes the shards.
_BUILDING = "building-"


def shards_dir(entry: Path) -> Path:
    """Where the build of the cache entry ``entry`` keeps its shards until it is published."""
    return entry.with_name(f"{entry.name}.shards")


@contextlib.contextmanager
def building(entry: Path, fresh: bool) -> Iterator[Path]:
    """Within: this process builds the cache entry ``entry`` through its shards directory
    (yielded; ``fresh``: an earlier build's shards removed first), marked as under way. Once
    the body has published the entry its shards go, unless another live process builds it too
    (which removes them when done); an interrupted body keeps them for the next build."""
    marker = process.partial_path(shards_dir(entry), "tmp", _BUILDING + os.urandom(4).hex())
    with cache_writes(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    try:
        if fresh:
            remove_shards(entry)
        yield shards_dir(entry)
        if not _builders(entry, besides=marker):
            remove_shards(entry)
    finally:
        marker.unlink(missing_ok=True)


def _builders(entry: Path, besides: Path | None = None) -> list[Path]:
    """The markers (``building``) of the processes building ``entry`` that have not died, but
    ``besides``."""
    pattern = re.compile(re.escape(f".{shards_dir(entry).name}.tmp-") + process.OWNER_PATTERN
                         + _BUILDING)
    try:
        entries = list(entry.parent.iterdir())
    except OSError:  # no cache: no builder
        return []
    return [path for path in entries if path != besides and (match := pattern.match(path.name))
            and not process.owner_is_dead(match)]


def remove_shards(entry: Path) -> None:
    """Remove the shards of ``entry``'s build: renamed aside first to a name tagged with this
    process (``process.partial_path``), so they go whole for any other process, and a kill
    while deleting leaves a temporary that later writers remove."""
    work = shards_dir(entry)
    aside = process.partial_path(work, "tmp", os.urandom(4).hex())
    try:
        os.rename(work, aside)
    except OSError:  # none, another process removed them first, or a read-only cache
        return
    shutil.rmtree(aside, ignore_errors=True)


def sweep_cache(cache_dir: str | Path) -> None:
    """Remove what killed builds left in the data cache: the temporaries and markers of dead
    writers, and the shards of every published entry that no live process builds. The shards
    of an entry not published are kept: its next build continues after them."""
    process.recover_partial_writes(cache_dir)
    try:
        names = [path.name for path in Path(cache_dir).iterdir()]
    except OSError:  # no cache yet, or unreadable: nothing to sweep
        return
    for name in names:
        match = _SHARDS_OF.fullmatch(name)
        entry = Path(cache_dir) / match["entry"] if match else None
        if entry is not None and entry.is_dir() and not _builders(entry):
            remove_shards(entry)


def publish_cache_entry(final: Path, build: Callable[[Path], object],
                        replace: bool = False) -> None:
    """Build the cache entry ``final`` with ``process.write_dir_atomically`` (without
    ``replace`` the first complete build stays); a full disk names the cache directory."""
    with cache_writes(final):
        process.write_dir_atomically(final, build, replace=replace)


@contextlib.contextmanager
def cache_writes(entry: Path) -> Iterator[None]:
    """Within: an OSError of a full disk (or without a file name) while writing ``entry`` of the
    cache names the cache directory, and how to move it."""
    try:
        yield
    except OSError as err:
        full = process.is_disk_full(err)
        if err.filename is not None and not full:
            raise
        advice = (": free space, or move the data cache with CODELM_CACHE=DIR (or the cache_dir "
                  "data option)") if full else ""
        raise OSError(err.errno, f"{err.strerror or err} while writing {entry.name} there; "
                      f"nothing half-built was kept{advice}", str(entry.parent)) from None


def load_corpus(cfg: DataConfig) -> Corpus:
    """Cleaned, split corpus (cached by sources + cleaning + split options); ``cfg`` validated.
    Built through shards beside the entry (``corpus-KEY.shards``): an interrupted build continues
    after its last whole shard; the shards go once the entry is published (``sweep_cache``)."""
    sweep_cache(cfg.cache_dir)
    key = corpus_key(cfg)
    path = Path(cfg.cache_dir) / f"corpus-{key}"
    if cfg.use_cache and (path / "stats.json").exists():
        stats = json.loads((path / "stats.json").read_text())
        stats["cache_hit"] = True
        return _corpus_at(path, stats, key)
    with building(path, fresh=not cfg.use_cache) as work:
        stats = _publish_corpus(cfg, path, work)
    stats["cache_hit"] = False
    return _corpus_at(path, stats, key)


def _publish_corpus(cfg: DataConfig, path: Path, work: Path) -> dict:
    """Build the corpus entry ``path`` through its shards under ``work``; its stats."""
    manifests = build_corpus_shards(cfg, work)
    stats = corpus_stats(manifests, cfg)
    keys = [DocKey(*k) for m in manifests for k in m["keys"]]
    which, unit = split_assignment(keys, cfg)
    routes = [k.split or which[split_key(k, unit)] for k in keys]
    del keys
    stats["split"] = {s: routes.count(s) for s in SPLITS}
    stats["split_by"] = unit
    _check_splits(stats, cfg)

    def write(tmp: Path) -> None:
        with contextlib.ExitStack() as stack:
            out = {s: stack.enter_context(open(tmp / f"{s}.jsonl", "w", encoding="utf-8"))
                   for s in SPLITS}
            for (line, _), split in zip(shard_docs(work, manifests), routes, strict=True):
                out[split].write(line)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))

    publish_cache_entry(path, write, replace=not cfg.use_cache)
    return stats


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


# --- Datasets ---

class LMWindows(Dataset):
    """Windows of a packed, memory-mapped token file: input tokens[s : s+T], labels shifted by
    one. ``stride=1``: every start is an index (training samples them); ``block_size``: one pass."""

    def __init__(self, path: str | Path, dtype: str, n_tokens: int, block_size: int, stride: int):
        self.path, self.dtype, self.n_tokens = str(path), dtype, n_tokens
        self.block_size, self.stride = block_size, stride
        if n_tokens < 2:
            self.length = 0
        elif stride == 1:
            self.length = max(1, n_tokens - block_size)
        else:
            self.length = math.ceil((n_tokens - 1) / stride)

    @cached_property
    def tokens(self) -> np.ndarray:  # opened lazily so DataLoader workers do not pickle the map
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        s = i * self.stride
        chunk = torch.from_numpy(self.tokens[s : s + self.block_size + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:].clone()}


class SupervisedExamples(Dataset):
    """Prompt + completion sequences stored flat; labels are -100 on prompt targets."""

    def __init__(self, directory: str | Path, split: str):
        d = Path(directory)
        self.ids_path = d / f"{split}.ids.npy"
        self.offsets = np.load(d / f"{split}.offsets.npy")
        self.prompt_lens = np.load(d / f"{split}.prompt_lens.npy")

    @cached_property
    def ids(self) -> np.ndarray:  # opened lazily so DataLoader workers do not pickle the map
        return np.load(self.ids_path, mmap_mode="r")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "ids"}

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        """Each example's tokens (its input_ids'), read without the examples."""
        return np.diff(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        seq = torch.from_numpy(self.ids[self.offsets[i] : self.offsets[i + 1]].astype(np.int64))
        labels = seq[1:].clone()
        labels[: max(0, int(self.prompt_lens[i]) - 1)] = IGNORE_INDEX
        return {"input_ids": seq[:-1], "labels": labels}


def supervised_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int,
                       max_completion_tokens: int | None = None,
                       max_prompt_tokens: int | None = None, code: tuple[int, int] = (0, 0),
                       start: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """One causal-LM example: ``start`` + prompt + completion cut by ``_truncate_pair``."""
    prompt, completion = _truncate_pair(prompt_ids, completion_ids, max_length - len(start),
                                        max_completion_tokens, max_prompt_tokens, code)
    prompt = [*start, *prompt]
    seq = torch.tensor(prompt + completion, dtype=torch.long)
    labels = seq[1:].clone()
    labels[: max(0, len(prompt) - 1)] = IGNORE_INDEX
    return {"input_ids": seq[:-1], "labels": labels}


def _truncate_pair(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int,
                   max_completion_tokens: int | None, max_prompt_tokens: int | None = None,
                   code: tuple[int, int] = (0, 0)) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into ``max_length + 1`` tokens and the prompt into
    ``max_prompt_tokens`` (``fit_prompt`` cuts it); the completion keeps its start."""
    completion = list(completion_ids)[:max_completion_tokens]
    room = len(prompt_ids) if max_prompt_tokens is None else min(len(prompt_ids), max_prompt_tokens)
    budget = max_length + 1
    # When both are long, the prompt keeps half the sequence: a completion cut short still
    # teaches its start, a prompt cut to a token or two conditions nothing.
    room = min(room, max(budget - len(completion), budget // 2))
    return fit_prompt(prompt_ids, room, code), completion[: budget - room]


def fit_prompt(prompt_ids: Sequence[int], room: int, code: tuple[int, int] = (0, 0)) -> list[int]:
    """The prompt cut to ``room`` tokens: the end of its ``code`` span (start, end) goes first, so
    that the instruction around the code survives, then its left end (training and eval.py)."""
    prompt = list(prompt_ids)
    room = min(room, len(prompt))
    start, end = code
    del prompt[max(start, end - (len(prompt) - room)) : end]
    return prompt[len(prompt) - room :]


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_id: int | None
            ) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch: ``pad_id`` (or 0) on inputs, -100 on padded labels (so no
    mask is needed: causal attention never looks ahead at the padding); packed rows' document
    ids padded with -1, the padding a document of its own."""
    pad = 0 if pad_id is None else int(pad_id)
    input_ids = pad_sequence([e["input_ids"] for e in examples], batch_first=True,
                             padding_value=pad)
    labels = pad_sequence([e["labels"] for e in examples], batch_first=True,
                          padding_value=IGNORE_INDEX)
    batch = {"input_ids": input_ids, "labels": labels}
    if "document_ids" in examples[0]:
        batch["document_ids"] = pad_sequence([e["document_ids"] for e in examples],
                                             batch_first=True, padding_value=-1)
    return batch


@dataclass
class PreparedData:
    """The three splits of one task: Datasets, or without a tokenizer texts (to train one on)."""

    train: Dataset | Sequence[str]
    val: Dataset | Sequence[str]
    test: Dataset | Sequence[str]
    task: str
    stats: dict
    cache_path: Path | None = None
    sample_prompt: SamplePrompt | None = None  # held out, for the end of a run's sample


class SamplePrompt(typing.NamedTuple):
    """A prompt for a sample completion, and whether its completion ends with its function."""

    text: str
    ends_function: bool


# --- Task builders (text level): each yields Example(head, body, tail, completion) ---

@dataclass
class Example:
    """A supervised example before tokenization: prompt = head + body + tail; ``body`` (the code
    inside an instruction, at most ``body_budget`` tokens) is what a long prompt loses first."""

    head: str
    completion: str
    body: str = ""
    tail: str = ""
    body_budget: int | None = None
    pair: bool = False  # from a pair record: ``pair_special_tokens`` reads its special tokens

    @property
    def prompt(self) -> str:
        return self.head + self.body + self.tail


_DOCUMENTED = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class _Parsed(typing.NamedTuple):
    tree: ast.Module
    lines: list[str]  # numbered as ast numbers them (source_lines), without their ends
    in_string: set[int]  # numbers of the lines that start inside a multi-line string literal


def _parse(doc: Doc) -> _Parsed | None:
    """A Python document parsed, or None when it does not parse."""
    lines = source_lines(doc.text, keepends=True)
    try:
        tree = ast.parse(doc.text)
        tokens = tokenize.generate_tokens(iter(lines).__next__)
        in_string = {row for t in tokens for row in range(t.start[0] + 1, t.end[0] + 1)}
    except PYTHON_PARSE_ERRORS:
        return None
    lines = [line.rstrip("\r\n") for line in lines]
    for node in ast.walk(tree):
        ds = docstring_statement(node) if isinstance(node, _DOCUMENTED) else None
        if ds is not None and _docstring_can_move(ds, lines):
            in_string -= set(range(ds.lineno + 1, ds.end_lineno + 1))
    return _Parsed(tree, lines, in_string)


def _docstring_can_move(ds: ast.Expr, lines: list[str]) -> bool:
    """Whether a docstring's cleaned value survives dedenting its lines by its statement's
    indentation: they are indented that far, and no backslash joins two (an odd run ends one)."""
    inside = lines[ds.lineno : ds.end_lineno]
    indented = all(len(line) - len(line.lstrip(" \t")) >= ds.col_offset or not line.strip()
                   for line in inside)
    return indented and not any((len(line) - len(line.rstrip("\\"))) % 2
                                for line in lines[ds.lineno - 1 : ds.end_lineno - 1])


def line_completion_examples(doc: Doc, n: int, seed: int) -> list[Example]:
    """CodeXGLUE line completion: the file up to a line boundary -> the next (non-blank) line."""
    lines = source_lines(doc.text, keepends=True)
    candidates = [i for i in range(1, len(lines)) if lines[i].strip()]
    rng = random.Random(f"{seed}\0{doc.id}")
    chosen = sorted(rng.sample(candidates, min(n, len(candidates))))
    return [Example("".join(lines[:i]), lines[i].rstrip("\n")) for i in chosen]


def _dedent(parsed: _Parsed, first: int, last: int, indent: int) -> list[str]:
    """Lines ``first``..``last`` moved ``indent`` columns left (at most their own whitespace);
    lines inside a multi-line string keep theirs, so its value is kept."""
    out = []
    for row in range(first, last + 1):
        line = parsed.lines[row - 1]
        if row not in parsed.in_string:
            line = line[min(indent, len(line) - len(line.lstrip(" \t\f"))) :]
        out.append(line)
    return out


def method_examples(doc: Doc, parsed: _Parsed | None = None) -> list[Example]:
    """CodeXGLUE method generation: signature + docstring -> body; the docstring is the
    example's ``body``, so a long prompt loses the end of its docstring, not its signature."""
    parsed = parsed or _parse(doc)
    if parsed is None:
        return []
    out = []
    for node in ast.walk(parsed.tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        ds = docstring_statement(node)
        if (ds is None or len(node.body) < 2 or ds.lineno == node.lineno
                or node.body[1].lineno <= ds.end_lineno):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        head = _dedent(parsed, start, ds.end_lineno, node.col_offset)
        body = _dedent(parsed, ds.end_lineno + 1, node.end_lineno, node.col_offset)
        if not "".join(body).strip():
            continue
        n_sig = ds.lineno - start  # the decorator and def lines before the docstring
        sig, docstring = ("".join(line + "\n" for line in part)
                          for part in (head[:n_sig], head[n_sig:]))
        out.append(Example(sig, "\n".join(body).rstrip(), body=docstring))
    return out


def docstring_examples(doc: Doc, targets: str, prompt: str, code_tokens: int,
                       parsed: _Parsed | None = None) -> list[Example]:
    """A class (or function) with its docstring removed -> the docstring."""
    parsed = parsed or _parse(doc)
    if parsed is None:
        return []
    kinds = {"class": ast.ClassDef, "function": _DOCUMENTED[1:], "both": _DOCUMENTED}[targets]
    out = []
    for node in ast.walk(parsed.tree):
        if not isinstance(node, kinds):
            continue
        ds = docstring_statement(node)
        if ds is None or ds.lineno == node.lineno or _shares_line(parsed.lines, ds):
            continue
        # strip: Python < 3.13 keeps a last line of indentation before the closing quotes
        docstring = (ast.get_docstring(node, clean=True) or "").strip()
        if not docstring:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        indent = node.col_offset
        code = _dedent(parsed, start, ds.lineno - 1, indent)
        if len(node.body) == 1:
            code.append(" " * (ds.col_offset - indent) + "pass")
        code += _dedent(parsed, ds.end_lineno + 1, node.end_lineno, indent)
        source = "\n".join(code)
        template = DOCSTRING_PROMPTS[prompt]
        if not isinstance(node, ast.ClassDef):  # a function's prompt names a function
            template = template.replace("Class", "Function").replace(" class.", " function.")
        head, tail = template.replace("{class_name}", node.name).split("{source_code}")
        out.append(Example(head, docstring, body=source, tail=tail, body_budget=code_tokens))
    return out


def refactor_example(doc: Doc) -> Example:
    """A pair through REFACTOR_TEMPLATE (the input as the body); prompt/completion ones verbatim."""
    if doc.raw_pair:
        return Example(doc.text, doc.target, pair=True)
    head, tail = REFACTOR_TEMPLATE.split("{input}")
    return Example(head, doc.target, body=doc.text, tail=tail, pair=True)


# --- Tokenization, building and caching ---

def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's saved files, role ids and ``ENCODING_VERSION``: the cache changes
    when the ids can."""
    with tempfile.TemporaryDirectory(prefix="codelm-tokenizer-") as d:
        target = Path(d) / "tokenizer"
        target.mkdir()
        tokenizer.save(str(target))
        roles = ("vocab_size", "bos_id", "eos_id", "pad_id",  # can come from files beside it
                 "fim_prefix_id", "fim_middle_id", "fim_suffix_id")
        key = [ENCODING_VERSION, *(getattr(tokenizer, r) for r in roles)]
        h = hashlib.sha256(json.dumps(key).encode())
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(d).as_posix().encode() + b"\0" + p.read_bytes())
        return h.hexdigest()[:24]


def tokenizer_cache_dir(cfg: DataConfig, min_freq: int, max_vocab: int | None) -> Path:
    """Where a CodeTokenizer trained on ``cfg``'s train split is cached."""
    key = _hash_json({"v": ENCODING_VERSION, "corpus": corpus_key(cfg),
                      "min_freq": min_freq, "max_vocab": max_vocab})
    return Path(cfg.cache_dir) / f"tokenizer-{key}"


def _task_options(cfg: DataConfig) -> dict:
    """The options of ``cfg.task`` (a part of its cache key)."""
    opts = {"task": cfg.task, "block_size": cfg.block_size, "seed": cfg.seed}
    if cfg.task != "lm":
        opts.update(add_eos=cfg.add_eos, max_prompt_tokens=cfg.max_prompt_tokens,
                    max_completion_tokens=cfg.max_completion_tokens)
    if cfg.task == "completion":
        opts.update(style=cfg.completion_style)
        if cfg.completion_style == "window":
            opts.update(p=cfg.window_prompt_tokens, c=cfg.window_completion_tokens,
                        s=cfg.window_stride)
        else:
            opts.update(lines_per_file=cfg.lines_per_file)
    if cfg.task == "docstring":
        opts.update(targets=cfg.docstring_targets, min_tokens=cfg.docstring_min_tokens,
                    code_tokens=cfg.docstring_code_tokens,
                    prompt=DOCSTRING_PROMPTS[cfg.docstring_prompt])
    if cfg.task == "refactor":
        opts.update(template=REFACTOR_TEMPLATE)
    if cfg.task == "fim":
        # fim_cut: bump when the PSM cut changes the ids (rebuilds the fim entries only)
        opts.update(fim_rate=cfg.fim_rate, fim_cut=3)
    if reads_special_tokens(cfg.task, cfg.pair_special_tokens):
        opts.update(pair_special_tokens=True)
    return opts


def reads_special_tokens(task: str | None, pair_special_tokens: object) -> bool:
    """Whether a run's pair records (and its prompts) read special-token text as the tokens: a
    chat template's always do."""
    return task == "chat" or (bool(pair_special_tokens) and task != "lm")


def _encode(tokenizer, texts: list[str], cfg: DataConfig, desc: str,
            specials: Sequence[bool] = (), encoder: BatchEncoder | None = None
            ) -> list[list[int]]:
    """The texts' ids, encoded in chunks of about 16M characters (bounded memory, a progress
    bar) on ``encoder`` where it is the tokenizer's (a build's pool), else on a pool of this
    call; a special token's text is text, except in the texts ``specials`` marks
    (``pair_special_tokens``)."""
    if encoder is None or encoder.tokenizer is not tokenizer:
        encoding = tokenizer.batch_encoder(cfg.workers)
    else:
        encoding = contextlib.nullcontext(encoder)
    out: list[list[int]] = [[] for _ in texts]
    with encoding as encoder, progress_bar(total=len(texts), desc=desc, unit="text",
                                           enabled=cfg.progress) as bar:
        for read in (False, True):
            which = [i for i in range(len(texts)) if bool(specials and specials[i]) == read]
            ends = accumulate(len(texts[i]) for i in which)  # characters up to each text
            for _, chunk in groupby(zip(which, ends), lambda pair: pair[1] // 16_000_000):
                chunk = [i for i, _ in chunk]
                encoded = encoder([texts[i] for i in chunk], split_special_tokens=not read)
                for i, ids in zip(chunk, encoded):
                    out[i] = ids
                bar.update(len(chunk))
    return out


def _token_dtype(tokenizer) -> str:
    return "uint16" if tokenizer.vocab_size <= 65536 else "uint32"


def prompt_prefix(tokenizer: CodeTokenizer | BPETokenizer, task: str | None) -> list[int]:
    """The ids before a prompt, as the model saw text in training: the template start (Llama-3's
    BOS), after an EOS for the lm task, which packs each file after one."""
    eos = [tokenizer.eos_id] if task == "lm" and tokenizer.eos_id is not None else []
    return eos + tokenizer.template_prefix


def _special_token_text(tokenizer: CodeTokenizer | BPETokenizer) -> re.Pattern | None:
    """What finds the text of the tokenizer's ``matched_special_tokens``; None: it has none."""
    specials = tokenizer.matched_special_tokens
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _without_text_template_prefix(ids: list[int], prefix: Sequence[int]) -> list[int]:
    """``ids`` less a start equal to the template prefix (``prompt_prefix`` places it): one BOS."""
    return ids[len(prefix) :] if prefix and ids[: len(prefix)] == list(prefix) else ids


RUN_READ_TEXT = "the run trained on such text as text (pair records without pair_special_tokens, " \
                "or the lm task)"


def encode_prompts(tokenizer: CodeTokenizer | BPETokenizer, prompts: Sequence[str],
                   pair_special_tokens: bool | None = None, remedy: str = "",
                   why: str = RUN_READ_TEXT) -> list[list[int]]:
    """The ids of user prompts (after ``prompt_prefix``), a special token's text read as the model
    learned it: None (a base model) as transformers does, True as pairs, False as text (a note)."""
    if pair_special_tokens is None:
        return [tokenizer.encode(p) for p in prompts]
    if pair_special_tokens:
        prefix = tokenizer.template_prefix
        return [_without_text_template_prefix(tokenizer.encode(p), prefix) for p in prompts]
    found = _special_token_text(tokenizer)
    held = {m for p in prompts for m in found.findall(p)} if found else set()
    if held:
        n = len({p for p in prompts if found.search(p)})  # pass@k repeats each problem
        names = [t for t in tokenizer.matched_special_tokens if t in held]
        print(f"note: {n} prompt(s) hold the text of special token(s) of the tokenizer "
              f"({', '.join(names)}); {why}, so the prompt is encoded as text, not as those "
              f"tokens (as transformers' tokenizer(text) would read them){remedy}",
              file=sys.stderr)
    return [encode_text(tokenizer, p) for p in prompts]


def encode_text(tokenizer: CodeTokenizer | BPETokenizer, text: str) -> list[int]:
    """A text's ids as data building encodes a document (special tokens' text is text)."""
    return tokenizer.encode(text, split_special_tokens=True)


def packed_document(tokenizer: CodeTokenizer | BPETokenizer, ids: Sequence[int]) -> list[int]:
    """A file's ids as the lm task packs them: the template start, the file, EOS."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]  # eval.py scores without one
    return [*tokenizer.template_prefix, *ids, *eos]


# The lm task tokenizes a split's texts, and a supervised task builds a split's examples from
# its documents, in shards of about this many characters, each written when done (its ids: 8-16
# bytes a character while encoded): what an interrupt loses.
TOKEN_SHARD_CHARS = 8_000_000


def _build_lm(corpus: Corpus, tokenizer, cfg: DataConfig, out: Path, work: Path) -> dict:
    """Each split's packed token file, concatenated from its token shards under ``work``."""
    if tokenizer.eos_id is None:
        raise DataError("the lm task packs files with EOS between them; the tokenizer has no eos_id")
    dtype = _token_dtype(tokenizer)
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
    dtype = _token_dtype(tokenizer)
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
    _say_throughput(f"tokenize {split}", chars, started, cfg)
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


def _say_throughput(stage: str, chars: int, started: float, cfg: DataConfig) -> None:
    """A stage's throughput line (with progress on, when it built anything)."""
    if cfg.progress and chars:
        seconds = time.perf_counter() - started
        print(f"{stage}: {chars / 1e6:.1f} M characters in {seconds:.1f} s "
              f"({chars / 1e6 / seconds:.2f} M/s, {cfg.workers} workers)", file=sys.stderr)


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


def _examples_for(doc: Doc, cfg: DataConfig, events: Counter) -> list[Example]:
    if cfg.task == "refactor":
        if doc.target is None:
            raise DataError(
                f"the refactor task needs JSONL pair records {{'input', 'output'}}; the data holds "
                f"code files (e.g. {doc.id}: a directory's file or a scraper's {{'text'}} record)")
        return [refactor_example(doc)]
    if doc.target is not None:  # pairs in any other task: used as given
        return [Example(doc.text, doc.target, pair=True)]
    if cfg.task == "completion":
        return line_completion_examples(doc, cfg.lines_per_file, cfg.seed)
    if not doc.is_python:  # method and docstring targets come from Python files only
        return []
    parsed = _parse(doc)
    if parsed is None:
        events["skipped_syntax_error_file"] += 1
        return []
    if cfg.task == "method":
        return method_examples(doc, parsed)
    if cfg.task == "docstring":
        return docstring_examples(doc, cfg.docstring_targets, cfg.docstring_prompt,
                                  cfg.docstring_code_tokens, parsed)
    raise AssertionError(cfg.task)


def held_out_prompt(docs: Iterable[Doc], cfg: DataConfig) -> SamplePrompt | None:
    """An end-of-run sample's prompt from held-out documents (a pair task's first example, else
    the first top-level function with a docstring, its header and docstring, else the first
    function's header), and whether its completion ends with its function."""
    header = None
    if cfg.task == "chat":  # its prompts need the tokenizer's template
        return None
    for doc in docs:
        if cfg.task not in ("lm", "fim", "completion"):
            if doc.target or cfg.task != "refactor":
                if examples := _examples_for(doc, cfg, Counter()):
                    return SamplePrompt(examples[0].prompt, cfg.task == "method")
            continue
        parsed = _parse(doc) if doc.is_python else None  # is_python: not a pair
        for fn in parsed.tree.body if parsed else []:
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            docstring = docstring_statement(fn)
            end = docstring.end_lineno if docstring else fn.body[0].lineno - 1
            if end >= fn.lineno:  # not a one-line `def f(): ...`
                start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
                text = "\n".join(parsed.lines[start - 1 : end]) + "\n"
                if docstring:
                    return SamplePrompt(text, True)
                header = header or text
    return None if header is None else SamplePrompt(header, True)


_CHARS_PER_TOKEN_BOUND = 32


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize_examples(examples: list[Example], tokenizer: CodeTokenizer | BPETokenizer,
                      cfg: DataConfig, desc: str, encoder: BatchEncoder | None = None
                      ) -> list[tuple[list[int], list[int], tuple[int, int]]]:
    """(prompt ids, completion ids, the body's span in the prompt) of each example. A body with a
    budget is tokenized apart, to be cut; otherwise the prompt is tokenized whole (as eval.py
    does), its head and tail apart only to find the body's span. With ``pair_special_tokens`` a
    pair reads special tokens' text as the tokens, and loses its own template prefix (one BOS)."""
    # Text far beyond what can survive truncation is cut before tokenizing.
    chars = _CHARS_PER_TOKEN_BOUND * (cfg.block_size + 1)
    reads = [(cfg.pair_special_tokens or cfg.task == "chat") and e.pair for e in examples]
    parts = []
    for e in examples:
        head, completion = e.head[-chars:], e.completion[:chars]
        if e.body_budget is None:
            whole = head + e.body[:chars] + e.tail
            parts += [whole, head, e.tail] if e.body else [whole, "", ""]
        else:
            parts += [head, e.body[: _CHARS_PER_TOKEN_BOUND * e.body_budget], e.tail]
        parts.append(completion)
    ids = _encode(tokenizer, parts, cfg, desc, [r for r in reads for _ in range(4)], encoder)
    prefix = tokenizer.template_prefix
    out = []
    for i, e in enumerate(examples):
        a, b, c, completion = ids[4 * i : 4 * i + 4]
        if e.body_budget is None:  # a: the whole prompt, b: its head, c: its tail
            start = _common_prefix(a, b)
            end = max(start, len(a) - _common_prefix(a[::-1], c[::-1])) if e.body else start
            # With pair_special_tokens the text's own BOS goes.
            n = len(a) - len(_without_text_template_prefix(a, prefix)) if reads[i] else 0
            out.append((a[n:], completion, (max(0, start - n), max(0, end - n))))
        else:  # a: the head, b: the body, c: the tail
            b = b[: e.body_budget]
            out.append((a + b + c, completion, (len(a), len(a) + len(b))))
    return out


def window_pairs(ids: list[int], cfg: DataConfig) -> Iterator[tuple[list[int], list[int]]]:
    """A sliding window: up to P tokens of context -> the next C tokens."""
    p, c = cfg.window_prompt_tokens, cfg.window_completion_tokens
    stride = cfg.window_stride or (p + c)
    for s in range(min(p, max(1, len(ids) - c)), len(ids) - 1, stride):
        prompt, completion = ids[max(0, s - p) : s], ids[s : s + c]
        if prompt and completion:
            yield prompt, completion


def _char_start(raw: bytes, x: int) -> int:
    """``x`` moved back to the start of the UTF-8 character holding byte ``x``."""
    for _ in range(3):
        if 0 < x < len(raw) and raw[x] & 0xC0 == 0x80:
            x -= 1
    return x


def _fim_plan(ids: list[int], doc_id: str, size: int, tokenizer, cfg: DataConfig,
              byte_lengths: np.ndarray) -> list[list[int] | tuple[str, str, str]]:
    """A file's chunks of ``size`` tokens: plain LM chunks (ids) or, for a seeded ``fim_rate``
    share, the texts of prefix, middle and suffix cut at two tokens moved to character starts."""
    rng = random.Random(f"{cfg.seed}\0fim\0{doc_id}")
    table = tokenizer._id_to_bytes
    offsets = None
    plan: list[list[int] | tuple[str, str, str]] = []
    for s in range(0, len(ids), size):
        chunk = ids[s : s + size]
        if len(chunk) >= 3 and rng.random() < cfg.fim_rate:
            a, b = sorted(rng.sample(range(1, len(chunk)), 2))
            if offsets is None:  # where each token of the file starts, in bytes
                offsets = np.concatenate([[0], np.cumsum(byte_lengths[ids])]).tolist()
            # The chunk's bytes and 3 tokens either side, to find where its end characters start.
            first = max(0, s - 3)
            raw = b"".join(map(table.__getitem__, ids[first : s + len(chunk) + 3]))
            start, x, y, end = (_char_start(raw, offsets[s + k] - offsets[first])
                                for k in (0, a, b, len(chunk)))
            while y <= x < end or (y < end and raw[y] & 0xC0 == 0x80):
                y += 1  # both cuts in one character: the middle takes that character
            plan.append(tuple(raw[i:j].decode("utf-8", "replace")
                              for i, j in ((start, x), (x, y), (y, end))))
        elif len(chunk) >= 2:
            plan.append(chunk)
    return plan


def _fim_pairs(docs: list[tuple[list[int], str]], tokenizer, cfg: DataConfig,
               desc: str = "fim parts", encoder: BatchEncoder | None = None
               ) -> list[list[tuple[list[int], list[int]]]]:
    """(prompt, completion) pairs of each file ``(ids, doc id)``: plain LM chunks, and a
    ``fim_rate`` share of prefix-suffix-middle (PSM) examples whose parts are cut at characters
    and encoded alone, as at inference (StarCoder's FIM)."""
    # The template prefix, three sentinels, the chunk and EOS fill ``block_size + 1``.
    size = max(2, cfg.block_size + 1 - 4 - len(tokenizer.template_prefix))
    byte_lengths = np.fromiter(map(len, tokenizer._id_to_bytes), np.int64)
    plans = [_fim_plan(ids, doc_id, size, tokenizer, cfg, byte_lengths) for ids, doc_id in docs]
    texts = [t for plan in plans for item in plan if isinstance(item, tuple) for t in item]
    parts = iter(_encode(without_stripping(tokenizer), texts, cfg, desc, encoder=encoder))

    def pair(item: list[int] | tuple[str, str, str]) -> tuple[list[int], list[int]]:
        if not isinstance(item, tuple):
            return [], item
        prefix, middle, suffix = next(parts), next(parts), next(parts)
        # Encoded apart, the parts can outgrow the chunk: the prompt gets what the middle leaves.
        limit = max(FIM_SENTINELS, size + FIM_SENTINELS - len(middle))
        limit = min(limit, cfg.max_prompt_tokens or limit)
        return fim_prompt(tokenizer, prefix, suffix, limit), middle

    return [[pair(item) for item in plan] for plan in plans]


def fim_prompt(tokenizer, prefix: list[int], suffix: list[int], max_prompt_tokens: int
               ) -> list[int]:
    """A prefix-suffix-middle prompt in the tokenizer's own FIM tokens (PREFIX prefix SUFFIX
    suffix MIDDLE), prefix and suffix cut to fit ``max_prompt_tokens`` (training and eval.py)."""
    prefix, suffix = _fit_fim_context(prefix, suffix, max_prompt_tokens)
    return ([tokenizer.fim_prefix_id] + prefix + [tokenizer.fim_suffix_id] + suffix
            + [tokenizer.fim_middle_id])


def without_stripping(tokenizer):
    """``tokenizer`` without comment stripping: PSM parts are already stripped text, and a part
    stripped alone can lose code (a string's tail read as a comment)."""
    if not getattr(tokenizer, "strip_comments", False):
        return tokenizer
    plain = copy.copy(tokenizer)
    plain.strip_comments = False
    return plain




def _fit_fim_context(prefix: list[int], suffix: list[int], max_prompt_tokens: int
                     ) -> tuple[list[int], list[int]]:
    """Prefix and suffix cut to fit a PSM prompt into ``max_prompt_tokens``, keeping the code
    next to the middle (each keeps half the room where both are long)."""
    room = max_prompt_tokens - FIM_SENTINELS
    keep = min(len(prefix), max(room // 2, room - len(suffix)))
    return prefix[len(prefix) - keep :], suffix[: room - keep]


def _split_pairs(docs: list[Doc], tokenizer, cfg: DataConfig, s: str, events: Counter,
                 encoder: BatchEncoder | None = None
                 ) -> list[tuple[list[int], list[int], bool, tuple[int, int]]]:
    """The (prompt ids, completion ids, EOS follows it, the prompt's span truncation cuts first)
    of split ``s``'s documents ``docs`` (its consecutive ones in ``_example_order``), counting
    skipped examples in ``events``."""
    pairs = []
    if _encodes_files(cfg):
        code = [d for d in docs if d.target is None]
        encoded = _encode(tokenizer, [d.text for d in code], cfg, f"tokenize {s}",
                          encoder=encoder)
        if cfg.task == "fim":
            files = _fim_pairs([(ids, d.id) for d, ids in zip(code, encoded)], tokenizer, cfg,
                               f"fim parts {s}", encoder)
            pairs = [(p, c, bool(p), (0, 0)) for file_pairs in files for p, c in file_pairs]
        else:
            pairs = [(p, c, False, (0, 0)) for ids in encoded for p, c in window_pairs(ids, cfg)]
        examples = [Example(d.text, d.target, pair=True) for d in docs if d.target is not None]
    elif cfg.task == "chat":
        examples = chat_examples(docs, tokenizer, cfg, s)
    else:
        examples = [e for d in progress_bar(docs, desc=f"{cfg.task} {s}", enabled=cfg.progress)
                    for e in _examples_for(d, cfg, events)]
    tokenized = tokenize_examples(examples, tokenizer, cfg, f"tokenize {s}", encoder)
    for prompt, completion, span in tokenized:
        if cfg.task == "docstring" and len(completion) < cfg.docstring_min_tokens:
            events["skipped_docstring_too_short"] += 1
            continue
        # a chat answer that ends with its template's end-of-turn token gets no EOS after it
        marked = cfg.task == "chat" and bool(completion) and tokenizer.is_special(completion[-1])
        pairs.append((prompt, completion, not marked, span))
    return pairs


def chat_examples(docs: list[Doc], tokenizer, cfg: DataConfig, split: str) -> list[Example]:
    """One example an assistant turn of each conversation (tokenizer.chat_turns): the
    conversation before it, rendered with the model's chat template, then the answer."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the chat task needs the tokenizer of an instruct model, whose "
                        "tokenizer_config.json holds a chat_template (--init-from, --tokenizer)")
    examples = []
    for doc in progress_bar(docs, desc=f"chat {split}", enabled=cfg.progress):
        if not doc.chat:
            raise DataError(f"the chat task needs JSONL conversation records {{'messages': "
                            f"[{{'role', 'content'}}, ...]}}; the data holds {doc.id}, which is "
                            "not one")
        try:
            turns = chat_turns(tokenizer, doc.messages)
        except ValueError as e:  # the template's own error (raise_exception, an unknown role)
            raise DataError(f"{doc.id}: {e}") from None
        for turn in turns:
            examples.append(Example(turn.prompt, turn.answer, pair=True))
    return examples


def _build_supervised(corpus: Corpus, tokenizer, cfg: DataConfig, out: Path, work: Path) -> dict:
    """The examples of each split, joined from its example shards under ``work``
    (``_example_shards``): the files a build of the split's examples at once would write."""
    if cfg.task == "fim" and None in (tokenizer.fim_prefix_id, tokenizer.fim_middle_id,
                                      tokenizer.fim_suffix_id):
        raise DataError("the fim task needs a tokenizer with FIM tokens (fim_prefix/middle/suffix)")
    dtype = _token_dtype(tokenizer)
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
                        "train documents; check the sources and task options")
    return meta


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
    of them, joined, are ``_split_pairs`` of the whole split."""
    if not _encodes_files(cfg):
        return iter(docs)
    return chain((d for d in docs if d.target is None), (d for d in docs if d.target is not None))


def _doc_chars(doc: Doc) -> int:
    return len(_plain_text(doc))


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
        for chunk in text_batches(ordered, TOKEN_SHARD_CHARS, _doc_chars):
            examples, events = _chunk_examples(chunk, encoder, quiet, split, in_train)
            path = _task_shard_path(work, split, len(done), ".npz")
            done.append(_write_example_shard(path, examples, len(chunk), events))
            chars += sum(map(_doc_chars, chunk))
            bar.update(len(chunk))
    _say_throughput(f"{cfg.task} {split}", chars, started, cfg)
    return done


def _chunk_examples(docs: list[Doc], encoder: BatchEncoder, cfg: DataConfig, split: str,
                    in_train: np.ndarray | None) -> tuple[_Examples, Counter]:
    """The examples of consecutive documents of a split, truncated and filtered as the task's
    options say, and the events counted on them (examples skipped or truncated, by reason)."""
    tokenizer = encoder.tokenizer
    eos = tokenizer.eos_id if cfg.add_eos else None
    start = prompt_prefix(tokenizer, cfg.task)
    events: Counter = Counter()
    special_text = _special_token_text(tokenizer)
    if special_text is not None:
        events["pair_holds_special_token_text"] = sum(
            bool(special_text.search(d.text) or special_text.search(d.target))
            for d in docs if d.target is not None)
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    for prompt, completion, ends, code_span in _split_pairs(docs, tokenizer, cfg, split, events,
                                                            encoder):
        n_target = len(completion)
        if ends and eos is not None:
            completion = completion + [eos]
        # A plain LM chunk of the fim task is not cut: its cut tokens would be in no example.
        limit = cfg.max_completion_tokens if prompt or cfg.task != "fim" else None
        kept_prompt, kept_completion = _truncate_pair(
            prompt, completion, cfg.block_size - len(start), limit, cfg.max_prompt_tokens,
            code_span)
        if not kept_completion[:n_target]:  # nothing to learn (an EOS alone is no target)
            events["skipped_empty_completion"] += 1
            continue
        events["prompt_truncated"] += len(kept_prompt) < len(prompt)
        events["completion_truncated"] += len(kept_completion) < len(completion)
        seqs.append(start + kept_prompt + kept_completion)
        prompt_lens.append(len(start) + len(kept_prompt))
    keys = np.array([_example_key(seq, n) for seq, n in zip(seqs, prompt_lens)], "S16")
    # Different files can hold the same code: such an example stays in train only.
    if in_train is not None:
        kept = ~_in_sorted(keys, in_train)
        events["skipped_same_as_train"] += int((~kept).sum())
        seqs = list(itertools.compress(seqs, kept))
        prompt_lens = list(itertools.compress(prompt_lens, kept))
    ids = np.fromiter(chain.from_iterable(seqs), _token_dtype(tokenizer))
    offsets = np.cumsum([0, *map(len, seqs)], dtype=np.int64)
    own_keys = np.unique(keys) if split == "train" else np.zeros(0, "S16")
    return _Examples(ids, offsets, np.asarray(prompt_lens, np.int32), own_keys), events


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each of ``keys`` is in the sorted array ``sorted_keys``."""
    at = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
    return sorted_keys[at] == keys if len(sorted_keys) else np.zeros(len(keys), bool)


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
        with np.load(shard.path) as arrays:  # all but the keys
            part_ids, part_offsets, part_lens = (arrays[name] for name in _Examples._fields[:3])
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


def prepare(cfg: DataConfig, tokenizer: CodeTokenizer | BPETokenizer | None = None
            ) -> PreparedData:
    """Build (or load from cache) the three splits of ``cfg.task``; ``tokenizer=None`` returns
    the cleaned split texts (to train a tokenizer on ``.train``)."""
    cfg.validate()
    if tokenizer is None:
        corpus = load_corpus(cfg)
        texts = [Texts(getattr(corpus, s)) for s in SPLITS]  # read as iterated
        return PreparedData(*texts, task=cfg.task,
                            stats={"corpus": corpus.stats, "cache_hit": corpus.stats["cache_hit"]})
    if cfg.task in ("method", "docstring") and getattr(tokenizer, "strip_comments", False):
        raise DataError(f"the {cfg.task} task needs the docstrings a tokenizer with "
                        "strip_comments=True deletes from its prompts; use a tokenizer with "
                        "strip_comments=False")
    key = _hash_json({"corpus": corpus_key(cfg), "tokenizer": tokenizer_fingerprint(tokenizer),
                      "task": _task_options(cfg)})
    path = Path(cfg.cache_dir) / f"{cfg.task}-{key}"
    sweep_cache(cfg.cache_dir)
    cache_hit = cfg.use_cache and (path / "meta.json").exists()
    meta: dict = json.loads((path / "meta.json").read_text()) if cache_hit else {}
    if not cache_hit:
        corpus = load_corpus(cfg)
        build = _build_lm if cfg.task == "lm" else _build_supervised
        with building(path, fresh=not cfg.use_cache) as work:

            def write(tmp: Path) -> None:
                meta.update(corpus=corpus.stats, task=build(corpus, tokenizer, cfg, tmp, work))
                held_out = chain(corpus.val, corpus.test, corpus.train)
                meta["sample_prompt"] = held_out_prompt(held_out, cfg)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

            publish_cache_entry(path, write, replace=not cfg.use_cache)
    _note_pairs_as_text(cfg, meta)
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
    n = sum(events.get("pair_holds_special_token_text", 0)
            for events in meta["task"].get("events", {}).values())
    if n and not cfg.pair_special_tokens:
        print(f"note: {n} input/output pair(s) hold the text of a special token of the tokenizer "
              "(e.g. <|eot_id|>), encoded as text: to read it as the token, as transformers' "
              "tokenizer(text) does, use --pair-special-tokens or --data-options "
              "'{\"pair_special_tokens\": true}'", file=sys.stderr)


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

def make_cache_dir(cache_dir: str, option: str | None) -> None:
    """Create the data cache directory, or say why naming where it was set: ``option`` (the flag
    or key), else ``CODELM_CACHE`` or its default."""
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if option is not None:
            raise ValueError(f"{option} {cache_dir}: cannot create it ({err.strerror})") from None
        origin = (f"CODELM_CACHE={os.environ['CODELM_CACHE']} puts it there; point CODELM_CACHE"
                  if os.environ.get("CODELM_CACHE") else "set CODELM_CACHE")
        raise ValueError(f"{cache_dir}: cannot create the data cache ({err.strerror}); {origin} "
                         "to a writable directory (or set data_options.cache_dir)") from None


def main(argv: list[str] | None = None) -> int:
    parser = settings.ArgumentParser(
        description="Prepare a codelm dataset: read sources, clean, split, build a task, cache "
        "it, and print counts per stage (JSON).", argument_default=argparse.SUPPRESS)
    parser.add_argument("--tokenizer",
                        help="tokenizer file/dir; without one only the cleaned corpus is built")
    settings.add_config_flags(parser, DataConfig, _CHOICES)
    flags = vars(parser.parse_args(argv))
    tokenizer_path = flags.pop("tokenizer", None)

    def work() -> None:
        cfg = settings.config_from_dict(DataConfig, flags, "command line", _CHOICES)
        if cfg.use_cache:
            make_cache_dir(cfg.cache_dir, "--cache-dir" if "cache_dir" in flags else None)
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        data = prepare(cfg, tokenizer)
        print(json.dumps(data.stats, indent=1))  # the counts of every stage
        if data.cache_path is not None:
            print(f"cached at {data.cache_path}")

    return process.run_tool(work, "interrupted: whole shards are kept, no half-built cache "
                                  "entry; the same command continues from them")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
