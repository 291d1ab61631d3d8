"""The chat task: conversation records ({"messages": [{role, content}, ...]}) become one example
per assistant turn, prompted as generation is (the model's chat template with its generation
prompt, rendered as transformers renders it) and trained on the answer alone; a run fine-tunes
an instruct checkpoint on them."""

import json

import pytest
import torch
from test_tokenizer_families import CHATML_TEMPLATE
from tiny_hf import save_tiny_hf, train_family_tokenizer

import dataset
from architecture import IGNORE_INDEX
from codelm import trainconfig
from codelm.data.config import DataConfig
from codelm.data.sources import stdlib_files
from tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": f"Write a function returning {n} squared."},
     {"role": "assistant", "content": f"def square_{n}():\n    return {n} * {n}"},
     {"role": "user", "content": "Now its cube."},
     {"role": "assistant", "content": f"def cube_{n}():\n    return {n} ** 3"}]
    for n in range(40)
]


@pytest.fixture(scope="session")
def instruct(tmp_path_factory):
    """A tiny Qwen2.5-Coder-Instruct-shaped checkpoint: ChatML template, <|im_end|> its eos."""
    root = tmp_path_factory.mktemp("instruct")
    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::60]]
    hf_tok = train_family_tokenizer("qwen2", texts, root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}))
    eos = hf_tok.token_to_id("<|im_end|>")
    save_tiny_hf("qwen2", root, vocab_size=hf_tok.get_vocab_size(), eos_token_id=eos,
                 bos_token_id=None)
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    return root, data


def _prepare(instruct, tmp_path, **options):
    root, data = instruct
    cfg = DataConfig(task="chat", sources=[str(data)], block_size=128, cache_dir=str(tmp_path),
                     progress=False, split_by="file", min_bytes=0, min_lines=0, **options)
    return load_tokenizer(root), dataset.prepare(cfg, load_tokenizer(root))


def test_each_assistant_turn_is_an_example_trained_on_its_answer_alone(instruct, tmp_path):
    tok, data = _prepare(instruct, tmp_path)
    examples = [data.train[i] for i in range(len(data.train))]
    assert len(examples) == 2 * round(0.8 * len(CONVERSATIONS))  # two answers a conversation
    for example in examples:
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        counted = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        answer = tok.decode([labels[i] for i in counted])
        prompt = tok.decode(ids[: counted[0] + 1])
        assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt, then...
        assert answer.endswith("<|im_end|>")  # ...the answer and its end-of-turn marker only
        assert answer.count("<|im_end|>") == 1  # (the marker is the eos: none added after it)
        assert "<|im_start|>" not in answer
        turn = answer.removesuffix("<|im_end|>")
        assert turn.startswith(("def square_", "def cube_"))
        # the prompt is the conversation before the answer, as the template renders it
        n = turn.split("_", 1)[1].split("(")[0]
        messages = next(m for m in CONVERSATIONS if m[1]["content"].startswith(f"def square_{n}("))
        before = messages[:1] if turn.startswith("def square_") else messages[:3]
        assert prompt == tok.apply_chat_template(before, add_generation_prompt=True)
        assert tok.token_to_id("<|im_start|>") in ids  # special tokens read as tokens


# A template that writes no end-of-turn token: an answer is its message text alone.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def test_an_answer_without_an_end_of_turn_token_is_trained_to_end_with_eos(instruct, tmp_path):
    root, _ = instruct
    tok = load_tokenizer(root)
    tok.chat_template = PLAIN_TEMPLATE
    cfg = DataConfig(task="chat", sources=[str(instruct[1])], block_size=128,
                     cache_dir=str(tmp_path), progress=False, split_by="file", min_bytes=0,
                     min_lines=0)
    data = dataset.prepare(cfg, tok)
    for i in range(len(data.train)):
        labels = data.train[i]["labels"].tolist()
        counted = [label for label in labels if label != IGNORE_INDEX]
        assert counted[-1] == tok.eos_id
        assert tok.decode(counted[:-1]).startswith(("def square_", "def cube_"))


def test_a_template_error_names_the_conversation_line(instruct, tmp_path):
    root, data = instruct
    bad = tmp_path / "tool.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n" + json.dumps({"messages": [
        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}) + "\n")
    cfg = DataConfig(task="chat", sources=[str(bad)], cache_dir=str(tmp_path), progress=False,
                     split_by="file", min_bytes=0, min_lines=0)
    with pytest.raises(ValueError, match=r"tool\.jsonl:2: chat_template: unknown role: tool"):
        dataset.prepare(cfg, load_tokenizer(root))


def test_code_files_or_a_template_less_tokenizer_are_refused_naming_the_fix(instruct, tmp_path):
    root, _ = instruct
    tok = load_tokenizer(root)
    code = DataConfig(task="chat", sources=["stdlib"], cache_dir=str(tmp_path), progress=False,
                      max_docs=20)
    with pytest.raises(ValueError, match=r"chat task needs JSONL conversation records"):
        dataset.prepare(code, tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"chat task needs the tokenizer of an instruct model"):
        _, _ = tok, dataset.prepare(DataConfig(task="chat", sources=[str(instruct[1])],
                                               cache_dir=str(tmp_path / "b"), progress=False,
                                               split_by="file", min_bytes=0, min_lines=0), tok)


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, r"'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string 'role'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"no 'assistant' message"),
])
def test_a_malformed_conversation_is_refused_naming_its_line(record, message, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps(record) + "\n")
    cfg = DataConfig(task="chat", sources=[str(data)], cache_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: {message}"):
        dataset.prepare(cfg)


def test_a_chat_run_fine_tunes_an_instruct_model_on_its_conversations(instruct, tmp_path):
    """trainingmanager --task chat on the instruct checkpoint: the answers' loss falls and the
    run ends with an export."""
    import trainingmanager as tm

    root, data = instruct
    cfg = trainconfig.TrainConfig(task="chat", init_from=str(root), data=[str(data)],
                                  block_size=128, batch_size=8, max_steps=30, lr=1e-2,
                                  warmup_steps=2, eval_every=30, out_dir=str(tmp_path / "runs"),
                                  name="chat", progress=False, precision="fp32",
                                  data_options={"split_by": "file", "min_bytes": 0, "min_lines": 0,
                                                "cache_dir": str(tmp_path / "cache")})
    result = tm.train(cfg)
    metrics = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [m["loss"] for m in map(json.loads, metrics) if "loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    assert (result.run_dir / "export" / "config.json").is_file()
    assert torch.isfinite(torch.tensor(result.best_val_loss))


@pytest.mark.parametrize("bos", ["absent", None, "<|endoftext|>"])
def test_a_special_token_the_config_leaves_out_renders_as_nothing_as_in_transformers(
        bos, instruct, tmp_path):
    """A chat template may write {{ bos_token }}: transformers gives it the tokenizer_config's
    token, and nothing where the config has none (null, or no key), never a token guessed
    from the vocabulary nor the text None."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copy(instruct[0] / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "chat_template": "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}"
                               "\n{{ m.content }}<|im_end|>\n{% endfor %}"}
    if bos != "absent":
        config["bos_token"] = bos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}]
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages,
                                                                          tokenize=False)
    assert load_tokenizer(tmp_path).apply_chat_template(messages) == expected
