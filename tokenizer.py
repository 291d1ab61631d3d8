"""Tokenizers: ``CodeTokenizer`` (trained here, lossless through byte fallback, saved as an HF
tokenizer.json) and ``BPETokenizer`` (the ids of HF ``tokenizers`` for byte-level BPE files;
anything else is refused naming the component). Ground floor: imports only settings and process.

Main path: ``load_tokenizer(path)`` -> ``.encode(text)`` / ``.decode(ids)``.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, as in every script
    from codelm.runtime import process

    process.quiet_start_up_stops()

import ast
import contextlib
import functools
import heapq
import io
import itertools
import json
import operator
import os
import sys
import tokenize
import unicodedata
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import NamedTuple, TypeVar

import regex

from codelm.runtime import process, settings

TOKENIZER_FILE = "tokenizer.json"
CODE_TOKENIZER_TYPE = "codelm-code-tokenizer"
CODE_TOKENIZER_FORMAT_VERSION = 1  # of the file ``CodeTokenizer.to_dict`` writes
# What ids depend on besides a tokenizer's files (a key of dataset's caches): these encoding rules
# (bump when a file starts to encode differently) and `regex`'s Unicode tables.
ENCODING_VERSION = f"4+regex-{regex.__version__}"
# Texts shorter than this in total are encoded in-process: starting workers would cost more.
_MIN_PARALLEL_CHARS = 1 << 20
# Distinct pieces remembered per tokenizer; code repeats its words, so this is rarely reached.
_MAX_CACHE_ENTRIES = 1 << 20


class _PieceCache(dict):
    """Piece -> token ids; a miss computes the ids once (code repeats its words)."""

    def __init__(self, encode_piece):
        super().__init__()
        self._encode_piece = encode_piece

    def __missing__(self, piece: str) -> tuple[int, ...]:
        if len(self) >= _MAX_CACHE_ENTRIES:
            self.clear()
        ids = tuple(self._encode_piece(piece))  # tuples chain a little faster than lists
        self[piece] = ids
        return ids


# --- Parallel batch encoding shared by both tokenizers ---

_worker_tokenizer = None


def _init_worker(tok) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tok


def _encode_in_worker(text: str, **options) -> bytes:
    # An array pickles as one buffer, far cheaper than a list of Python ints.
    return array("I", _worker_tokenizer.encode(text, **options)).tobytes()


class BatchEncoder:
    """Encodes batches of texts on one pool of worker processes, started at the first batch
    worth it and kept across batches (each worker's piece cache stays warm); a context manager
    that stops the pool. Small batches, one worker, or a daemon process (a DataLoader worker,
    which can have no children) encode in this process. Options as ``encode``'s, per batch."""

    def __init__(self, tokenizer, num_workers: int | None = None):
        self.tokenizer = tokenizer
        self.workers = process.worker_count(num_workers)
        assert self.workers >= 1, num_workers
        self._pool = None
        self._ending = contextlib.ExitStack()  # ends the pool with the encoder

    def __enter__(self) -> BatchEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self._pool = None
        self._ending.__exit__(*exc)

    def _in_process(self, texts: Sequence[str]) -> bool:
        return self.workers == 1 or len(texts) < 2 or sum(map(len, texts)) < _MIN_PARALLEL_CHARS

    def arrays(self, texts: Sequence[str], add_special_tokens: bool = False,
               split_special_tokens: bool = False) -> list[array]:
        """Each text's ids as an ``array("I")`` (no Python int per token)."""
        options = {"add_special_tokens": add_special_tokens,
                   "split_special_tokens": split_special_tokens}
        if self._in_process(texts):
            return [array("I", self.tokenizer.encode(t, **options)) for t in texts]
        if self._pool is None:
            pool = process.worker_pool(self.workers, _init_worker, (self.tokenizer,))
            self._pool = self._ending.enter_context(pool)
        # Many chunks per worker balance uneven files without paying per-text overhead.
        results = self._pool.map(functools.partial(_encode_in_worker, **options), texts,
                                 chunksize=max(1, len(texts) // (self.workers * 16)))
        return [array("I", buf) for buf in results]

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False,
                 split_special_tokens: bool = False) -> list[list[int]]:
        """Each text's ids."""
        arrays = self.arrays(texts, add_special_tokens, split_special_tokens)
        return [ids.tolist() for ids in arrays]


class _BatchEncodeMixin:
    """encode_batch over processes, decode, and the piece cache (never pickled)."""

    _id_to_bytes: list[bytes]
    _special_ids: Container[int]  # the ids that skip_special_tokens drops

    def batch_encoder(self, num_workers: int | None = None) -> BatchEncoder:
        """A BatchEncoder of this tokenizer, for many batches on one pool of ``num_workers``
        processes (default: every core)."""
        return BatchEncoder(self, num_workers)

    def encode_batch(self, texts: Sequence[str], num_workers: int | None = None,
                     add_special_tokens: bool = False, split_special_tokens: bool = False
                     ) -> list[list[int]]:
        """Encode many texts with ``num_workers`` processes (default: every core)."""
        if isinstance(texts, str):  # list() would make each character a text
            raise ValueError("encode_batch expects a list of texts, got a str; use encode(text) "
                             "for one text")
        with self.batch_encoder(num_workers) as encode:
            return encode(list(texts), add_special_tokens, split_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token (one ``skip_special_tokens`` drops)."""
        return token_id in self._special_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               continuation: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD, as in HF); special tokens are kept by
        default, so that decode(encode(x)) == x. ``continuation``: the ids continue a text
        (byte-level text decodes the same either way)."""
        table = self._id_to_bytes
        ids = _checked_ids(ids, len(table))
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(map(table.__getitem__, ids)).decode("utf-8", "replace")

    def token_byte_lengths(self) -> list[int]:
        """The UTF-8 bytes each id stands for in a text (special tokens: none)."""
        return [0 if i in self._special_ids else len(b) for i, b in enumerate(self._id_to_bytes)]

    @functools.cached_property
    def _cache(self) -> _PieceCache:
        return _PieceCache(self._encode_piece)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_cache", None)  # rebuilt when first used; carries a bound method
        return state


def _read_json(path: Path) -> dict:
    return settings.read_json_object(path, "tokenizer file")


# --- Comment and docstring stripping (Python's own tokenize/ast, never regexes) ---

# What parsing or tokenizing untrusted Python text can raise.
PYTHON_PARSE_ERRORS = (SyntaxError, ValueError, tokenize.TokenError, RecursionError, MemoryError)


def source_lines(text: str, keepends: bool = False) -> list[str]:
    """Lines as Python's parser numbers them (``str.splitlines`` also breaks at \\f, U+2028...)."""
    lines = io.StringIO(text, newline="").readlines()
    return lines if keepends else [line.rstrip("\r\n") for line in lines]


def docstring_statement(node: ast.AST) -> ast.Expr | None:
    """The docstring statement of a module, class or function node, or None."""
    body = getattr(node, "body", None)
    first = body[0] if isinstance(body, list) and body else None
    is_string = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return first if is_string and isinstance(first.value.value, str) else None


def _docstring_nodes(tree: ast.AST) -> Iterator[tuple[ast.Expr, bool]]:
    """(docstring statement, is it the only statement of its body) for every docstring."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and (first := docstring_statement(node)) is not None):
            yield first, len(node.body) == 1 and not isinstance(node, ast.Module)


def strip_comments_and_docstrings(source: str, comments: bool = True, docstrings: bool = True,
                                  strict: bool = False) -> str:
    """Remove ``#`` comments and/or docstrings from Python source, keeping it valid Python (a
    lone docstring becomes ``pass``). Invalid Python is returned unchanged, or with ``strict``
    raises one of ``PYTHON_PARSE_ERRORS``, as does a stripped text that does not parse."""
    lines = source_lines(source, keepends=True)
    try:
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(iter(lines).__next__)) if comments else []
    except PYTHON_PARSE_ERRORS:
        if strict:
            raise
        return source
    line_bytes = [line.encode("utf-8", "surrogatepass") for line in lines]

    def char_col(line_no: int, byte_col: int) -> int:
        return len(line_bytes[line_no - 1][:byte_col].decode("utf-8", "surrogatepass"))

    # (start line, start col, end line, end col, replacement); columns in characters.
    edits = [(*tok.start, *tok.end, "") for tok in tokens if tok.type == tokenize.COMMENT]
    for node, only_statement in _docstring_nodes(tree) if docstrings else []:
        col = char_col(node.lineno, node.col_offset)
        end_col = char_col(node.end_lineno, node.end_col_offset)
        # A docstring sharing its line with code (``def f(): "doc"; return 1``) becomes ``pass``.
        rest = lines[node.end_lineno - 1][end_col:].split("#", 1)[0]
        shares_line = lines[node.lineno - 1][:col].strip() != "" or rest.strip() != ""
        replacement = "pass" if only_statement or shares_line else ""
        edits.append((node.lineno, col, node.end_lineno, end_col, replacement))
    if not edits:
        return source
    edited_rows: set[int] = set()
    # From the end, so earlier positions stay valid; the rows an edit swallows are left empty.
    for row, col, end_row, end_col, replacement in sorted(edits, reverse=True):
        head, tail = lines[row - 1][:col], lines[end_row - 1][end_col:]
        if not replacement and not tail.strip():
            head = head.rstrip(" \t")
        lines[row - 1 : end_row] = [head + replacement + tail] + [""] * (end_row - row)
        edited_rows.update(range(row, end_row + 1))
    stripped = "".join(line for row, line in enumerate(lines, start=1)
                       if row not in edited_rows or line.strip())
    if strict:  # what a dataset keeps must parse, whatever this function got wrong
        ast.parse(stripped)
    return stripped


# --- CodeTokenizer ---

# Pieces of code. Every character is matched by some branch (the last one takes anything), so the
# pieces of a text always concatenate back to it.
_CODE_PIECE_PATTERN = r"""
    \r\n|\n|\r                                  # a newline
  | (?<=^|[\r\n])[^\S\r\n]+                     # indentation
  | [\p{Lu}\p{Lt}]+(?=[\p{Lu}\p{Lt}]\p{Ll})     # acronym before a Capitalized word: HTTP|Server
  | [\p{Lu}\p{Lt}]?[\p{Ll}\p{Lm}\p{Lo}\p{M}]+   # a lower-case word, maybe Capitalized
  | [\p{Lu}\p{Lt}\p{M}]+                        # an upper-case run
  | \p{N}+                                      # a number
  | _+                                          # underscores
  | [^\S\r\n]+                                  # spaces between tokens
  | [^\s\p{L}\p{N}\p{M}_]+                      # operators and punctuation
  | (?s:.)
"""
_CODE_PIECE_RE = regex.compile(_CODE_PIECE_PATTERN, regex.VERBOSE)
# The same pattern for HF tokenizers' Oniguruma: no verbose layout, and [\s\S] for (?s:.).
_CODE_PIECE_HF_REGEX = regex.sub(r"\s+", "", regex.sub(r"#.*", "", _CODE_PIECE_PATTERN)
                                 ).replace("(?s:.)", r"[\s\S]")

# Longest code piece: longer matches (blobs, rows of '=') are cut, here and in the HF export, whose
# WordPiece is about cubic in a piece's length.
MAX_PIECE_CHARS = 128
_CAP_PIECE_HF_REGEX = rf"[\s\S]{{1,{MAX_PIECE_CHARS}}}"
# A lone surrogate (an undecodable byte of a file) has no UTF-8 form: no piece may hold one.
_SURROGATE = regex.compile(r"\p{Cs}")
# Byte tokens as codelm writes them (HF's byte-fallback spelling): upper-case hex.
_BYTE_TOKEN_RE = regex.compile(r"<0x([0-9A-F]{2})>")

CODE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>")
_N_BYTES = 256


def _cut(match: str) -> list[str]:
    """A piece-pattern match cut into runs of at most ``MAX_PIECE_CHARS`` characters."""
    k = MAX_PIECE_CHARS
    return [match[i : i + k] for i in range(0, len(match), k)]


T = TypeVar("T")


def text_batches(texts: Iterable[T], chars: int, size: Callable[[T], int] = len
                 ) -> Iterator[list[T]]:
    """Consecutive texts (or documents, ``size`` their characters) in lists of at least
    ``chars`` characters (the last: the rest)."""
    batch: list[T] = []
    n = 0
    for text in texts:
        batch.append(text)
        n += size(text)
        if n >= chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _count_pieces(texts: Iterable[str], strip_comments: bool) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        if strip_comments:
            text = strip_comments_and_docstrings(text)
        counts.update(_CODE_PIECE_RE.findall(text))  # long pieces are cut after counting
    return counts


# CodeTokenizer.train counts pieces in batches of about this many characters, at most two per
# worker in flight: texts are read as they are counted.
_COUNT_BATCH_CHARS = 2_000_000


def _piece_counts(texts: Iterable[str], strip_comments: bool, num_workers: int | None
                  ) -> Counter[str]:
    """How often each code piece occurs in ``texts``, counted on ``num_workers`` processes
    (default: every core; one batch of texts, or a daemon process: in this one)."""
    workers = process.worker_count(num_workers)
    assert workers >= 1, num_workers
    batches = text_batches(texts, _COUNT_BATCH_CHARS)
    head = list(itertools.islice(batches, 2))
    if len(head) < 2 or workers == 1:
        return _count_pieces(chain.from_iterable(chain(head, batches)), strip_comments)
    counts: Counter[str] = Counter()
    count = functools.partial(_count_pieces, strip_comments=strip_comments)
    with process.worker_pool(workers) as pool:
        pending: deque = deque()
        for batch in chain(head, batches):
            pending.append(pool.apply_async(count, (batch,)))
            if len(pending) >= 2 * workers:
                counts.update(pending.popleft().get())
        while pending:
            counts.update(pending.popleft().get())
    return counts


# The character classes of the piece pattern: a piece longer than one character holds one only.
_PIECE_CLASS_RES = [regex.compile(p) for p in
                    (r"\s", r"[\p{L}\p{M}]", r"\p{N}", r"_", r"[^\s\p{L}\p{N}\p{M}_]")]


def _can_be_in_a_piece(token: str) -> bool:
    """Whether HF's WordPiece could find ``token`` inside a code piece: unless it is printable
    ASCII mixing two character classes (a longer piece has one)."""
    if not all("!" <= c <= "~" for c in token):
        return True
    return sum(any(r.match(c) for c in token) for r in _PIECE_CLASS_RES) < 2


class CodeTokenizer(_BatchEncodeMixin):
    """Code pieces (camelCase, underscores, indentation) seen ``min_freq`` times; byte fallback.
    Ids: specials, the 256 bytes, pieces by frequency; "<eos>" inside a text is text."""

    def __init__(self, pieces: Sequence[str], min_freq: int = 10, strip_comments: bool = False,
                 special_tokens: Sequence[str] = CODE_SPECIAL_TOKENS):
        self.special_tokens = list(special_tokens)
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special tokens must be distinct: {self.special_tokens}")
        self.pieces = list(pieces)
        self.min_freq = min_freq
        self.strip_comments = strip_comments
        self._byte_offset = len(self.special_tokens)
        first_piece = self._byte_offset + _N_BYTES
        self._piece_to_id = {p: first_piece + i for i, p in enumerate(self.pieces)}
        if len(self._piece_to_id) != len(self.pieces):
            raise ValueError("CodeTokenizer vocabulary pieces must be distinct")
        self._max_piece_len = max(map(len, self.pieces), default=1)
        self._id_to_bytes = ([s.encode("utf-8") for s in self.special_tokens]
                             + [bytes([b]) for b in range(_N_BYTES)]
                             + [p.encode("utf-8", "surrogatepass") for p in self.pieces])

    @classmethod
    def train(cls, texts: Iterable[str], min_freq: int = 10, max_vocab: int | None = None,
              strip_comments: bool = False, special_tokens: Sequence[str] = CODE_SPECIAL_TOKENS,
              num_workers: int | None = None) -> CodeTokenizer:
        """Keep each piece seen ``min_freq`` times, at most ``max_vocab`` (bytes come on top);
        pieces counted on ``num_workers`` processes (default: every core)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = _piece_counts(texts, strip_comments, num_workers)
        for match in [m for m in counts if len(m) > MAX_PIECE_CHARS]:
            n = counts.pop(match)
            for piece in _cut(match):
                counts[piece] += n
        kept = sorted((piece for piece, n in counts.items()
                       if n >= min_freq and not _SURROGATE.search(piece)
                       and piece not in special_tokens),
                      key=lambda piece: (-counts[piece], piece))
        return cls(kept[:max_vocab], min_freq=min_freq, strip_comments=strip_comments,
                   special_tokens=special_tokens)

    def _encode_piece(self, piece: str) -> list[int]:
        """Longest known sub-pieces from the left; bytes of a character no piece covers."""
        if len(piece) > MAX_PIECE_CHARS:
            return [i for part in _cut(piece) for i in self._cache[part]]
        vocab = self._piece_to_id
        if (i := vocab.get(piece)) is not None:
            return [i]
        ids = []
        pos, n = 0, len(piece)
        while pos < n:
            for end in range(min(n, pos + self._max_piece_len), pos, -1):
                if (i := vocab.get(piece[pos:end])) is not None:
                    ids.append(i)
                    pos = end
                    break
            else:
                raw = piece[pos].encode("utf-8", "surrogatepass")
                ids.extend(self._byte_offset + b for b in raw)
                pos += 1
        return ids

    def encode(self, text: str, add_special_tokens: bool = False,
               split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (with ``add_special_tokens``, between bos and eos); special
        tokens' text is always text, so ``split_special_tokens`` changes nothing."""
        if self.strip_comments:
            text = strip_comments_and_docstrings(text)
        ids = list(chain.from_iterable(map(self._cache.__getitem__, _CODE_PIECE_RE.findall(text))))
        if add_special_tokens:
            bos, eos = self.bos_id, self.eos_id
            ids = ([] if bos is None else [bos]) + ids + ([] if eos is None else [eos])
        return ids

    @property
    def template_prefix(self) -> list[int]:
        """Ids before every text: none (the HF export has no template)."""
        return []

    @property
    def matched_special_tokens(self) -> list[str]:
        """Special tokens whose text HF reads as the token: none."""
        return []

    @property
    def _special_ids(self) -> range:
        return range(self._byte_offset)

    def _special_id(self, token: str) -> int | None:
        return self.special_tokens.index(token) if token in self.special_tokens else None

    # The role ids (None where custom special_tokens lack the token).
    pad_id = property(lambda self: self._special_id("<pad>"))
    bos_id = property(lambda self: self._special_id("<bos>"))
    eos_id = property(lambda self: self._special_id("<eos>"))
    fim_prefix_id = property(lambda self: self._special_id("<fim_prefix>"))
    fim_middle_id = property(lambda self: self._special_id("<fim_middle>"))
    fim_suffix_id = property(lambda self: self._special_id("<fim_suffix>"))

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, a vocabulary piece, or a byte token written ``<0xNN>``."""
        i = self._special_id(token)
        if i is None:
            i = self._piece_to_id.get(token)
        if i is None and (m := _BYTE_TOKEN_RE.fullmatch(token)):
            i = self._byte_offset + int(m[1], 16)
        return i

    def id_to_token(self, i: int) -> str:
        _checked_ids([i], self.vocab_size)
        if i < self._byte_offset:
            return self.special_tokens[i]
        if i < self._byte_offset + _N_BYTES:
            return f"<0x{i - self._byte_offset:02X}>"
        return self.pieces[i - self._byte_offset - _N_BYTES]

    def is_byte_token(self, i: int) -> bool:
        return self._byte_offset <= i < self._byte_offset + _N_BYTES

    def to_dict(self) -> dict:
        """codelm's own format, for what HF cannot express (comment stripping)."""
        return {"type": CODE_TOKENIZER_TYPE, "format_version": CODE_TOKENIZER_FORMAT_VERSION,
                "min_freq": self.min_freq, "strip_comments": self.strip_comments,
                "special_tokens": self.special_tokens, "pieces": self.pieces}

    def to_hf(self) -> dict:
        """The same tokenizer as an HF tokenizer.json: piece Splits, ByteLevel, then WordPiece
        (greedy longest match, as ``_encode_piece``) over every byte; specials are plain entries."""
        if self.strip_comments:
            raise ValueError("a CodeTokenizer that strips comments has no HF tokenizer.json form")
        if inside := [t for t in self.special_tokens if _can_be_in_a_piece(t)]:
            raise ValueError(f"special tokens {inside} could be read inside a code piece by HF; "
                             "one with an HF form mixes punctuation with letters or digits, "
                             "e.g. '<eos>'")
        vocab = {t: i for i, t in enumerate(self.special_tokens)}
        pieces = {p: "".join(map(BYTE_TO_UNICODE.__getitem__, p.encode("utf-8")))
                  for p in self.pieces}
        taken = set(pieces.values())
        for b in range(_N_BYTES):
            char = BYTE_TO_UNICODE[b]
            vocab[char if char not in taken else f"<0x{b:02X}>"] = self._byte_offset + b
        vocab.update((pieces[p], i) for p, i in self._piece_to_id.items())
        sections = _code_hf_sections()
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": sections["pre_tokenizer"],
            "post_processor": None, "decoder": sections["decoder"],
            "model": {"type": "WordPiece", "unk_token": next(iter(vocab)),
                      **_CODE_HF_MODEL, "vocab": vocab},
        }

    @classmethod
    def from_hf(cls, spec: dict, source: str = "<tokenizer.json>") -> CodeTokenizer:
        """Read back what ``to_hf`` writes (or a transformers save of it): the special tokens
        are the entries before the byte tokens; any other difference is refused."""
        model = spec.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict):
            raise ValueError(f"{source}: model.vocab is missing or not an object")
        _check_code_hf_sections(spec, source)
        by_id = {i: token for token, i in vocab.items()}
        n = len(vocab)
        if set(by_id) != set(range(n)):
            raise ValueError(f"{source}: model.vocab ids must be 0..{n - 1}, each once")
        n_specials = vocab.get("<0x00>", vocab.get(BYTE_TO_UNICODE[0], n))
        if any(by_id.get(n_specials + b) not in (BYTE_TO_UNICODE[b], f"<0x{b:02X}>")
               for b in range(_N_BYTES)):
            raise ValueError(f"{source}: model.vocab must list the special tokens, the 256 bytes "
                             "in order, then the pieces")
        pieces = []
        for i in range(n_specials + _N_BYTES, n):
            try:
                pieces.append(bytes(map(UNICODE_TO_BYTE.__getitem__, by_id[i])).decode("utf-8"))
            except (KeyError, UnicodeDecodeError):
                raise ValueError(f"{source}: model.vocab entry {by_id[i]!r} (id {i}) is not the "
                                 "ByteLevel spelling of UTF-8 text") from None
        specials = [by_id[i] for i in range(n_specials)]
        # Added tokens may only repeat the special tokens (as a transformers save lists them).
        added = spec.get("added_tokens", [])
        if bad := [e for e in (added if isinstance(added, list) else [added])
                   if not (isinstance(e, dict) and e.get("content") in specials)]:
            raise ValueError(f"{source}: added_tokens entry {_shown_json(bad[0])} is not one of "
                             f"the special tokens {specials}: HF would read it inside a text")
        # (distinct: the vocab's keys are, and the ByteLevel spelling maps them one to one)
        return cls(pieces, special_tokens=specials)

    @staticmethod
    def is_hf_form(spec: dict) -> bool:
        """Whether an HF tokenizer.json is a CodeTokenizer's: WordPiece, no continuation prefix."""
        model = spec.get("model")
        return (isinstance(model, dict) and model.get("type") == "WordPiece"
                and model.get("continuing_subword_prefix") == "")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (into a directory: with a tokenizer_config.json naming the
        special tokens for transformers); one that strips comments in codelm's own format."""
        if self.strip_comments:
            return _write_tokenizer(path, self.to_dict(), indent=0)
        roles = {f"{token[1:-1]}_token": token for token in ("<bos>", "<eos>", "<pad>")
                 if token in self.special_tokens}
        others = [t for t in self.special_tokens if t not in roles.values()]
        return _write_tokenizer(path, self.to_hf(), 0, replace_config=True, config={
            **roles, "additional_special_tokens": others, "split_special_tokens": True})

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> CodeTokenizer:
        """Read codelm's own format (``to_dict``; one version, another is refused)."""
        if data.get("type") != CODE_TOKENIZER_TYPE:
            raise ValueError(f"{source}: not a codelm CodeTokenizer file (type={data.get('type')!r})")
        if (version := data.get("format_version")) != CODE_TOKENIZER_FORMAT_VERSION:
            raise ValueError(f"{source}: CodeTokenizer format_version {version!r}; codelm reads "
                             f"format_version {CODE_TOKENIZER_FORMAT_VERSION} (train it again)")
        for key, kind in (("pieces", list), ("special_tokens", list), ("min_freq", int),
                          ("strip_comments", bool)):
            if not isinstance(data.get(key), kind):
                raise ValueError(f"{source}: key {key!r} missing or not a {kind.__name__}")
            if kind is list and not all(isinstance(p, str) and p for p in data[key]):
                raise ValueError(f"{source}: key {key!r} must hold non-empty strings")
        try:
            return cls(data["pieces"], min_freq=data["min_freq"],
                       strip_comments=data["strip_comments"], special_tokens=data["special_tokens"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def __repr__(self) -> str:
        return (f"CodeTokenizer(vocab_size={self.vocab_size}, min_freq={self.min_freq}, "
                f"strip_comments={self.strip_comments})")


def _write_tokenizer(path: str | os.PathLike, data: dict, indent: int, config: dict | None = None,
                     replace_config: bool = False) -> Path:
    """Write ``data`` to ``path``; into a directory, as tokenizer.json beside a
    tokenizer_config.json of ``config`` (one there is kept unless ``replace_config``)."""
    path = Path(path)
    into_directory = path.is_dir()
    if into_directory:
        path = path / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent), "utf-8")
    config_file = path.parent / "tokenizer_config.json"
    if into_directory and config is not None and (replace_config or not config_file.exists()):
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), "utf-8")
    return path


# ``to_hf``'s WordPiece settings; HF's default max_input_chars_per_word would make long pieces unknown.
_CODE_HF_MODEL = {"continuing_subword_prefix": "", "max_input_chars_per_word": 1 << 40}


def _code_hf_sections() -> dict:
    """The parts of ``to_hf``'s tokenizer.json but the model, added tokens and post-processor."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    splits = [{"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
               "invert": False} for pattern in (_CODE_PIECE_HF_REGEX, _CAP_PIECE_HF_REGEX)]
    return {
        "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, byte_level]},
    }


def _shown_json(value: object, limit: int = 60) -> str:
    """A JSON value cut short for an error message: a Split regex runs to 200 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _covers(actual: object, expected: object) -> bool:
    """Whether ``actual`` is ``expected`` but for keys ``expected`` lacks (HF saves add some)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and _covers(actual[key], value) for key, value in expected.items())
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(map(_covers, actual, expected)))
    return type(actual) is type(expected) and actual == expected


def _check_code_hf_sections(spec: dict, source: str) -> None:
    """Refuse an edited CodeTokenizer tokenizer.json: HF would read it as another tokenizer. A
    post-processor may add no ids (a transformers save writes a TemplateProcessing of $A)."""
    try:
        adds_ids = _post_processor_ids(spec.get("post_processor")) != ([], [])
    except (ValueError, KeyError, TypeError, AttributeError):
        adds_ids = True  # not one HF would read alike
    parts = {"model": _CODE_HF_MODEL, **_code_hf_sections()}  # a part left out HF reads as null
    part = next((p for p, want in parts.items() if not _covers(spec.get(p), want)),
                "post_processor" if adds_ids else None)
    if part:
        hint = ("; a transformers save after a padded or truncated call writes them: set "
                "truncation and padding to null" if part in ("truncation", "padding") else "")
        raise ValueError(f"{source}: a WordPiece model whose {part} is not codelm's: HF would "
                         f"give other ids or text{hint}")


# --- Byte-level BPE (HF tokenizer.json) ---

# The pre-tokenizer regexes of the supported tokenizer.json styles (HF writes the first as its
# ByteLevel default and ships the last inside Llama-3's Split).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Digits(individual_digits) then ByteLevel, as one regex: a digit is a piece of its own, and the
# end of a digit-free run acts as the end of text for the trailing-space rule.
STARCODER_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
_DIGIT_RUNS_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
# Qwen2's (Qwen2.5-Coder, Qwen3): Llama-3's with single digits, after an NFC normalizer.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRETOKENIZER_STYLES = ("gpt2", "starcoder", "llama3", "qwen2")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by every ByteLevel component."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = (chr(256 + k) for k in range(256))
    return {b: chr(b) if b in printable else next(others) for b in range(256)}


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _pretokenizer_json(style: str) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if style == "gpt2":
        return {**byte_level, "use_regex": True}
    if style == "starcoder":
        steps = [{"type": "Digits", "individual_digits": True}, {**byte_level, "use_regex": True}]
        return {"type": "Sequence", "pretokenizers": steps}
    if style in ("llama3", "qwen2"):
        pattern = LLAMA3_PATTERN if style == "llama3" else QWEN2_PATTERN
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                 "invert": False}
        return {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    raise ValueError(f"unknown pre-tokenizer style {style!r}; choose one of {PRETOKENIZER_STYLES}")


class _Unsupported(ValueError):
    pass


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise _Unsupported(f"unsupported {where}: {what}")


def _pretokenizer_pattern(spec: dict | None) -> tuple[str, bool]:
    """(regex, isolated gaps possible) for a supported tokenizer.json pre_tokenizer."""
    where = "pre_tokenizer"
    _expect(isinstance(spec, dict), where, f"{spec!r} (a byte-level BPE needs a ByteLevel one)")
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    _expect(isinstance(steps, list) and all(isinstance(s, dict) for s in steps), where, "Sequence")
    kinds = [s.get("type") for s in steps]
    _expect(kinds in (["ByteLevel"], ["Digits", "ByteLevel"], ["Split", "ByteLevel"]), where,
            f"{kinds} (codelm reads a ByteLevel, alone or after Digits or a Split)")
    *first, byte_level = steps
    _expect(not byte_level.get("add_prefix_space", False), where,
            "ByteLevel with add_prefix_space=true (codelm reads add_prefix_space=false only)")
    use_regex = byte_level.get("use_regex", True)
    if not first:
        _expect(use_regex, where, "ByteLevel(use_regex=false) on its own")
        return GPT2_PATTERN, False
    if kinds[0] == "Digits":
        _expect(use_regex, where, "Digits then ByteLevel(use_regex=false)")
        individual = first[0].get("individual_digits", False)
        return (STARCODER_PATTERN if individual else _DIGIT_RUNS_PATTERN), False
    split = first[0]
    _expect(not use_regex, where,
            "Split then ByteLevel(use_regex=true) (Llama-3 style has use_regex=false)")
    _expect(split.get("behavior") == "Isolated", where, f"Split behavior {split.get('behavior')!r}")
    _expect(not split.get("invert", False), where, "Split with invert=true")
    pattern = split.get("pattern")
    _expect(isinstance(pattern, dict) and len(pattern) == 1, where, f"Split pattern {pattern!r}")
    if isinstance(pattern.get("Regex"), str):
        _check_split_regex(pattern["Regex"])
        return pattern["Regex"], True
    _expect(isinstance(pattern.get("String"), str), where, f"Split pattern {pattern!r}")
    return regex.escape(pattern["String"]), True


# Split regexes are written for Oniguruma (HF) but run here by Python ``regex``: only syntax both
# read alike passes (e.g. \h, \w, ^, $, (?m), {n}?, nested classes are refused). A supported
# regex is a run of these constructs; it is refused where the run stops.
_GENERAL_CATEGORY = (r"\\[pP]\{\^?(?:L[ultmo]?|M[nce]?|N[dlo]?|P[cdseifo]?|S[mcko]?|Z[slp]?"
                     r"|C[cfson]?)\}")
_SAME_SYNTAX = regex.compile("(?:" + "|".join([
    _GENERAL_CATEGORY, r"\\[sSdDnrtfvauxAzRX]", r"\\\P{L}",  # escapes
    # a class, not nested, without Oniguruma's && intersection
    r"\[\^?\]?(?:" + _GENERAL_CATEGORY + r"|\\[sSdDnrtfvaux]|\\\P{L}|&(?!&)|[^\\\[\]&])*\]",
    r"\((?!\?)", r"\(\?(?:[:=!>]|<[=!]|<\w+>)", r"\(\?#[^)]*\)",  # groups, comments
    r"\(\?i:(?:(?!(?i:ss|st|ff|fi|fl)|[\\\[\](){}^$.*+?])[\x00-\x7f])*\)",  # no case folding
    r"\{\d*,\d*\}\??(?!\+)", r"\{\d*\}(?![?+])", r"\{(?!\d*(?:,\d*)?\})",  # intervals
    r"[^\\\[({^$]",
]) + ")*+")


def _check_split_regex(pattern: str) -> None:
    """Refuse a Split regex that Oniguruma (HF) and Python ``regex`` could read differently."""
    end = _SAME_SYNTAX.match(pattern).end()
    if end < len(pattern):
        raise _Unsupported(
            f"pre_tokenizer: Split regex {pattern!r} uses {pattern[end : end + 20]!r}, which "
            "codelm refuses: Oniguruma (run by HF) and Python regex (run here) do not read it "
            "the same way")


def _template_ids(spec: dict, where: str) -> tuple[list[int], list[int]]:
    """Ids a TemplateProcessing ``single`` template puts before and after the sequence."""
    single = spec.get("single")
    specials = spec.get("special_tokens", {})
    _expect(isinstance(single, list) and isinstance(specials, dict), where, "TemplateProcessing")
    before, after, seen_sequence = [], [], False
    for item in single:
        _expect(isinstance(item, dict) and len(item) == 1, where, f"template item {item!r}")
        ((kind, body),) = item.items()
        if kind == "Sequence":
            _expect(body.get("id") == "A" and not seen_sequence, where, f"template item {item!r}")
            seen_sequence = True
        elif kind == "SpecialToken":
            token = specials.get(body.get("id"))
            _expect(isinstance(token, dict), where, f"special token {body.get('id')!r} undefined")
            ids = token.get("ids")
            _expect(isinstance(ids, list) and all(isinstance(i, int) for i in ids), where, "ids")
            (after if seen_sequence else before).extend(ids)
        else:
            raise _Unsupported(f"unsupported {where}: template item {kind!r}")
    _expect(seen_sequence, where, "single template without the sequence $A")
    return before, after


def _post_processor_ids(spec: object) -> tuple[list[int], list[int]]:
    """Ids the post_processor puts before and after every text (ByteLevel changes only offsets);
    a Sequence may hold one TemplateProcessing (HF tokenizers applies only the first of two)."""
    if spec is None:
        return [], []
    where = "post_processor"
    _expect(isinstance(spec, dict), where, repr(spec))
    steps = (spec.get("processors") or []) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") if isinstance(step, dict) else step for step in steps]
    _expect(all(k in ("ByteLevel", "TemplateProcessing") for k in kinds), where, f"type {kinds}")
    templates = [step for step in steps if step["type"] == "TemplateProcessing"]
    _expect(len(templates) < 2, where, f"a Sequence of {len(templates)} TemplateProcessing steps")
    return _template_ids(templates[0], where) if templates else ([], [])


# ---- tokenizer.json beyond byte-level BPE: normalizers, SentencePiece-style pieces, decoders

SPIECE_SPACE = "\u2581"  # "▁": SentencePiece's space, in Llama-2, Gemma and Mistral tokens
_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
_BYTE_TOKEN = regex.compile(r"<0x([0-9A-F]{2})>")  # a byte-fallback token: <0x0A>


class _Normalizer:
    """A tokenizer.json normalizer as its steps, in order: ("form", NFC...), ("prepend", s) or
    ("replace", old, new) (plain data, so that a tokenizer pickles into encode_batch's workers)."""

    def __init__(self, spec: dict):
        self.steps: list[tuple[str, ...]] = []
        self._add(spec)

    def _add(self, spec: object) -> None:
        _expect(isinstance(spec, dict), "normalizer", repr(spec)[:200])
        kind = spec.get("type")
        if kind == "Sequence":
            _expect(isinstance(spec.get("normalizers"), list), "normalizer", "Sequence")
            for step in spec["normalizers"]:
                self._add(step)
        elif kind in _UNICODE_FORMS:
            self.steps.append(("form", kind))
        elif kind == "Prepend":
            _expect(isinstance(spec.get("prepend"), str), "normalizer", f"Prepend {spec!r}")
            self.steps.append(("prepend", spec["prepend"]))
        elif kind == "Replace":
            pattern = spec.get("pattern")
            _expect(isinstance(pattern, dict) and isinstance(pattern.get("String"), str)
                    and isinstance(spec.get("content"), str), "normalizer",
                    f"Replace {spec!r} (codelm replaces a plain String only)")
            self.steps.append(("replace", pattern["String"], spec["content"]))
        else:
            raise _Unsupported(f"unsupported normalizer: {kind!r} (codelm reads NFC, NFD, NFKC, "
                               "NFKD, Prepend, Replace and Sequences of them)")

    def replaces(self, old: str) -> bool:
        """Whether no ``old`` is left in the normalized text (a Replace of it)."""
        return any(step[0] == "replace" and step[1] == old for step in self.steps)

    def __call__(self, text: str) -> str:
        for kind, *args in self.steps:
            if kind == "form":
                text = unicodedata.normalize(args[0], text)
            elif kind == "prepend":
                text = args[0] + text if text else text  # HF prepends to non-empty text only
            else:
                text = text.replace(args[0], args[1])
        return text


# Gemma's pre-tokenizer (after a normalizer that replaces every space with U+2581).
_SPLIT_AFTER_SPACES = {"type": "Split", "pattern": {"String": " "},
                       "behavior": "MergedWithPrevious", "invert": False}


class _SentencePieces:
    """Pieces of SentencePiece-style text (no byte-level mapping). Metaspace: spaces become
    ``replacement``, which is prepended (``prepend_scheme`` always, or first: to the text's first
    segment only), and with ``split`` every ▁ starts a piece. Otherwise (or with no
    pre-tokenizer) the segment is one word, cut where no token of the vocabulary can span the
    cut, so that the ids are the same and the pieces can be cached: between runs of letters,
    digits and other characters (each with the ▁ before it) where every token is one such run,
    as SentencePiece's training splits by script and digit; else before each ▁ run where no
    token has ▁ after another character."""

    def __init__(self, spec: dict | None, merges: Iterable[tuple[str, str]],
                 spaces_replaced: bool = False):
        """``merges``: the model's, whose results are every token BPE can make of characters;
        ``spaces_replaced``: the normalizer leaves no space, so Gemma's Split after each space
        (its tokenizer.json's pre-tokenizer) splits nothing."""
        if spaces_replaced and spec == _SPLIT_AFTER_SPACES:
            spec = None
        self.metaspace = spec is not None
        self.replacement, self.prepend, split = SPIECE_SPACE, "never", False
        if spec is not None:
            _expect(spec.get("type") == "Metaspace", "pre_tokenizer",
                    f"{spec.get('type')!r} (a BPE without ByteLevel reads Metaspace, none, or "
                    "Gemma's Split after spaces the normalizer replaced)")
            self.replacement = spec.get("replacement", SPIECE_SPACE)
            _expect(isinstance(self.replacement, str) and len(self.replacement) == 1,
                    "pre_tokenizer", f"Metaspace replacement {self.replacement!r}")
            legacy = "always" if spec.get("add_prefix_space", True) else "never"
            self.prepend = spec.get("prepend_scheme", legacy)
            _expect(self.prepend in ("always", "first", "never"), "pre_tokenizer",
                    f"Metaspace prepend_scheme {self.prepend!r}")
            split = bool(spec.get("split", True))
        mark = regex.escape(self.replacement)
        runs = regex.compile(rf"{mark}*[\p{{L}}\p{{M}}]+|{mark}*\p{{N}}|{mark}*[^\p{{L}}\p{{M}}\p{{N}}"
                             rf"{mark}]+|{mark}+")
        joined = regex.compile(rf"[^{mark}]{mark}")  # a token gluing ▁ after a character
        made = [first + second for first, second in merges]
        if split:
            self._pieces = regex.compile(rf"{mark}[^{mark}]*|[^{mark}]+")
        elif all(runs.fullmatch(token) for token in made):
            self._pieces = runs
        elif not any(joined.search(token) for token in made):
            self._pieces = regex.compile(rf"{mark}*[^{mark}]+|{mark}+")
        else:
            self._pieces = None  # the whole segment, one word

    def __call__(self, text: str, first: bool) -> list[str]:
        """``first``: the segment starts the text (no added token before it)."""
        if self.metaspace:
            text = text.replace(" ", self.replacement)
            wanted = self.prepend == "always" or (self.prepend == "first" and first)
            if wanted and not text.startswith(self.replacement):
                text = self.replacement + text
        if self._pieces is None:
            return [text] if text else []
        return self._pieces.findall(text)


class _Decoding(NamedTuple):
    """How a tokenizer.json decoder turns tokens into text."""

    byte_level: bool  # ByteLevel: each character stands for a byte
    space: str | None  # the character decoded as a space (▁), if any
    byte_fallback: bool  # <0xNN> tokens stand for their byte
    strip: str | None  # "text": one leading space of the whole text (Fuse, then Strip);
    #                    "token": the first token's leading ▁ (Metaspace)


def _decoding(spec: object) -> _Decoding:
    """The _Decoding of a supported decoder: ByteLevel, Metaspace, or Llama-2's Sequence of
    Replace(▁ -> space), ByteFallback, Fuse and Strip(one leading space)."""
    where = "decoder"
    _expect(isinstance(spec, dict), where, repr(spec)[:200])
    if spec.get("type") == "ByteLevel":
        return _Decoding(True, None, False, None)
    steps = spec.get("decoders") if spec.get("type") == "Sequence" else [spec]
    _expect(isinstance(steps, list) and all(isinstance(d, dict) for d in steps), where, "Sequence")
    space, byte_fallback, strip, fused = None, False, None, False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and step.get("content") == " ":
            space = (step.get("pattern") or {}).get("String")
            _expect(isinstance(space, str) and len(space) == 1, where, f"Replace {step!r}")
        elif kind == "Metaspace":
            space = step.get("replacement", SPIECE_SPACE)
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True)
                              else "never")
            strip = None if scheme == "never" else "token"
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip" and fused and step.get("content") == " " and step.get("stop") == 0:
            _expect(step.get("start") in (0, 1), where, f"Strip {step!r}")
            strip = "text" if step["start"] == 1 else None
        else:
            raise _Unsupported(f"unsupported decoder: {step!r} (codelm reads ByteLevel, Metaspace, "
                               "and Replace to a space, ByteFallback, Fuse, then Strip)")
    return _Decoding(False, space, byte_fallback, strip)


def _token_bytes(token: str, decoding: _Decoding) -> bytes:
    """The bytes a token decodes to."""
    if decoding.byte_level:
        return _byte_level_bytes(token)
    if decoding.byte_fallback and (m := _BYTE_TOKEN.fullmatch(token)):
        return bytes([int(m[1], 16)])
    if decoding.space is not None:
        token = token.replace(decoding.space, " ")
    return token.encode("utf-8")


class FimTokens(NamedTuple):
    """Fill-in-the-middle's markers, prefix-suffix-middle: PREFIX prefix SUFFIX suffix MIDDLE
    middle."""

    prefix: int
    suffix: int
    middle: int


# Each family's spelling of its FIM markers, as (prefix, suffix, middle): StarCoder and
# StarCoder2; Qwen2.5-Coder and CodeGemma; DeepSeek-Coder (begin, hole, end).
FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
              ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
              ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>",
               "<\uff5cfim\u2581end\uff5c>"))


_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class BPETokenizer(_BatchEncodeMixin):
    """Byte-level BPE with the ids of HF ``tokenizers`` for the tokenizer.json files it accepts;
    bos/eos/pad from the template, a tokenizer_config.json beside the file, or the usual names."""

    def __init__(self, spec: dict, source: str = "<tokenizer.json>", roles: dict | None = None):
        self.source = source
        try:
            self._build(spec)
        except _Unsupported as e:
            raise ValueError(f"{source}: {e}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: malformed tokenizer.json ({type(e).__name__}: {e})") from None
        self.spec = spec
        self._roles = self._resolve_roles(roles or {})
        self.chat_template: str | None = None  # an instruct model's (tokenizer_config.json)

    def _build(self, spec: dict) -> None:
        for key in ("truncation", "padding"):
            _expect(spec.get(key) is None, key, repr(spec.get(key))[:200])
        normalizer = spec.get("normalizer")
        self._normalize = _Normalizer(normalizer) if normalizer is not None else None
        model = spec.get("model")
        _expect(isinstance(model, dict), "model", "missing")
        _expect(model.get("type", "BPE") == "BPE", "model", f"type {model.get('type')!r}")
        _expect(model.get("dropout") in (None, 0, 0.0), "model", "BPE dropout")
        self._byte_fallback = bool(model.get("byte_fallback", False))
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            _expect(model.get(key) in (None, ""), "model", f"BPE {key}={model.get(key)!r}")
        vocab = model.get("vocab")
        _expect(isinstance(vocab, dict) and all(isinstance(k, str) and isinstance(v, int) and v >= 0
                                                for k, v in vocab.items()),
                "model", "vocab must map token strings to non-negative integer ids")
        self._vocab: dict[str, int] = vocab
        self._ranks: dict[tuple[str, str], int] = {}
        merges = model.get("merges", [])
        _expect(isinstance(merges, list), "model", "merges must be a list")
        for rank, merge in enumerate(merges):
            parts = merge.split(" ") if isinstance(merge, str) else merge
            if not (isinstance(parts, list) and len(parts) == 2
                    and all(isinstance(p, str) and p in vocab for p in parts)
                    and parts[0] + parts[1] in vocab):
                raise _Unsupported(f"model: merge #{rank} {merge!r} is not two vocabulary tokens "
                                   "whose concatenation is in the vocabulary")
            self._ranks[(parts[0], parts[1])] = rank
        self._ignore_merges = bool(model.get("ignore_merges", False))
        unk = model.get("unk_token")
        _expect(unk is None or unk in vocab, "model", f"unk_token {unk!r} not in the vocabulary")
        self._unk_id = vocab[unk] if unk is not None else None
        self._fuse_unk = bool(model.get("fuse_unk", False))

        self._decoding = _decoding(spec.get("decoder"))
        self._build_pieces(spec.get("pre_tokenizer"))
        self._prefix_ids, self._suffix_ids = _post_processor_ids(spec.get("post_processor"))
        self._build_added(spec.get("added_tokens") or [])

        size = max(max(vocab.values(), default=-1), max(self._added_ids.values(), default=-1)) + 1
        n_tokens = len(vocab) + len(self._added_ids)  # a file's ids size the tables made below
        _expect(size <= 2 * n_tokens + 1024, "model",
                f"ids up to {size - 1} for {n_tokens} tokens (not dense)")
        self._id_to_token: list[str | None] = [None] * size
        self._id_to_bytes: list[bytes] = [b""] * size
        for token, i in chain(vocab.items(), self._added_ids.items()):
            self._id_to_token[i] = token
            self._id_to_bytes[i] = _token_bytes(token, self._decoding)

    def _build_pieces(self, pre_tokenizer: dict | None) -> None:
        """The pre-tokenizer: byte-level (its regex, then each byte as a character) or
        SentencePiece-style (the text as normalized, unknown characters as <0xNN> bytes)."""
        byte_level = self._decoding.byte_level
        self.pattern = None
        if byte_level:
            _expect(not self._byte_fallback, "model", "BPE byte_fallback=true with ByteLevel")
            self.pattern, isolated = _pretokenizer_pattern(pre_tokenizer)
            try:
                self._pretokenize = _Pretokenizer(self.pattern, isolated)
            except regex.error as e:
                raise _Unsupported(f"pre_tokenizer: Split regex does not compile: {e}") from None
        else:
            spaces_replaced = self._normalize is not None and self._normalize.replaces(" ")
            self._pretokenize = _SentencePieces(pre_tokenizer, self._ranks, spaces_replaced)

    def _build_added(self, added: list) -> None:
        """Added tokens with the ids HF gives them (it ignores the JSON ``id``): a vocabulary
        token keeps its id, any other gets the next one past the vocabulary and added ids."""
        _expect(isinstance(added, list), "added_tokens", "must be a list")
        self._added_ids: dict[str, int] = {}
        self._added: dict[str, dict] = {}
        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
        for entry in added:
            _expect(isinstance(entry, dict) and isinstance(entry.get("content"), str)
                    and isinstance(entry.get("id"), int),
                    "added_tokens", f"entry {entry!r} needs a string 'content' and an integer 'id'")
            content = entry["content"]
            if not content:
                continue
            entry_flags = {f: bool(entry.get(f, f == "normalized")) for f in flags}
            if content in self._added:
                # HF merges such repeats in ways that depend on the flags; only exact ones pass.
                _expect(self._added[content] == entry_flags, "added_tokens",
                        f"entry {entry!r} repeats {content!r} with other flags")
                continue
            i = self._vocab.get(content)
            if i is None:
                i = max(max(self._added_ids.values(), default=-1) + 1, len(self._vocab))
            self._added_ids[content] = i
            self._added[content] = entry_flags
        self._special_ids = {self._added_ids[c] for c, f in self._added.items() if f["special"]}
        # HF matches tokens that are not normalized first, in the text, then the normalized
        # ones in the normalized gaps.
        self._added_res = []
        for normalized in (False, True):
            contents = [c for c, f in self._added.items() if f["normalized"] == normalized]
            self._added_res.append(_longest_first(contents) if contents else None)

    def _resolve_roles(self, roles: dict) -> dict[str, int | None]:
        resolved = {}
        for role, names in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES), ("pad", _PAD_NAMES)):
            name = roles.get(role)
            if name is not None:
                i = self.token_to_id(name)
                if i is None:
                    raise ValueError(f"{self.source}: {role}_token {name!r} is not in the vocabulary")
            elif role in roles:  # null in tokenizer_config.json: none, as transformers reads it
                i = None
            elif role == "bos" and self._prefix_ids:
                i = self._prefix_ids[0]
            else:
                i = next((self._added_ids[n] for n in names if n in self._added_ids), None)
            resolved[role] = i
        return resolved

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pretokenizer: str = "gpt2",
              special_tokens: Sequence[str] = ("<|endoftext|>",), min_frequency: int = 2
              ) -> BPETokenizer:
        """Learn a byte-level BPE (ids: specials, 256 bytes, then one per merge, the most frequent
        pair first, ties by text); ``save()`` writes a tokenizer.json HF loads as is."""
        pre_tokenizer = _pretokenizer_json(pretokenizer)
        special_tokens = list(dict.fromkeys(special_tokens))
        if vocab_size < len(special_tokens) + len(BYTE_TO_UNICODE):
            raise ValueError(f"vocab_size={vocab_size} leaves no room for {len(special_tokens)} "
                             f"special tokens and the {len(BYTE_TO_UNICODE)} byte tokens")
        normalizer = {"type": "NFC"} if pretokenizer == "qwen2" else None
        normalize = _Normalizer(normalizer) if normalizer is not None else str
        pieces = _Pretokenizer(*_pretokenizer_pattern(pre_tokenizer))
        specials_re = _longest_first(special_tokens) if special_tokens else None
        counts: Counter[str] = Counter()
        for text in texts:
            for segment in specials_re.split(text) if specials_re else (text,):
                counts.update(pieces(normalize(segment)))
        vocab = {t: i for i, t in enumerate(special_tokens)}
        for c in sorted(BYTE_TO_UNICODE.values()):
            vocab.setdefault(c, len(vocab))
        merges = _learn_merges([_byte_level(p) for p in counts], list(counts.values()), vocab,
                               vocab_size, min_frequency)
        byte_level = _pretokenizer_json("gpt2")
        added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True} for t in special_tokens]
        model = {"type": "BPE", "dropout": None, "unk_token": None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                 "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                 "merges": [list(m) for m in merges]}
        spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": byte_level,
                "decoder": byte_level, "model": model}
        return cls(spec, f"<BPETokenizer.train {pretokenizer}>")

    @classmethod
    def from_file(cls, path: str | os.PathLike, roles: dict | None = None) -> BPETokenizer:
        """Read a tokenizer.json; ``roles`` {"bos"/"eos"/"pad": token or None} override guesses."""
        path = tokenizer_path(path)
        spec = _read_json(path)
        tok = cls(spec, str(path), _roles_from_config(path.parent) if roles is None else roles)
        tok.chat_template = _chat_template_from_config(path.parent)
        return tok  # (load_tokenizer reads it as this does)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer.json; into a directory, with a tokenizer_config.json naming the
        bos/eos/pad tokens and the chat template (unless one is there) for transformers'
        AutoTokenizer."""
        config = {f"{role}_token": self.id_to_token(i) for role, i in self._roles.items()
                  if i is not None}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return _write_tokenizer(path, self.spec, 2, config=config)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False
                            ) -> str:
        """The text of a conversation (``messages``: [{"role": ..., "content": ...}, ...]) as
        transformers' ``apply_chat_template(messages, tokenize=False)`` renders it with this
        tokenizer's chat template; ``add_generation_prompt``: ends with the assistant's header."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: no chat_template (tokenizer_config.json or "
                             "chat_template.jinja beside it): this is not an instruct model's "
                             "tokenizer")
        names = {f"{role}_token": self.id_to_token(i) if i is not None else None
                 for role, i in self._roles.items()}
        unk = self.id_to_token(self._unk_id) if self._unk_id is not None else None
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           **names, unk_token=unk)

    def _bpe(self, symbols: list[str | None]) -> list[str | None]:
        """Merge the lowest-ranked adjacent pair, leftmost first, until none is left: HF's order,
        (rank, position) from a heap over a linked list. (A None symbol is in no pair.)"""
        ranks = self._ranks
        n = len(symbols)
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap = [(ranks[pair], i, *pair) for i, pair in enumerate(zip(symbols, symbols[1:]))
                if pair in ranks]
        heapq.heapify(heap)
        while heap:
            _, i, first, second = heapq.heappop(heap)
            j = nxt[i]
            # Symbols only grow, so an unchanged pair of strings means the entry is current.
            if j == -1 or symbols[i] != first or symbols[j] != second:
                continue
            symbols[i] = first + second
            symbols[j] = ""
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            for left, right in ((prev[i], i), (i, nxt[i])):
                if left != -1 and right != -1:
                    if (rank := ranks.get((symbols[left], symbols[right]))) is not None:
                        heapq.heappush(heap, (rank, left, symbols[left], symbols[right]))
        return [s for s in symbols if s != ""]  # "": merged into its left neighbour

    def _encode_piece(self, piece: str) -> list[int]:
        word = _byte_level(piece) if self._decoding.byte_level else piece
        vocab = self._vocab
        if self._ignore_merges and (i := vocab.get(word)) is not None:
            return [i]
        if any(c not in vocab for c in word):
            return self._encode_with_unknown(word)
        return [vocab[s] for s in self._bpe(list(word))]

    def _encode_with_unknown(self, word: str) -> list[int]:
        """As HF: a character missing from the vocabulary becomes its UTF-8 bytes' <0xNN>
        tokens (byte_fallback, where they all exist), else unk_token (consecutive ones fused
        with fuse_unk), else it is dropped (its neighbours merge as one word). No merge
        crosses an unk_token."""
        vocab = self._vocab
        symbols: list[str | None] = []  # None: an unk_token
        for c in word:
            if c in vocab:
                symbols.append(c)
                continue
            fallback = [f"<0x{b:02X}>" for b in c.encode("utf-8")] if self._byte_fallback else []
            if fallback and all(t in vocab for t in fallback):
                symbols.extend(fallback)
            elif self._unk_id is not None and not (self._fuse_unk and symbols
                                                   and symbols[-1] is None):
                symbols.append(None)
        return [self._unk_id if s is None else vocab[s] for s in self._bpe(symbols)]

    def _split_added(self, text: str, level: int = 0, plain_special: bool = False
                     ) -> list[tuple[str, int | None]]:
        """(segment, added-token id or None) covering ``text``, the way HF finds added tokens,
        the segments between them normalized; ``plain_special``: special ones are left in the
        text (HF's encode_special_tokens)."""
        if level == 1 and self._normalize is not None:
            text = self._normalize(text)
        if level == len(self._added_res):
            return [(text, None)] if text else []
        if self._added_res[level] is None:
            return self._split_added(text, level + 1, plain_special)
        out: list[tuple[str, int | None]] = []
        start_offset = 0
        for m in self._added_res[level].finditer(text):
            start, stop = m.span()
            content = m.group()
            flags = self._added[content]
            if plain_special and flags["special"]:
                continue
            if flags["single_word"] and (_WORD_CHAR.match(text[start - 1 : start])
                                         or _WORD_CHAR.match(text[stop : stop + 1])):
                continue
            if flags["lstrip"]:  # the spaces before it, but none a previous token took
                start = max(_SPACES_BEFORE.match(text, 0, start).start(), start_offset)
            if flags["rstrip"]:
                stop = _SPACES.match(text, stop).end()
            if start >= stop:  # the previous rstrip token took this match: HF drops it
                continue
            if start_offset < start:
                out.extend(self._split_added(text[start_offset:start], level + 1, plain_special))
            out.append((text[start:stop], self._added_ids[content]))
            start_offset = stop
        if start_offset < len(text):
            out.extend(self._split_added(text[start_offset:], level + 1, plain_special))
        return out

    def encode(self, text: str, add_special_tokens: bool = False,
               split_special_tokens: bool = False) -> list[int]:
        """HF ``Tokenizer.encode(text, add_special_tokens).ids``; ``split_special_tokens``: a
        special token's text is text (HF's ``encode_special_tokens``)."""
        ids = []
        segments = self._split_added(text, plain_special=split_special_tokens)
        for n, (segment, token_id) in enumerate(segments):
            if token_id is None:
                pieces = self._pretokenize(segment, n == 0)
                ids += chain.from_iterable(map(self._cache.__getitem__, pieces))
            else:
                ids.append(token_id)
        if add_special_tokens and (self._prefix_ids or self._suffix_ids):
            ids = [*self._prefix_ids, *ids, *self._suffix_ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               continuation: bool = False) -> str:
        """HF's decode: the decoder's text of ``ids`` (invalid UTF-8 becomes U+FFFD as the
        decoder makes it); special tokens are kept by default, so that decode(encode(x)) == x.
        ``continuation``: the ids continue a text, so the leading space a SentencePiece decoder
        drops at a text's start is kept."""
        if self._decoding.byte_level:
            return super().decode(ids, skip_special_tokens)
        ids = _checked_ids(ids, self.vocab_size)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        strip = None if continuation else self._decoding.strip
        parts: list[str] = []
        run = bytearray()  # consecutive byte-fallback tokens: one character, or U+FFFD each
        for n, i in enumerate(ids):
            if i in self._byte_token_ids:
                run += self._id_to_bytes[i]
                continue
            parts.append(_fallback_text(run))
            run.clear()
            if n == 0 and strip == "token":  # Metaspace drops every ▁ of the first token
                parts.append(self._id_to_token[i].replace(self._decoding.space, ""))
            else:
                parts.append(self._id_to_bytes[i].decode("utf-8"))
        parts.append(_fallback_text(run))
        text = "".join(parts)
        if strip == "text" and text.startswith(" "):  # Fuse, then Strip one leading space
            return text[1:]
        return text

    @functools.cached_property
    def _byte_token_ids(self) -> frozenset[int]:
        """Ids of the <0xNN> tokens the decoder reads as bytes."""
        if not self._decoding.byte_fallback:
            return frozenset()
        return frozenset(i for t, i in self._vocab.items() if _BYTE_TOKEN.fullmatch(t))

    @property
    def template_prefix(self) -> list[int]:
        """Ids HF's template puts before every text (Llama-3's <|begin_of_text|>): documents and
        prompts start with them, as the model was pretrained."""
        return list(self._prefix_ids)

    @property
    def matched_special_tokens(self) -> list[str]:
        """Special tokens whose text HF's tokenizer(text) reads as the token (<|eot_id|>)."""
        return [content for content, flags in self._added.items() if flags["special"]]

    bos_id = property(lambda self: self._roles["bos"])
    eos_id = property(lambda self: self._roles["eos"])
    pad_id = property(lambda self: self._roles["pad"])
    @functools.cached_property
    def _fim(self) -> FimTokens | None:
        """The ids of the first family's FIM tokens (FIM_TOKENS) this tokenizer holds."""
        for spelling in FIM_TOKENS:
            ids = [self._added_ids.get(token) for token in spelling]
            if None not in ids:
                return FimTokens(*ids)
        return None

    fim_prefix_id = property(lambda self: self._fim.prefix if self._fim else None)
    fim_suffix_id = property(lambda self: self._fim.suffix if self._fim else None)
    fim_middle_id = property(lambda self: self._fim.middle if self._fim else None)

    def token_to_id(self, token: str) -> int | None:
        i = self._added_ids.get(token)
        return i if i is not None else self._vocab.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self._id_to_token[i] if 0 <= i < len(self._id_to_token) else None

    def __repr__(self) -> str:
        return f"BPETokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _checked_ids(ids: object, vocab_size: int) -> list[int]:
    """``ids`` as a list of ints in [0, vocab_size) (a -100 label would index from the end)."""
    try:
        ids = list(map(operator.index, ids))
    except TypeError:  # one id, a float, or a batch (a row is no index)
        raise ValueError(f"decode takes one sequence of integer token ids, got {type(ids).__name__}"
                         " (a batch: decode each row, e.g. tok.decode(ids[0]))") from None
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    return ids


def _fallback_text(run: bytes) -> str:
    """Byte-fallback bytes as HF's ByteFallback decoder reads them: their UTF-8 text, or one
    U+FFFD per byte where they are not valid UTF-8."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _byte_level_bytes(token: str) -> bytes:
    """Bytes HF's ByteLevel decoder makes of a token: mapped back, or raw UTF-8 if it cannot."""
    try:
        return bytes(map(UNICODE_TO_BYTE.__getitem__, token))
    except KeyError:
        return token.encode("utf-8")


# Rust's regex \w and \s (Unicode), which HF uses for single_word and lstrip/rstrip.
_WORD_CHAR = regex.compile(r"\w")
_SPACES = regex.compile(r"\s*")
_SPACES_BEFORE = regex.compile(r"\s*", regex.REVERSE)  # matched backwards from endpos


def _longest_first(tokens: Iterable[str]) -> regex.Pattern:
    """A regex finding ``tokens`` leftmost-longest, as HF finds added tokens."""
    return regex.compile("|".join(map(regex.escape, sorted(tokens, key=len, reverse=True))))


def _byte_level(piece: str) -> str:
    return piece.encode("utf-8", "surrogatepass").decode("latin-1").translate(BYTE_TO_UNICODE)


class _Pretokenizer:
    """Split text into pre-tokenizer pieces; ``isolated`` keeps the text between matches too."""

    def __init__(self, pattern: str, isolated: bool):
        compiled = regex.compile(pattern)
        # findall gives a pattern's groups, not its matches, where it has any (a Split regex may)
        self._findall = (compiled.findall if not compiled.groups
                         else lambda text: [m.group() for m in compiled.finditer(text)])
        self._finditer = compiled.finditer
        self._isolated = isolated

    def __call__(self, text: str, first: bool = False) -> list[str]:
        """``first`` (whether the text starts the encoded text) does not change these pieces."""
        pieces = self._findall(text)
        if not self._isolated or sum(map(len, pieces)) == len(text):
            return pieces
        pieces, pos = [], 0
        for m in self._finditer(text):
            pieces += (text[pos : m.start()], m.group())
            pos = m.end()
        pieces.append(text[pos:])
        return [p for p in pieces if p]


def _merge_pair(word: list[str], first: str, second: str) -> list[str]:
    out, i, n = [], 0, len(word)
    merged = first + second
    while i < n:
        if i < n - 1 and word[i] == first and word[i + 1] == second:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _learn_merges(words: list[str], freqs: list[int], vocab: dict[str, int], vocab_size: int,
                  min_frequency: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair, updating counts in place."""
    symbols = [list(w) for w in words]
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, (word, freq) in enumerate(zip(symbols, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(wi)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(vocab) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:
            continue  # stale: the current count was pushed when it changed
        if count < min_frequency:
            break
        first, second = pair
        merges.append(pair)
        vocab.setdefault(first + second, len(vocab))
        touched = set()
        for wi in pair_words.pop(pair):
            word = symbols[wi]
            new = _merge_pair(word, first, second)
            if len(new) == len(word):
                continue
            freq = freqs[wi]
            for p in zip(word, word[1:]):
                pair_counts[p] -= freq
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += freq
                pair_words[p].add(wi)
                touched.add(p)
            symbols[wi] = new
        for p in touched:
            if pair_counts[p] > 0 and p != pair:
                heapq.heappush(heap, (-pair_counts[p], p))
        pair_counts.pop(pair, None)
    return merges


def _roles_from_config(directory: Path) -> dict:
    """bos/eos/pad names from a tokenizer_config.json beside the file (null: none; absent: guess)."""
    config = directory / "tokenizer_config.json"
    data = _read_json(config) if config.is_file() else {}
    roles = {role: data[f"{role}_token"] for role in ("bos", "eos", "pad")
             if f"{role}_token" in data}
    for role, value in roles.items():
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            roles[role] = value = value["content"]  # an AddedToken as transformers writes it
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{config}: {role}_token must be a token string, an AddedToken "
                             f"object (its content a string) or null for none, got "
                             f"{_shown_json(value)}")
    return roles


def _chat_template_from_config(directory: Path) -> str | None:
    """The chat template transformers reads beside a tokenizer.json: chat_template.jinja, else
    tokenizer_config.json's chat_template (a string, or named templates: the "default" one)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text("utf-8")
    config = directory / "tokenizer_config.json"
    template = _read_json(config).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config}: chat_template must be a Jinja template string, or a list "
                         f"of {{'name', 'template'}} with a 'default' one, got "
                         f"{_shown_json(template)}")
    return template


# ---- Chat templates: an instruct model's conversations, rendered as transformers renders them

@functools.lru_cache(maxsize=8)
def _compiled_chat_template(template: str):
    """The template in transformers' sandboxed Jinja2 environment: no attribute or file access
    beyond the data given, trim_blocks and lstrip_blocks, loop controls, its ``tojson`` filter,
    ``raise_exception`` and ``strftime_now``, and ``{% generation %}`` blocks rendered as text."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text so)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: line {e.lineno}: {e.message}") from None


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                **special_tokens: str | None) -> str:
    """``messages`` rendered by a chat ``template`` as transformers renders them (bos_token,
    eos_token, ... given as ``special_tokens``); the template's own errors are ValueErrors."""
    import jinja2

    try:
        return _compiled_chat_template(template).render(
            messages=list(messages), tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat_template: {e}") from None


class ChatTurn(NamedTuple):
    """One assistant turn of a conversation, as text."""

    prompt: str  # the conversation before it, rendered with the generation prompt
    answer: str  # the assistant's text, up to the template's end-of-turn marker


def chat_turns(tok: BPETokenizer, messages: Sequence[dict]) -> list[ChatTurn]:
    """Each assistant turn of a conversation: what generation is prompted with, and what it is
    to answer (the whitespace after the end-of-turn marker is the template's glue)."""
    turns = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        turn = tok.apply_chat_template(messages[: i + 1])
        if not turn.startswith(prompt):
            raise ValueError("chat_template: the text before an assistant turn is not a prefix "
                             "of the conversation's text: the assistant's tokens cannot be told "
                             "apart")
        turns.append(ChatTurn(prompt, turn[len(prompt):].rstrip()))
    return turns


def tokenizer_path(path: str | os.PathLike) -> Path:
    """The tokenizer file ``path`` names (a directory's tokenizer.json)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / TOKENIZER_FILE).exists() and all(
            (path / name).is_file() for name in ("vocab.json", "merges.txt")):
        raise ValueError(
            f"{path}: holds vocab.json and merges.txt (the slow tokenizer format) but no "
            f"{TOKENIZER_FILE}, the file codelm reads; write one with transformers: "
            f"AutoTokenizer.from_pretrained({str(path)!r}).save_pretrained({str(path)!r}) "
            "(GPT2TokenizerFast in place of AutoTokenizer where it cannot tell the class)")
    return path / TOKENIZER_FILE


def load_tokenizer(path: str | os.PathLike) -> CodeTokenizer | BPETokenizer:
    """Load a tokenizer.json (HF byte-level BPE), a codelm tokenizer file, or a dir with one."""
    directory = Path(path) if Path(path).is_dir() else None
    path = tokenizer_path(path)
    if directory is not None and not path.exists():
        raise ValueError(f"{path}: not found{where_tokenizer_is(directory)}")
    data = _read_json(path)
    if data.get("type") == CODE_TOKENIZER_TYPE:
        return CodeTokenizer.from_dict(data, str(path))
    if CodeTokenizer.is_hf_form(data):
        return CodeTokenizer.from_hf(data, str(path))
    if "model" in data:
        tok = BPETokenizer(data, str(path), _roles_from_config(path.parent))
        tok.chat_template = _chat_template_from_config(path.parent)
        return tok
    raise ValueError(f"{path}: neither a HF tokenizer.json (no 'model' key) nor a codelm tokenizer file")


# PEFT's adapter config (lora.ADAPTER_CONFIG: this floor imports nothing else of codelm).
_ADAPTER_CONFIG = "adapter_config.json"


def where_tokenizer_is(directory: str | os.PathLike) -> str:
    """Where the tokenizer of a directory without one is, as the end of an error ("; ..." or
    ""): an adapter's base model, a run above (for best/, checkpoints/step-N/), or runs below."""
    directory = Path(directory)
    if (directory / _ADAPTER_CONFIG).is_file():
        base = None
        with contextlib.suppress(ValueError):
            base = _read_json(directory / _ADAPTER_CONFIG).get("base_model_name_or_path")
        return (f"; {directory} is a LoRA adapter directory ({_ADAPTER_CONFIG}), whose "
                f"tokenizer is its base model's" + (f": {base}" if base else ""))
    for above in list(directory.resolve().parents)[:2]:
        if (above / TOKENIZER_FILE).is_file():
            return f"; {above} above it holds one"
    below = sorted(p.parent for p in directory.glob(f"*/{TOKENIZER_FILE}"))
    hold = "holds" if len(below) == 1 else "hold"
    return f"; {', '.join(map(str, below))} below it {hold} one" if below else ""


def _config_ids(value: object, n_embeddings: object) -> list[int]:
    """A config.json bos/eos entry (null, an id or a list) as ids within the embeddings."""
    ids = value if isinstance(value, list) else [value]
    return [i for i in ids if type(i) is int and i >= 0
            and not (type(n_embeddings) is int and i >= n_embeddings)]


def generation_eos_ids(tok: CodeTokenizer | BPETokenizer, model_eos: object,
                       model_dir: str | os.PathLike | None = None) -> list[int]:
    """The ids that end a generated text, as transformers' generate: the tokenizer's eos, then
    each special-token id of the model's ``eos_token_id`` and of ``model_dir``'s
    generation_config.json (an ordinary token there is a stale class default)."""
    listed = _config_ids(model_eos, tok.vocab_size)
    generation = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if generation is not None and generation.is_file():
        with contextlib.suppress(ValueError):  # an unreadable one adds none
            listed += _config_ids(_read_json(generation).get("eos_token_id"), tok.vocab_size)
    ids = dict.fromkeys([tok.eos_id, *(i for i in listed if i in tok._special_ids)])
    return [i for i in ids if i is not None]


def decode_generated(tok: CodeTokenizer | BPETokenizer, ids: Iterable[int]) -> str:
    """Text of generated ``ids``; as in transformers, ids past the tokenizer decode to nothing."""
    n = tok.vocab_size
    return tok.decode([i for i in ids if i < n], continuation=True)


def _shown_id(tok: CodeTokenizer | BPETokenizer, i: int) -> str:
    """An id with the token it names in ``tok`` (and the role it has there)."""
    if i >= tok.vocab_size:
        return f"{i} (past the tokenizer's {tok.vocab_size} tokens)"
    role = "".join(f", its {r}" for r, own in (("bos", tok.bos_id), ("eos", tok.eos_id))
                   if own == i)
    return f"{i} ({tok.id_to_token(i)!r} in the tokenizer{role})"


def check_model_tokenizer(tok: CodeTokenizer | BPETokenizer, tokenizer_file: str | os.PathLike,
                          model_dir: str | os.PathLike) -> None:
    """Refuse a tokenizer that is not the model's, as the bos/eos ids of its config.json tell:
    crossed roles, or other ids than a CodeTokenizer's (a BPE's differing ids may be a stale
    config's)."""
    config = Path(model_dir) / "config.json"
    try:
        hf = _read_json(config)
    except ValueError:  # none (a model built from the tokenizer), or one the model loader names
        return
    mine = {"bos": tok.bos_id, "eos": tok.eos_id}
    given = {role: _config_ids(hf.get(f"{role}_token_id"), hf.get("vocab_size")) for role in mine}
    differ = {role: ids for role, ids in given.items()
              if ids and mine[role] is not None and mine[role] not in ids}
    crossed = any(own in ids for role, ids in differ.items()
                  for other, own in mine.items() if other != role)
    if not differ or not (crossed or isinstance(tok, CodeTokenizer)):
        return
    listed = " and ".join(f"{role}_token_id {', '.join(_shown_id(tok, i) for i in ids)}"
                         for role, ids in differ.items())
    has = " and ".join(f"the tokenizer's {role} is {mine[role]} ({tok.id_to_token(mine[role])!r})"
                       for role in differ)
    own_file = Path(model_dir) / TOKENIZER_FILE
    remedy = (f"pass --tokenizer {model_dir}, the model's own"
              if own_file.is_file() and own_file.resolve() != Path(tokenizer_file).resolve()
              else f"pass --tokenizer with the tokenizer {model_dir} was trained with")
    raise ValueError(f"{tokenizer_file} is not the tokenizer of the model in {model_dir}: "
                     f"{config} has {listed}, but {has}; {remedy}")


def main(argv: Sequence[str] | None = None) -> int:
    """Show how a tokenizer splits a text: what a model is actually fed."""
    parser = settings.ArgumentParser(
        description="Show how a tokenizer splits a text: each token's id and text (or bytes, "
        "for part of a character), then the count. The tokenizer is a tokenizer.json (HF "
        "byte-level BPE or codelm's), a codelm tokenizer file, or a directory holding one: a "
        "model's, or a run's (runs/NAME).")
    parser.add_argument("tokenizer", help="tokenizer file or directory")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="the text to split")
    given.add_argument("--file", help="a UTF-8 file whose text to split")
    parser.add_argument("--count", action="store_true", help="print only the number of tokens")
    parser.add_argument("--add-special-tokens", action="store_true",
                        help="with the tokens the tokenizer's template adds (e.g. Llama-3's BOS)")
    args = parser.parse_args(argv)
    return process.run_tool(lambda: _show_split(args))


def _show_split(args) -> None:
    tok = load_tokenizer(args.tokenizer)
    text = args.text
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{args.file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids = tok.encode(text, add_special_tokens=args.add_special_tokens)
    if args.count:
        print(len(ids))
        return
    width = len(str(tok.vocab_size - 1))
    for i in ids:
        raw = tok._id_to_bytes[i]
        try:
            shown = repr(raw.decode("utf-8"))
        except UnicodeDecodeError:  # part of a character: its bytes
            shown = repr(raw)
        print(f"{i:>{width}}  {shown}")
    per_token = f" ({len(text) / len(ids):.2f} characters a token)" if ids else ""
    print(f"{len(ids)} tokens for {len(text)} characters{per_token}")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
