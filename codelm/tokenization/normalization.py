"""Unicode normalization as HF tokenizers computes it: NFC, NFD, NFKC and NFKD with Unicode
9.0.0's tables (its unicode-normalization-alignments crate), whatever version Python's
``unicodedata`` follows."""

from __future__ import annotations

import bisect
import functools
import unicodedata

import regex

from codelm.tokenization.unicode9 import UNASSIGNED_IN_UNICODE_9

_FIRSTS = [first for first, _ in UNASSIGNED_IN_UNICODE_9]
_LASTS = [last for _, last in UNASSIGNED_IN_UNICODE_9]
_LOWEST = chr(_FIRSTS[0])


def _unassigned_in_9(char: str) -> bool:
    k = bisect.bisect_right(_FIRSTS, ord(char)) - 1
    return k >= 0 and ord(char) <= _LASTS[k]


@functools.lru_cache(maxsize=256)
def _runs_of(chars: frozenset[str]) -> regex.Pattern:
    """Runs of ``chars``, kept in split's parts by the group."""
    return regex.compile("([" + "".join(map(regex.escape, sorted(chars))) + "]+)")


def normalize(form: str, text: str) -> str:
    """``unicodedata.normalize(form, text)`` with Unicode 9.0.0's data, as HF's normalizers.

    A code point assigned after 9.0 is, in those tables, a starter (combining class 0) that
    neither decomposes nor composes, so no reordering or composition crosses it: the text
    between such code points normalizes on its own, and they stay as they are. Every code point
    9.0 assigns keeps its combining class and decomposition in later versions, and no later
    composition joins two of them (Unicode's normalization stability policy), so Python's own
    tables give the same result on that text (Python 3.10+ is on Unicode 13 or later)."""
    if text.isascii():  # ASCII is unchanged by every form
        return text
    later = (frozenset(c for c in set(text) if c >= _LOWEST and _unassigned_in_9(c))
             if max(text) >= _LOWEST else None)
    if not later:
        return unicodedata.normalize(form, text)
    parts = _runs_of(later).split(text)  # text, a run of later code points, text, ..., text
    return "".join(unicodedata.normalize(form, part) if n % 2 == 0 else part
                   for n, part in enumerate(parts))
