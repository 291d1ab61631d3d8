"""Preference data from execution: an evaluation's pass@k samples, each scored by its problem's
test in the sandbox (the test apart from the candidate, so a program that games it earns no
pass), written as training data for the preference tasks (``trainingmanager.py --task dpo``):
chosen/rejected pairs, a passing program over a failing one of the same prompt, each with its
verdicts; and KTO's labelled completions (every distinct sample, desirable where it passed).
A problem whose samples all pass or all fail gives no pair, and is counted; so does one whose
test ran in the candidate's interpreter (a program there can game it), which gives no data."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from codelm.runtime import process


class PreferenceData(NamedTuple):
    pairs: list[dict]  # {prompt, chosen, rejected, task, task_id, model, *_status}
    labelled: list[dict]  # {prompt, completion, label, status, task, task_id, model}
    counts: Counter  # problems (per model): paired, all_passed, all_failed, untrusted; pairs;
    #   labelled; models: the models sampled


def preference_data(records: Iterable[dict], tasks: Sequence[str]) -> PreferenceData:
    """The pairs and labelled completions of the prediction records (eval.py's
    predictions.jsonl) of the pass@k ``tasks``, per model, task and problem: its distinct
    passing programs, in sample order, each paired with a distinct failing one, as many pairs as
    the fewer of the two."""
    problems: dict[tuple[str, str, str], list[dict]] = {}
    for record in records:
        if record["task"] in tasks:
            key = (record["model"], record["task"], record["id"])
            problems.setdefault(key, []).append(record)
    pairs, labelled, counts = [], [], Counter()
    for (model, task, task_id), samples in problems.items():
        if not all(r.get("trusted", True) for r in samples):
            counts["untrusted"] += 1
            continue
        distinct = _verdicts(samples)
        passed = [r for r in distinct if r["status"] == "passed"]
        failed = sorted((r for r in distinct if r["status"] != "passed"),  # definite first: a
                        key=lambda r: r["status"] != "failed")  # timeout may be a slow machine's
        where = {"task": task, "task_id": task_id, "model": model}
        for r in distinct:
            labelled.append({"prompt": _prompt(r), "completion": _completion(r),
                             "label": r["status"] == "passed", "status": r["status"], **where})
        if not failed:
            counts["all_passed"] += 1
            continue
        if not passed:
            counts["all_failed"] += 1
            continue
        counts["paired"] += 1
        for good, bad in zip(passed, failed):
            pairs.append({"prompt": _prompt(good), "chosen": _completion(good),
                          "rejected": _completion(bad), **where,
                          "chosen_status": good["status"], "rejected_status": bad["status"]})
    counts["pairs"], counts["labelled"] = len(pairs), len(labelled)
    counts["models"] = len({model for model, _, _ in problems})
    return PreferenceData(pairs, labelled, counts)


def _prompt(record: dict) -> str | list[dict]:
    """A sample's prompt as preference data: its text, or an instruct model's (``--chat``)
    conversation, which training renders with the model's chat template (TRL's format)."""
    return record.get("messages", record["prompt"])


def _completion(record: dict) -> str | list[dict]:
    """A sample's completion as preference data: its text, or an instruct model's answer as the
    assistant's message (what opened it for the model, then what it wrote)."""
    if "messages" not in record:
        return record["prediction"]
    return [{"role": "assistant", "content": record["answer_opening"] + record["prediction"]}]


def _verdicts(samples: list[dict]) -> list[dict]:
    """One record a distinct program, in the order of their first run: passed where any run of
    it passed (a run that timed out on a busy machine does not make it wrong), else its first
    run's."""
    first: dict[str, dict] = {}
    for sample in samples:
        kept = first.setdefault(sample["prediction"], sample)
        if sample["status"] == "passed" and kept["status"] != "passed":
            first[sample["prediction"]] = {**kept, "status": "passed"}
    return list(first.values())


def labelled_path(path: Path) -> Path:
    """Where the labelled completions go beside the pairs: OUT.jsonl -> OUT.kto.jsonl."""
    return path.with_name(f"{path.name.removesuffix('.jsonl')}.kto.jsonl")


def write_preference_data(path: str | Path, out_dir: Path, tasks: Sequence[str]) -> str:
    """The pairs of the evaluation in ``out_dir`` (its predictions.jsonl) written to ``path``,
    the labelled completions beside it (``labelled_path``); the summary line."""
    path = Path(path)
    lines = (out_dir / "predictions.jsonl").read_text("utf-8").splitlines()
    data = preference_data(map(json.loads, lines), tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    for file, rows in ((path, data.pairs), (labelled_path(path), data.labelled)):
        process.write_atomic(file, "".join(process.json_text(r) + "\n" for r in rows))
    c = data.counts
    total = c["paired"] + c["all_passed"] + c["all_failed"] + c["untrusted"]
    untrusted = (f", nothing from {c['untrusted']} whose test ran in the candidate's interpreter"
                 if c["untrusted"] else "")
    hint = ""
    if not c["pairs"]:  # no problem both passed and failed
        hint = ("\nnote: a pair needs a problem whose samples both pass and fail: more "
                "--num-samples, a --temperature that varies them, or problems fit to the model "
                "(failing all: fine-tune it first; passing all: harder ones)")
    problems = f"{total} problems"
    if c["models"] > 1:  # each model's samples of a problem are paired apart
        problems = f"{total} problems' samples ({total // c['models']} problems x {c['models']} models)"
    return (f"preference pairs: {c['pairs']} pairs from {c['paired']} of {problems} in "
            f"{path}; no pair from {c['all_passed']} whose samples all passed and "
            f"{c['all_failed']} whose samples all failed{untrusted}; {c['labelled']} labelled "
            f"completions (kto) in {labelled_path(path)}{hint}")
