"""Encoding many texts: ``BatchEncoder`` (a worker pool where the texts are long enough),
``text_batches`` and the ``encode_batch`` mixin both tokenizers share, and the id check of
``decode``."""

from __future__ import annotations

import contextlib
import functools
import operator
from array import array
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import TypeVar

from codelm.runtime import process

# Texts shorter than this in total are worked on in-process (encoded here, a project's examples
# composed): starting workers would cost more.
MIN_PARALLEL_CHARS = 1 << 20
# Distinct pieces remembered per tokenizer; code repeats its words, so this is rarely reached.
_MAX_CACHE_ENTRIES = 1 << 20
# A longer piece (a blob, a minified line) is encoded each time, not kept: a million of them
# would hold gigabytes.
_MAX_CACHED_PIECE_CHARS = 256


class _PieceCache(dict):
    """Piece -> token ids; a miss computes the ids once (code repeats its words), kept where
    the piece is short."""

    def __init__(self, encode_piece):
        super().__init__()
        self._encode_piece = encode_piece

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = tuple(self._encode_piece(piece))  # tuples chain a little faster than lists
        if len(piece) > _MAX_CACHED_PIECE_CHARS:
            return ids
        if len(self) >= _MAX_CACHE_ENTRIES:
            self.clear()
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
        return self.workers == 1 or len(texts) < 2 or sum(map(len, texts)) < MIN_PARALLEL_CHARS

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


# A continuation (a completion after its prompt) is encoded after this text and cut from it
# where the tokenizer starts every encoded text with a space: no token merges with a newline.
CONTINUATION_ANCHOR = "\n"


class BatchEncodeMixin:
    """encode_batch over processes, decode, and the piece cache (never pickled)."""

    _id_to_bytes: list[bytes]
    _special_ids: Container[int]  # the ids that skip_special_tokens drops

    def token_bytes(self, i: int) -> bytes:
        """The bytes id ``i`` decodes to: part of a character where the token is."""
        return self._id_to_bytes[i]

    @functools.cached_property
    def longest_token(self) -> int:
        """The most bytes (so characters) a token decodes to: a text of n tokens is at most n
        times as long."""
        return max(map(len, self._id_to_bytes), default=1)

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
        ids = checked_ids(ids, len(table))
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(map(table.__getitem__, ids)).decode("utf-8", "replace")

    def token_byte_lengths(self) -> list[int]:
        """The UTF-8 bytes each id stands for in a text (special tokens: none)."""
        return [0 if i in self._special_ids else len(b) for i, b in enumerate(self._id_to_bytes)]

    @functools.cached_property
    def continuation_anchor(self) -> list[int] | None:
        """The ids of CONTINUATION_ANCHOR where this tokenizer starts every text it encodes with a
        space (SentencePiece's dummy prefix: Llama-2's Prepend normalizer, Metaspace's prepend),
        else None. Encoded alone, a completion would start with a space its text does not have,
        one that the prompt and completion encoded whole never hold."""
        if self.decode(self.encode("a"), continuation=True) == "a":
            return None
        return self.encode(CONTINUATION_ANCHOR)

    @functools.cached_property
    def _cache(self) -> _PieceCache:
        return _PieceCache(self._encode_piece)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_cache", None)  # rebuilt when first used; carries a bound method
        return state


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


def checked_ids(ids: object, vocab_size: int) -> list[int]:
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


def continuation_ids(ids: list[int], anchor: list[int] | None,
                     alone: Callable[[], list[int]]) -> list[int]:
    """A continuation's ids from ``ids``, those of CONTINUATION_ANCHOR + its text (or of its
    text where ``anchor`` is None); ``alone()`` (its text encoded alone) where the anchor
    merged."""
    if anchor is None:
        return ids
    if ids[: len(anchor)] == anchor:
        return ids[len(anchor):]
    return alone()


def encode_continuation(tokenizer: BatchEncodeMixin, text: str,
                        split_special_tokens: bool = True) -> list[int]:
    """The ids of ``text`` as it continues another text (``continuation_anchor``)."""
    anchor = tokenizer.continuation_anchor
    if anchor is None:
        return tokenizer.encode(text, split_special_tokens=split_special_tokens)
    ids = tokenizer.encode(CONTINUATION_ANCHOR + text, split_special_tokens=split_special_tokens)
    return continuation_ids(ids, anchor, lambda: tokenizer.encode(
        text, split_special_tokens=split_special_tokens))
