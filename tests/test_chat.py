"""The chat task: conversation records ({"messages": [{role, content}, ...]}) become one example
per assistant turn, prompted as generation is (the model's chat template with its generation
prompt, rendered as transformers renders it) and trained on the answer alone; a run fine-tunes
an instruct checkpoint on them."""

import dataclasses
import json
from pathlib import Path

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
    """Each assistant turn is an example: its prompt is the conversation before it as
    apply_chat_template renders it with the generation prompt, and only the answer and its one
    end-of-turn marker are labelled, so the model learns answers, not the user's turns."""
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


def test_an_opening_assistant_greeting_is_context_not_an_example(instruct, tmp_path):
    """ChatML reads messages[0]: a conversation that opens with the assistant's greeting has no
    prompt before it (the template cannot render one), so the turns after it are the examples."""
    root, _ = instruct
    greeting = [{"role": "assistant", "content": "Hi, how can I help?"}, *CONVERSATIONS[0]]
    data = tmp_path / "greeting.jsonl"
    data.write_text(json.dumps({"messages": greeting}) + "\n")
    tok, prepared = _prepare((root, data), tmp_path, train_frac=1.0, val_frac=0.0, test_frac=0.0)
    assert len(prepared.train) == 2
    first = prepared.train[0]
    counted = [i for i, label in enumerate(first["labels"].tolist()) if label != IGNORE_INDEX]
    prompt = tok.decode(first["input_ids"].tolist()[: counted[0] + 1])
    assert prompt == tok.apply_chat_template(greeting[:2], add_generation_prompt=True)
    assert "Hi, how can I help?" in prompt


GREETING_ONLY = [{"role": "assistant", "content": "Hi, how can I help?"},
                 {"role": "user", "content": "Nothing, thanks."}]


def test_a_conversation_whose_one_answer_opens_it_is_counted_as_skipped(instruct, tmp_path):
    """A conversation whose only assistant message is its opening greeting has no answer that
    follows a prompt: it makes no example, and the build's events count it by that reason, so
    every conversation read is accounted for (a build of such conversations alone names it)."""
    root, _ = instruct
    data = tmp_path / "greeting.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n"
                            for m in (GREETING_ONLY, CONVERSATIONS[0])))
    whole = {"train_frac": 1.0, "val_frac": 0.0, "test_frac": 0.0}
    _, prepared = _prepare((root, data), tmp_path, **whole)
    assert len(prepared.train) == 2
    assert prepared.stats["task"]["events"]["train"] == {"skipped_answer_opens_conversation": 1}
    alone = tmp_path / "alone.jsonl"
    alone.write_text(json.dumps({"messages": GREETING_ONLY}) + "\n")
    with pytest.raises(ValueError, match=r"no training examples.*1 answer opens conversation"):
        _prepare((root, alone), tmp_path / "alone", **whole)


# Mistral's and Llama 2's rule: the roles alternate, the user's first.
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_refuses_an_opening_answer_refuses_its_conversation(instruct, tmp_path):
    """A template whose roles must alternate from the user's refuses a conversation that opens
    with the assistant's greeting, as transformers' rendering of it does: the conversation is
    refused at its line with the template's message, whether or not an answer follows."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    root, _ = instruct
    with pytest.raises(TemplateError, match="must alternate"):
        AutoTokenizer.from_pretrained(root).apply_chat_template(
            GREETING_ONLY, chat_template=ALTERNATING_TEMPLATE, tokenize=False)
    tok = load_tokenizer(root)
    tok.chat_template = ALTERNATING_TEMPLATE
    answered = [*GREETING_ONLY, {"role": "assistant", "content": "Bye."}]
    for n, messages in enumerate([GREETING_ONLY, answered]):
        data = tmp_path / f"greeting{n}.jsonl"
        data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n"
                        + json.dumps({"messages": messages}) + "\n")
        cfg = DataConfig(task="chat", sources=[str(data)], cache_dir=str(tmp_path / str(n)),
                         progress=False, split_by="file", min_bytes=0, min_lines=0,
                         train_frac=1.0, val_frac=0.0, test_frac=0.0)
        with pytest.raises(ValueError, match=rf"greeting{n}\.jsonl:2: chat_template: .*alternate"):
            dataset.prepare(cfg, tok)


# A template that writes no end-of-turn token: an answer is its message text alone.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def test_an_answer_without_an_end_of_turn_token_is_trained_to_end_with_eos(instruct, tmp_path):
    """Where the template writes no end-of-turn marker, each answer's labels end with the eos: the
    fine-tuned model learns to stop after its answer instead of running on."""
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


# Qwen2.5-Instruct's way with tools: listed in a system turn, a call as <tool_call> JSON.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{{ m.content or '' }}{% for call in m.tool_calls or [] %}<tool_call>\n"
    "{{ call.function | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@pytest.mark.parametrize("content", ["", None, "Let me look."], ids=["empty", "null", "text"])
def test_a_tool_call_turn_is_trained_with_the_tools_as_transformers_renders_them(
        content, instruct, tmp_path):
    """A record's tools and an assistant turn's tool_calls reach the chat template, as TRL gives
    them to it: the prompts list the tools as transformers' apply_chat_template(tools=...)
    renders them, and the tool call is an answer, up to its end-of-turn marker."""
    import shutil

    from transformers import AutoTokenizer

    root = tmp_path / "tools"
    shutil.copytree(instruct[0], root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config,
                                                            "chat_template": TOOLS_TEMPLATE}))
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": content, "tool_calls": [CALL]},
                {"role": "tool", "content": "22C"},
                {"role": "assistant", "content": "It is 22C in Paris."}]
    data = tmp_path / "calls.jsonl"
    data.write_text(json.dumps({"messages": messages, "tools": TOOLS}) + "\n")
    cfg = DataConfig(task="chat", sources=[str(data)], block_size=256, cache_dir=str(tmp_path),
                     progress=False, split_by="file", min_bytes=0, min_lines=0,
                     train_frac=1.0, val_frac=0.0, test_frac=0.0)
    tok = load_tokenizer(root)
    prepared = dataset.prepare(cfg, tok)
    hf = AutoTokenizer.from_pretrained(str(root))
    assert len(prepared.train) == 2
    for example, end in zip((prepared.train[i] for i in range(2)), (2, 4)):
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompt = hf.apply_chat_template(messages[: end - 1], tools=TOOLS,
                                        add_generation_prompt=True, tokenize=False)
        whole = hf.apply_chat_template(messages[:end], tools=TOOLS, tokenize=False)
        answer = whole[len(prompt):].removesuffix("\n")  # the template's glue after the turn
        assert tok.decode(ids[: first + 1]) == prompt
        assert tok.decode([label for label in labels if label != IGNORE_INDEX]) == answer
    call_answer = [label for label in prepared.train[0]["labels"].tolist() if label != IGNORE_INDEX]
    assert '"name": "get_weather"' in tok.decode(call_answer)


def test_one_conversation_offered_other_tools_is_no_duplicate(instruct, tmp_path):
    """Exact dedupe compares a conversation with its tools: the same messages offered other
    tools are another example, kept."""
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "It is 22C in Paris."}]
    other = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "name": "get_time"}}]
    data = tmp_path / "offers.jsonl"
    data.write_text("".join(json.dumps({"messages": messages, "tools": tools}) + "\n"
                            for tools in (TOOLS, other, TOOLS)))
    cfg = DataConfig(task="chat", sources=[str(data)], block_size=256, cache_dir=str(tmp_path),
                     progress=False, split_by="file", min_bytes=0, min_lines=0,
                     train_frac=1.0, val_frac=0.0, test_frac=0.0)
    from codelm.data.splits import load_corpus

    assert len(load_corpus(cfg).train) == 2  # the third repeats the first


def test_a_conversation_answered_by_a_tool_call_alone_is_kept(tmp_path):
    """An assistant turn with no text but a tool call is an answer to learn: its conversation
    is kept, and one whose assistant says nothing and calls nothing is dropped as empty."""
    from codelm.data.splits import load_corpus

    called = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]}]
    silent = [{"role": "user", "content": "Weather in Rome?"},
              {"role": "assistant", "content": " "}]
    data = tmp_path / "calls.jsonl"
    data.write_text("".join(json.dumps({"messages": m, "tools": TOOLS}) + "\n"
                            for m in (called, silent)))
    cfg = DataConfig(task="chat", sources=[str(data)], block_size=256, cache_dir=str(tmp_path),
                     progress=False, split_by="file", min_bytes=0, min_lines=0,
                     train_frac=1.0, val_frac=0.0, test_frac=0.0)
    corpus = load_corpus(cfg)
    assert [json.loads(doc.text)[0]["content"] for doc in corpus.train] == ["Weather in Paris?"]
    assert corpus.stats["dropped"] == {"empty_chat": 1}


def test_a_template_error_names_the_conversation_line(instruct, tmp_path):
    """A conversation the chat template cannot render (this ChatML knows no tool role) is refused
    with its file:line and the template's own message: the record can be found and corrected."""
    root, data = instruct
    bad = tmp_path / "tool.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n" + json.dumps({"messages": [
        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}) + "\n")
    cfg = DataConfig(task="chat", sources=[str(bad)], cache_dir=str(tmp_path), progress=False,
                     split_by="file", min_bytes=0, min_lines=0)
    with pytest.raises(ValueError, match=r"tool\.jsonl:2: chat_template: unknown role: tool"):
        dataset.prepare(cfg, load_tokenizer(root))


def test_code_files_or_a_template_less_tokenizer_are_refused_naming_the_fix(instruct, tmp_path):
    """The chat task refuses code files (it needs JSONL conversation records) and a tokenizer
    without a chat template (it needs an instruct model's), each message naming what it needs."""
    root, _ = instruct
    tok = load_tokenizer(root)
    code = DataConfig(task="chat", sources=["stdlib"], cache_dir=str(tmp_path), progress=False,
                      max_docs=20)
    with pytest.raises(ValueError, match=r"chat task needs JSONL conversation records"):
        dataset.prepare(code, tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"chat task needs the tokenizer of an instruct model"):
        dataset.prepare(DataConfig(task="chat", sources=[str(instruct[1])],
                                   cache_dir=str(tmp_path / "b"), progress=False,
                                   split_by="file", min_bytes=0, min_lines=0), tok)


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, r"'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": 3}]},
     r"messages\[0\] must be an object with a string 'role' and a string \(or null\) 'content'"),
    ({"messages": CONVERSATIONS[0], "tools": {"name": "f"}}, r"'tools' must be a list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"no 'assistant' message"),
    # a role no template reads as a turn to learn: its answer would be context, never trained
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistnt", "content": "a"},
                   {"role": "assistant", "content": "b"}]},
     r"messages\[1\]\.role 'assistnt': did you mean 'assistant'\?"),
    ({"messages": [{"role": "User", "content": "hi"}, {"role": "assistant", "content": "a"}]},
     r"messages\[0\]\.role 'User': roles are lower case: 'user'"),
    ({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "a"}]},
     r"messages\[0\]\.role 'human': ShareGPT's name.*'user'"),
])
def test_a_malformed_conversation_is_refused_naming_its_line(record, message, tmp_path):
    """A record that is no conversation (no messages, a non-string content, tools not a list, no
    assistant turn, a misspelt, capitalized or ShareGPT role) is refused at its file:line with the
    likely role: a misspelt assistant turn would be read as context and never trained."""
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps(record) + "\n")
    cfg = DataConfig(task="chat", sources=[str(data)], cache_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: {message}"):
        dataset.prepare(cfg)


def test_roles_of_other_templates_pass_to_the_template_as_they_are():
    """Roles chat templates of other families read (GLM's observation, Granite's
    tool_response, Gemma's model, a function_call) are no mistake: kept as they are."""
    from codelm.data.sources import checked_messages

    messages = [{"role": role, "content": "x"}
                for role in ("observation", "tool_response", "model", "function_call", "ipython")]
    assert checked_messages(messages, "messages", "chat.jsonl:1") == messages


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


# Phi-3's template: no BOS of its own (its tokenizer's post-processor adds <s> to plain text),
# each turn ended by <|end|> and a newline, the conversation by the end-of-text token.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")


@pytest.fixture(scope="module")
def phi3_tokenizer(tmp_path_factory):
    """A Phi-3-shaped tokenizer.json (byte-level BPE, <s> added by TemplateProcessing) with its
    tokenizer_config.json, as transformers loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("phi3")
    specials = ["<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([json.dumps(m) for m in CONVERSATIONS] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
        "eos_token": "<|endoftext|>", "chat_template": PHI3_TEMPLATE}))
    return root


def test_a_template_without_a_bos_trains_on_its_text_alone_up_to_the_end_of_turn(
        phi3_tokenizer, tmp_path):
    """Phi-3's template writes no BOS, though its tokenizer adds one to plain text: a training
    prompt is transformers' apply_chat_template(tokenize=True) ids, nothing added, and an
    answer is trained up to its <|end|>, not on the newline and end-of-text the template
    writes after the last turn."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(phi3_tokenizer)
    tok = load_tokenizer(phi3_tokenizer)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS[:10]))
    cfg = DataConfig(task="chat", sources=[str(data)], block_size=256, cache_dir=str(tmp_path),
                     progress=False, split_by="file", min_bytes=0, min_lines=0,
                     train_frac=1.0, val_frac=0.0, test_frac=0.0)
    prepared = dataset.prepare(cfg, tok)
    expected = []
    for messages in CONVERSATIONS[:10]:
        for i in (1, 3):
            prompt = hf.apply_chat_template(messages[:i], tokenize=True, return_dict=False,
                                            add_generation_prompt=True)
            answer = hf.encode(messages[i]["content"] + "<|end|>", add_special_tokens=False)
            expected.append((list(prompt), answer))
    found = []
    for i in range(len(prepared.train)):
        ids, labels = prepared.train[i]["input_ids"].tolist(), prepared.train[i]["labels"].tolist()
        counted = [j for j, label in enumerate(labels) if label != IGNORE_INDEX]
        found.append((ids[: counted[0] + 1], [labels[j] for j in counted]))
    assert sorted(found) == sorted(expected)


def test_the_server_offers_a_requests_tools_through_the_template(instruct):
    """/v1/chat/completions' tools reach the chat template (a template that lists them renders
    them), as transformers' apply_chat_template(tools=...) renders them."""
    import transformers

    from codelm.models import pretrained
    from codelm.openai_api import served_model

    root, _ = instruct
    template = ("{% if tools %}{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{% endif %}"
                + CHATML_TEMPLATE)
    config = json.loads((root / "tokenizer_config.json").read_text())
    shaped = root.parent / "instruct_tools"
    shaped.mkdir(exist_ok=True)
    (shaped / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
    (shaped / "tokenizer_config.json").write_text(json.dumps({
        **config, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    hf = transformers.AutoTokenizer.from_pretrained(shaped)
    want = hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False,
                                  add_generation_prompt=True)
    served = served_model("m", pretrained.load(root), load_tokenizer(shaped))
    assert served.chat_prompt(messages, tools) == list(want)
    assert served.chat_prompt(messages, tools) != served.chat_prompt(messages, None)


def test_a_long_history_loses_its_start_but_not_the_templates_bos(tmp_path):
    """Llama-3's template writes <|begin_of_text|>: a conversation longer than the block loses
    its oldest turns, never that first token (the model has seen every text start with it),
    however long the history (longer than the text tokenizing cuts before it reads it)."""
    from tiny_hf import save_tiny_llama3_instruct

    root = tmp_path / "llama3"
    save_tiny_llama3_instruct(root, [p.read_text("utf-8", "replace") for p in stdlib_files()[::400]])
    tok = load_tokenizer(root)
    long_history = [turn for messages in CONVERSATIONS[:6] for turn in messages]
    longest = [turn for _ in range(7) for messages in CONVERSATIONS[:6] for turn in messages]
    assert len(tok.apply_chat_template(longest)) > tok.longest_token * (96 + 1)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": long_history}) + "\n"
                    + json.dumps({"messages": longest}) + "\n")
    cfg = DataConfig(task="chat", sources=[str(data)], block_size=96, cache_dir=str(tmp_path),
                     progress=False, split_by="file", min_bytes=0, min_lines=0,
                     train_frac=1.0, val_frac=0.0, test_frac=0.0)
    prepared = dataset.prepare(cfg, tok)
    starts = [prepared.train[i]["input_ids"][0].item() for i in range(len(prepared.train))]
    assert len(starts) == 12 + 7 * 12 and set(starts) == {tok.bos_id}
    assert prepared.stats["task"]["events"]["train"]["prompt_truncated"] >= 10 + 7 * 12 - 2


def test_an_answer_ends_at_the_first_marker_after_its_text_and_a_tool_call_keeps_all():
    """The answer is cut after the first end-of-turn marker that follows its content; a turn
    whose content is empty (a tool call the template writes itself) keeps its whole text."""
    from codelm.tokenization.chat import chat_answer

    phi3 = ["<|end|>", "<|endoftext|>", "<|user|>"]
    assert chat_answer("Hello!\n<|end|>\n<|endoftext|>", "Hello!\n", phi3) == "Hello!\n<|end|>"
    assert chat_answer("a <|user|> b<|end|>\n", "a <|user|> b", phi3) == "a <|user|> b<|end|>"
    tool_call = '[TOOL_CALLS] [{"name": "get_weather"}]</s>'
    assert chat_answer(tool_call, "", ["</s>", "[TOOL_CALLS]"]) == tool_call
    assert chat_answer("end<|end|>\n<|endoftext|>", "end", phi3) == "end<|end|>"


def test_of_markers_that_start_at_one_place_the_answer_keeps_the_longest():
    """Two end-of-turn markers found at the same place, one the other's prefix: the answer ends
    after the longer, whole, whichever order they are listed in; a marker cut short would
    leave the rest of a special token's text outside the answer."""
    from codelm.tokenization.chat import chat_answer

    rendered = "Hi<|end|><|eos|>\n"
    for markers in (["<|end|>", "<|end|><|eos|>"], ["<|end|><|eos|>", "<|end|>"]):
        assert chat_answer(rendered, "Hi", markers) == "Hi<|end|><|eos|>"


class _TemplateOnly:
    """A tokenizer as chat_turns reads one: a chat template and its special tokens' texts."""

    def __init__(self, template: str, markers: list[str]):
        self.chat_template = template
        self.matched_special_tokens = markers

    def apply_chat_template(self, messages, add_generation_prompt=False, tools=None):
        from codelm.tokenization.chat import render_chat

        return render_chat(self.chat_template, messages, add_generation_prompt, tools)

    def token_to_id(self, token):
        return self.matched_special_tokens.index(token)


# A generation prompt that opens a think block a rendered turn drops (DeepSeek-R1's way), and
# a turn ended by two special tokens' texts, one the other's end.
THINK_PROMPT_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}U:{{ m.content }}{% else %}"
    "A:{{ m.content.split('</think>')[-1] }}<|end|><|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:<think>\n{% endif %}")


def test_a_prefilled_answer_ends_with_the_longest_marker_its_turn_ends_with():
    """An answer after a generation prompt that opens a think block is its content after that
    opening and the end-of-turn marker the turn ends with: of two markers that both end it,
    one the other's end, the longer, whole, whichever order they are listed in."""
    from codelm.tokenization.chat import chat_turns

    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nsum\n</think>4"}]
    for markers in (["<|eos|>", "<|end|><|eos|>"], ["<|end|><|eos|>", "<|eos|>"]):
        [turn] = chat_turns(_TemplateOnly(THINK_PROMPT_TEMPLATE, markers), messages)
        assert turn.prompt == "U:2+2?A:<think>\n"
        assert turn.answer == "sum\n</think>4<|end|><|eos|>"


# gpt-oss's way with reasoning: the last answer's thinking in an analysis channel ended by
# <|end|>, then its final channel ended by <|return|>; {% generation %} marks what TRL trains.
GPT_OSS_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}<|start|>user<|message|>{{ m.content }}"
    "<|end|>{% elif loop.last %}<|start|>assistant{% generation %}{% if m.thinking %}"
    "<|channel|>analysis<|message|>{{ m.thinking }}<|end|><|start|>assistant{% endif %}"
    "<|channel|>final<|message|>{{ m.content }}<|return|>{% endgeneration %}{% else %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")



def _chat_tokenizer(directory: Path, specials: list[str], config: dict) -> None:
    """A byte-level BPE trained by HF tokenizers on the conversations, with ``specials``, saved
    in ``directory`` beside a tokenizer_config.json of ``config`` (its chat template, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([json.dumps(m) for m in CONVERSATIONS] * 5, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **config}))


def _one_chat_prepared(directory: Path, messages: list[dict]):
    """The chat task's data of one conversation (chats.jsonl in ``directory``) prepared with the
    tokenizer there, all of it trained on: its DataConfig and the prepared data."""
    data = directory / "chats.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    cfg = DataConfig(task="chat", sources=[str(data)], block_size=128,
                     cache_dir=str(directory / "cache"), progress=False, split_by="file",
                     min_bytes=0, min_lines=0, train_frac=1.0, val_frac=0.0, test_frac=0.0)
    return cfg, dataset.prepare(cfg, load_tokenizer(directory))

def test_an_answer_its_reasoning_quotes_is_trained_through_its_final_channel(tmp_path):
    """An answer whose reasoning holds the answer's text ("4" in "2+2 is 4") is labelled
    through its final channel and <|return|>: the labelled tokens are those transformers'
    return_assistant_tokens_mask marks in the {% generation %} block, as TRL trains them."""
    import transformers

    specials = ["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                "<|return|>"]
    _chat_tokenizer(tmp_path, specials, {"eos_token": "<|return|>",
                                         "chat_template": GPT_OSS_TEMPLATE})
    messages = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4", "thinking": "2+2 is 4, so say 4."}]
    cfg, prepared = _one_chat_prepared(tmp_path, messages)
    labels = prepared.train[0]["labels"].tolist()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    marked = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
    want = [i for i, m in zip(marked["input_ids"], marked["assistant_masks"]) if m]
    assert [label for label in labels if label != IGNORE_INDEX] == want
    assert hf.decode(want).endswith("<|channel|>final<|message|>4<|return|>")


def test_a_template_whose_generation_prompt_opens_a_think_block_trains_the_reasoning(tmp_path):
    """DeepSeek-R1-Distill's template prompts with <｜Assistant｜><think>\n and drops a past
    turn's reasoning: a turn whose content opens with <think>\n is prompted as generation is
    and trained on its reasoning, answer and end-of-sentence, the ids and labels of TRL's
    training template (return_assistant_tokens_mask) after that prompt; a turn without the
    opening is refused naming it."""
    import transformers
    import trl
    from trl.chat_template_utils import get_training_chat_template

    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                "<think>", "</think>"]
    template = Path(trl.__file__).parent / "chat_templates" / "deepseek_r1_distill.jinja"
    _chat_tokenizer(tmp_path, specials, {"bos_token": specials[0], "eos_token": specials[1],
                                         "chat_template": template.read_text()})
    messages = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "<think>\n2+2 is 4.\n</think>\n\n4"}]
    cfg, prepared = _one_chat_prepared(tmp_path, messages)
    ids = prepared.train[0]["input_ids"].tolist()
    labels = prepared.train[0]["labels"].tolist()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    marked = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True,
                                    chat_template=get_training_chat_template(hf))
    prompt = hf.apply_chat_template(messages[:1], tokenize=True, return_dict=False,
                                    add_generation_prompt=True)
    counted = [j for j, label in enumerate(labels) if label != IGNORE_INDEX]
    assert ids[: counted[0] + 1] == list(prompt)
    assert [*ids[: counted[-1] + 1], labels[counted[-1]]] == marked["input_ids"]  # labels: next ids
    assert [labels[j] for j in counted] == marked["input_ids"][len(prompt):]
    assert all(marked["assistant_masks"][len(prompt):])
    plain = [messages[0], {"role": "assistant", "content": "4"}]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": plain}) + "\n")
    cfg = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(ValueError, match=r"chats\.jsonl:1.*generation prompt.*<think>"):
        dataset.prepare(cfg, load_tokenizer(tmp_path))


def _base_checkpoint(instruct, base: Path) -> Path:
    """The instruct checkpoint as a base model's: its tokenizer's and config's EOS
    <|endoftext|>, its ChatML template kept (ending a turn at <|im_end|>)."""
    import shutil

    shutil.copytree(instruct[0], base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config,
                                                            "eos_token": "<|endoftext|>"}))
    eos = load_tokenizer(base).eos_id
    for name in ("config.json", "generation_config.json"):  # a base model's: EOS alone
        values = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**values, "eos_token_id": eos}))
    return base


def test_a_chat_run_stops_at_the_end_of_turn_its_answers_were_trained_to_end_with(
        instruct, tmp_path):
    """A base checkpoint's tokenizer (eos <|endoftext|>) with ChatML's template: chat training
    ends each answer at <|im_end|>, so eval, the server and the run's sample stop there too
    (not at EOS alone: the text would run on into the next turn); a model not trained on
    conversations keeps its EOS ids alone, as transformers' generate."""
    from codelm import loading
    from codelm.evaluation import scoring
    from codelm.tokenization.chat import end_of_turn_ids

    base = _base_checkpoint(instruct, tmp_path / "base")
    tok = load_tokenizer(base)
    end = tok.token_to_id("<|im_end|>")
    assert end_of_turn_ids(tok) == [end] and tok.eos_id != end
    model = torch.nn.Linear(1, 1)
    model.cfg = type("Cfg", (), {"eos_id": None})()
    model.name_or_path = None
    chat = loading.LoadedModel("c", "runs/c", model, tok, run_config={"task": "chat"})
    plain = loading.LoadedModel("p", "runs/p", model, tok, run_config={"task": "completion"})
    assert scoring.stop_ids(chat) == [tok.eos_id, end]
    assert scoring.stop_ids(plain) == [tok.eos_id]
    import transformers

    import trainingmanager as tm

    _, data = instruct
    cfg = trainconfig.TrainConfig(task="chat", init_from=str(base), data=[str(data)],
                                  block_size=128, batch_size=8, max_steps=2, warmup_steps=0,
                                  eval_every=2, out_dir=str(tmp_path / "runs"), name="chat",
                                  progress=False, precision="fp32", sample_tokens=0,
                                  data_options={"split_by": "file", "min_bytes": 0,
                                                "min_lines": 0, "cache_dir": str(tmp_path / "c")})
    export = tm.train(cfg).run_dir / "export"  # transformers' generate stops there as well
    eos = transformers.GenerationConfig.from_pretrained(export).eos_token_id
    assert end in (eos if isinstance(eos, list) else [eos])
    lora = dataclasses.replace(cfg, name="lora", lora_r=4, export_merged=True)
    merged = tm.train(lora).run_dir / "export" / "merged"  # a LoRA run's merged model too
    eos = transformers.GenerationConfig.from_pretrained(merged).eos_token_id
    assert end in (eos if isinstance(eos, list) else [eos])
    from codelm.runtime import process

    assert process.manifest_problem(merged.parent) is None  # the manifest holds the rewrite


def test_lora_py_merges_a_chat_runs_adapter_to_stop_at_the_end_of_turn_as_its_export(
        instruct, tmp_path):
    """`python lora.py` merging the adapter a chat run exports writes the generation_config.json
    of the run's own export/merged: the template's end-of-turn token beside the base's EOS, as
    transformers reads it, so that generate and vLLM stop where the answers end. The run's
    config.json names its task: the adapter of a run of another task merges with the base's
    generation_config.json as it is."""
    import shutil

    import transformers

    import lora
    import trainingmanager as tm

    base = _base_checkpoint(instruct, tmp_path / "base")
    tok = load_tokenizer(base)
    end = tok.token_to_id("<|im_end|>")
    cfg = trainconfig.TrainConfig(task="chat", init_from=str(base), data=[str(instruct[1])],
                                  block_size=128, batch_size=8, max_steps=1, warmup_steps=0,
                                  out_dir=str(tmp_path / "runs"), name="chat", lora_r=4,
                                  export_merged=True, progress=False, precision="fp32",
                                  sample_tokens=0,
                                  data_options={"split_by": "file", "min_bytes": 0,
                                                "min_lines": 0, "cache_dir": str(tmp_path / "c")})
    run = tm.train(cfg).run_dir
    assert lora.main([str(run / "export"), str(tmp_path / "merged")]) == 0
    written = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    exported = json.loads((run / "export" / "merged" / "generation_config.json").read_text())
    assert written["eos_token_id"] == exported["eos_token_id"] == [tok.eos_id, end]
    read = transformers.GenerationConfig.from_pretrained(tmp_path / "merged")
    assert read.eos_token_id == [tok.eos_id, end]
    from codelm.runtime import process

    assert process.manifest_problem(tmp_path / "merged") is None  # the manifest holds the rewrite
    other = tmp_path / "runs" / "completion"
    shutil.copytree(run, other)
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "task": "completion"}))
    assert lora.main([str(other / "export"), str(tmp_path / "plain")]) == 0
    plain = (tmp_path / "plain" / "generation_config.json").read_bytes()
    assert plain == (base / "generation_config.json").read_bytes()


def test_an_export_without_a_generation_config_gets_the_models_ids_and_the_end_of_turn(
        instruct, tmp_path):
    """No generation_config.json beside the weights (a base without one, a tokenizer from
    elsewhere): the one written holds config.json's bos, eos and pad ids, as transformers
    derives them, and the end-of-turn token after the EOS."""
    import transformers

    from codelm.models.pretrained import stop_at_end_of_turn

    root, _ = instruct
    tok = load_tokenizer(root)
    end = tok.token_to_id("<|im_end|>")
    (tmp_path / "config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 3}))
    stop_at_end_of_turn(tok, tmp_path)
    written = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (written.bos_token_id, written.eos_token_id, written.pad_token_id) == (1, [0, end], 3)
