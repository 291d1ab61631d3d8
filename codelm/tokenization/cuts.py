"""Finding many literal tokens in a text at once (``longest_first``) and cutting a text where no
BPE token can cross the cut (``SafeCuts``)."""

from __future__ import annotations

from collections.abc import Iterable

import regex

_END = ""  # a trie node's key for "a token ends here" (no token is empty)


def longest_first(tokens: Iterable[str]) -> regex.Pattern:
    """A regex finding ``tokens`` leftmost-longest, as HF finds added tokens (Aho-Corasick,
    leftmost-longest). The tokens form a trie, each branch tried before the token that ends at
    it, so a match costs the trie's depth rather than one try per token (Gemma 3 adds 6,415)."""
    root: dict = {}
    for token in tokens:
        node = root
        for char in token:
            node = node.setdefault(char, {})
        node[_END] = {}
    return regex.compile(_trie_pattern(root))


def _trie_pattern(node: dict) -> str:
    branches = []
    for char, child in sorted(node.items()):
        if char == _END:
            continue
        text = regex.escape(char)
        while len(child) == 1 and _END not in child:  # a chain of single children: one literal
            ((char, child),) = child.items()
            text += regex.escape(char)
        branches.append(text + _trie_pattern(child))
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if _END in node else body


class SafeCuts:
    """A text's pieces as ``pattern`` finds them (its matches cover any text), joined where an
    occurrence of one of ``spanning`` crosses the cut between them.

    Every symbol BPE makes is a token of the vocabulary that is a substring of the text, so a
    cut that no merged token (``spanning`` holds those that can cross one of ``pattern``'s cuts)
    crosses in this text is crossed by no merge: BPE on the pieces one by one gives the ids of
    BPE on the whole text, and each piece's ids can be cached."""

    def __init__(self, pattern: regex.Pattern, spanning: Iterable[str], common: str = ""):
        """``common``: characters too frequent to look for a spanning token by (▁, which
        stands for every space)."""
        spanning = set(spanning)
        self._pieces = pattern
        self._spanning = longest_first(spanning) if spanning else None
        self._clues = _clues(spanning, common) if spanning else None

    def __call__(self, text: str) -> list[str]:
        if self._clues is None or self._clues.search(text) is None:
            return self._pieces.findall(text)
        # The longest spanning token at each position: no cut strictly inside one.
        covers = [m.span() for m in self._spanning.finditer(text, overlapped=True)]
        pieces: list[str] = []
        start = reach = k = 0
        for m in self._pieces.finditer(text):
            cut = m.end()
            while k < len(covers) and covers[k][0] < cut:
                reach = max(reach, covers[k][1])
                k += 1
            if reach <= cut:  # no token starting before the cut ends after it
                pieces.append(text[start:cut])
                start = cut
        return pieces


def _clues(tokens: set[str], common: str) -> regex.Pattern:
    """A regex that matches in every text holding one of ``tokens``, and seldom elsewhere (a
    search as fast as a character class's): each token is looked for by its highest code point
    outside ``common`` where that is not ASCII (rare in code, and in most text), else whole."""
    clues, whole = set(), []
    for token in tokens:
        clue = max((c for c in token if c not in common), default="\0")
        if clue.isascii():
            whole.append(token)
        else:
            clues.add(clue)
    found = ["[" + "".join(map(regex.escape, sorted(clues))) + "]"] if clues else []
    if whole:
        found.append(longest_first(whole).pattern)
    return regex.compile("|".join(found))
