"""Texts at Unicode's edges for the tokenizer parity tests and bench/bench_tokenizer.py: a few
code points of every general category, combining sequences (marks out of canonical order, NKo's,
marks Unicode assigned after 9.0, Hangul jamo), emoji ZWJ sequences, long runs of whitespace,
and, apart (HF tokenizers refuses a str holding one), lone surrogates."""

from __future__ import annotations

import functools
import unicodedata

# Marks in an order NFC changes (combining class 230 before 220, 202), and NKo's: U+07FD
# (Unicode 11) has class 220 in Python's tables and none in Unicode 9.0's, which HF follows.
COMBINING = [
    "e\u0301\u0327 a\u0308\u0304 o\u0323\u0302 u\u031b\u0300",
    "a\u0301\u0316\u0300\u0317 x\u0360y \u0327c \u0301",
    "\u07ca\u07f3\u07fd\u07eb \u07cb\u07fd\u07f3 \u07fd\u07eb",
    "\u1100\u1161\u11a8 \uac00\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af",
    "\u0915\u094d\u0937\u093f \u0e01\u0e34\u0e4d \u0628\u0650\u0633\u0652\u0645\u0650",
    "Å vs A\u030a, ñ vs n\u0303, \ufb01 \u212b \u2126",
    "1\u0301 _\u0301 \u2581\u0301 \t\u0301",
]
EMOJI = [
    "👩\u200d👩\u200d👧\u200d👦 family",
    "🏳\ufe0f\u200d🌈 🏴\u200d☠\ufe0f",
    "👨🏽\u200d💻 🧑🏿\u200d🤝\u200d🧑🏻 ❤\ufe0f\u200d🔥",
    "1\ufe0f\u20e3 #\ufe0f\u20e3 🇺🇳🇫🇷🇯🇵",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f scotland",
    "x = '🙂' + \"✨\" * 3  # 👍🏼",
]
WHITESPACE = [
    " " * 100,
    "x" + " " * 33 + "y" + " " * 7,
    "\t" * 40 + "return x\n",
    "\n" * 40 + "x" + "\n" * 3,
    "\r\n" * 20 + "\r\r\n\n",
    " \t" * 30 + "\n",
    "    " * 10 + "return x  \n        pass\n",
    "\u00a0" * 10 + "\u3000" * 5 + "\u2003\u2002x",
    "\u2581" * 40 + "x",  # SentencePiece's space written in the text
    "\u2581\u2581 x  \u2581 \u2581\u2581\u2581y",
    "<table>\n\n\n<tr>  </td>[multimodal]<unused7><start_of_turn>user\n",
]
# A str holds these; HF tokenizers refuses such a text (TypeError), a Rust str cannot.
LONE_SURROGATES = ["a\ud800b", "\udfff", "x\ud83d\ude00y", "def f():\n    return '\udcff'\n"]


@functools.cache
def category_samples(per_category: int = 4) -> dict[str, str]:
    """For each general category Python's unicodedata knows (but Cs), ``per_category`` of its
    code points, spread over the range: its first, its last and some between."""
    members: dict[str, list[int]] = {}
    for cp in range(0x110000):
        category = unicodedata.category(chr(cp))
        if category != "Cs":
            members.setdefault(category, []).append(cp)
    samples = {}
    for category, cps in sorted(members.items()):
        step = max(1, (len(cps) - 1) // max(1, per_category - 1))
        picked = sorted({*cps[::step][: per_category - 1], cps[-1]})
        samples[category] = "".join(map(chr, picked))
    return samples


@functools.cache
def edge_texts() -> list[str]:
    """The corpus (no lone surrogates): each category's samples alone, in code, and after a
    letter, a digit and a space, then the combining, emoji and whitespace texts."""
    texts = []
    for category, chars in category_samples().items():
        texts.append(chars)
        texts.append(f"x_{category} = '{chars}'  # {chars} a{chars}1{chars} {chars}\n")
        texts.append(" ".join(chars) + "\n\t" + "".join(c * 3 for c in chars))
    return [*texts, *COMBINING, *EMOJI, *WHITESPACE]
