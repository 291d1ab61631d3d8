"""Finding many literal tokens in a text at once (``longest_first``) and cutting a text where no
BPE token can cross the cut (``SafeCuts``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

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

    def __init__(self, pattern: regex.Pattern, spanning: Iterable[str], common: str = "",
                 ascii_pattern: re.Pattern | None = None):
        """``common``: characters too frequent to look for a spanning token by (▁, which
        stands for every space); ``ascii_pattern``: ``pattern``'s pieces of a text of ASCII
        and ``common`` characters alone, found quicker."""
        spanning = set(spanning)
        self._pieces = pattern
        self._ascii_pieces = ascii_pattern or pattern
        self._common = common
        self._spanning = longest_first(spanning) if spanning else None
        self._clues = _Clues(spanning, common) if spanning else None

    def for_text(self, text: str) -> Callable[[str], list[str]]:
        """This call for the parts of ``text``: a findall where no spanning token can be in
        it, the ASCII pattern's where the text is ASCII but ``common``."""
        rest = text
        for char in self._common:
            rest = rest.replace(char, "")
        plain = rest.isascii()  # a flag of the string, read at once
        if self._clues is not None and self._clues.in_text(text, plain):
            return self
        return self._ascii_pieces.findall if plain else self._pieces.findall

    def __call__(self, text: str) -> list[str]:
        findall = self.for_text(text)
        if findall is not self:
            return findall(text)
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


class _Clues:
    """Whether a text may hold one of some tokens, quicker than looking for them: each token
    is looked for by its highest code point outside ``common`` where that is not ASCII (rare in
    code, and in most text), else whole."""

    def __init__(self, tokens: set[str], common: str):
        chars, whole = set(), []
        for token in tokens:
            clue = max((c for c in token if c not in common), default="\0")
            if clue.isascii():
                whole.append(token)
            else:
                chars.add(clue)
        self._chars = regex.compile("[" + "".join(map(regex.escape, sorted(chars))) + "]"
                                    ) if chars else None
        self._whole = longest_first(whole) if whole else None

    def in_text(self, text: str, plain: bool) -> bool:
        """``plain``: the text is ASCII but ``common`` characters, so it holds no clue
        character (none is ASCII), as most code."""
        if self._whole is not None and self._whole.search(text):
            return True
        return not plain and self._chars is not None and self._chars.search(text) is not None
