"""A BPE model's merges by token id, and BPE itself in HF tokenizers' order."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

# A word of more symbols than this merges by a heap; a shorter one by scans of a list.
_LIST_SYMBOLS = 128


class Merges:
    """The merges of a vocabulary of ``size`` ids, each pair (a, b) keyed by the one int
    a * base + b, its value rank * base + the merged id: the least value is the merge BPE makes
    first, and ints hash and compare faster than pairs of strings. ``no_pair`` (== size) stands
    for a symbol that is in no pair (an unk_token)."""

    def __init__(self, firsts: Sequence[int], seconds: Sequence[int], merged: Sequence[int],
                 size: int):
        """Merge number r joins ``firsts[r]`` and ``seconds[r]`` into ``merged[r]`` (a pair
        listed twice keeps its last rank, as in HF)."""
        self.no_pair = size
        self.base = base = size + 1
        self._table = dict(zip([a * base + b for a, b in zip(firsts, seconds)],
                               [rank * base + m for rank, m in enumerate(merged)]))
        self._none = (len(merged) + 1) * base  # above every value: no merge

    def __len__(self) -> int:
        return len(self._table)

    def __call__(self, ids: list[int]) -> list[int]:
        """BPE on ``ids`` (in place): merge the lowest-ranked adjacent pair, leftmost first,
        until none is left, as HF does. Each step finds the least merge of the word's list by
        ``min`` and ``index`` (scans in C: quicker than a heap for words of the usual length)."""
        if len(ids) > _LIST_SYMBOLS:
            return self._by_heap(ids)
        base, none, merge_of = self.base, self._none, self._table.get
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
        base, merge_of = self.base, self._table.get
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
