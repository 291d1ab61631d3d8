"""SentencePiece-style text without a byte-level mapping (Llama-2, Gemma, Mistral): its pieces,
cut where no token of the vocabulary crosses the cut, and the runs of ▁ before a word."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import regex

from codelm.tokenization.cuts import SafeCuts
from codelm.tokenization.files import expect

SPIECE_SPACE = "\u2581"  # "▁": SentencePiece's space, in Llama-2, Gemma and Mistral tokens

# Gemma's pre-tokenizer (after a normalizer that replaces every space with U+2581).
_SPLIT_AFTER_SPACES = {"type": "Split", "pattern": {"String": " "},
                       "behavior": "MergedWithPrevious", "invert": False}


class SentencePieces:
    """Pieces of SentencePiece-style text (no byte-level mapping). Metaspace: spaces become
    ``replacement``, which is prepended (``prepend_scheme`` always, or first: to the text's first
    segment only), and with ``split`` every ▁ starts a piece. Otherwise (or with no
    pre-tokenizer) the segment is one BPE word, cut where no token of the vocabulary crosses the
    cut in this text (``SafeCuts``), so that the ids are the same and the pieces can be cached."""

    def __init__(self, spec: dict | None, cuts_for: Callable[[str, bool], WordCuts | None],
                 spaces_replaced: bool = False):
        """``cuts_for(replacement, split)``: the cuts of a segment (``word_cuts``);
        ``spaces_replaced``: the normalizer leaves no space, so Gemma's Split after each space
        (its tokenizer.json's pre-tokenizer) splits nothing."""
        if spaces_replaced and spec == _SPLIT_AFTER_SPACES:
            spec = None
        self.metaspace = spec is not None
        self.replacement, self.prepend, split = SPIECE_SPACE, "never", False
        if spec is not None:
            expect(spec.get("type") == "Metaspace", "pre_tokenizer",
                   f"{spec.get('type')!r} (a BPE without ByteLevel reads Metaspace, none, or "
                   "Gemma's Split after spaces the normalizer replaced)")
            self.replacement = spec.get("replacement", SPIECE_SPACE)
            expect(isinstance(self.replacement, str) and len(self.replacement) == 1,
                   "pre_tokenizer", f"Metaspace replacement {self.replacement!r}")
            legacy = "always" if spec.get("add_prefix_space", True) else "never"
            self.prepend = spec.get("prepend_scheme", legacy)
            expect(self.prepend in ("always", "first", "never"), "pre_tokenizer",
                   f"Metaspace prepend_scheme {self.prepend!r}")
            split = bool(spec.get("split", True))
        self.cuts = cuts_for(self.replacement, split)
        self._cut = None
        if self.cuts is not None:
            name, space = self.cuts.pattern, self.replacement
            self._cut = SafeCuts(cut_pattern(name, space), self.cuts.spanning, common=space,
                                 ascii_pattern=cut_pattern(name, space, ascii=True))
        self._apart: SafeCuts | None = None

    def keep_apart(self, chars: str) -> None:
        """Let ``whole`` cut a text's runs of ``chars`` into pieces of their own: characters no
        cut class holds but the other characters' (runs of them are added tokens)."""
        others = regex.compile(rf"[^\p{{L}}\p{{M}}\p{{N}}{regex.escape(self.replacement)}]")
        if chars and not self.metaspace and self._cut is not None and all(map(others.match, chars)):
            name, space = self.cuts.pattern, self.replacement
            self._apart = SafeCuts(cut_pattern(name, space, chars), self.cuts.spanning, space,
                                   cut_pattern(name, space, chars, ascii=True))

    def whole(self, text: str) -> list[str] | None:
        """The pieces of a whole normalized text, its runs of ``keep_apart``'s characters
        pieces of their own; None where this way does not serve (a spanning token may be in
        the text)."""
        if self._apart is None:
            return None
        findall = self._apart.for_text(text)
        return None if findall is self._apart else findall(text)

    def __call__(self, text: str, first: bool) -> list[str]:
        """``first``: the segment starts the text (no added token before it)."""
        if self.metaspace:
            text = text.replace(" ", self.replacement)
            wanted = self.prepend == "always" or (self.prepend == "first" and first)
            if wanted and not text.startswith(self.replacement):
                text = self.replacement + text
        if self._cut is None:
            return [text] if text else []
        return self._cut(text)

    def pieces_for(self, text: str) -> Callable[[str], list[str]]:
        """The pieces of parts of ``text`` (normalized) but its first, quicker where it can be:
        a plain regex where no token crosses its cuts anywhere in the text."""
        if self.metaspace or self._cut is None:
            return functools.partial(self, first=False)
        return self._cut.for_text(text)


# A cut pattern serves where at most this share of the merged tokens can cross its cuts: each of
# those is looked for in the text, and where one is found its cuts are joined.
_MAX_SPANNING_SHARE = 0.01


class WordCuts(NamedTuple):
    """Where a SentencePiece segment is cut: ``pattern`` (a name of ``cut_pattern``) and the
    merged tokens that can cross its cuts."""

    pattern: str
    spanning: list[str]


def cut_pattern(name: str, space: str, apart: str = "", ascii: bool = False
                ) -> regex.Pattern | re.Pattern:
    """The pattern ``name`` for ▁ = ``space``; ``apart``: characters of the other class whose
    runs are pieces of their own (the pattern's pieces of a text without them are the same);
    ``ascii``: the same pieces of a text of ASCII and ▁ alone, by Python's re (twice as quick)."""
    engine = re if ascii else regex
    letters, digits = ("A-Za-z", "0-9") if ascii else (r"\p{L}\p{M}", r"\p{N}")
    mark = engine.escape(space)
    runs_apart = f"[{engine.escape(apart)}]+|" if apart else ""
    rest = mark + engine.escape(apart)
    if name == "split":  # Metaspace's own pieces: every ▁ starts one
        return engine.compile(rf"{runs_apart}{mark}[^{rest}]*|[^{rest}]+")
    if name == "runs":
        return engine.compile(rf"{runs_apart}{mark}*(?:[{letters}]+|[{digits}]"
                              rf"|[^{letters}{digits}{rest}]+)|{mark}+")
    assert name == "spaces", name
    return engine.compile(rf"{runs_apart}{mark}*[^{rest}]+|{mark}+")


def word_cuts(space: str, made: Iterable[str], split: bool) -> WordCuts | None:
    """The cuts of a SentencePiece segment (``made``: the tokens the merges make; ``split``:
    Metaspace's, which no token crosses): between runs of letters, digits and other characters,
    each with the ▁ (``space``) before it, as SentencePiece's training splits text by script
    and digit (556 of the 236,339 tokens Gemma 3's merges make cross such a cut, as ``²,``);
    else before each run of ▁; None (no cut: the segment is one word) where too many tokens
    cross either."""
    if split:
        return WordCuts("split", [])
    made = set(made)
    for name in ("runs", "spaces"):
        # A token that is one piece of the pattern crosses none of its cuts in any text.
        pattern = cut_pattern(name, space)
        spanning = [token for token in made if not pattern.fullmatch(token)]
        if len(spanning) <= _MAX_SPANNING_SHARE * len(made):
            return WordCuts(name, spanning)
    return None


class SpaceRuns:
    """The ids of a piece ▁▁...▁w (a run of k >= 2 ▁, then a word without ▁) from those of
    shorter pieces, where the merges' ranks make them the same: indented lines of code give
    such a piece for each indentation of each word. It holds where no merged token has ▁▁
    before another character, and either

    - every merge making a token of ▁ alone ranks before every merge making one of ▁ and
      other characters (Gemma): the run merges first, on its own, so BPE(▁^k w) is BPE(▁^k)
      then BPE(w), or, where the run's BPE ends in a lone ▁ (which may yet merge with the
      word), BPE(▁^k) less that ▁, then BPE(▁w); or
    - every merge making a token of ▁ alone ranks after every other merge (Llama-2): the word
      merges first, with the ▁ before it, so BPE(▁^k w) is BPE(▁^(k-1)) then BPE(▁w), or,
      where BPE(▁w) leaves that ▁ alone, BPE(▁^k) then the rest of BPE(▁w).
    """

    def __init__(self, space: str, space_id: int, run_first: bool):
        self._space = space
        self._space_id = space_id
        self._run_first = run_first

    @staticmethod
    def order(space: str, vocab: dict[str, int], made: Sequence[str]) -> bool | None:
        """For the merges that make ``made`` (in rank order): whether the run merges first
        (True) or last (False), or None where neither holds."""
        doubled = [(rank, token) for rank, token in enumerate(made) if space * 2 in token]
        mark = regex.escape(space)
        if space not in vocab or any(regex.search(rf"{mark}{mark}[^{mark}]", token)
                                     for _, token in doubled):
            return None
        runs = [rank for rank, token in doubled if not token.strip(space)]
        if not runs:  # no run merges at all
            return True
        first_mixed = next((rank for rank, token in enumerate(made)
                            if space in token and token.strip(space)), len(made))
        if max(runs) < first_mixed:
            return True
        last_other = next((rank for rank in reversed(range(len(made)))
                           if made[rank].strip(space)), -1)
        if min(runs) > last_other:
            return False
        return None

    def __call__(self, piece: str, ids_of: Callable[[str], Sequence[int]]) -> list[int] | None:
        """The ids of ``piece`` from ``ids_of`` shorter pieces; None where it is no run of two
        or more ▁ then a word."""
        space = self._space
        word = piece.lstrip(space)
        k = len(piece) - len(word)
        if k < 2 or not word or space in word:
            return None
        run = piece[:k]
        if self._run_first:
            ids = ids_of(run)
            if ids[-1] != self._space_id:
                return [*ids, *ids_of(word)]
            return [*ids[:-1], *ids_of(space + word)]
        rest = ids_of(space + word)
        if rest[0] != self._space_id:
            return [*ids_of(run[1:]), *rest]
        return [*ids_of(run), *rest[1:]]
