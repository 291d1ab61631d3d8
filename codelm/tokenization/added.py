"""A tokenizer.json's added tokens: the ids HF tokenizers gives them, and a text cut at them as
HF finds them."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import regex

from codelm.tokenization.cuts import longest_first
from codelm.tokenization.files import expect

_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# Rust's regex \w and \s (Unicode), which HF uses for single_word and lstrip/rstrip.
_WORD_CHAR = regex.compile(r"\w")
_SPACES = regex.compile(r"\s*")
_SPACES_BEFORE = regex.compile(r"\s*", regex.REVERSE)  # matched backwards from endpos


class _QuickSplit(NamedTuple):
    """AddedTokens' one-pass way of cutting a text at its added tokens."""

    replacements: list[tuple[str, str]]  # the normalizer's, applied to the whole text
    absent: str  # characters the text must not hold for the split to serve
    split: regex.Pattern | None  # the added tokens, kept in split's parts by a group


class AddedTokens:
    """The added tokens of a tokenizer.json (``entries``) over ``vocab``: ``ids`` (a vocabulary
    token keeps its id, any other gets the next one past the vocabulary and added ids: HF
    ignores the JSON ``id``), ``flags`` and ``special_ids``. ``normalize``: the normalizer
    (None: none), which HF applies to the text between added tokens; ``replacements``: its
    steps where each replaces one character, else None. ``runs_apart``: the pre-tokenizer can
    keep runs of one character pieces of their own (SentencePiece's; a byte-level regex
    cannot), so such runs of added tokens take the one-pass way."""

    def __init__(self, entries: object, vocab: dict[str, int],
                 normalize: Callable[[str], str] | None,
                 replacements: list[tuple[str, str]] | None, runs_apart: bool = True):
        expect(isinstance(entries, list), "added_tokens", "must be a list")
        self.ids: dict[str, int] = {}
        self.flags: dict[str, dict] = {}
        for entry in entries:
            expect(isinstance(entry, dict) and isinstance(entry.get("content"), str)
                   and isinstance(entry.get("id"), int),
                   "added_tokens", f"entry {entry!r} needs a string 'content' and an integer 'id'")
            content = entry["content"]
            if not content:
                continue
            flags = {f: bool(entry.get(f, f == "normalized")) for f in _FLAGS}
            if content in self.flags:
                # HF merges such repeats in ways that depend on the flags; only exact ones pass.
                expect(self.flags[content] == flags, "added_tokens",
                       f"entry {entry!r} repeats {content!r} with other flags")
                continue
            i = vocab.get(content)
            if i is None:
                i = max(max(self.ids.values(), default=-1) + 1, len(vocab))
            self.ids[content] = i
            self.flags[content] = flags
        self.special_ids = {self.ids[c] for c, f in self.flags.items() if f["special"]}
        self._normalize = normalize
        # HF matches tokens that are not normalized first, in the text, then the normalized
        # ones in the normalized gaps, each as the normalizer writes it (Llama-2's Prepend
        # makes <sep> "▁<sep>"): ``_contents`` maps what each level finds to the token.
        self._found, self._contents = [], []
        for normalized in (False, True):
            contents = {self._as_found(c) if normalized else c: c
                        for c, f in self.flags.items() if f["normalized"] == normalized}
            self._contents.append(contents)
            self._found.append(longest_first(list(contents)) if contents else None)
        self.found_ids = {found: self.ids[c] for level in self._contents
                          for found, c in level.items()}
        self._quick = self._quick_split(replacements)
        self.run_chars, self._others = self._runs_of_one_character() if runs_apart else ("", None)

    def spelled(self, content: str) -> str:
        """An added token as HF names and decodes it: a normalized one as normalized (Llama-2's
        Prepend makes <sep> "▁<sep>", which decodes as " <sep>")."""
        return self._as_found(content) if self.flags[content]["normalized"] else content

    def _as_found(self, content: str) -> str:
        """A normalized token's text as HF looks for it: normalized."""
        return self._normalize(content) if self._normalize is not None else content

    def segments(self, text: str, plain_special: bool = False, level: int = 0
                 ) -> list[tuple[str, int | None]]:
        """(segment, added-token id or None) covering ``text``, the way HF finds added tokens,
        the segments between them normalized; ``plain_special``: special ones are left in the
        text (HF's encode_special_tokens)."""
        if level == 1 and self._normalize is not None:
            text = self._normalize(text)
        if level == len(self._found):
            return [(text, None)] if text else []
        if self._found[level] is None:
            return self.segments(text, plain_special, level + 1)
        out: list[tuple[str, int | None]] = []
        start_offset = 0
        for m in self._found[level].finditer(text):
            start, stop = m.span()
            content = self._contents[level][m.group()]
            flags = self.flags[content]
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
                out.extend(self.segments(text[start_offset:start], plain_special, level + 1))
            out.append((text[start:stop], self.ids[content]))
            start_offset = stop
        if start_offset < len(text):
            out.extend(self.segments(text[start_offset:], plain_special, level + 1))
        return out

    def _quick_split(self, replacements: list[tuple[str, str]] | None) -> _QuickSplit | None:
        """``quick_parts``' way where it gives ``segments``' cuts (else None): no added token
        has lstrip, rstrip or single_word, all are matched alike (all normalized, or none),
        and the normalizer only replaces characters, so the whole text is normalized at once
        and cut at its added tokens by one split. Tokens matched as written may hold no
        character the normalizer replaces, and one holding a character it writes is left out:
        it cannot occur in a text without that character (which ``quick_parts`` checks)."""
        flags = self.flags.values()
        if any(f["lstrip"] or f["rstrip"] or f["single_word"] for f in flags):
            return None
        if self._normalize is None:
            replacements = []
        if replacements is None or len({f["normalized"] for f in flags}) > 1:
            return None
        written = "".join(new for _, new in replacements)
        tokens = list(self.flags)
        as_written = bool(tokens) and not self.flags[tokens[0]]["normalized"]
        if as_written:
            if any(old in token for token in tokens for old, _ in replacements):
                return None
            tokens = [t for t in tokens if not any(c in t for c in written)]
        else:  # found in the normalized text as the normalizer writes them
            tokens = list(self._contents[1])
        split = regex.compile(f"({longest_first(tokens).pattern})") if tokens else None
        return _QuickSplit(replacements, written if as_written else "", split)

    def _runs_of_one_character(self) -> tuple[str, regex.Pattern | None]:
        """(``run_chars``, the other tokens of the one-pass way): characters every run of
        which HF cuts into added tokens that are not special (there is one for each length up
        to some n, as Gemma's newlines and tabs) and no other added token holds; such a run
        never reaches the model, even with split_special_tokens, so a run of them can be a
        piece of its own (``run_ids`` gives its ids)."""
        if self._quick is None or self._quick.split is None:
            return "", None
        tokens = [t for t in self.flags if not any(c in t for c in self._quick.absent)]
        replaced = "".join(old + new for old, new in self._quick.replacements)
        run_chars = ""
        for char in sorted({t[0] for t in tokens if t == t[0] * len(t)} - set(replaced)):
            runs = {t for t in tokens if t == char * len(t)}
            every_length = {char * n for n in range(1, max(map(len, runs)) + 1)} == runs
            plain = not any(self.flags[t]["special"] for t in runs)  # split_special_tokens
            if every_length and plain and not any(char in t for t in tokens if t not in runs):
                run_chars += char
        others = [t for t in tokens if not (t[0] in run_chars and t == t[0] * len(t))]
        return run_chars, longest_first(others) if others else None

    def run_ids(self, run: str) -> list[int]:
        """The ids of a run of one of ``run_chars``: its added tokens, longest first."""
        return [i for _, i in self.segments(run)]

    def quick_text(self, text: str) -> str | None:
        """``text`` normalized for the one-pass way (``parts``), or None where that does not
        serve this text (then ``segments`` does)."""
        quick = self._quick
        if quick is None or any(c in text for c in quick.absent):
            return None
        for old, new in quick.replacements:
            text = text.replace(old, new)
        return text

    def only_runs(self, text: str) -> bool:
        """Whether no added token is in ``quick_text``'s text but runs of ``run_chars``."""
        return bool(self.run_chars) and (self._others is None or self._others.search(text) is None)

    def parts(self, text: str) -> list[str]:
        """``quick_text``'s text cut at its added tokens: text, added token, ..., text."""
        split = self._quick.split
        return split.split(text) if split is not None else [text]
