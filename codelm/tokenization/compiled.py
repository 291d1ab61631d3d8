"""A big tokenizer.json's slow parts, kept in the cache once per file: reading Gemma 3's
(262,144 tokens, 514,906 merges) from JSON and deriving its tables takes longer than HF
tokenizers' whole load. The kept form is JSON and arrays of integers (nothing in it runs when
read), named by the SHA-256 of the tokenizer.json it was made from, which it repeats."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import sys
from array import array
from pathlib import Path
from typing import NamedTuple

from codelm.runtime import process, settings
from codelm.tokenization import merges, spiece
from codelm.tokenization.merges import Merges
from codelm.tokenization.spiece import WordCuts

# Files smaller than this are read from their JSON each time (a few tenths of a second at most).
CACHED_FROM_BYTES = 4 << 20
_FORMAT = 1  # one more where the kept form changes
_MAGIC = b"codelm compiled tokenizer\n"


class ModelTables(NamedTuple):
    """A BPE model's vocabulary and merges, and what its merged tokens decide for SentencePiece
    text: what is slow to read from a tokenizer.json and to derive."""

    vocab: dict[str, int]
    merges: Merges
    word_cuts: WordCuts | None  # how SentencePiece text is cut (None: a segment is one word)
    space_runs: bool | None  # SpaceRuns.order's answer


def digest(path: Path) -> str | None:
    """The SHA-256 naming the kept form of the tokenizer.json at ``path``; None for a file too
    small to keep one, or one that cannot be read (its reader says why)."""
    sha = hashlib.sha256()
    try:
        if path.stat().st_size < CACHED_FROM_BYTES:
            return None
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                sha.update(chunk)
    except OSError:
        return None
    return sha.hexdigest()


@functools.cache
def _code() -> str:
    """The SHA-256 of the code that derives the kept tables: a form kept by other code is
    made again. bpe.py, which reads a model's vocab and merges, imports this module: it is
    named by its path."""
    sha = hashlib.sha256()
    files = [Path(module.__file__) for module in (sys.modules[__name__], merges, spiece)]
    for file in [*files, Path(__file__).with_name("bpe.py")]:
        with contextlib.suppress(OSError):
            sha.update(file.read_bytes())
    return sha.hexdigest()


def kept_path(digest: str) -> Path:
    """Where the compiled form of the file of ``digest`` is kept."""
    return settings.cache_root() / "tokenizers" / f"{digest}.bpe"


def load(digest: str) -> tuple[dict, ModelTables] | None:
    """(the tokenizer.json less its model's vocab and merges, its ModelTables) as kept for the
    file of ``digest``; None where none is kept, or it is damaged or of another format."""
    try:
        data = kept_path(digest).read_bytes()
    except OSError:
        return None
    try:
        return _parsed(data, digest)
    except (ValueError, KeyError, TypeError, IndexError):  # damaged: made again from the JSON
        return None


def _parsed(data: bytes, digest: str) -> tuple[dict, ModelTables] | None:
    if not data.startswith(_MAGIC):
        return None
    start = len(_MAGIC) + 8
    end = start + int.from_bytes(data[len(_MAGIC) : start], "little")
    header = json.loads(data[start:end])
    if (header["format"], header["source"], header["byteorder"], header["code"]) != (
            _FORMAT, digest, sys.byteorder, _code()):
        return None
    arrays = []
    for length in header["lengths"]:
        arrays.append(array("q", data[end : end + 8 * length]))
        end += 8 * length
    ids, keys, values = arrays
    tokens = header["tokens"]
    if end != len(data) or len(ids) != len(tokens) or len(keys) != len(values):
        return None
    cuts = header["word_cuts"]
    tables = ModelTables(dict(zip(tokens, ids)), Merges(dict(zip(keys, values)), header["size"]),
                         WordCuts(*cuts) if cuts is not None else None, header["space_runs"])
    return header["spec"], tables


def store(digest: str, spec: dict, tables: ModelTables) -> None:
    """Keep ``tables``, and ``spec`` less its model's vocab and merges, for the file of
    ``digest``; where the cache cannot be written, nothing is kept."""
    model = {key: value for key, value in spec["model"].items() if key not in ("vocab", "merges")}
    arrays = [array("q", tables.vocab.values()), array("q", tables.merges.table.keys()),
              array("q", tables.merges.table.values())]
    header = {"format": _FORMAT, "source": digest, "byteorder": sys.byteorder, "code": _code(),
              "spec": {**spec, "model": model}, "tokens": list(tables.vocab),
              "size": tables.merges.no_pair, "space_runs": tables.space_runs,
              "word_cuts": list(tables.word_cuts) if tables.word_cuts is not None else None,
              "lengths": [len(a) for a in arrays]}
    # surrogatepass: a token may hold a lone surrogate (JSON can spell one); json.loads reads
    # bytes back with it
    head = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")
    path = kept_path(digest)
    temp = process.partial_path(path, "tmp", f"-{secrets.token_hex(4)}")  # (threads too)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        process.recover_partial_writes(path.parent)  # what killed writers left
        with open(temp, "wb") as f:
            f.write(_MAGIC + len(head).to_bytes(8, "little") + head)
            for a in arrays:
                f.write(a.tobytes())
        os.replace(temp, path)  # whole or not at all, for a reader at the same time
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if not isinstance(e, OSError):  # a full disk only costs the next load its speed
            raise
