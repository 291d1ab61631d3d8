"""Byte-level BPE from an HF tokenizer.json: the pre-tokenizer patterns, normalizers,
SentencePiece-style pieces and decoders it reads, ``FimTokens``, ``BPETokenizer`` and merge
learning. Anything else is refused naming the component."""

from __future__ import annotations

import functools
import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import regex

from codelm.tokenization.batching import BatchEncodeMixin, checked_ids
from codelm.tokenization.chat import chat_template_from_config, render_chat, roles_from_config
from codelm.tokenization.cuts import SafeCuts, longest_first
from codelm.tokenization.files import read_json, tokenizer_path, write_tokenizer
from codelm.tokenization.merges import Merges
from codelm.tokenization.normalization import normalize

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


def _merge_pairs(merges: object, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The (first, second) tokens of each merge, in rank order: "a b" or ["a", "b"], two
    vocabulary tokens whose concatenation is one."""
    _expect(isinstance(merges, list), "model", "merges must be a list")
    try:
        pairs = [merge.split(" ") if isinstance(merge, str) else merge for merge in merges]
        if all(first + second in vocab and first in vocab and second in vocab
               for first, second in pairs):
            return [(first, second) for first, second in pairs]
    except (TypeError, ValueError):  # not a pair of strings
        pass
    for rank, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(parts, list) and len(parts) == 2
                and all(isinstance(p, str) and p in vocab for p in parts)
                and parts[0] + parts[1] in vocab):
            raise _Unsupported(f"model: merge #{rank} {merge!r} is not two vocabulary tokens "
                               "whose concatenation is in the vocabulary")
    raise AssertionError("unreachable")


def post_processor_ids(spec: object) -> tuple[list[int], list[int]]:
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
                text = normalize(args[0], text)
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
    pre-tokenizer) the segment is one BPE word, cut where no token of the vocabulary crosses the
    cut in this text (``SafeCuts``), so that the ids are the same and the pieces can be cached."""

    def __init__(self, spec: dict | None, made: Iterable[str], spaces_replaced: bool = False):
        """``made``: the tokens the merges make, every token BPE can make of characters;
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
        if split:  # HF's own pieces: no token crosses them
            self._cut = SafeCuts(regex.compile(rf"{mark}[^{mark}]*|[^{mark}]+"), ())
        else:
            self._cut = _word_cuts(self.replacement, set(made))

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


# A cut pattern serves where at most this share of the merged tokens can cross its cuts: each of
# those is looked for in the text, and where one is found its cuts are joined.
_MAX_SPANNING_SHARE = 0.01


def _word_cuts(space: str, made: set[str]) -> SafeCuts | None:
    """Cuts of a SentencePiece word (``made``: the tokens the merges make): between runs of
    letters, digits and other characters, each with the ▁ (``space``) before it, as
    SentencePiece's training splits text by script and digit (556 of the 236,339 tokens Gemma
    3's merges make cross such a cut, as ``²,``); else before each run of ▁; None (no cut)
    where too many tokens cross either."""
    mark = regex.escape(space)
    runs = regex.compile(rf"{mark}*[\p{{L}}\p{{M}}]+|{mark}*\p{{N}}|{mark}*[^\p{{L}}\p{{M}}\p{{N}}"
                         rf"{mark}]+|{mark}+")
    spaces = regex.compile(rf"{mark}*[^{mark}]+|{mark}+")
    for pattern in (runs, spaces):
        # A token that is one piece of the pattern crosses none of its cuts in any text.
        spanning = [token for token in made if not pattern.fullmatch(token)]
        if len(spanning) <= _MAX_SPANNING_SHARE * len(made):
            return SafeCuts(pattern, spanning, common=space)
    return None


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


class BPETokenizer(BatchEncodeMixin):
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
        _expect(isinstance(vocab, dict) and set(map(type, vocab)) <= {str}
                and set(map(type, vocab.values())) <= {int} and min(vocab.values(), default=0) >= 0,
                "model", "vocab must map token strings to non-negative integer ids")
        self._vocab: dict[str, int] = vocab
        pairs = _merge_pairs(model.get("merges", []), vocab)
        made = [first + second for first, second in pairs]
        self._merges = Merges([vocab[first] for first, _ in pairs],
                              [vocab[second] for _, second in pairs],
                              list(map(vocab.__getitem__, made)), max(vocab.values(), default=-1) + 1)
        self._ignore_merges = bool(model.get("ignore_merges", False))
        unk = model.get("unk_token")
        _expect(unk is None or unk in vocab, "model", f"unk_token {unk!r} not in the vocabulary")
        self._unk_id = vocab[unk] if unk is not None else None
        self._fuse_unk = bool(model.get("fuse_unk", False))

        self._decoding = _decoding(spec.get("decoder"))
        self._build_pieces(spec.get("pre_tokenizer"), made)
        self._prefix_ids, self._suffix_ids = post_processor_ids(spec.get("post_processor"))
        self._build_added(spec.get("added_tokens") or [])

        size = max(max(vocab.values(), default=-1), max(self._added_ids.values(), default=-1)) + 1
        n_tokens = len(vocab) + len(self._added_ids)  # a file's ids size the tables made below
        _expect(size <= 2 * n_tokens + 1024, "model",
                f"ids up to {size - 1} for {n_tokens} tokens (not dense)")
        self._id_to_token: list[str | None] = [None] * size
        for token, i in chain(vocab.items(), self._added_ids.items()):
            self._id_to_token[i] = token

    @functools.cached_property
    def _id_to_bytes(self) -> list[bytes]:
        """The bytes each id decodes to (built at the first decode: 262,144 for Gemma 3)."""
        decoding = self._decoding
        return [b"" if token is None else _token_bytes(token, decoding)
                for token in self._id_to_token]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def _build_pieces(self, pre_tokenizer: dict | None, made: list[str]) -> None:
        """The pre-tokenizer: byte-level (its regex, then each byte as a character) or
        SentencePiece-style (the text as normalized, unknown characters as <0xNN> bytes);
        ``made``: the tokens the merges make."""
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
            self._pretokenize = _SentencePieces(pre_tokenizer, made, spaces_replaced)

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
            self._added_res.append(longest_first(contents) if contents else None)

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
        specials_re = longest_first(special_tokens) if special_tokens else None
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
        spec = read_json(path)
        tok = cls(spec, str(path), roles_from_config(path.parent) if roles is None else roles)
        tok.chat_template = chat_template_from_config(path.parent)
        return tok  # (load_tokenizer reads it as this does)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer.json; into a directory, with a tokenizer_config.json naming the
        bos/eos/pad tokens and the chat template (unless one is there) for transformers'
        AutoTokenizer."""
        config = {f"{role}_token": self.id_to_token(i) for role, i in self._roles.items()
                  if i is not None}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return write_tokenizer(path, self.spec, 2, config=config)

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

    def _encode_piece(self, piece: str) -> list[int]:
        word = _byte_level(piece) if self._decoding.byte_level else piece
        vocab = self._vocab
        if self._ignore_merges and (i := vocab.get(word)) is not None:
            return [i]
        ids = list(map(vocab.get, word))
        if None in ids:
            return self._encode_with_unknown(word)
        return self._merges(ids)

    def _encode_with_unknown(self, word: str) -> list[int]:
        """As HF: a character missing from the vocabulary becomes its UTF-8 bytes' <0xNN>
        tokens (byte_fallback, where they all exist; a lone surrogate's as Python's
        surrogatepass spells it, which HF's str cannot hold), else unk_token (consecutive ones
        fused with fuse_unk), else it is dropped (its neighbours merge as one word). No merge
        crosses an unk_token."""
        vocab = self._vocab
        unk = self._merges.no_pair  # in no pair, until it becomes unk_token's id
        ids: list[int] = []
        for c in word:
            if (i := vocab.get(c)) is not None:
                ids.append(i)
                continue
            spelled = c.encode("utf-8", "surrogatepass") if self._byte_fallback else b""
            fallback = [vocab.get(f"<0x{b:02X}>") for b in spelled]
            if fallback and None not in fallback:
                ids += fallback
            elif self._unk_id is not None and not (self._fuse_unk and ids and ids[-1] == unk):
                ids.append(unk)
        return [self._unk_id if i == unk else i for i in self._merges(ids)]

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
        ids = checked_ids(ids, self.vocab_size)
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
