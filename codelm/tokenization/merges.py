"""A BPE model's merges by token id, BPE itself in HF tokenizers' order, and a piece's ids."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

# A word of more symbols than this merges by a heap; a shorter one by scans of a list.
_LIST_SYMBOLS = 128


class Merges:
    """The merges of a vocabulary of ``size`` ids, each pair (a, b) keyed by the one int
    a * base + b, its value rank * base + the merged id: the least value is the merge BPE makes
    first, and ints hash and compare faster than pairs of strings. ``no_pair`` (== size) stands
    for a symbol that is in no pair (an unk_token)."""

    def __init__(self, table: dict[int, int], size: int):
        """``table``: pair key -> value, as ``from_pairs`` and ``table`` make it."""
        self.no_pair = size
        self.base = size + 1
        self.table = table
        self._none = max(table.values(), default=0) + 1  # above every value: no merge

    @classmethod
    def from_pairs(cls, firsts: Sequence[int], seconds: Sequence[int], merged: Sequence[int],
                   size: int) -> Merges:
        """Merge number r joins ``firsts[r]`` and ``seconds[r]`` into ``merged[r]`` (a pair
        listed twice keeps its last rank, as in HF)."""
        base = size + 1
        return cls(dict(zip([a * base + b for a, b in zip(firsts, seconds)],
                            [rank * base + m for rank, m in enumerate(merged)])), size)

    def __len__(self) -> int:
        return len(self.table)

    def __call__(self, ids: list[int]) -> list[int]:
        """BPE on ``ids`` (in place): merge the lowest-ranked adjacent pair, leftmost first,
        until none is left, as HF does. Each step finds the least merge of the word's list by
        ``min`` and ``index`` (scans in C: quicker than a heap for words of the usual length)."""
        if len(ids) > _LIST_SYMBOLS:
            return self._by_heap(ids)
        base, none, merge_of = self.base, self._none, self.table.get
        merges = [merge_of(a * base + b, none) for a, b in zip(ids, ids[1:])]
        while merges:
            value = min(merges)
            if value == none:
                break
            i = merges.index(value)  # the leftmost
            new = value % base
            ids[i : i + 2] = (new,)
            del merges[i]
            if i > 0:
                merges[i - 1] = merge_of(ids[i - 1] * base + new, none)
            if i < len(merges):
                merges[i] = merge_of(new * base + ids[i + 1], none)
        return ids

    def _by_heap(self, ids: list[int]) -> list[int]:
        """The same merges, (value, position) from a heap over a linked list."""
        base, merge_of = self.base, self.table.get
        n = len(ids)
        prev = list(range(-1, n - 1))
        nxt = [*range(1, n), -1]
        heap = [(value, i, a, b) for i, (a, b) in enumerate(zip(ids, ids[1:]))
                if (value := merge_of(a * base + b)) is not None]
        heapq.heapify(heap)
        gone = -1  # a symbol merged into its left neighbour
        while heap:
            value, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            # A merge makes a longer token, so an unchanged pair of ids means a current entry.
            if j == -1 or ids[i] != a or ids[j] != b:
                continue
            ids[i] = value % base
            ids[j] = gone
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            for left, right in ((prev[i], i), (i, nxt[i])):
                if left != -1 and right != -1:
                    pair = (ids[left], ids[right])
                    if (value := merge_of(pair[0] * base + pair[1])) is not None:
                        heapq.heappush(heap, (value, left, *pair))
        return [i for i in ids if i != gone]


class WordEncoder:
    """A pre-tokenized piece's ids, as HF's BPE model makes them: its characters (``prepare``
    maps a piece to them, as ByteLevel does), merged."""

    def __init__(self, vocab: dict[str, int], merges: Merges, prepare: Callable[[str], str],
                 ignore_merges: bool, byte_fallback: bool, unk_id: int | None, fuse_unk: bool):
        self._vocab = vocab
        self._merges = merges
        self._prepare = prepare
        self._ignore_merges = ignore_merges
        self._byte_fallback = byte_fallback
        self._unk_id = unk_id
        self._fuse_unk = fuse_unk

    def __call__(self, piece: str) -> list[int]:
        word = self._prepare(piece)
        vocab = self._vocab
        if self._ignore_merges and word in vocab:
            return [vocab[word]]
        ids = list(map(vocab.get, word))
        if None in ids:
            return self._with_unknown(word)
        return self._merges(ids)

    def _with_unknown(self, word: str) -> list[int]:
        """As HF: a character missing from the vocabulary becomes its UTF-8 bytes' <0xNN>
        tokens (byte_fallback, where they all exist; a lone surrogate's as Python's
        surrogatepass spells it, which HF's str cannot hold), else unk_token (consecutive ones
        fused with fuse_unk), else it is dropped (its neighbours merge as one word). No merge
        crosses an unk_token. As in HF, an unk_token is placed when the next character in the
        vocabulary (or the word's end) comes: byte-fallback tokens between go before it, and
        with fuse_unk it takes in the unknown characters after them."""
        vocab = self._vocab
        unk = self._merges.no_pair  # in no pair, until it becomes unk_token's id
        ids: list[int] = []
        pending = False  # an unk_token not placed yet
        for c in word:
            if (i := vocab.get(c)) is not None:
                ids += [unk, i] if pending else [i]
                pending = False
                continue
            spelled = c.encode("utf-8", "surrogatepass") if self._byte_fallback else b""
            fallback = [vocab.get(f"<0x{b:02X}>") for b in spelled]
            if fallback and None not in fallback:
                ids += fallback
            elif self._unk_id is not None:
                if pending and not self._fuse_unk:
                    ids.append(unk)
                pending = True
        if pending:
            ids.append(unk)
        return [self._unk_id if i == unk else i for i in self._merges(ids)]
