"""codelm.data.preferences: TRL's preference formats read from JSONL, parquet and a cached
Hugging Face dataset, tokenized as TRL 1.16's DPOTrainer and KTOTrainer tokenize them (their own
``_prepare_dataset``, called unbound on the same records with transformers' tokenizer of the
same files), and each bad record refused in one line naming its file and line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_hf import hub_cache, save_tiny_llama3_instruct

from codelm.data.config import DataConfig, DataError
from codelm.data.preferences import (
    check_record,
    encodable,
    encode_preferences,
    read_preferences,
    split_records,
    tokenized,
)
from codelm.data.sources import stdlib_files
from tokenizer import load_tokenizer

PLAIN = {"prompt": "def add(a, b):\n    return", "chosen": " a + b\n", "rejected": " a - b\n"}
CHAT = {"prompt": [{"role": "system", "content": "You write Python."},
                   {"role": "user", "content": "Write add."}],
        "chosen": [{"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
        "rejected": [{"role": "assistant", "content": "def add(a, b):\n    return a - b"}]}


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> Path:
    """A tiny Llama-3-Instruct-shaped checkpoint: its tokenizer reads <|eot_id|> as EOS and
    holds a chat template."""
    root = tmp_path_factory.mktemp("instruct")
    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::80]]
    save_tiny_llama3_instruct(root, texts)
    return root


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trl_tokenized(trainer, records: list[dict], root: Path) -> list[dict]:
    """TRL's own dataset preparation of ``records`` with transformers' tokenizer of ``root``."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(root)
    this = SimpleNamespace(_tokenizer=hf, calculate_KL=False, desirable_weight=1.0,
                           undesirable_weight=1.0)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start",
                           per_device_train_batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(trainer._prepare_dataset(this, Dataset.from_list(records), hf, args, "eval"))


TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "number"}}}}}]


@pytest.mark.parametrize("record", [PLAIN, CHAT, {**PLAIN, "chosen": " a + b<|eot_id|>"},
                                    {**PLAIN, "rejected": ""}, {**PLAIN, "rejected": "\n"}],
                         ids=["plain", "conversational", "ends-with-eos", "empty", "blank"])
def test_pairs_tokenize_as_trls_dpo_trainer(record, instruct):
    """Plain and conversational pairs, one ending in the EOS text and ones with an
    empty or blank rejected, give the prompt and completion ids TRL's DPOTrainer
    gives: training sees TRL's data."""
    from trl import DPOTrainer

    ours = tokenized(check_record(record, "x.jsonl:1", unpaired=False), load_tokenizer(instruct))
    theirs = _trl_tokenized(DPOTrainer, [record], instruct)[0]
    assert ours == (theirs["prompt_ids"], [theirs["chosen_ids"], theirs["rejected_ids"]])


@pytest.fixture(scope="module")
def instruct_with_tools(instruct, tmp_path_factory) -> Path:
    """The instruct checkpoint's tokenizer, its chat template listing the tools first."""
    import shutil

    root = tmp_path_factory.mktemp("instruct_tools")
    for file in instruct.iterdir():
        if file.is_file():
            shutil.copy(file, root / file.name)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if tools %}{% for tool in tools %}{{ tool | tojson }}\n"
                               "{% endfor %}{% endif %}" + config["chat_template"])
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


IMPLICIT = [{"chosen": "def add(a, b): return a + b", "rejected": "def add(a, b): return a - b"},
            {"chosen": [CHAT["prompt"][1], CHAT["chosen"][0]],
             "rejected": [CHAT["prompt"][1], CHAT["rejected"][0]]}]


@pytest.mark.parametrize("record", IMPLICIT, ids=["plain", "conversational"])
def test_a_pair_without_a_prompt_is_split_where_trl_splits_it(record, instruct):
    """TRL's implicit-prompt pairs: the prompt is where chosen and rejected first differ (a
    text's space left to the completions, a conversation's shared turns), as TRL's
    extract_prompt reads them, and the ids are DPOTrainer's."""
    from trl import DPOTrainer
    from trl.data_utils import extract_prompt

    from codelm.data.preferences import implicit_prompt

    assert implicit_prompt(record["chosen"], record["rejected"]) == extract_prompt(record)
    ours = tokenized(check_record(record, "x.jsonl:1", unpaired=False), load_tokenizer(instruct))
    theirs = _trl_tokenized(DPOTrainer, [record], instruct)[0]
    assert ours == (theirs["prompt_ids"], [theirs["chosen_ids"], theirs["rejected_ids"]])


def test_a_messages_other_keys_reach_its_template_as_in_trl(instruct, tmp_path):
    """A message is given to the chat template whole, as TRL gives it: its name, an assistant
    turn's tool_calls (its content null or empty) render as the template writes them."""
    import shutil

    from trl import DPOTrainer

    root = tmp_path / "named"
    shutil.copytree(instruct, root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}"
        "{% if m.name %} ({{ m.name }}){% endif %}: {{ m['content'] or '' }}"
        "{% for call in m.tool_calls or [] %}<call>{{ call.function.name }}</call>{% endfor %}"
        "<|eot_id|>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    record = {"prompt": [{"role": "user", "content": "Add.", "name": "bob"}],
              "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
              "rejected": [{"role": "assistant", "content": "I cannot."}]}
    ours = tokenized(check_record(record, "x.jsonl:1", unpaired=False), load_tokenizer(root))
    theirs = _trl_tokenized(DPOTrainer, [record], root)[0]
    assert ours == (theirs["prompt_ids"], [theirs["chosen_ids"], theirs["rejected_ids"]])


@pytest.mark.parametrize("tools", [TOOLS, json.dumps(TOOLS)], ids=["list", "json-text"])
def test_a_conversations_tools_reach_its_template_as_in_trl(tools, instruct_with_tools):
    """TRL's tools field (a list, or its JSON text) is rendered by the chat template into the
    prompt, as TRL's DPOTrainer renders it."""
    from trl import DPOTrainer

    record = {**CHAT, "tools": tools}
    tok = load_tokenizer(instruct_with_tools)
    ours = tokenized(check_record(record, "x.jsonl:1", unpaired=False), tok)
    theirs = _trl_tokenized(DPOTrainer, [record], instruct_with_tools)[0]
    assert ours == (theirs["prompt_ids"], [theirs["chosen_ids"], theirs["rejected_ids"]])
    plain = tokenized(check_record(CHAT, "x.jsonl:1", unpaired=False), tok)
    assert len(ours[0]) > len(plain[0])


@pytest.mark.parametrize("records", [[{"prompt": PLAIN["prompt"], "completion": " a * b\n",
                                       "label": False}],
                                     [{"prompt": CHAT["prompt"], "completion": CHAT["chosen"],
                                       "label": True}],
                                     [PLAIN]], ids=["plain", "conversational", "pair"])
def test_labelled_completions_tokenize_as_trls_kto_trainer(records, instruct, tmp_path):
    """A pair read for kto is its two completions, desirable then not (TRL's
    unpair_preference_dataset)."""
    from trl import KTOTrainer

    path = _write_jsonl(tmp_path / "kto.jsonl", records)
    read = read_preferences([str(path)], True, DataConfig(progress=False))
    ours, _ = encode_preferences(read, load_tokenizer(instruct), block_size=512)
    theirs = _trl_tokenized(KTOTrainer, records, instruct)
    assert [(p.prompt, p.completions[0], p.label) for p in ours] == [
        (t["prompt_ids"], t["completion_ids"], t["label"]) for t in theirs]


def test_parquet_and_a_cached_dataset_id_read_as_jsonl(tmp_path, offline_hub):
    """The same pairs read from JSONL, from parquet and from a dataset id in the offline hub cache
    are the same records: a source's format does not change the data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{**PLAIN, "chosen": f" a + b + {i}\n"} for i in range(5)]
    jsonl = _write_jsonl(tmp_path / "pairs.jsonl", records)
    table = tmp_path / "data"
    table.mkdir()
    pq.write_table(pa.Table.from_pylist(records), table / "train-00000.parquet")
    hub_cache(offline_hub, "someone/pairs", table, repo_type="dataset")
    cfg = DataConfig(progress=False)
    read = [[(r.prompt, r.completions) for r in read_preferences([source], False, cfg)]
            for source in (str(jsonl), str(table / "train-00000.parquet"), "someone/pairs")]
    assert read[0] == read[1] == read[2] and len(read[0]) == 5


def test_a_cached_dataset_id_reads_its_train_split_not_train_prefs_or_train_sft(
        tmp_path, offline_hub):
    """UltraFeedback-binarized's layout: train_prefs, train_sft and test_prefs are splits of
    their own, so a dataset with a split named train reads that one; one without (only
    train_prefs, train_sft) is refused naming its files, not read as their union."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, splits in (("with/train", ("train", "train_prefs", "test_prefs")),
                         ("without/train", ("train_prefs", "train_sft"))):
        table = tmp_path / name
        (table / "data").mkdir(parents=True)
        for split in splits:
            pq.write_table(pa.Table.from_pylist([{**PLAIN, "prompt": f"{split} p"}]),
                           table / "data" / f"{split}-00000-of-00001.parquet")
        hub_cache(offline_hub, name, table, repo_type="dataset")
    cfg = DataConfig(progress=False)
    read = read_preferences(["with/train"], False, cfg)
    assert [r.prompt for r in read] == ["train p"]
    with pytest.raises(DataError, match="no split named train .*train_prefs"):
        read_preferences(["without/train"], False, cfg)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, "no 'rejected' field"),
    ({"chosen": "a"}, "no 'rejected' field"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user",
                                                                  "content": "b"}]},
     "'prompt' must be a string or a non-empty list"),  # no message shared: no prompt
    ({"chosen": 3, "rejected": "b"}, "no 'prompt' field"),
    ({"prompt": "p", "choosen": "a", "rejected": "b"},
     "no 'chosen' field (its fields: prompt, choosen, rejected;"),  # a misspelt key, shown
    ({**PLAIN, "chosen": None}, "'chosen' is null"),
    ({**PLAIN, "rejected": PLAIN["chosen"]}, "'chosen' and 'rejected' are the same"),
    ({**PLAIN, "chosen": 3}, "'chosen' must be a string or a non-empty list"),
    ({**PLAIN, "chosen": CHAT["chosen"]}, "'chosen' and 'prompt' must both be text"),
    ({"prompt": "p", "completion": "c", "label": True}, "a labelled completion (prompt, "
                                                        "completion, label): --task kto"),
])
def test_a_bad_pair_is_refused_in_one_line_naming_file_and_line(record, message, tmp_path):
    """Each kind of bad pair (a field missing, null or of the wrong type, chosen equal
    to rejected, a labelled completion where pairs are read) is one line opening
    with file:line, naming the fault and the data option that skips such records (not for a
    labelled completion: its file is --task kto's, which skipping would empty); a missing
    field's line lists the fields the record has, so that a misspelt key shows."""
    path = _write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, record])
    with pytest.raises(DataError) as caught:
        read_preferences([str(path)], False, DataConfig(progress=False))
    assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value)
    skip_bad = '--data-options \'{"skip_bad": true}\''
    assert "\n" not in str(caught.value)
    assert (skip_bad in str(caught.value)) == ("labelled" not in message)  # a kto file: no hint


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "completion": "c"}, "no 'label' field"),
    ({"prompt": "p", "completion": "c", "label": 1}, "'label' must be true"),
])
def test_a_bad_labelled_completion_is_refused_naming_its_line(record, message, tmp_path):
    """A labelled completion without a label, or with one that is not a boolean, is refused
    naming its file:line and the field."""
    path = _write_jsonl(tmp_path / "kto.jsonl", [record])
    with pytest.raises(DataError, match=rf"^{path}:1: .*{message}"):
        read_preferences([str(path)], True, DataConfig(progress=False))


def test_skip_bad_drops_the_records_encoding_refuses_too(instruct, tmp_path):
    """A pair whose two are the same once cut to the block is refused by name, or with
    skip_bad dropped and counted like a bad record."""
    same_start = {**PLAIN, "chosen": " a + b + 1 + 2 + 3\n", "rejected": " a + b + 1 + 2 - 3\n"}
    path = _write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, same_start])
    tok = load_tokenizer(instruct)
    read = read_preferences([str(path)], False, DataConfig(progress=False))
    prompt = len(tokenized(read[0], tok)[0])
    with pytest.raises(DataError, match=rf"^{path}:2: 'chosen' and 'rejected' are the same"):
        encode_preferences(read, tok, block_size=prompt + 3)
    kept, dropped = encodable(read, tok, block_size=prompt + 3)
    assert kept == read[:1] and dropped == 1


def test_skip_bad_drops_bad_records_and_max_docs_keeps_the_first(tmp_path, capsys):
    """skip_bad drops a bad record, the others keeping their own line numbers, and says how many
    went; max_docs keeps the first records read."""
    path = _write_jsonl(tmp_path / "pairs.jsonl", [PLAIN, {"prompt": "p"}, PLAIN, PLAIN])
    read = read_preferences([str(path)], False, DataConfig(skip_bad=True, progress=False))
    assert [r.where for r in read] == [f"{path}:{n}" for n in (1, 3, 4)]
    assert "1 bad preference record(s) skipped" in capsys.readouterr().err
    assert len(read_preferences([str(path)], False, DataConfig(skip_bad=True, max_docs=2))) == 2


def test_a_prompt_that_fills_the_block_is_refused_and_long_completions_cut(instruct, tmp_path):
    """A prompt of block_size tokens is refused naming its line, its length and
    --block-size; with room left, completions are cut to fit and counted, and a cut leaving
    chosen equal to rejected is refused."""
    tok = load_tokenizer(instruct)
    long = check_record({**PLAIN, "prompt": "x = 1\n" * 40}, f"{tmp_path}/p.jsonl:7", False)
    n = len(tokenized(long, tok)[0])
    with pytest.raises(DataError) as caught:
        encode_preferences([long], tok, block_size=n)
    assert str(caught.value).startswith(f"{tmp_path}/p.jsonl:7: the prompt is {n} tokens")
    assert "raise --block-size" in str(caught.value)
    (kept,), events = encode_preferences([long], tok, block_size=n + 2)
    assert [len(c) for c in kept.completions] == [2, 2] and events["completion_truncated"] == 2
    with pytest.raises(DataError, match="'chosen' and 'rejected' are the same in the 1 tokens"):
        encode_preferences([long], tok, block_size=n + 1)


def test_a_completion_of_exactly_the_room_left_is_kept_whole_and_not_counted_cut(instruct):
    """A completion of as many tokens as the block leaves after the prompt fits: it is kept
    whole and not counted in completion_truncated; one token less of room cuts it."""
    tok = load_tokenizer(instruct)
    record = check_record(PLAIN, "x.jsonl:1", False)
    prompt, completions = tokenized(record, tok)
    longest = max(len(ids) for ids in completions)
    (kept,), events = encode_preferences([record], tok, block_size=len(prompt) + longest)
    assert list(kept.completions) == completions and events["completion_truncated"] == 0
    _, events = encode_preferences([record], tok, block_size=len(prompt) + longest - 1)
    assert events["completion_truncated"] >= 1


def test_a_prompt_token_merging_with_one_completion_is_left_to_both_as_trl_leaves_it(instruct):
    """A prompt ending in a space that merges with the chosen completion's first word but not
    with the rejected one's: the prompt's ids end where every completion's whole ids still
    agree with them, and the prompt and completion ids are DPOTrainer's."""
    from trl import DPOTrainer

    record = {"prompt": PLAIN["prompt"] + " ", "chosen": "a + b\n", "rejected": "\n"}
    tok = load_tokenizer(instruct)
    prompt, (chosen, rejected) = tokenized(check_record(record, "x.jsonl:1", False), tok)
    assert len(prompt) == len([*tok.template_prefix, *tok.encode(record["prompt"])]) - 1
    theirs = _trl_tokenized(DPOTrainer, [record], instruct)[0]
    assert (prompt, [chosen, rejected]) == (theirs["prompt_ids"],
                                            [theirs["chosen_ids"], theirs["rejected_ids"]])


def test_conversations_need_a_chat_template_and_a_user_turn_last(instruct):
    """A conversational prompt ending with an assistant turn is refused naming its
    line, and so is a conversation when the tokenizer has no chat template: the
    prompt must end where a reply starts."""
    tok = load_tokenizer(instruct)
    ends_with_assistant = check_record({**CHAT, "prompt": CHAT["prompt"] + CHAT["chosen"]},
                                       "c.jsonl:3", False)
    with pytest.raises(DataError, match="^c.jsonl:3: the prompt ends with a message of role 'assistant'"):
        tokenized(ends_with_assistant, tok)
    tok.chat_template = None
    with pytest.raises(DataError, match="^c.jsonl:3: conversational records need"):
        tokenized(ends_with_assistant, tok)


def test_the_validation_split_is_seeded_and_holds_out_whole_prompts(tmp_path):
    """Twenty prompts with two pairs each (as --preference-pairs writes several pairs of one
    problem), read unpaired (80 halves): a tenth of the prompts is held out with all of their
    records, so no validation prompt is trained on."""
    rows = [{**PLAIN, "prompt": f"def f{i}():\n", "chosen": f" {i}{j}\n"}
            for i in range(20) for j in range(2)]
    records = read_preferences([str(_write_jsonl(tmp_path / "pairs.jsonl", rows))], True,
                               DataConfig(progress=False))
    train, val = split_records(records, 0.1, seed=3)
    assert len(val) == 8 and len(train) == 72
    assert {r.prompt for r in train}.isdisjoint(r.prompt for r in val)
    assert split_records(records, 0.1, seed=3) == (train, val)
    with pytest.raises(DataError, match="too few to hold out a validation split"):
        split_records(records[:4], 0.1, seed=3)
    with pytest.raises(DataError, match="val_frac 0.8 of 2 distinct prompts .* every one"):
        split_records(records[:8], 0.8, seed=3)


def test_eval_writes_pairs_of_samples_the_sandbox_checked(tmp_path, capsys):
    """`eval.py --preference-pairs` on scored samples of the bundled problems (a generations
    file: the sandbox runs each with its test): a problem with passing and failing samples gives
    pairs (distinct programs, passing over failing, the verdicts with them), one that always
    passes or always fails gives none and is counted; an exploit's program (run whole, as a
    loaded generation is) fails; each pair is the prompt's completions; the files read back as
    preference data, and another evaluation does not write over them."""
    import eval as ev
    from codelm.evaluation.tasks import passk
    from codelm.training import rewards

    problems = passk.load_problems()[:3]
    right = [p["prompt"] + p["canonical_solution"] for p in problems]
    wrong = [p["prompt"] + "    return None\n" for p in problems]
    cheat = problems[0]["prompt"] + rewards.exploit_completion(
        problems[0], rewards.exploits()["equal_to_everything"])
    generations = [[right[0], right[0] + "\n", wrong[0], cheat],  # 2 pairs
                   [right[1]] * 4,  # all pass
                   [wrong[2], wrong[2] + "\n", wrong[2], wrong[2]]]  # all fail
    file = tmp_path / "generations.json"
    file.write_text(json.dumps(generations))
    out = tmp_path / "pairs" / "out.jsonl"
    assert ev.main(["--tasks", "passk", "--limit", "3", "--load-generations", str(file),
                    "--num-samples", "4", "--out-dir", str(tmp_path / "eval"), "--no-progress",
                    "--preference-pairs", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"preference pairs: 2 pairs from 1 of 3 problems in {out}" in said, said
    assert "1 whose samples all passed" in said and "1 whose samples all failed" in said, said
    assert f"7 labelled completions (kto) in {tmp_path / 'pairs' / 'out.kto.jsonl'}" in said, said
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    prompt = problems[0]["prompt"]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (prompt, right[0][len(prompt):], wrong[0][len(prompt):]),
        (prompt, (right[0] + "\n")[len(prompt):], cheat[len(prompt):])]
    assert {(p["task_id"], p["task"], p["chosen_status"], p["rejected_status"])
            for p in pairs} == {(problems[0]["task_id"], "passk", "passed", "failed")}
    labelled = [json.loads(line) for line in (tmp_path / "pairs" / "out.kto.jsonl").read_text()
                .splitlines()]
    assert [r["label"] for r in labelled] == [True, True, False, False, True, False, False]
    cfg = DataConfig(progress=False)
    assert len(read_preferences([str(out)], False, cfg)) == 2
    assert len(read_preferences([str(tmp_path / "pairs" / "out.kto.jsonl")], True, cfg)) == 7
    # another evaluation never writes over these pairs: refused before it samples
    written = out.read_text()
    assert ev.main(["--tasks", "passk", "--limit", "1", "--load-generations", str(file),
                    "--num-samples", "4", "--out-dir", str(tmp_path / "again"), "--no-progress",
                    "--preference-pairs", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds another evaluation's preference data" in err and "name a new file" in err
    assert out.read_text() == written
    from codelm.evaluation.config import EvalConfig

    ev._refuse_others_pairs(EvalConfig(preference_pairs=str(out)), tmp_path / "eval")  # its own
    other = tmp_path / "other"  # results naming other pairs: continuing them is refused too
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"config": {"preference_pairs": "x.jsonl"}}))
    with pytest.raises(ValueError, match="holds another evaluation's preference data"):
        ev._refuse_others_pairs(EvalConfig(preference_pairs=str(out)), other)


def test_a_problem_whose_test_ran_in_the_candidates_interpreter_gives_no_data():
    """Where a problem's test could only run in the candidate's interpreter, a passing program
    may have gamed it: its samples give no pair and no labelled completion, and are counted."""
    from codelm.evaluation.preference_pairs import preference_data

    def record(task_id: str, prediction: str, status: str, trusted: bool) -> dict:
        return {"model": "m", "task": "passk", "id": task_id, "prompt": "def f():\n",
                "prediction": prediction, "status": status, "trusted": trusted}

    records = [record("p/0", "hack", "passed", False), record("p/0", "honest", "failed", False),
               record("p/1", "right", "passed", True), record("p/1", "wrong", "failed", True)]
    data = preference_data(records, ["passk"])
    assert [(p["task_id"], p["chosen"], p["rejected"]) for p in data.pairs] == [
        ("p/1", "right", "wrong")]
    assert {r["task_id"] for r in data.labelled} == {"p/1"}
    assert data.counts["untrusted"] == 1 and data.counts["paired"] == 1


def _sample(prediction: str, status: str) -> dict:
    """A pass@k prediction record of problem p/0, as eval.py writes one."""
    return {"model": "m", "task": "passk", "id": "p/0", "prompt": "def f():\n",
            "prediction": prediction, "status": status, "trusted": True}


def test_a_program_sampled_twice_is_passed_where_any_of_its_runs_passed():
    """The same program sampled twice, passing once and timing out once (a busy machine): it is
    a passing program, paired with the failing one, and labelled once; an empty sample is a
    failing program like any other."""
    from codelm.evaluation.preference_pairs import preference_data

    records = [_sample("right", "passed"), _sample("", "failed"), _sample("right", "timeout")]
    data = preference_data(records, ["passk"])
    assert [(p["chosen"], p["rejected"]) for p in data.pairs] == [("right", "")]
    assert [(r["completion"], r["label"]) for r in data.labelled] == [("right", True),
                                                                      ("", False)]


def test_a_definite_failure_is_rejected_before_a_program_that_timed_out():
    """A timeout may be a slow machine's, not the program's: a pair's rejected program is a
    failed one where the problem has one, before one that ran out of time."""
    from codelm.evaluation.preference_pairs import labelled_path, preference_data

    records = [_sample("slow", "timeout"), _sample("wrong", "failed"), _sample("right", "passed")]
    data = preference_data(records, ["passk"])
    assert [(p["chosen"], p["rejected"]) for p in data.pairs] == [("right", "wrong")]
    assert labelled_path(Path("out/pairs.jsonl")) == Path("out/pairs.kto.jsonl")


def test_the_summary_counts_each_models_samples_of_a_problem(tmp_path):
    """Two models' samples of two problems are four sets of samples, each paired apart: the
    summary says so, not four problems."""
    from codelm.evaluation.preference_pairs import write_preference_data

    records = []
    for model in ("a", "b"):
        for task_id in ("p/0", "p/1"):
            for prediction, status in (("right", "passed"), ("wrong", "failed")):
                records.append({**_sample(prediction, status), "model": model, "id": task_id})
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    said = write_preference_data(tmp_path / "pairs.jsonl", tmp_path, ["passk"])
    assert said.startswith("preference pairs: 4 pairs from 4 of 4 problems"), said
    assert "(2 problems x 2 models)" in said, said
    one_model = [r for r in records if r["model"] == "a"]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one_model))
    said = write_preference_data(tmp_path / "pairs.jsonl", tmp_path, ["passk"])
    assert said.startswith("preference pairs: 2 pairs from 2 of 2 problems in"), said


def test_pairs_of_samples_holding_a_lone_surrogate_are_written_and_read_back(tmp_path):
    """predictions.jsonl carries a loaded sample's lone surrogate as its JSON escape: the pairs
    and labelled files carry it so too, and read back to the same text."""
    from codelm.evaluation.preference_pairs import labelled_path, write_preference_data

    records = [_sample("right", "passed"), _sample("wrong\ud800", "failed")]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_preference_data(tmp_path / "pairs.jsonl", tmp_path, ["passk"])
    pairs = (tmp_path / "pairs.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line)["rejected"] for line in pairs] == ["wrong\ud800"]
    labelled = labelled_path(tmp_path / "pairs.jsonl").read_text("utf-8").splitlines()
    assert {json.loads(line)["completion"] for line in labelled} == {"right", "wrong\ud800"}


def test_samples_that_all_fail_give_no_pair_and_say_what_gives_some(tmp_path, capsys):
    """A weak model's samples all fail: no pair is written, and the summary says what makes
    pairs; DPO on that empty file says where its records come from."""
    import eval as ev
    from codelm.evaluation.tasks import passk

    problems = passk.load_problems()[:2]
    file = tmp_path / "generations.json"
    file.write_text(json.dumps([[p["prompt"] + "    return None\n"] * 2 for p in problems]))
    out = tmp_path / "pairs.jsonl"
    assert ev.main(["--tasks", "passk", "--limit", "2", "--load-generations", str(file),
                    "--num-samples", "2", "--out-dir", str(tmp_path / "eval"), "--no-progress",
                    "--preference-pairs", str(out)]) == 0
    said = capsys.readouterr().out
    assert "preference pairs: 0 pairs" in said and "more --num-samples" in said
    with pytest.raises(DataError, match=r"no preference records \(.*--preference-pairs"):
        read_preferences([str(out)], False, DataConfig())


def test_preference_pairs_need_a_pass_at_k_task_sampled_twice():
    """--preference-pairs is refused for a name not ending in .jsonl, without a pass@k task, or
    with one sample a problem."""
    from codelm.evaluation.config import parse_config

    with pytest.raises(ValueError, match="written as JSONL: name a file ending in .jsonl"):
        parse_config(["--tasks", "passk", "--num-samples", "2", "--temperature", "0.8",
                      "--preference-pairs", "p.jsonl.gz"])

    with pytest.raises(ValueError, match=r"^preference_pairs \('p.jsonl', --preference-pairs\): "
                                         "pairs a pass@k task's samples"):
        parse_config(["--tasks", "lm", "--preference-pairs", "p.jsonl"])
    with pytest.raises(ValueError, match=r"set num_samples \(1, --num-samples\) to 2 or more"):
        parse_config(["--tasks", "passk", "--preference-pairs", "p.jsonl"])
