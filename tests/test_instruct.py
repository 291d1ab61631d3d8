"""Instruct models on pass@k benchmarks (``eval.py --chat``) are prompted and read as EvalPlus
prompts and reads them: the chat prompt is its ``make_raw_chat_prompt``'s text, an answer's
program is what its ``sanitize`` keeps (both as EvalPlus 0.3.1 outputs them, recorded in
evalplus_reference.json by evalplus_reference.py), and generation continues that prompt as
transformers' ``generate`` does."""

from __future__ import annotations

import gzip
import json

import pytest
from evalplus_reference import (
    CHAT_PROBLEMS,
    HAND_WRITTEN,
    REFERENCE_FILE,
    TEMPLATE_TOKENS,
    TEMPLATES,
    answers,
    digest,
    humaneval_problems,
)

import eval as ev
from codelm.evaluation import instruct, scoring
from codelm.evaluation.config import parse_config


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE_FILE.read_text())


def test_the_prompt_prefixes_and_stops_are_evalplus_defaults(reference):
    """The instruction and response prefixes are EvalPlus 0.3.1's own (the version the reference
    records), and a chat answer stops where its code block closes, so scores compare with
    EvalPlus's."""
    from evalplus_reference import INSTRUCTION_PREFIX, RESPONSE_PREFIX

    assert reference["evalplus"] == "0.3.1"
    assert instruct.INSTRUCTION_PREFIX == INSTRUCTION_PREFIX
    assert instruct.RESPONSE_PREFIX == RESPONSE_PREFIX
    assert instruct.CHAT_STOPS[-1] == "\n```\n"  # its stops for a chat prompt: the block's end


def test_sanitize_keeps_what_evalplus_keeps_of_every_answer(reference):
    """On every answer of the corpus (each HumanEval program written six ways an instruct model
    writes it, and the hand-written rules), the program and the code block equal EvalPlus's."""
    cases = answers(humaneval_problems())
    assert len(cases) == reference["cases"]
    for (answer, entry), want, block in zip(cases, reference["sanitize_sha256"],
                                            reference["code_extract_sha256"], strict=True):
        assert digest(instruct.code_block(answer)) == block, answer
        assert digest(instruct.sanitize(answer, entry)) == want, answer
    for (answer, entry), want in zip(HAND_WRITTEN, reference["hand_written_sanitized"]):
        assert instruct.sanitize(answer, entry) == want


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory) -> dict:
    """name -> codelm's tokenizer of a Llama-3 tokenizer.json with each chat template."""
    from tiny_hf import train_hf_tokenizer

    from codelm.data.sources import stdlib_files
    from tokenizer import load_tokenizer

    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::60]]
    out = {}
    for name, template in TEMPLATES.items():
        directory = tmp_path_factory.mktemp(name)
        hf = train_hf_tokenizer("llama3", texts, directory / "tokenizer.json")
        hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        hf.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {**TEMPLATE_TOKENS[name], "chat_template": template,
             "tokenizer_class": "PreTrainedTokenizerFast"}))
        out[name] = load_tokenizer(directory)
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_chat_prompt_is_evalplus_make_raw_chat_prompt(chat_tokenizers, reference, name):
    """With each chat template, a problem's prompt is the text EvalPlus's make_raw_chat_prompt
    rendered for it (in evalplus_reference.json): the model sees what EvalPlus shows it."""
    problems = {p["task_id"]: p for p in humaneval_problems()}
    for task_id in CHAT_PROBLEMS:
        assert instruct.chat_prompt(chat_tokenizers[name], problems[task_id]["prompt"]) == (
            reference["chat_prompts"][name][task_id])


def _answer(problem: dict) -> str:
    """A problem's canonical program as an instruct model answers: prose, a fenced block, a
    usage line and a closing remark."""
    program = problem["prompt"] + problem["canonical_solution"]
    return (f"Here is the script:\n```python\n{program}\n\nprint({problem['entry_point']}"
            "([1]))\n```\nIt runs in linear time.")


def test_chat_answers_run_alone_as_evalplus_runs_them(tmp_path, monkeypatch):
    """A chat answer scores by its sanitized program, run alone (no prompt before it): a
    canonical program in a chatty answer passes; the same answers read as completions of the
    prompt fail. The samples file is EvalPlus's (each program its solution)."""
    from codelm.evaluation.tasks.humaneval import humaneval_file

    with gzip.open(humaneval_file(), "rt") as lines:
        problems = [json.loads(line) for line in lines][:3]
    by_prompt = {}

    def answered(lm, prompts, cfg, stops, desc="", chat=False, **kwargs):
        assert chat and stops == instruct.CHAT_STOPS
        return [by_prompt[prompt] for prompt in prompts]

    monkeypatch.setattr(scoring, "generate_texts", answered)
    monkeypatch.setattr(instruct, "chat_prompt", lambda tok, prompt: prompt)
    by_prompt.update({p["prompt"]: _answer(p) for p in problems})
    out = tmp_path / "out"
    assert ev.main(["--models", str(_instruct_model(tmp_path)), "--tasks", "humaneval",
                    "--limit", "3", "--chat", "--out-dir", str(out), "--no-progress",
                    "--workers", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["rows"][0]["metrics"] == {"humaneval/pass@1": 100.0}
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == [_answer(p) for p in problems]
    assert [r["solution"] for r in records] == [instruct.sanitize(_answer(p), p["entry_point"])
                                                for p in problems]
    [samples] = out.glob("samples-*.jsonl")
    assert {"task_id", "solution", "passed"} <= set(json.loads(samples.read_text().split("\n")[0]))
    assert not list(out.glob("generations-*.json"))
    answers_as_completions = [{"task_id": p["task_id"], "completion": _answer(p)} for p in problems]
    from codelm.evaluation.tasks import passk

    for sample in answers_as_completions:
        problem = next(p for p in problems if p["task_id"] == sample["task_id"])
        assert not passk.run_check(problem, sample["completion"]).passed


def _instruct_model(tmp_path):
    """A tiny Llama-3-Instruct-shaped checkpoint (the real generation_config's eos list), with
    room for a chat prompt, whose weights are large enough that its greedy text is not one
    token repeated."""
    import torch
    from tiny_hf import save_tiny_llama3_instruct

    from codelm.data.sources import stdlib_files

    directory = tmp_path / "instruct"
    if not directory.exists():
        texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::60]]
        model, _, _ = save_tiny_llama3_instruct(directory, texts, max_position_embeddings=1024)
        torch.manual_seed(0)
        with torch.no_grad():
            for weight in model.parameters():
                if weight.dim() == 2:
                    weight.normal_(0, 0.3)
        model.save_pretrained(directory)
    return directory


def test_chat_generation_continues_the_prompt_as_transformers_generate(tmp_path):
    """--chat's greedy answer is transformers' greedy generate of the chat prompt's ids (the
    template's tokens, one BOS: transformers' apply_chat_template(tokenize=True)), stopped at
    the generation config's EOS list, decoded without special tokens (the model is made to
    write its BOS first) and cut at EvalPlus's stops."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codelm.evaluation.tasks.humaneval import humaneval_file
    from codelm.models.generation import truncate_at_stops

    directory = _instruct_model(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with gzip.open(humaneval_file(), "rt") as lines:
        problems = [json.loads(line) for line in lines][:2]
    first = hf_tok(instruct.chat_prompt(_codelm_tokenizer(directory), problems[0]["prompt"]),
                   add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():  # its BOS row twice its first answer token's: BOS comes first
        head = model.lm_head.weight
        head[hf_tok.bos_token_id] = 2 * head[int(model(first).logits[0, -1].argmax())]
    model.save_pretrained(directory)
    out = tmp_path / "out"
    assert ev.main(["--models", str(directory), "--tasks", "humaneval", "--limit", "2", "--chat",
                    "--max-new-tokens", "24", "--out-dir", str(out), "--no-progress",
                    "--workers", "1"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for problem, record in zip(problems, records, strict=True):
        question = (f"{instruct.INSTRUCTION_PREFIX}\n```\n{problem['prompt'].strip()}\n```\n")
        rendered = hf_tok.apply_chat_template(
            [{"role": "user", "content": question},
             {"role": "assistant", "content": f"{instruct.RESPONSE_PREFIX}\n```python\nX"}],
            tokenize=False)
        assert record["prompt"] == rendered[: rendered.index("```python\n") + 10]
        ids = hf_tok(record["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        assert ids[0].tolist().count(hf_tok.bos_token_id) == 1
        generated = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
        if problem is problems[0]:
            assert int(generated[0]) == hf_tok.bos_token_id
        text = hf_tok.decode(generated, skip_special_tokens=True)
        assert record["prediction"] == truncate_at_stops(text, instruct.CHAT_STOPS)
        assert len(set(record["prediction"])) > 5  # a text, not one token repeated
        assert record["solution"] == instruct.sanitize(record["prediction"],
                                                       problem["entry_point"])


def _codelm_tokenizer(directory):
    from tokenizer import load_tokenizer

    return load_tokenizer(directory)


@pytest.mark.parametrize("flags, words", [
    (["--tasks", "line"], ("chat", "pass@k")),
    (["--tasks", "humaneval", "--prompt", "def f"], ("chat", "prompt")),
    (["--tasks", "humaneval", "--serve"], ("chat", "serve")),
])
def test_chat_is_refused_where_it_does_not_apply(flags, words):
    """--chat with a task that is no pass@k task, a --prompt or --serve is refused at validation,
    the message naming --chat and the setting it clashes with, before any model loads."""
    with pytest.raises(ValueError) as err:
        parse_config(["--chat", *flags]).validate()
    assert all(word in str(err.value) for word in words)


def test_chat_refuses_a_model_without_a_chat_template(tmp_path):
    """--chat on a base model (its tokenizer has no chat template) is an error naming the chat
    template, not prompts rendered without the turns the model would expect."""
    from tiny_hf import save_tiny_hf

    from tokenizer import CodeTokenizer

    base = tmp_path / "base"
    tok = CodeTokenizer.train(["def f():\n    return 1\n"] * 4, min_freq=1)
    save_tiny_hf("llama", base, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id)
    tok.save(base)
    with pytest.raises(ValueError, match="chat template"):
        ev.evaluate(parse_config(["--models", str(base), "--tasks", "humaneval", "--limit", "1",
                                  "--chat", "--out-dir", str(tmp_path / "out"),
                                  "--no-progress"]))


def test_an_mbpp_answer_keeps_what_the_tested_function_reaches():
    """MBPP's problems name no entry point: an answer's program keeps what the function its
    test calls reaches (EvalPlus's MBPP+ entry point), not what a class the test also builds
    reaches."""
    from codelm.evaluation.tasks import mbpp, passk

    code = ("class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n"
            "def dist(p):\n    return (p.x ** 2 + p.y ** 2) ** 0.5\n")
    record = {"task_id": 11, "text": "Write a function for a point's distance from 0.",
              "code": code, "test_list": ["assert dist(Point(3, 4)) == 5"]}
    problem = mbpp.PASSK.read(record, "mbpp.jsonl:1")
    assert problem["functions"] == ["Point", "dist"]
    answer = f"Here it is:\n```python\n{code}\ndef unused():\n    return 1\n```\n"
    [chat] = passk.chat_problems([problem], ["(the chat prompt)"], ["(its question)"], "")
    cfg = parse_config(["--tasks", "mbpp", "--chat", "--workers", "1", "--no-progress",
                        "--timeout-s", "10"])
    _, [record] = passk.score_passk("m", mbpp.PASSK, [chat], [[answer]], cfg)
    assert record["solution"] == instruct.sanitize(answer, "dist")
    assert "def dist" in record["solution"] and "unused" not in record["solution"]


def test_chat_samples_become_conversational_preference_pairs(tmp_path, monkeypatch):
    """--chat --preference-pairs writes each pair as a conversation (TRL's conversational
    format): the user's question, the assistant's answer as the model wrote it after the text
    that opened it; the pairs read back as preference data and tokenize as TRL's DPOTrainer
    tokenizes them."""
    from test_preference_data import _trl_tokenized
    from trl import DPOTrainer

    from codelm.data.config import DataConfig
    from codelm.data.preferences import check_record, read_preferences, tokenized
    from codelm.evaluation.tasks.humaneval import humaneval_file
    from tokenizer import load_tokenizer

    with gzip.open(humaneval_file(), "rt") as lines:
        problems = [json.loads(line) for line in lines][:2]
    right = [p["prompt"] + p["canonical_solution"] + "```\n" for p in problems]
    wrong = [p["prompt"] + "    return None\n" for p in problems]

    def answered(lm, prompts, cfg, stops, desc="", chat=False, **kwargs):
        return [right[0], wrong[0], right[1], wrong[1]]

    monkeypatch.setattr(scoring, "generate_texts", answered)
    directory = _instruct_model(tmp_path)
    out = tmp_path / "pairs.jsonl"
    assert ev.main(["--models", str(directory), "--tasks", "humaneval", "--limit", "2", "--chat",
                    "--num-samples", "2", "--temperature", "0.8", "--out-dir",
                    str(tmp_path / "eval"), "--no-progress", "--workers", "1",
                    "--preference-pairs", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    opening = ("Below is a Python script with a self-contained function that solves the problem "
               "and passes corresponding tests:\n```python\n")
    assert [pair["prompt"] for pair in pairs] == [
        [{"role": "user", "content": "Please provide a self-contained Python script that solves "
          f"the following problem in a markdown code block:\n```\n{p['prompt'].strip()}\n```\n"}]
        for p in problems]
    assert [pair["chosen"] for pair in pairs] == [
        [{"role": "assistant", "content": opening + answer}] for answer in right]
    assert [pair["rejected"][0]["content"] for pair in pairs] == [opening + w for w in wrong]
    assert len(read_preferences([str(out)], False, DataConfig(progress=False))) == 2
    tok = load_tokenizer(directory)
    trl_fields = ("prompt", "chosen", "rejected")
    for pair in pairs:
        record = {key: pair[key] for key in trl_fields}
        ours = tokenized(check_record(record, "pairs.jsonl:1", unpaired=False), tok)
        theirs = _trl_tokenized(DPOTrainer, [record], directory)[0]
        assert ours == (theirs["prompt_ids"], [theirs["chosen_ids"], theirs["rejected_ids"]])
