"""codelm's BPETokenizer against HF ``tokenizers`` on the tokenizer.json types today's families
ship, each trained here by HF's BpeTrainer: Qwen2's (NFC, its Split regex, byte-level BPE) and
SentencePiece BPE with byte fallback, as Llama-2/CodeLlama/Mistral/Phi-3 write it (Prepend and
Replace to U+2581) and in its Metaspace form: the same ids on Python, JavaScript, C and edge
strings, the same decoded text, and decode(encode(x)) == x where HF's round-trips."""

import copy
import itertools
import json
import pickle
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tokenizers
import torch
from edge_corpus import LONE_SURROGATES, edge_texts
from test_tokenizer import EDGE_CASES, _assert_ids_equal_hf, _first_mismatch, _hf_ids
from tiny_hf import (
    FAMILY_TOKENIZER_STYLES,
    QWEN2_SPECIALS,
    train_family_tokenizer,
    train_hf_tokenizer,
)

from codelm.data.datasets import LabelBytes
from codelm.data.encoding import encode_text, packed_document
from codelm.data.sources import stdlib_files, stdlib_root
from codelm.tokenization.bpe import BPETokenizer
from codelm.tokenization.chat import chat_turns
from codelm.tokenization.spiece import cut_pattern
from tokenizer import decode_generated, load_tokenizer

JAVASCRIPT = '''import { readFile } from "node:fs/promises";

export async function loadConfig(path, fallback = {}) {
  try {
    const text = await readFile(path, "utf8");
    return { ...fallback, ...JSON.parse(text) };
  } catch (err) {
    console.warn(`config ${path}: ${err.message} — using defaults`);
    return fallback;
  }
}

const squares = [1, 2, 3].map((n) => n ** 2).filter((n) => n !== 4);
class Counter extends EventTarget {
  #count = 0;
  increment() { this.#count += 1; this.dispatchEvent(new Event("change")); }
}
'''

C_SOURCE = '''#include <stdio.h>
#include <stdlib.h>

/* Sum the squares of an array: ∑ xᵢ² */
static long sum_squares(const int *xs, size_t n) {
    long total = 0;
    for (size_t i = 0; i < n; ++i) {
        total += (long)xs[i] * xs[i];
    }
    return total;
}

int main(int argc, char **argv) {
    int values[] = {3, -1, 4, 1, -5, 9};
    printf("%ld\\n", sum_squares(values, sizeof values / sizeof *values));
    return argc > 1 ? EXIT_FAILURE : EXIT_SUCCESS;
}
'''

FAMILY_EDGE_CASES = [
    *EDGE_CASES,
    "<s>def f():</s>\n<s> x</s>",
    "<unk> and <0x41> spelled out",
    "<|im_start|>user\nwrite fib<|im_end|>\n<|im_start|>assistant\n",
    "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>",
    "Ａｂｃ ｆｕｌｌｗｉｄｔｈ ﬁ ligature Å vs Å ñ vs ñ",  # NFC composes, NFC keeps compatibility forms
    "\u2581already\u2581metaspace\u2581chars",
    "\u00a0\u00a0nbsp   four   spaces\u3000ideographic",
    "1234567890 " * 20,
]


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory) -> dict:
    """style -> (HF tokenizer, codelm's BPETokenizer of the same tokenizer.json), trained on every
    50th stdlib file (~550 KB: each reaches its full vocabulary; none is held out below)."""
    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::50]]
    out = {}
    for style in FAMILY_TOKENIZER_STYLES:
        path = tmp_path_factory.mktemp(style) / "tokenizer.json"
        out[style] = (train_family_tokenizer(style, texts, path), load_tokenizer(path))
    return out


@pytest.fixture(scope="module")
def held_out() -> list[tuple[str, str]]:
    """Python files the tokenizers were not trained on (each its first 40,000 characters: the
    Metaspace tokenizer reads a whole text as one word), and the JavaScript and C sources."""
    root = stdlib_root()
    files = stdlib_files()[7::25]
    python = [(p.relative_to(root).as_posix(), p.read_text("utf-8", "replace")[:40_000])
              for p in files]
    return [*python, ("javascript", JAVASCRIPT), ("c", C_SOURCE)]


@pytest.mark.parametrize("style, start, every", [
    # The quick suite: every third held-out Python file for each style, from the first, the
    # second or the third, so that each file meets two styles; the slow suite: every file for
    # every style.
    *[(style, k % 3, 3) for k, style in enumerate(FAMILY_TOKENIZER_STYLES)],
    *[pytest.param(style, 0, 1, marks=pytest.mark.slow) for style in FAMILY_TOKENIZER_STYLES],
])
def test_ids_equal_hf_on_held_out_code(style, start, every, family_tokenizers, held_out):
    """On held-out Python files (every one, or every third) and the JavaScript and C sources each
    family's tokenizer gives HF tokenizers' ids; the first mismatch is reported."""
    hf, ours = family_tokenizers[style]
    assert isinstance(ours, BPETokenizer)
    chosen = [*held_out[:-2][start::every], *held_out[-2:]]
    names = [n for n, _ in chosen]
    texts = [t for _, t in chosen]
    got = [ours.encode(t) for t in texts]
    mismatch = _first_mismatch(names, got, _hf_ids(hf, texts))
    assert mismatch is None, mismatch
    assert len(texts) > 40 // every
    assert names[-2:] == ["javascript", "c"]


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_ids_and_text_equal_hf_on_edge_strings(style, family_tokenizers):
    """On the edge strings, with and without special tokens, the ids and the decoded text (specials
    kept or skipped) are HF's; where HF's decode gives the text back, ours does, for more than half
    of them."""
    hf, ours = family_tokenizers[style]
    for add in (False, True):
        _assert_ids_equal_hf(hf, ours, FAMILY_EDGE_CASES, add_special_tokens=add)
    round_trips = 0
    for text in FAMILY_EDGE_CASES:
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), repr(text[:40])
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids), repr(text[:40])
        if hf.decode(ids, skip_special_tokens=False) == text:
            assert ours.decode(ids) == text
            round_trips += 1
    assert round_trips > len(FAMILY_EDGE_CASES) // 2


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_ids_equal_hf_on_the_edge_corpus(style, family_tokenizers):
    """Every general category, combining sequences (NKo's marks among them: Python's Unicode
    reorders them, HF's 9.0 does not), emoji ZWJ sequences and whitespace runs, with and
    without the template's special tokens."""
    hf, ours = family_tokenizers[style]
    for add in (False, True):
        _assert_ids_equal_hf(hf, ours, edge_texts(), add_special_tokens=add)


@pytest.mark.parametrize("style", ["qwen2", "spm", "gemma3"])
def test_a_lone_surrogate_is_its_surrogatepass_bytes(style, family_tokenizers):
    """HF's str cannot hold one (it raises TypeError); codelm encodes the bytes Python's
    surrogatepass writes (byte-level tokens, or <0xNN> by byte fallback), which decode to one
    U+FFFD each, as HF decodes those bytes."""
    hf, ours = family_tokenizers[style]
    for text in LONE_SURROGATES:
        with pytest.raises(TypeError):
            hf.encode(text)
        ids = ours.encode(text)
        lossy = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False) == lossy


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_bits_per_byte_counts_the_bytes_of_each_document_as_hf_decodes_it(
        style, family_tokenizers, held_out):
    """Bits per byte divides by the text the labels stand for: over documents packed as the lm
    task packs them, LabelBytes counts each document's UTF-8 bytes, so that a SentencePiece
    dummy prefix (a space no text holds) counts none, and a text's own opening space counts
    where the tokenizer keeps it apart from a dummy one (HF's decoding gives it back)."""
    hf, ours = family_tokenizers[style]
    docs = [" x = 1\n", "\n\ndef f():\n    return 'é'\n", "y",
            *(text[:2000] for _, text in held_out[:3])]
    stream = [] if ours.template_prefix else [ours.eos_id]  # each document's first id a label
    expected = 0
    for doc in docs:
        ids = encode_text(ours, doc)
        if doc.startswith(" ") and hf.decode(ids) != doc:
            continue  # Metaspace's: no dummy space before a space, so its ids read without it
        stream += packed_document(ours, ids)
        expected += len(doc.encode("utf-8"))
    stream = torch.tensor(stream)
    assert int(LabelBytes(ours)(stream[:-1], stream[1:])) == expected


# Mistral v3's chat template: [INST] and [/INST] are special tokens, an answer follows a space.
MISTRAL_V3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}"
    "[/INST]{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")


def test_bits_per_byte_counts_a_chat_answers_own_space_after_a_special_token(tmp_path):
    """Mistral v3's template writes each answer after its [/INST] token and a space that is
    text of the rendered conversation (transformers' ids of it read the space into the answer's
    first token): LabelBytes counts the UTF-8 bytes of the text a chat example's labels cover,
    that space included, and still none for the dummy prefix of a document after BOS."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from codelm.data.config import DataConfig
    from codelm.data.encoding import tokenize_examples
    from codelm.data.examples import Example
    from codelm.kernels import IGNORE_INDEX

    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::400]]
    hf = train_family_tokenizer("metaspace", texts, tmp_path / "tokenizer.json")
    hf.add_special_tokens([AddedToken(t, normalized=False) for t in ("[INST]", "[/INST]")])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": MISTRAL_V3_TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "Add two numbers."},
                {"role": "assistant", "content": "return a + b"},
                {"role": "user", "content": "And a comment?"},
                {"role": "assistant", "content": "return a + b  # é"}]
    cfg = DataConfig(task="chat", block_size=256, progress=False)
    for i, turn in zip((1, 3), chat_turns(ours, messages)):
        [(prompt, completion, _)] = tokenize_examples([Example(turn.prompt, turn.answer,
                                                               pair=True)], ours, cfg, "test")
        ids = torch.tensor(prompt + completion)
        assert ids.tolist() == theirs.apply_chat_template(messages[: i + 1], tokenize=True,
                                                          return_dict=False)
        labels = ids[1:].clone()
        labels[: len(prompt) - 1] = IGNORE_INDEX
        before = theirs.apply_chat_template(messages[:i], tokenize=False,
                                            add_generation_prompt=True)
        text = theirs.apply_chat_template(messages[: i + 1], tokenize=False)[len(before):]
        assert text == f" {messages[i]['content']}</s>"
        covered = text.removesuffix("</s>").encode("utf-8")
        assert int(LabelBytes(ours)(ids[:-1], labels)) == len(covered)
    document = "return a + b"
    stream = torch.tensor(packed_document(ours, encode_text(ours, document)))
    assert ours.decode(stream[1:2].tolist(), continuation=True).startswith(" ")  # a dummy space
    assert int(LabelBytes(ours)(stream[:-1], stream[1:])) == len(document.encode("utf-8"))


def test_bits_per_byte_counts_a_fim_middles_bytes_without_its_dummy_space(tmp_path):
    """A prefix-suffix-middle example encodes its middle alone, after the FIM middle sentinel:
    a SentencePiece tokenizer opens it with a dummy space the file does not hold at that
    point, so LabelBytes counts the middle's own UTF-8 bytes over its labels, none for that
    space and none for EOS."""
    from tokenizers import AddedToken

    from codelm.data.encoding import fim_prompt, supervised_example

    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::400]]
    hf = train_family_tokenizer("spm", texts, tmp_path / "tokenizer.json")
    fim = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    hf.add_special_tokens([AddedToken(t, normalized=False) for t in fim])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    assert ours.fim_middle_id is not None
    prefix, middle, suffix = "def add(a, b):\n    ", "return a + b  # é", "\n\nprint(add(1, 2))\n"
    middle_ids = encode_text(ours, middle)
    assert ours.token_bytes(middle_ids[0]).startswith(b" ")  # the dummy space
    prompt = fim_prompt(ours, encode_text(ours, prefix), encode_text(ours, suffix), 64)
    example = supervised_example(prompt, [*middle_ids, ours.eos_id], max_length=64)
    labels = example["labels"]
    assert int(LabelBytes(ours)(example["input_ids"], labels)) == len(middle.encode("utf-8"))


def test_normalization_is_hfs_unicode_9_on_every_code_point_it_can_change():
    """NFC, NFD, NFKC and NFKD as HF's normalizers (Unicode 9.0.0's tables) on each code point
    Python's tables decompose, give a combining class or assign after 9.0, alone and among
    marks; Python's own unicodedata differs on some (U+07FD, U+1AC1, U+11938, ...)."""
    from tokenizers import normalizers

    from codelm.tokenization.normalization import normalize
    from codelm.tokenization.unicode9 import UNASSIGNED_IN_UNICODE_9

    later = {cp for first, last in UNASSIGNED_IN_UNICODE_9 for cp in range(first, last + 1)}
    changing = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp < 0xE000 and (
        unicodedata.combining(chr(cp)) or unicodedata.decomposition(chr(cp))
        or (cp in later and unicodedata.category(chr(cp)) != "Cn"))]
    texts = ["".join(f"a{c}\u0301\u0327{c}\u07f3" for c in changing[i : i + 200])
             for i in range(0, len(changing), 200)]
    python_differs = 0
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        hf = getattr(normalizers, form)()
        for text in texts:
            assert normalize(form, text) == hf.normalize_str(text), form
            python_differs += unicodedata.normalize(form, text) != hf.normalize_str(text)
    assert python_differs > 0  # the case this guards: Python 3.10+ is past Unicode 9.0


def test_space_runs_before_a_word_come_from_the_pieces_after_them(family_tokenizers):
    """Indentation: BPE(▁^k w) from BPE(▁w), BPE(w) and the run's, where the merges of ▁ runs
    rank first (Gemma 3) or last (Llama-2); the same ids as HF for every k."""
    for style, run_first in (("gemma3", True), ("spm", False)):
        hf, ours = family_tokenizers[style]
        assert ours._space_runs is not None and ours._space_runs._run_first is run_first
        texts = [" " * k + word for k in range(40) for word in ("return x", "self", "1", "(")]
        assert [ours.encode(t) for t in texts] == _hf_ids(hf, texts), style


@pytest.mark.parametrize("style", ["spm", "spm-words", "metaspace"])
def test_byte_fallback_spells_unknown_characters_as_hf_does(style, family_tokenizers):
    """Emoji and CJK are not in the 120-character alphabet: their UTF-8 bytes as <0xNN>."""
    hf, ours = family_tokenizers[style]
    text = "x = '🙂 中文'"
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert any(ours.id_to_token(i) == "<0xF0>" for i in ids)
    assert ours.decode(ids) == text
    # bytes that are no UTF-8 character: one U+FFFD each, as HF's ByteFallback decoder
    bad = [ours.token_to_id("<0xF0>"), ours.token_to_id("<0x9F>"), ours.token_to_id("x")]
    assert ours.decode(bad) == hf.decode(bad) == "\ufffd\ufffdx"


@pytest.mark.parametrize("style", ["spm", "metaspace", "gemma"])
@pytest.mark.parametrize("fuse_unk", [True, False])
def test_without_byte_fallback_unknown_characters_are_unk_as_in_hf(style, fuse_unk,
                                                                    family_tokenizers, tmp_path):
    """A SentencePiece tokenizer without byte fallback writes a character outside its alphabet as
    <unk>, a run of them as one <unk> where fuse_unk is set: HF's ids, and HF's text back (the
    <unk> written out, or left out with the special tokens)."""
    spec = json.loads(family_tokenizers[style][0].to_str())
    spec["model"]["byte_fallback"] = False
    spec["model"]["fuse_unk"] = fuse_unk
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    hf, ours = tokenizers.Tokenizer.from_file(str(path)), load_tokenizer(path)
    texts = ["x = '🙂 中文'", "ab🙂🙂c", "🙂", " 🙂x", "a\x00b", "return '€€'"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
    unk = ours.token_to_id("<unk>")
    assert ours.encode("ab🙂🙂c").count(unk) == (1 if fuse_unk else 2)


@pytest.mark.parametrize("style", ["spm", "spm-words", "metaspace"])
def test_a_generated_continuation_keeps_its_leading_space(style, family_tokenizers):
    """decode drops the space SentencePiece puts before a text, as HF's; a continuation's first
    token starts a word inside the text, so its space is kept."""
    hf, ours = family_tokenizers[style]
    token = next(t for t in hf.get_vocab() if t.startswith("\u2581") and t[1:].isalpha())
    word = ours.token_to_id(token)
    assert ours.decode([word]) == hf.decode([word]) == token[1:]
    assert decode_generated(ours, [word]) == " " + token[1:]


def test_sentencepiece_text_is_cut_only_where_no_token_can_span_the_cut(family_tokenizers):
    """The three ways a word is cut, each giving HF's ids (the tests above): between runs of
    letters, digits and other characters where every token is one run (SentencePiece's own
    vocabularies), before each run of spaces where no token glues a space after a character,
    and not at all (the Metaspace vocabulary here has tokens across spaces)."""
    text = "\u2581\u2581return\u2581self.x(1)"
    cut = {style: family_tokenizers[style][1]._pretokenize(text, False)
           for style in ("spm", "spm-words", "metaspace")}
    assert cut["spm"] == ["\u2581\u2581return", "\u2581self", ".", "x", "(", "1", ")"]
    assert cut["spm-words"] == ["\u2581\u2581return", "\u2581self.x(1)"]
    assert cut["metaspace"] == [text]
    # Gemma 3's vocabulary: a few tokens cross runs ("e.", "f(", "1)", ")▁"); where one is in
    # the text, the cuts it crosses are joined
    gemma3 = family_tokenizers["gemma3"][1]._pretokenize
    assert gemma3("\u2581name.x(f(1)\u2581+", False) == [
        "\u2581name.", "x", "(", "f(", "1)\u2581+"]
    # its added runs of newlines: in a text with no other added token, pieces of their own
    assert family_tokenizers["gemma3"][1]._added_tokens.run_chars == "\n"
    assert gemma3.whole("x\n\n\u2581y(\n") == ["x", "\n\n", "\u2581y", "(", "\n"]
    assert gemma3.whole("f(1)\n") is None  # "1)" may cross a cut: the segments' way


def test_qwen2_special_tokens_and_nfc(family_tokenizers):
    """Qwen2's special tokens have HF's ids, and NFC composes a decomposed "é" as HF does; N'Ko
    with U+07FD (Unicode 11) keeps the order HF's Unicode-9 NFC keeps, not Python's."""
    hf, ours = family_tokenizers["qwen2"]
    for token in QWEN2_SPECIALS:
        assert ours.token_to_id(token) == hf.token_to_id(token)
    decomposed = "cafe\u0301"
    assert ours.encode(decomposed) == ours.encode("caf\u00e9") == hf.encode(decomposed).ids
    nko = "\u07ca\u07f3\u07fd\u07eb"  # U+07FD: Unicode 11, so no reordering in HF's 9.0
    assert ours.encode(nko) == hf.encode(nko).ids
    assert ours.decode(ours.encode(nko)) == nko != unicodedata.normalize("NFC", nko)


def test_pickled_or_in_workers_the_tokenizers_encode_alike(family_tokenizers, held_out):
    """A tokenizer pickled and loaded again (as DataLoader workers get it) encodes as the original,
    and encode_batch's workers (over a MB of text) give encode's ids."""
    texts = [t for _, t in held_out]
    for _, ours in family_tokenizers.values():
        assert pickle.loads(pickle.dumps(ours)).encode(texts[0]) == ours.encode(texts[0])
    _, spm = family_tokenizers["spm"]
    many = texts * 4  # over a MB: encode_batch starts its workers
    assert spm.encode_batch(many, num_workers=2) == [spm.encode(t) for t in many]


@pytest.mark.parametrize("normalizer, message", [
    ({"type": "Lowercase"}, r"unsupported normalizer: 'Lowercase'"),
    ({"type": "Replace", "pattern": {"Regex": " +"}, "content": "\u2581"},
     r"unsupported normalizer: Replace .*plain String"),
])
def test_an_unsupported_normalizer_is_one_line_naming_it(normalizer, message, family_tokenizers,
                                                         tmp_path):
    """A tokenizer.json normalizer codelm does not implement (Lowercase, a regex Replace) is a
    ValueError naming the file and the normalizer, not ids that differ from HF's."""
    hf, _ = family_tokenizers["spm"]
    spec = json.loads(hf.to_str())
    spec["normalizer"] = normalizer
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"tokenizer\.json: {message}"):
        load_tokenizer(path)


@pytest.mark.parametrize("markers", [
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>",  # DeepSeek-Coder
     "<\uff5cfim\u2581end\uff5c>"),
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),  # SantaCoder
])
def test_each_familys_fim_markers_are_found(markers):
    """The FIM task and generation use the model's own markers, whatever the family spells."""
    tok = BPETokenizer.train(["def f(x):\n    return x\n"] * 4, 300,
                             special_tokens=("<|endoftext|>", *markers))
    assert (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id) == tuple(
        tok.token_to_id(m) for m in markers)
    assert None not in (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id)


# A ChatML template as Qwen2.5-Coder-Instruct's (its default system message, a role check that
# raises, assistant text in a generation block) and Llama-3's.
CHATML_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful coding assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message.role) }}{%- endif %}\n"
    "  {%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
    "  {%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>\\n' }}{%- endif %}\n"
    "  {%- if loop.last and message.role == 'tool' %}{% break %}{% endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Write fib(n)."},
     {"role": "assistant", "content": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"}],
    [{"role": "system", "content": "Answer in Python."},
     {"role": "user", "content": "Reverse a list"},
     {"role": "assistant", "content": "xs[::-1]"},
     {"role": "user", "content": "In place?"},
     {"role": "assistant", "content": "xs.reverse()  # é, 中文"}],
]


@pytest.fixture(scope="module")
def chat_tokenizers(family_tokenizers, tmp_path_factory) -> dict:
    """name -> (transformers' tokenizer, ours) for a ChatML and a Llama-3 chat template."""
    from transformers import AutoTokenizer

    hf, _ = family_tokenizers["qwen2"]
    out = {}
    for name, template, roles in (
            ("chatml", CHATML_TEMPLATE, {"eos_token": "<|im_end|>"}),
            ("llama3", LLAMA3_TEMPLATE, {"bos_token": "<|endoftext|>"})):
        directory = tmp_path_factory.mktemp(name)
        hf.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {**roles, "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}))
        out[name] = (AutoTokenizer.from_pretrained(directory), load_tokenizer(directory))
    return out


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_chat_templates_render_as_transformers_renders_them(chat_tokenizers, name):
    """A ChatML (Qwen2.5-Coder-Instruct's) and a Llama-3 chat template render each conversation,
    with and without the generation prompt, to transformers' text exactly."""
    theirs, ours = chat_tokenizers[name]
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == (
                theirs.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=prompt))


TOOL_USE_TEMPLATE = ("{%- for message in messages %}<|im_start|>{{ message.role }}\n"
                     "{{ message.content }}<|im_end|>\n{%- endfor %}"
                     "{%- for tool in tools %}<tools>{{ tool | tojson }}</tools>{%- endfor %}"
                     "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_a_request_with_tools_renders_the_named_tool_use_template_as_transformers(
        family_tokenizers, tmp_path):
    """tokenizer_config.json's named templates (default and tool_use, as Hermes and Command-R
    ship): with tools the tool_use one renders, without them the one named default (not the
    list's first), as transformers chooses, read from the list or from transformers' saved
    layout; both survive the tokenizer's save."""
    from transformers import AutoTokenizer

    hf, _ = family_tokenizers["qwen2"]
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": [{"name": "tool_use", "template": TOOL_USE_TEMPLATE},
                           {"name": "default", "template": CHATML_TEMPLATE}]}))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    saved = tmp_path / "saved"
    load_tokenizer(tmp_path).save(saved)
    theirs.save_pretrained(tmp_path / "hf_saved")  # chat_template.jinja and
    #   additional_chat_templates/tool_use.jinja, transformers' own layout
    assert (tmp_path / "hf_saved" / "additional_chat_templates" / "tool_use.jinja").is_file()
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    messages = CONVERSATIONS[0][:1]
    for ours in (load_tokenizer(tmp_path), load_tokenizer(saved),
                 load_tokenizer(tmp_path / "hf_saved")):
        for given in (None, tools):
            assert ours.apply_chat_template(messages, True, given) == theirs.apply_chat_template(
                messages, tools=given, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in load_tokenizer(saved).apply_chat_template(messages, True, tools)


# Llama 3.1's test for a tool call: whether the message has the key.
HAS_KEY_TEMPLATE = ("{%- for message in messages %}<|im_start|>{{ message.role }}\n"
                    "{%- if 'tool_calls' in message %}{{ message.tool_calls | length }} call"
                    "{%- else %}{{ message.content }}{%- endif %}<|im_end|>\n{%- endfor %}")


def test_a_messages_null_keys_are_undefined_in_the_template_as_in_transformers(chat_tokenizers):
    """A message's keys whose value is null (a dataset's rows share their keys, filled with
    null) are not given to the template: a test for the key and the value printed render as
    transformers' apply_chat_template renders them."""
    theirs, ours = chat_tokenizers["chatml"]
    ours = copy.copy(ours)
    ours.chat_template = HAS_KEY_TEMPLATE
    messages = [{"role": "user", "content": "Weather?", "tool_calls": None},
                {"role": "assistant", "content": None, "tool_calls": None}]
    rendered = ours.apply_chat_template(messages)
    assert rendered == theirs.apply_chat_template(messages, chat_template=HAS_KEY_TEMPLATE,
                                                  tokenize=False)
    assert "None" not in rendered


# Templates as their families ship them: Zephyr's one block tag a line (its newlines cut by
# trim_blocks), the same indented (the indent cut by lstrip_blocks), Gemma's and Phi-3's; and
# a tools listing by tojson, which keeps non-ASCII text as it is.
FAMILY_TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"),
    "indented": (
        "{% for message in messages %}\n    {% if message['role'] == 'user' %}\n"
        "<|user|>{{ message['content'] }}\n    {% else %}\n"
        "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}\n    {% endif %}\n"
        "{% endfor %}\n    {% if add_generation_prompt %}\n<|assistant|>\n    {% endif %}\n"),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{% continue %}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' "
        "+ message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt"
        " %}{{'<start_of_turn>model\n'}}{% endif %}"),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
    "tools": (
        "{% if tools %}{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"),
    "reasoning": (  # Qwen3's reasoning_content and gpt-oss's thinking
        "{% for m in messages %}{{ m.role }}: {% if m.reasoning_content %}<think>"
        "{{ m.reasoning_content }}</think>{% endif %}{% if m.thinking %}[{{ m.thinking }}]"
        "{% endif %}{{ m.content }}\n{% endfor %}"),
}
FAMILY_TOOLS = [{"type": "function", "function": {"name": "größe", "description": "中文 ok"}}]
# A message's reasoning under an older name, and under two names that differ: the first of
# transformers' names fills both that templates read.
REASONING_CONVERSATION = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning": "two and two"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6", "thinking": "three and three",
     "reasoning_content": "3 + 3 = 6"},
]


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_family_templates_render_as_transformers_renders_them(family_tokenizers, tmp_path, name):
    """Each family's template renders each conversation, with and without the generation
    prompt, to transformers' text exactly: the newline after a block tag and a block tag's
    indent dropped (trim_blocks, lstrip_blocks), the bos and eos texts, and tools as JSON that
    keeps non-ASCII characters, and a message's reasoning under the names templates read."""
    from transformers import AutoTokenizer

    family_tokenizers["qwen2"][0].save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
         "chat_template": FAMILY_TEMPLATES[name], "tokenizer_class": "PreTrainedTokenizerFast"}))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    tools = FAMILY_TOOLS if name == "tools" else None
    for messages in [*CONVERSATIONS, REASONING_CONVERSATION]:
        for prompt in (False, True):
            rendered = ours.apply_chat_template(messages, prompt, tools)
            assert rendered == theirs.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=prompt)


def test_a_templates_type_error_on_a_message_is_a_value_error_naming_the_template(chat_tokenizers):
    """A template expression that fails on the messages it is given (text plus a number) is a
    ValueError naming the chat template, which the data reader turns into a one-line error
    naming the record."""
    _, ours = chat_tokenizers["chatml"]
    ours = copy.copy(ours)
    ours.chat_template = "{{ messages[0].content + 1 }}"
    with pytest.raises(ValueError, match="chat_template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_chat_turns_are_the_generation_prompt_then_the_answer_and_its_end_marker(
        chat_tokenizers, name):
    """Each assistant turn's prompt is transformers' rendering of the conversation before it
    with the generation prompt; its answer, the message and the template's end-of-turn marker,
    continues it into transformers' rendering of the conversation up to that turn."""
    theirs, ours = chat_tokenizers[name]
    messages = CONVERSATIONS[1]
    turns = chat_turns(ours, messages)
    answered = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(turns) == len(answered) == 2
    end = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
    for turn, i in zip(turns, answered):
        assert turn.prompt == theirs.apply_chat_template(messages[:i], tokenize=False,
                                                         add_generation_prompt=True)
        assert turn.answer == messages[i]["content"] + end
        full = theirs.apply_chat_template(messages[: i + 1], tokenize=False)
        assert full.startswith(turn.prompt + turn.answer)


def test_a_template_error_is_one_line_naming_the_chat_template(chat_tokenizers):
    """A template's raise_exception is a ValueError naming chat_template with its message, and a
    tokenizer without a template says it has no chat_template."""
    _, ours = chat_tokenizers["chatml"]
    with pytest.raises(ValueError, match=r"chat_template: unknown role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "42"}])
    plain = load_tokenizer(ours.source)  # the same tokenizer.json without a template beside it
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"no chat_template"):
        plain.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize("name", ["runs", "spaces", "split"])
def test_a_token_one_piece_of_a_cut_pattern_crosses_none_of_its_cuts(name):
    """SafeCuts' premise, on every text of up to 6 characters of an alphabet of each class:
    wherever a token that the pattern matches whole occurs, no cut of the pattern falls
    inside it."""
    pattern = cut_pattern(name, "\u2581")
    alphabet = "\u2581ab\u03011\u00b2,("
    tokens = ["".join(t) for n in range(2, 4) for t in itertools.product(alphabet, repeat=n)]
    whole = {t for t in tokens if pattern.fullmatch(t)}
    assert 0 < len(whole) < len(tokens)
    for n in range(1, 7):
        spans = [(start, end) for start in range(n)
                 for end in range(start + 2, min(start + 3, n) + 1)]
        for text in map("".join, itertools.product(alphabet, repeat=n)):
            # each occurrence of a token (2 or 3 characters) in the text; a text without one
            # has nothing to check, and a cut inside start..end falls at start + 1 or start + 2
            found = [(start, end) for start, end in spans if text[start:end] in whole]
            if found:
                cuts = {m.end() for m in pattern.finditer(text)}
                for start, end in found:
                    crossed = start + 1 in cuts or (end == start + 3 and start + 2 in cuts)
                    assert not crossed, (text, text[start:end])


def test_a_big_tokenizer_json_is_read_from_its_kept_compiled_form(family_tokenizers, held_out,
                                                                  tmp_path, monkeypatch):
    """A tokenizer.json of compiled.CACHED_FROM_BYTES or more is kept compiled in the cache,
    named by its SHA-256, and read from there the next time: the same ids, vocabulary and
    spec; a damaged kept form, or another file, is read from its JSON again."""
    from codelm.tokenization import compiled

    monkeypatch.setattr(compiled, "CACHED_FROM_BYTES", 0)
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    hf, _ = family_tokenizers["gemma3"]
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    assert BPETokenizer.from_kept(path) is None
    first = load_tokenizer(path)  # from the JSON; keeps the compiled form
    (kept,) = (tmp_path / "cache" / "tokenizers").iterdir()
    second = load_tokenizer(path)
    assert second._spec is None  # read from the kept form
    texts = [t for _, t in held_out[:4]] + edge_texts()
    ids = [second.encode(t) for t in texts]
    assert ids == [first.encode(t) for t in texts] == _hf_ids(hf, texts)
    assert [second.decode(i) for i in ids] == [first.decode(i) for i in ids]
    assert second.vocab_size == first.vocab_size and second.bos_id == first.bos_id
    assert pickle.loads(pickle.dumps(second)).encode(texts[0]) == ids[0]
    assert second.spec == json.loads(path.read_text("utf-8"))
    kept.write_bytes(kept.read_bytes()[:-8])
    assert BPETokenizer.from_kept(path) is None
    path.write_text(path.read_text("utf-8") + "\n", "utf-8")  # another file
    assert BPETokenizer.from_kept(path) is None
    assert load_tokenizer(path).encode(texts[0]) == ids[0]


def test_the_kept_forms_code_digest_covers_the_reader_of_vocab_and_merges(tmp_path, monkeypatch):
    """A kept form is named by the code that derived its tables, bpe.py's reading of the
    vocab and merges included: other code there makes the form again."""
    from codelm.tokenization import compiled

    for name in ("compiled.py", "bpe.py"):
        shutil.copy(Path(compiled.__file__).with_name(name), tmp_path / name)
    monkeypatch.setattr(compiled, "__file__", str(tmp_path / "compiled.py"))
    before = compiled._code.__wrapped__()
    with open(tmp_path / "bpe.py", "a", encoding="utf-8") as f:
        f.write("# other code\n")
    assert compiled._code.__wrapped__() != before


def test_storing_the_compiled_form_leaves_no_temporary_file(family_tokenizers, tmp_path,
                                                           monkeypatch):
    """A store stopped mid-write (Ctrl-C) removes its temporary file, and the next store removes
    what a killed writer left (named as the project's partial writes are, by their owner)."""
    from codelm.runtime import process
    from codelm.tokenization import compiled

    monkeypatch.setattr(compiled, "CACHED_FROM_BYTES", 0)
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    hf, _ = family_tokenizers["qwen2"]
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    cache = tmp_path / "cache" / "tokenizers"
    cache.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = int(finished.stdout)  # a writer that has ended
    _, host, ns, _ = process.owner_tag().split("@")
    left = cache / f".x.bpe.tmp-{dead}@{host}@{ns}@-ab12"
    left.write_bytes(b"half a file")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compiled.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_tokenizer(path)
    assert list(cache.iterdir()) == []  # the killed writer's file and its own both gone


def test_a_long_piece_is_encoded_each_time_not_kept(family_tokenizers):
    """The piece cache keeps short pieces (code repeats its words), never a long one: distinct
    blobs would otherwise hold memory without bound."""
    from codelm.tokenization import batching

    hf, _ = family_tokenizers["qwen2"]
    tok = BPETokenizer(json.loads(hf.to_str()), "qwen2")
    blob = "".join(random.Random(0).choice("abcdefgh") for _ in range(4000))
    assert tok.encode(f"x = {blob}") == hf.encode(f"x = {blob}", add_special_tokens=False).ids
    assert blob not in tok._cache and "x" in tok._cache
    assert batching._MAX_CACHED_PIECE_CHARS < len(blob)


@pytest.mark.parametrize("name", ["runs", "spaces", "split"])
@pytest.mark.parametrize("apart", ["", "\n\t"])
def test_the_ascii_cut_pattern_cuts_ascii_text_as_the_unicode_one(name, apart):
    """A text of ASCII and ▁ alone is cut by Python's re with ASCII classes (twice as quick):
    the same pieces as the regex module's Unicode classes."""
    unicode, ascii = (cut_pattern(name, "\u2581", apart, ascii=a) for a in (False, True))
    rng = random.Random(0)
    alphabet = "\u2581\u2581\u2581 aZ_09.(\n\t\r\x00\x7f~"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert ascii.findall(text) == unicode.findall(text), repr(text)


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_a_completion_is_encoded_as_it_continues_its_prompt_with_no_space_of_its_own(
        style, family_tokenizers):
    """A SentencePiece tokenizer starts every text it encodes with a space (Llama-2's Prepend,
    Metaspace's prepend): a completion encoded alone would teach the model a space its text
    does not have (a body line five spaces deep). Training's examples and the project task's
    targets are encoded as continuations: the completion's ids decode, as a continuation, to
    its text, and after a prompt ending in a newline they are those of HF's encoding of the
    whole text."""
    from codelm.data.config import DataConfig
    from codelm.data.encoding import tokenize_examples
    from codelm.data.examples import Example
    from codelm.tokenization.batching import encode_continuation

    hf, ours = family_tokenizers[style]
    cfg = DataConfig(task="completion", block_size=256, progress=False, num_workers=1)
    for prompt, completion in [("def add(a, b):\n", "    return a + b"),
                               ("x = [\n", "  1,\n  2]\n"), ("if ok:\n", "pass")]:
        [(prompt_ids, completion_ids, _)] = tokenize_examples(
            [Example(prompt, completion)], ours, cfg, "test")
        assert ours.decode(completion_ids, continuation=True) == completion, style
        whole = hf.encode(prompt + completion, add_special_tokens=False).ids
        alone = hf.encode(prompt, add_special_tokens=False).ids
        if whole[: len(alone)] == alone:  # no token crosses the prompt's end
            assert completion_ids == whole[len(alone):], style
        assert encode_continuation(ours, completion) == completion_ids, style


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_a_prompt_with_a_budgeted_body_is_the_tokenizers_ids_of_its_text(style,
                                                                        family_tokenizers):
    """The docstring task's prompt (a head, the code cut to its token budget, a tail) is
    tokenized whole, as HF's tokenizer encodes the prompt's text: no SentencePiece space
    before the code or the tail, no word split where the parts meet; the code's span is
    where it lies, and the cut is fitted_prompt's."""
    from codelm.data.config import DataConfig
    from codelm.data.encoding import fitted_prompt, tokenize_examples
    from codelm.data.examples import Example

    hf, ours = family_tokenizers[style]
    cfg = DataConfig(task="docstring", block_size=256, progress=False, num_workers=1)
    code = "class Greeter:\n    def hello(self, name):\n        return 'hi ' + name\n"
    for budget in (200, 7):
        example = Example("Class ", "Says hello.", body=code, tail="\n\nDocstring:",
                          body_budget=budget)
        [(prompt_ids, _, (start, end))] = tokenize_examples([example], ours, cfg, "test")
        text = fitted_prompt(example, ours)
        assert prompt_ids == hf.encode(text, add_special_tokens=False).ids, (style, budget)
        assert ours.decode(prompt_ids) == text
        assert start > 0 and ours.decode(prompt_ids[start:end], continuation=True).strip() in code


@pytest.mark.parametrize("style, token, texts", [
    ("spm", "<sep>", ["a<sep>b", "<sep>b", "ab <sep> c", "x<sep>"]),
    ("metaspace", "<sep>", ["a<sep>b", "<sep>b", "ab <sep> c"]),
    ("gemma", "new line", ["a new line", "new line", "newline"]),
    ("qwen2", "e\u0301", ["caf\u00e9", "cafe\u0301 au lait"])])
def test_an_added_token_that_is_normalized_is_found_as_the_normalizer_writes_it(
        style, token, texts, family_tokenizers, tmp_path):
    """transformers' add_tokens writes a token with normalized=true: HF looks for it in the
    normalized text as the normalizer writes it (Llama-2's Prepend makes <sep> "▁<sep>",
    Gemma's Replace "new line" "new▁line", NFC e + U+0301 "é"); the ids are HF's, and the
    token decodes as HF decodes it, as normalized ("a <sep>b" keeps its space)."""
    from tokenizers import AddedToken, Tokenizer

    hf, _ = family_tokenizers[style]
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    added = Tokenizer.from_file(str(path))
    added.add_tokens([AddedToken(token, normalized=True)])
    added.save(str(path))
    ours = load_tokenizer(path)
    for text in texts:
        ids = added.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == added.decode(ids, skip_special_tokens=False), text
    i = added.token_to_id(token)
    assert ours.id_to_token(i) == added.id_to_token(i)  # HF names it as normalized
    assert ours.token_content(i) == token  # tokenizer_config.json names it as written


def test_special_runs_of_one_character_are_text_with_split_special_tokens(family_tokenizers,
                                                                          tmp_path):
    """Special added tokens for every run of newlines up to six (as Gemma's, but special): with
    split_special_tokens their text is text, encoded by the model as HF's
    encode_special_tokens encodes it; without it they are found as HF finds them."""
    from tokenizers import AddedToken, Tokenizer

    hf, _ = family_tokenizers["gemma"]
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    added = Tokenizer.from_file(str(path))
    added.add_special_tokens([AddedToken("\n" * n, normalized=False) for n in range(1, 7)])
    added.save(str(path))
    ours = load_tokenizer(path)
    texts = ["x\n\n\n\n\ny", "def f():\n\n\n\n\n\n    return 1\n", "\n" * 5]
    for split in (True, False):
        added.encode_special_tokens = split
        ref = [added.encode(t, add_special_tokens=False).ids for t in texts]
        assert [ours.encode(t, split_special_tokens=split) for t in texts] == ref, split


@pytest.mark.parametrize("style", ["metaspace", "spm"])
def test_an_id_in_a_gap_of_the_vocabulary_decodes_to_nothing_as_in_hf(style, family_tokenizers,
                                                                      tmp_path):
    """A vocabulary whose ids leave a gap (an entry past its end): HF decodes an id of the gap
    to nothing and strips the leading ▁ of the first real token, wherever the gap id is."""
    from tokenizers import Tokenizer

    hf, _ = family_tokenizers[style]
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    spec = json.loads(path.read_text())
    size = max(spec["model"]["vocab"].values()) + 1
    spec["model"]["vocab"]["zzzq"] = size + 5  # ids size .. size + 4 unused
    path.write_text(json.dumps(spec))
    theirs, ours = Tokenizer.from_file(str(path)), load_tokenizer(path)
    word = ours.encode(" return")
    for ids in ([size + 1, *word], [*word, size + 1], [size + 1]):
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False), ids


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_a_stop_string_is_found_at_the_token_the_whole_texts_check_finds_it(
        style, family_tokenizers):
    """generation.finish_reason decodes only the text's end to look for a stop string: for
    every prefix of generated ids (texts' own ids, and random ids that split characters into
    bytes), it stops exactly where a check of the whole decoded text first finds a stop."""
    from codelm.models.generation import GenerationConfig, finish_reason

    _, tok = family_tokenizers[style]
    stops = ["\n\n", "é中", "# end", " return"]
    cfg = GenerationConfig(10**6, stop=stops, decode=lambda ids: decode_generated(tok, ids))
    rng = random.Random(0)
    pieces = ["def f(x):\n", "    return x", " é", "中文", "# end", "\n", "\n\n", "😀", "  ",
              "ñ", "x = 1", "\u00a0"]
    sequences = [tok.encode("".join(rng.choice(pieces) for _ in range(30))) for _ in range(40)]
    sequences += [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(40)]
    for ids in sequences:
        whole = next((n for n in range(1, len(ids) + 1)
                      if any(stop in cfg.decode(ids[:n]) for stop in stops)), None)
        ends = next((n for n in range(1, len(ids) + 1) if finish_reason(ids[:n], cfg)), None)
        assert ends == whole, (ids, whole, ends)


def test_a_stop_string_is_found_through_a_decoder_that_drops_the_first_tokens_spaces(
        family_tokenizers):
    """A Metaspace decoder (tokenizer.decode, not a continuation's) drops every ▁ of a text's
    first token, so the last token decoded alone can read far shorter than it reads in the
    text: a stop string ending at the start of an 8-space token is still found at that token,
    where a check of the whole decoded text finds it."""
    from codelm.models.generation import GenerationConfig, finish_reason

    _, tok = family_tokenizers["metaspace"]
    spaces = tok.token_to_id("▁" * 8)
    ids = [tok.token_to_id("x"), spaces]
    assert tok.decode(ids) == "x" + " " * 8 and tok.decode([spaces]) == ""
    cfg = GenerationConfig(10**6, stop=["x "], decode=tok.decode)
    assert finish_reason(ids[:1], cfg) is None
    assert finish_reason(ids, cfg) == "stop"


def test_a_lines_stop_is_found_where_the_next_lines_indentation_shares_its_token(tmp_path):
    """Eval's line task stops at "\n" once its answer has started (``answer``: past leading
    blank lines): a byte-level BPE's "\n" + indentation is one token, which the answer's start
    must not strip from the text's end that finish_reason reads, or the stop comes lines late."""
    from codelm.models.generation import GenerationConfig, finish_reason

    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::200]]
    train_hf_tokenizer("starcoder", texts, tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    ids = tok.encode("    if x:\n        return x * 3 + y  # ok\n    return y\n")
    assert "\n       " in [tok.decode([i]) for i in ids]
    line = GenerationConfig(10**6, stop=["\n"], decode=lambda i: decode_generated(tok, i),
                            answer=str.lstrip)
    whole = next(n for n in range(1, len(ids) + 1) if "\n" in line.decode(ids[:n]).lstrip())
    assert next(n for n in range(1, len(ids) + 1) if finish_reason(ids[:n], line)) == whole
    assert finish_reason(tok.encode("\n\n    "), line) is None  # no answer yet: no stop


def test_a_stop_string_in_bytes_the_whole_text_replaces_does_not_stop(family_tokenizers):
    """Byte fallback decodes a run of byte tokens that makes no character as U+FFFD, every byte
    of it: "AB" spelled in bytes after a lone continuation byte is no stop string, though the
    run's end alone reads "AB"; the same run without that byte stops."""
    from codelm.models.generation import GenerationConfig, finish_reason

    _, tok = family_tokenizers["spm"]
    cfg = GenerationConfig(10**6, stop=["AB"], decode=lambda ids: decode_generated(tok, ids))
    a, b, lone = (tok.token_to_id(f"<0x{byte:02X}>") for byte in (0x41, 0x42, 0x80))
    run = [a] * 20 + [b]
    assert cfg.decode([lone, *run]) == "\ufffd" * 22
    assert finish_reason([lone, *run], cfg) is None
    assert finish_reason(run, cfg) == "stop"


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_a_cut_prompt_keeps_its_templates_tail_in_every_family(style, family_tokenizers):
    """A docstring prompt too long for its room loses the end of its code, never the template's
    tail after it: the kept prompt reads "...\\n\\nDocstring:" in every family's tokenizer
    (byte-level BPEs that join ")\\n\\n" into one token, SentencePiece ones whose tail encoded
    alone opens with a space of its own), and it starts as the prompt does."""
    from codelm.data.config import DataConfig
    from codelm.data.encoding import tokenize_examples, truncate_pair
    from codelm.data.examples import Example

    _, ours = family_tokenizers[style]
    code = "".join(f"value{i} = compute(value, {i})\n" for i in range(40)) + "result = f(a, b)"
    example = Example("Class ", "A docstring.", body=code, tail="\n\nDocstring:")
    cfg = DataConfig(task="docstring", block_size=1024, progress=False, num_workers=1)
    [(prompt, completion, span)] = tokenize_examples([example], ours, cfg, "test")
    kept, _ = truncate_pair(prompt, completion, 48, None, None, span)
    text = ours.decode(kept)
    assert len(kept) < len(prompt) and text.lstrip().startswith("Class"), (style, text)
    assert text.endswith("\n\nDocstring:"), (style, text)
