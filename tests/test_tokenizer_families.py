"""codelm's BPETokenizer against HF ``tokenizers`` on the tokenizer.json types today's families
ship, each trained here by HF's BpeTrainer: Qwen2's (NFC, its Split regex, byte-level BPE) and
SentencePiece BPE with byte fallback, as Llama-2/CodeLlama/Mistral/Phi-3 write it (Prepend and
Replace to U+2581) and in its Metaspace form: the same ids on Python, JavaScript, C and edge
strings, the same decoded text, and decode(encode(x)) == x where HF's round-trips."""

import json
import pickle

import pytest
from test_tokenizer import EDGE_CASES, _first_mismatch, _hf_ids
from tiny_hf import FAMILY_TOKENIZER_STYLES, QWEN2_SPECIALS, train_family_tokenizer

from codelm.data.examples import chat_turns
from codelm.data.sources import stdlib_files, stdlib_root
from codelm.tokenization.bpe import BPETokenizer
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
    """style -> (HF tokenizer, codelm's BPETokenizer of the same tokenizer.json)."""
    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::25]]
    out = {}
    for style in FAMILY_TOKENIZER_STYLES:
        path = tmp_path_factory.mktemp(style) / "tokenizer.json"
        out[style] = (train_family_tokenizer(style, texts, path), load_tokenizer(path))
    return out


@pytest.fixture(scope="module")
def held_out() -> list[tuple[str, str]]:
    """Python files the tokenizers were not trained on, and the JavaScript and C sources."""
    root = stdlib_root()
    files = stdlib_files()[7::25]
    python = [(p.relative_to(root).as_posix(), p.read_text("utf-8", "replace")) for p in files]
    return [*python, ("javascript", JAVASCRIPT), ("c", C_SOURCE)]


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_ids_equal_hf_on_held_out_code(style, family_tokenizers, held_out):
    hf, ours = family_tokenizers[style]
    assert isinstance(ours, BPETokenizer)
    names = [n for n, _ in held_out]
    texts = [t for _, t in held_out]
    got = [ours.encode(t) for t in texts]
    mismatch = _first_mismatch(names, got, _hf_ids(hf, texts))
    assert mismatch is None, mismatch
    assert len(texts) > 20


@pytest.mark.parametrize("style", FAMILY_TOKENIZER_STYLES)
def test_ids_and_text_equal_hf_on_edge_strings(style, family_tokenizers):
    hf, ours = family_tokenizers[style]
    names = [repr(t[:40]) for t in FAMILY_EDGE_CASES]
    for add in (False, True):
        got = [ours.encode(t, add_special_tokens=add) for t in FAMILY_EDGE_CASES]
        ref = _hf_ids(hf, FAMILY_EDGE_CASES, add_special_tokens=add)
        assert _first_mismatch(names, got, ref) is None, _first_mismatch(names, got, ref)
    round_trips = 0
    for text in FAMILY_EDGE_CASES:
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), repr(text[:40])
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids), repr(text[:40])
        if hf.decode(ids, skip_special_tokens=False) == text:
            assert ours.decode(ids) == text
            round_trips += 1
    assert round_trips > len(FAMILY_EDGE_CASES) // 2


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


def test_qwen2_special_tokens_and_nfc(family_tokenizers):
    hf, ours = family_tokenizers["qwen2"]
    for token in QWEN2_SPECIALS:
        assert ours.token_to_id(token) == hf.token_to_id(token)
    decomposed = "cafe\u0301"
    assert ours.encode(decomposed) == ours.encode("caf\u00e9") == hf.encode(decomposed).ids


def test_pickled_or_in_workers_the_tokenizers_encode_alike(family_tokenizers, held_out):
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
    theirs, ours = chat_tokenizers[name]
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == (
                theirs.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=prompt))


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
    _, ours = chat_tokenizers["chatml"]
    with pytest.raises(ValueError, match=r"chat_template: unknown role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "42"}])
    plain = load_tokenizer(ours.source)  # the same tokenizer.json without a template beside it
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"no chat_template"):
        plain.apply_chat_template(CONVERSATIONS[0])
