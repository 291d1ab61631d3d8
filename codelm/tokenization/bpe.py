"""Byte-level BPE from an HF tokenizer.json: the pre-tokenizer patterns, normalizers,
SentencePiece-style pieces and decoders it reads, ``FimTokens``, ``BPETokenizer`` and merge
learning. Anything else is refused naming the component."""

from __future__ import annotations

import functools
import heapq
import operator
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import regex

from codelm.tokenization import compiled
from codelm.tokenization.added import AddedTokens
from codelm.tokenization.batching import BatchEncodeMixin, checked_ids
from codelm.tokenization.chat import (
    chat_template_from_config,
    named_chat_templates,
    render_chat,
    roles_from_config,
)
from codelm.tokenization.compiled import ModelTables
from codelm.tokenization.cuts import longest_first
from codelm.tokenization.files import (
    Unsupported,
    expect,
    read_json,
    tokenizer_path,
    write_tokenizer,
)
from codelm.tokenization.merges import Merges, WordEncoder
from codelm.tokenization.normalization import normalize
from codelm.tokenization.spiece import SPIECE_SPACE, SentencePieces, SpaceRuns, word_cuts

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


def _pretokenizer_pattern(spec: dict | None) -> tuple[str, bool]:
    """(regex, isolated gaps possible) for a supported tokenizer.json pre_tokenizer."""
    where = "pre_tokenizer"
    expect(isinstance(spec, dict), where, f"{spec!r} (a byte-level BPE needs a ByteLevel one)")
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    expect(isinstance(steps, list) and all(isinstance(s, dict) for s in steps), where, "Sequence")
    kinds = [s.get("type") for s in steps]
    expect(kinds in (["ByteLevel"], ["Digits", "ByteLevel"], ["Split", "ByteLevel"]), where,
           f"{kinds} (codelm reads a ByteLevel, alone or after Digits or a Split)")
    *first, byte_level = steps
    expect(not byte_level.get("add_prefix_space", False), where,
           "ByteLevel with add_prefix_space=true (codelm reads add_prefix_space=false only)")
    use_regex = byte_level.get("use_regex", True)
    if not first:
        expect(use_regex, where, "ByteLevel(use_regex=false) on its own")
        return GPT2_PATTERN, False
    if kinds[0] == "Digits":
        expect(use_regex, where, "Digits then ByteLevel(use_regex=false)")
        individual = first[0].get("individual_digits", False)
        return (STARCODER_PATTERN if individual else _DIGIT_RUNS_PATTERN), False
    split = first[0]
    expect(not use_regex, where,
           "Split then ByteLevel(use_regex=true) (Llama-3 style has use_regex=false)")
    expect(split.get("behavior") == "Isolated", where, f"Split behavior {split.get('behavior')!r}")
    expect(not split.get("invert", False), where, "Split with invert=true")
    pattern = split.get("pattern")
    expect(isinstance(pattern, dict) and len(pattern) == 1, where, f"Split pattern {pattern!r}")
    if isinstance(pattern.get("Regex"), str):
        _check_split_regex(pattern["Regex"])
        return pattern["Regex"], True
    expect(isinstance(pattern.get("String"), str), where, f"Split pattern {pattern!r}")
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
        raise Unsupported(
            f"pre_tokenizer: Split regex {pattern!r} uses {pattern[end : end + 20]!r}, which "
            "codelm refuses: Oniguruma (run by HF) and Python regex (run here) do not read it "
            "the same way")
    try:
        compiled = regex.compile(pattern)
    except regex.error:
        return  # the pre-tokenizer's build names the error
    for text in _EMPTY_MATCH_PROBES:
        if any(match.start() == match.end() for match in compiled.finditer(text)):
            raise Unsupported(
                f"pre_tokenizer: Split regex {pattern!r} can match the empty string, which "
                "codelm refuses: Oniguruma (run by HF) and Python regex (run here) step past "
                "an empty match differently")


# Texts on which a Split regex must match no empty string: letters, digits, spaces, newlines.
_EMPTY_MATCH_PROBES = ("", "a", "0", " ", "\n", "a b", "x  y\n\n1", "é.:_")


def _template_ids(spec: dict, where: str) -> tuple[list[int], list[int]]:
    """Ids a TemplateProcessing ``single`` template puts before and after the sequence."""
    single = spec.get("single")
    specials = spec.get("special_tokens", {})
    expect(isinstance(single, list) and isinstance(specials, dict), where, "TemplateProcessing")
    before, after, seen_sequence = [], [], False
    for item in single:
        expect(isinstance(item, dict) and len(item) == 1, where, f"template item {item!r}")
        ((kind, body),) = item.items()
        if kind == "Sequence":
            expect(body.get("id") == "A" and not seen_sequence, where, f"template item {item!r}")
            seen_sequence = True
        elif kind == "SpecialToken":
            token = specials.get(body.get("id"))
            expect(isinstance(token, dict), where, f"special token {body.get('id')!r} undefined")
            ids = token.get("ids")
            expect(isinstance(ids, list) and all(isinstance(i, int) for i in ids), where, "ids")
            (after if seen_sequence else before).extend(ids)
        else:
            raise Unsupported(f"unsupported {where}: template item {kind!r}")
    expect(seen_sequence, where, "single template without the sequence $A")
    return before, after


def _read_model(model: dict) -> tuple[dict[str, int], Merges, list[str]]:
    """A BPE model's vocab, its merges, and the tokens they make (in rank order). A merge is
    "a b" or ["a", "b"]: two vocabulary tokens whose concatenation is one."""
    vocab = model.get("vocab")
    expect(isinstance(vocab, dict) and set(map(type, vocab)) <= {str}
           and set(map(type, vocab.values())) <= {int} and min(vocab.values(), default=0) >= 0,
           "model", "vocab must map token strings to non-negative integer ids")
    expect("merges" in model, "model", "merges missing (a BPE model without merges: [])")
    merges = model["merges"]
    expect(isinstance(merges, list), "model", "merges must be a list")
    try:  # a pass in C over each field (Llama-3 has 280,147 merges)
        pairs = [merge.split(" ") if isinstance(merge, str) else merge for merge in merges]
        if set(map(len, pairs)) <= {2}:
            firsts, seconds = [p[0] for p in pairs], [p[1] for p in pairs]
            made = list(map(operator.add, firsts, seconds))
            ids = [list(map(vocab.__getitem__, tokens)) for tokens in (firsts, seconds, made)]
            return vocab, Merges.from_pairs(*ids, max(vocab.values(), default=-1) + 1), made
    except (KeyError, TypeError):  # not two vocabulary tokens: which one, below
        pass
    for rank, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(parts, list) and len(parts) == 2
                and all(isinstance(p, str) and p in vocab for p in parts)
                and parts[0] + parts[1] in vocab):
            raise Unsupported(f"model: merge #{rank} {merge!r} is not two vocabulary tokens "
                              "whose concatenation is in the vocabulary")
    raise AssertionError("unreachable: every merge passed")


def post_processor_ids(spec: object) -> tuple[list[int], list[int]]:
    """Ids the post_processor puts before and after every text (ByteLevel changes only offsets);
    a Sequence may hold one TemplateProcessing (HF tokenizers applies only the first of two)."""
    if spec is None:
        return [], []
    where = "post_processor"
    expect(isinstance(spec, dict), where, repr(spec))
    steps = (spec.get("processors") or []) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") if isinstance(step, dict) else step for step in steps]
    expect(all(k in ("ByteLevel", "TemplateProcessing") for k in kinds), where, f"type {kinds}")
    templates = [step for step in steps if step["type"] == "TemplateProcessing"]
    expect(len(templates) < 2, where, f"a Sequence of {len(templates)} TemplateProcessing steps")
    return _template_ids(templates[0], where) if templates else ([], [])


# ---- tokenizer.json beyond byte-level BPE: normalizers, SentencePiece-style pieces, decoders

_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
_BYTE_TOKEN = regex.compile(r"<0x([0-9A-F]{2})>")  # a byte-fallback token: <0x0A>


class _Normalizer:
    """A tokenizer.json normalizer as its steps, in order: ("form", NFC...), ("prepend", s) or
    ("replace", old, new) (plain data, so that a tokenizer pickles into encode_batch's workers)."""

    def __init__(self, spec: dict):
        self.steps: list[tuple[str, ...]] = []
        self._add(spec)

    def _add(self, spec: object) -> None:
        expect(isinstance(spec, dict), "normalizer", repr(spec)[:200])
        kind = spec.get("type")
        if kind == "Sequence":
            expect(isinstance(spec.get("normalizers"), list), "normalizer", "Sequence")
            for step in spec["normalizers"]:
                self._add(step)
        elif kind in _UNICODE_FORMS:
            self.steps.append(("form", kind))
        elif kind == "Prepend":
            expect(isinstance(spec.get("prepend"), str), "normalizer", f"Prepend {spec!r}")
            self.steps.append(("prepend", spec["prepend"]))
        elif kind == "Replace":
            pattern = spec.get("pattern")
            expect(isinstance(pattern, dict) and isinstance(pattern.get("String"), str)
                   and isinstance(spec.get("content"), str), "normalizer",
                   f"Replace {spec!r} (codelm replaces a plain String only)")
            self.steps.append(("replace", pattern["String"], spec["content"]))
        else:
            raise Unsupported(f"unsupported normalizer: {kind!r} (codelm reads NFC, NFD, NFKC, "
                              "NFKD, Prepend, Replace and Sequences of them)")

    def replacements(self) -> list[tuple[str, str]] | None:
        """The steps as (character, text) replacements, where every step replaces one
        character (Gemma's space by ▁), else None: then normalizing a whole text is normalizing
        its parts one by one."""
        if not all(step[0] == "replace" and len(step[1]) == 1 for step in self.steps):
            return None
        return [(old, new) for _, old, new in self.steps]

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
    expect(isinstance(spec, dict), where, repr(spec)[:200])
    if spec.get("type") == "ByteLevel":
        return _Decoding(True, None, False, None)
    steps = spec.get("decoders") if spec.get("type") == "Sequence" else [spec]
    expect(isinstance(steps, list) and all(isinstance(d, dict) for d in steps), where, "Sequence")
    space, byte_fallback, strip, fused = None, False, None, False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and step.get("content") == " ":
            space = (step.get("pattern") or {}).get("String")
            expect(isinstance(space, str) and len(space) == 1, where, f"Replace {step!r}")
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
            expect(step.get("start") in (0, 1), where, f"Strip {step!r}")
            strip = "text" if step["start"] == 1 else None
        else:
            raise Unsupported(f"unsupported decoder: {step!r} (codelm reads ByteLevel, Metaspace, "
                              "and Replace to a space, ByteFallback, Fuse, then Strip)")
    return _Decoding(False, space, byte_fallback, strip)


def _token_bytes(token: str, decoding: _Decoding) -> bytes:
    """The bytes a token decodes to."""
    if decoding.byte_level:
        return _byte_level_bytes(token)
    byte = _BYTE_TOKEN.fullmatch(token) if decoding.byte_fallback else None
    if byte:
        return bytes([int(byte[1], 16)])
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
               "<\uff5cfim\u2581end\uff5c>"),
              ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"))  # SantaCoder's


_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class BPETokenizer(BatchEncodeMixin):
    """Byte-level BPE with the ids of HF ``tokenizers`` for the tokenizer.json files it accepts;
    bos/eos/pad from the template, a tokenizer_config.json beside the file, or the usual names."""

    def __init__(self, spec: dict, source: str = "<tokenizer.json>", roles: dict | None = None,
                 tables: ModelTables | None = None):
        """``tables``: the model's, kept in the cache (``compiled.load``; ``spec`` then lacks
        the model's vocab and merges)."""
        self.source = source
        try:
            self._build(spec, tables)
        except Unsupported as e:
            raise ValueError(f"{source}: {e}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: malformed tokenizer.json ({type(e).__name__}: {e})") from None
        self._spec = spec if tables is None else None
        self._roles = self._resolve_roles(roles or {})
        # the roles tokenizer_config.json names: a chat template sees these only, as in transformers
        self._named_roles = {role for role, name in (roles or {}).items() if name is not None}
        self.chat_template: str | None = None  # an instruct model's (tokenizer_config.json)
        self.tool_use_template: str | None = None  # its named "tool_use" one, where it lists one

    @property
    def spec(self) -> dict:
        """The tokenizer.json (read from ``source`` again where the tokenizer was read from its
        kept compiled form)."""
        if self._spec is None:
            self._spec = read_json(Path(self.source))
        return self._spec

    def _build(self, spec: dict, tables: ModelTables | None) -> None:
        for key in ("truncation", "padding"):
            expect(spec.get(key) is None, key, repr(spec.get(key))[:200])
        normalizer = spec.get("normalizer")
        self._normalize = _Normalizer(normalizer) if normalizer is not None else None
        model = spec.get("model")
        expect(isinstance(model, dict), "model", "missing")
        expect(model.get("type", "BPE") == "BPE", "model", f"type {model.get('type')!r}")
        expect(model.get("dropout") in (None, 0, 0.0), "model", "BPE dropout")
        self._byte_fallback = bool(model.get("byte_fallback", False))
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            expect(model.get(key) in (None, ""), "model", f"BPE {key}={model.get(key)!r}")
        if tables is None:
            vocab, merges, made = _read_model(model)
        else:
            vocab, merges, made = tables.vocab, tables.merges, None
        self._vocab: dict[str, int] = vocab
        unk = model.get("unk_token")
        expect(unk is None or unk in vocab, "model", f"unk_token {unk!r} not in the vocabulary")
        self._unk_id = vocab[unk] if unk is not None else None

        self._decoding = _decoding(spec.get("decoder"))
        byte_level = self._decoding.byte_level
        self._encode_word = WordEncoder(
            vocab, merges, _byte_level if byte_level else str,
            ignore_merges=bool(model.get("ignore_merges", False)),
            byte_fallback=self._byte_fallback, unk_id=self._unk_id,
            fuse_unk=bool(model.get("fuse_unk", False)))
        self.model_tables = self._build_pieces(spec.get("pre_tokenizer"), merges, made, tables)
        self._prefix_ids, self._suffix_ids = post_processor_ids(spec.get("post_processor"))
        replacements = self._normalize.replacements() if self._normalize is not None else []
        added = AddedTokens(spec.get("added_tokens") or [], vocab, self._normalize, replacements,
                            runs_apart=not byte_level)
        self._added_tokens = added
        self._added_ids, self._added, self._special_ids = added.ids, added.flags, added.special_ids
        if not self._decoding.byte_level:
            self._pretokenize.keep_apart(added.run_chars)

        size = max(max(vocab.values(), default=-1), max(self._added_ids.values(), default=-1)) + 1
        n_tokens = len(vocab) + len(self._added_ids)  # a file's ids size the tables made below
        expect(size <= 2 * n_tokens + 1024, "model",
               f"ids up to {size - 1} for {n_tokens} tokens (not dense)")
        self._id_to_token: list[str | None] = [None] * size
        for token, i in vocab.items():
            self._id_to_token[i] = token
        for content, i in self._added_ids.items():
            self._id_to_token[i] = added.spelled(content)

    @functools.cached_property
    def _id_to_bytes(self) -> list[bytes]:
        """The bytes each id decodes to (built at the first decode: 262,144 for Gemma 3)."""
        decoding = self._decoding
        return [b"" if token is None else _token_bytes(token, decoding)
                for token in self._id_to_token]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def _build_pieces(self, pre_tokenizer: dict | None, merges: Merges, made: list[str] | None,
                      tables: ModelTables | None) -> ModelTables:
        """The pre-tokenizer: byte-level (its regex, then each byte as a character) or
        SentencePiece-style (the text as normalized, unknown characters as <0xNN> bytes);
        ``made``: the tokens the merges make, where ``tables`` are not given. The model's
        tables, with what the merged tokens decide (or decided) for SentencePiece text."""
        vocab = self._vocab
        self.pattern = None
        self._space_runs = None
        if self._decoding.byte_level:
            expect(not self._byte_fallback, "model", "BPE byte_fallback=true with ByteLevel")
            self.pattern, isolated = _pretokenizer_pattern(pre_tokenizer)
            try:
                self._pretokenize = _Pretokenizer(self.pattern, isolated)
            except regex.error as e:
                raise Unsupported(f"pre_tokenizer: Split regex does not compile: {e}") from None
            return ModelTables(vocab, merges, None, None)
        spaces_replaced = self._normalize is not None and self._normalize.replaces(" ")
        self._pretokenize = SentencePieces(
            pre_tokenizer, lambda space, split: (tables.word_cuts if tables is not None
                                                 else word_cuts(space, made, split)),
            spaces_replaced)
        space = self._pretokenize.replacement
        order = tables.space_runs if tables is not None else SpaceRuns.order(space, vocab, made)
        if order is not None:
            self._space_runs = SpaceRuns(space, vocab[space], order)
        return ModelTables(vocab, merges, self._pretokenize.cuts, order)

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
        pair first, ties to the least ids, as HF's BpeTrainer); ``save()`` writes a tokenizer.json
        HF loads as is."""
        if isinstance(texts, str):
            raise ValueError("BPETokenizer.train expects texts (a list of str), got one str")
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
    def from_file(cls, path: str | os.PathLike, roles: dict | None = None,
                  spec: dict | None = None) -> BPETokenizer:
        """Read a tokenizer.json (``spec``: its JSON, where read already); ``roles``
        {"bos"/"eos"/"pad": token or None} override guesses. A big file's compiled form is kept
        in the cache (``compiled``), and read in its place the next time."""
        path = tokenizer_path(path)
        tok = None if spec is not None else cls.from_kept(path, roles)
        if tok is None:
            digest = compiled.digest(path)
            tok = cls(read_json(path) if spec is None else spec, str(path), cls._roles_of(path, roles))
            if digest is not None:
                compiled.store(digest, tok.spec, tok.model_tables)
            tok.read_chat_templates(path.parent)
        return tok

    def read_chat_templates(self, directory: Path) -> None:
        """The chat templates transformers reads in ``directory``: the default, and the named
        "tool_use" one where tokenizer_config.json lists it (used when a request has tools)."""
        self.chat_template = chat_template_from_config(directory)
        named = {t["name"]: t["template"] for t in named_chat_templates(directory) or []}
        self.tool_use_template = named.get("tool_use")

    @classmethod
    def from_kept(cls, path: Path, roles: dict | None = None) -> BPETokenizer | None:
        """The tokenizer.json at ``path`` from its compiled form in the cache; None where none
        is kept (a small file, or one not read before)."""
        digest = compiled.digest(path)
        kept = compiled.load(digest) if digest is not None else None
        if kept is None:
            return None
        spec, tables = kept
        tok = cls(spec, str(path), cls._roles_of(path, roles), tables)
        tok.read_chat_templates(path.parent)
        return tok

    @staticmethod
    def _roles_of(path: Path, roles: dict | None) -> dict:
        return roles_from_config(path.parent) if roles is None else roles

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer.json; into a directory, with a tokenizer_config.json naming the
        bos/eos/pad tokens (null: none, as Qwen's bos_token, so that the copy reads back the
        same roles) and the chat template (unless one is there) for transformers'
        AutoTokenizer."""
        config = {f"{role}_token": None if i is None else self.token_content(i)
                  for role, i in self._roles.items()}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self.chat_template is not None and self.tool_use_template is not None:
            config["chat_template"] = [{"name": "default", "template": self.chat_template},
                                       {"name": "tool_use", "template": self.tool_use_template}]
        return write_tokenizer(path, self.spec, 2, config=config)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tools: Sequence[dict] | None = None) -> str:
        """The text of a conversation (``messages``: [{"role": ..., "content": ...}, ...]) as
        transformers' ``apply_chat_template(messages, tokenize=False)`` renders it with this
        tokenizer's chat template; ``add_generation_prompt``: ends with the assistant's header;
        ``tools``: the function definitions (JSON schemas) the template offers the model (its
        "tool_use" template where it has one, as transformers chooses it)."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: no chat_template (tokenizer_config.json or "
                             "chat_template.jinja beside it): this is not an instruct model's "
                             "tokenizer")
        names = {f"{role}_token": self.token_content(i) for role, i in self._roles.items()
                 if i is not None and role in self._named_roles}
        if self._unk_id is not None:
            names["unk_token"] = self.token_content(self._unk_id)
        template = self.chat_template
        if tools is not None and self.tool_use_template is not None:
            template = self.tool_use_template
        return render_chat(template, messages, add_generation_prompt, tools, **names)

    def _encode_piece(self, piece: str) -> list[int]:
        run_chars = self._added_tokens.run_chars
        if run_chars and piece[0] in run_chars and not piece.strip(run_chars):
            return self._added_tokens.run_ids(piece)  # SentencePieces.whole's run of one
        if self._space_runs is not None:
            ids = self._space_runs(piece, self._cache.__getitem__)
            if ids is not None:
                return ids
        return self._encode_word(piece)

    def _quick_ids(self, text: str) -> list[int] | None:
        """encode's ids by AddedTokens' one-pass way, or None where it does not serve."""
        added_tokens = self._added_tokens
        text = added_tokens.quick_text(text)
        if text is None:
            return None
        cache = self._cache.__getitem__
        if added_tokens.only_runs(text):  # as Gemma's newlines: pieces of their own
            pieces = self._pretokenize.whole(text)
            if pieces is not None:
                return list(chain.from_iterable(map(cache, pieces)))
        parts = added_tokens.parts(text)
        gaps, added = parts[::2], parts[1::2]  # text, added token, text, ..., text
        ids = list(chain.from_iterable(map(cache, self._pretokenize(gaps[0], True)))) if gaps[0] else []
        pieces = self._pretokenize.pieces_for(text)  # of the gaps after the first
        for token, gap in zip(added, gaps[1:]):
            ids.append(added_tokens.found_ids[token])
            if gap:
                ids += chain.from_iterable(map(cache, pieces(gap)))
        return ids

    def encode(self, text: str, add_special_tokens: bool = False,
               split_special_tokens: bool = False) -> list[int]:
        """HF ``Tokenizer.encode(text, add_special_tokens).ids``; ``split_special_tokens``: a
        special token's text is text (HF's ``encode_special_tokens``)."""
        ids = None if split_special_tokens else self._quick_ids(text)
        if ids is None:
            ids = []
            segments = self._added_tokens.segments(text, plain_special=split_special_tokens)
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
        first = True
        for i in ids:
            if self._id_to_token[i] is None:  # an id in a gap of the vocabulary: HF skips it
                continue
            if i in self.byte_fallback_ids:
                run += self._id_to_bytes[i]
                first = False
                continue
            parts.append(_fallback_text(run))
            run.clear()
            if first and strip == "token":  # Metaspace drops every ▁ of the first token
                parts.append(self._id_to_token[i].replace(self._decoding.space, ""))
            else:
                parts.append(self._id_to_bytes[i].decode("utf-8"))
            first = False
        parts.append(_fallback_text(run))
        text = "".join(parts)
        if strip == "text" and text.startswith(" "):  # Fuse, then Strip one leading space
            return text[1:]
        return text

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
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

    def token_content(self, i: int) -> str | None:
        """The token of id ``i`` as the tokenizer file writes it (an added token's content, not
        its normalized spelling): what tokenizer_config.json and a chat template name."""
        content = self._added_contents.get(i)
        return content if content is not None else self.id_to_token(i)

    @functools.cached_property
    def _added_contents(self) -> dict[int, str]:
        return {i: content for content, i in self._added_ids.items()}

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

    def pieces_for(self, text: str) -> Callable[[str], list[str]]:
        """The pieces of parts of ``text``."""
        return self

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
    """Greedy BPE: repeatedly merge the most frequent adjacent pair, updating counts in place.
    Ties go to the pair of least token ids (first, then second), as in HF's BpeTrainer."""
    symbols = [list(w) for w in words]
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, (word, freq) in enumerate(zip(symbols, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(wi)
    heap = [(-count, vocab[pair[0]], vocab[pair[1]], pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(vocab) < vocab_size and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
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
                heapq.heappush(heap, (-pair_counts[p], vocab[p[0]], vocab[p[1]], p))
        pair_counts.pop(pair, None)
    return merges
