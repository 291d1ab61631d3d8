"""Project-level code completion, Long Code Arena's method, on any git repository's history
(``--tasks project-completion --data REPO_DIR``): the files commits add (newest first), each
completed line by line with the snapshot of the commit's parent as the project.

For each completion file and composer (codelm.data.composers): the perplexity of the file given
the composed context, and the composer with the lowest one is the one chosen (LCA's choice); for
each of its lines drawn per category (codelm.data.history: committed, inproject, infile, common,
non_informative, random), the line generated greedily after the file's prefix, under each
composer's context and without (``empty``). As LCA's line generator scores a line: the
generated text after its leading newlines, up to the next newline, its indentation kept; exact
match on the stripped lines (``evaluate``'s exact_match), edit similarity (fuzzywuzzy's ratio,
0-100) on the lines as they are. Both are averaged over a file's lines of a category, then over
files, as LCA aggregates exact match (its edit similarity's running sums carry over from one
category to the next; here each category's is its own), in percent."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch

from codelm.data.composers import Composed, IndexCache, RepositoryIndex, compose
from codelm.data.config import DataConfig
from codelm.data.history import CATEGORIES, GitRepo, completion_cases, snapshot
from codelm.evaluation import scoring
from codelm.evaluation.metrics import fuzz_ratio
from codelm.evaluation.scoring import Scoring
from codelm.kernels import IGNORE_INDEX
from codelm.loading import LoadedModel

KIND = "repository"  # completion cases read from the git repositories of --data
CASES = 100  # completion files per repository where --limit is not given
LINE_NEW_TOKENS = 64  # a line of code takes at most this many new tokens


class ProjectSettings(Scoring, Protocol):
    """What the task reads of an evaluation's settings (EvalConfig has each)."""

    data: list[str] | None
    limit: int | None
    lines_per_file: int
    composers: list[str]


def extensions(cfg: ProjectSettings) -> list[str]:
    """The completion files' extensions: ``--data-options`` extensions, else DataConfig's."""
    return list(cfg.data_options.get("extensions") or DataConfig().extensions)


def load_repositories(cfg: ProjectSettings) -> list[dict]:
    """The completion cases of every repository of ``cfg.data``: up to ``cfg.limit`` (default
    CASES) each, ``cfg.lines_per_file`` lines drawn per category; each case as a record (its
    commit, parent, file and lines: what the scores are of)."""
    records = []
    for root in cfg.data or []:
        for case in completion_cases(root, extensions(cfg), cfg.limit or CASES,
                                     cfg.lines_per_file, cfg.seed):
            records.append({"id": case.id, "repo_dir": str(Path(root).expanduser().resolve()),
                            "repo": case.repo, "commit": case.commit,
                            "parent": case.parent, "path": case.path,
                            "text": case.text, "lines": case.lines})
    return records


@lru_cache(maxsize=16)
def _repo(root: str) -> GitRepo:
    """One GitRepo a directory: its blobs are read once however many cases and models."""
    return GitRepo(root)


@lru_cache(maxsize=4)
def _snapshot(root: str, parent: str, exts: tuple[str, ...]) -> dict[str, str]:
    return snapshot(_repo(root), parent, exts)


def _indexes(cases: Sequence[dict], lm: LoadedModel, exts: tuple[str, ...]
             ) -> dict[str, RepositoryIndex]:
    """Each case's index of its snapshot: one per snapshot (the cases of one commit share it),
    the files snapshots share read once (one IndexCache a repository)."""
    caches: dict[str, IndexCache] = {}
    built: dict[tuple[str, str], RepositoryIndex] = {}
    indexes = {}
    for case in cases:
        key = (case["repo_dir"], case["parent"])
        if key not in built:
            files = _snapshot(case["repo_dir"], case["parent"], exts)
            cache = caches.setdefault(case["repo_dir"], IndexCache())
            built[key] = RepositoryIndex(case["repo"], files, lm.tokenizer, cache)
        indexes[case["id"]] = built[key]
    return indexes


def _encode(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer.encode(text, split_special_tokens=True)


def _fitting(lm: LoadedModel, cases: Sequence[dict], indexes: dict, budget: int
             ) -> list[dict]:
    """The cases whose openings leave a prompt of ``budget`` tokens room for two of the file's;
    the others are counted and their first paths named on stderr (a model of a short context
    and a long path), and none fitting is an error naming the longest path."""
    openings = {case["id"]: indexes[case["id"]].openings_length(case["path"]) for case in cases}
    fitting = [case for case in cases if budget - openings[case["id"]] >= 2]
    if len(fitting) == len(cases):
        return fitting
    longest = max(cases, key=lambda case: openings[case["id"]])
    why = (f"the repository's name and the file's path take up to {openings[longest['id']]} "
           f"tokens ({longest['path']}) of the {budget} a prompt of {lm.label} may have")
    if not fitting:
        raise ValueError(f"project-completion: {why}, no room for a file's code: a longer "
                         "--block-size (up to the model's context), or a model of a longer "
                         "context")
    left_out = [case["path"] for case in cases if budget - openings[case["id"]] < 2]
    named = ", ".join(left_out[:3]) + (", ..." if len(left_out) > 3 else "")
    print(f"project-completion: {lm.label}: {len(left_out)} of {len(cases)} completion files "
          f"left out ({named}): {why}", file=sys.stderr)
    return fitting


# ---- Perplexity per composer --------------------------------------------------------------------

@torch.no_grad()
def composer_perplexity(lm: LoadedModel, cases: Sequence[dict], composers: Sequence[str],
                        cfg: ProjectSettings, indexes: dict) -> dict[str, float]:
    """Each composer's perplexity of the completion files, as LCA scores a composer: each
    file's perplexity (the exponent of the mean loss of its tokens: its first half-context of
    them, fewer where the openings leave less room, less its first token, the same for every
    composer) after the composed context, then their mean over files (its ranking reads the
    whole file, as LCA's composers do; the prompt holds only the scored tokens of it)."""
    start = lm.prompt_start
    context = scoring.context(lm, cfg)
    budget = context + 1 - len(start)
    out = {}
    for composer in composers:
        windows = []
        for case in cases:
            index = indexes[case["id"]]
            room = budget - index.openings_length(case["path"])
            file_ids = _encode(lm, case["text"])[: min(context // 2, room)]
            composed = compose(index, composer, case["path"], case["text"], file_ids, budget)
            windows.append(_scored_window(start, composed))
        perplexities = _file_perplexities(lm, windows, cfg, f"perplexity {composer}")
        out[composer] = sum(perplexities) / len(perplexities)
    return out


def _file_perplexities(lm: LoadedModel, windows: Sequence[dict], cfg: ProjectSettings,
                       desc: str) -> list[float]:
    """Each window's perplexity: the exponent of the mean loss of its scored tokens."""
    out: list[float] = []
    for batch in scoring.scored_batches(lm, windows, cfg, desc):
        labels = batch["labels"]
        logps = lm.model(batch["input_ids"], targets=labels, token_logps=True)
        losses = -logps.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1)
        out += [math.exp(min(loss, 700.0)) for loss in losses.tolist()]
    return out


def _scored_window(start: list[int], composed: Composed) -> dict[str, torch.Tensor]:
    """Inputs and labels of a composed file: only the file's tokens after its first count."""
    ids = torch.tensor([*start, *composed.ids])
    labels = ids[1:].clone()
    first_scored = len(start) + composed.prefix_start + 1  # the file's second token
    labels[: first_scored - 1] = IGNORE_INDEX
    return {"input_ids": ids[:-1], "labels": labels}


# ---- Line completion ----------------------------------------------------------------------------

def line_prompts(lm: LoadedModel, case: dict, index: RepositoryIndex, composers: Sequence[str],
                 budget: int) -> list[dict]:
    """One prompt per (line drawn, composer): the file's prefix (the lines before the line; its
    left end cut so that every composer shows the same prefix tokens) after the composed
    context."""
    lines = case["text"].split("\n")
    overhead = index.openings_length(case["path"])
    prompts = []
    for category in CATEGORIES:
        for number in case["lines"].get(category, []):
            prefix = "\n".join(lines[:number])
            prefix_ids = _encode(lm, prefix)
            prefix_ids = prefix_ids[max(0, len(prefix_ids) - (budget - overhead)):]
            for composer in composers:
                composed = compose(index, composer, case["path"], prefix, prefix_ids, budget)
                prompts.append({"case": case["id"], "category": category, "line": number,
                                "composer": composer, "ids": composed.ids,
                                "files": composed.files, "reference": lines[number]})
    return prompts


def line_scores(prediction: str, reference: str) -> dict:
    """A generated line against the file's, as LCA scores it: exact match of the stripped
    lines, edit similarity of the lines as they are (indentation counts)."""
    return {"exact": prediction.strip() == reference.strip(),
            "edit_sim": fuzz_ratio(prediction, reference)}


def _aggregate(records: Sequence[dict], composers: Sequence[str]) -> dict[str, float]:
    """EM and edit similarity per composer and category (and over all lines), both 0-100 as
    codelm's other tasks report them: a file's mean over its lines, then the mean over files,
    as LCA aggregates."""
    per_file: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for record in records:
        for category in (record["category"], "all"):
            per_file[(record["composer"], category, record["case"])].append(record)
    metrics = {}
    for composer in composers:
        for category in (*CATEGORIES, "all"):
            files = [rows for (c, k, _), rows in per_file.items()
                     if c == composer and k == category]
            if not files:
                continue
            suffix = "" if category == "all" else f"_{category}"
            for name, key, scale in (("EM", "exact", 100.0), ("ES", "edit_sim", 1.0)):
                means = [scale * sum(r[key] for r in rows) / len(rows) for rows in files]
                metrics[f"{composer}/{name}{suffix}"] = sum(means) / len(means)
    return metrics


def run_project(lm: LoadedModel, cases: Sequence[dict], cfg: ProjectSettings
                ) -> tuple[dict, list[dict]]:
    """Perplexity per composer, the chosen one's name on stderr and in the records, and EM/ES
    per composer and category: ``<composer>/EM_<category>``; ``chosen/...`` repeats the
    chosen composer's."""
    composers = list(dict.fromkeys(["empty", *cfg.composers]))
    exts = tuple(extensions(cfg))
    indexes = _indexes(cases, lm, exts)
    line_cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, LINE_NEW_TOKENS))
    budget = scoring.prompt_room(lm, line_cfg)
    cases = _fitting(lm, cases, indexes, budget)
    perplexity = composer_perplexity(lm, cases, composers, cfg, indexes)
    chosen = min((c for c in composers if c != "empty"), key=perplexity.__getitem__,
                 default="empty")
    measured = ", ".join(f"{c} {p:.3f}" for c, p in perplexity.items())
    if chosen == "empty":
        print(f"project-completion: {lm.label}: no composer gives context (--composers empty): "
              f"its lines are completed without ({measured})", file=sys.stderr)
    else:
        print(f"project-completion: {lm.label}: chosen by lowest perplexity among the composers "
              f"that give context (ties: the first listed; empty is the baseline): {chosen} "
              f"({measured})", file=sys.stderr)
    prompts = [p for case in cases
               for p in line_prompts(lm, case, indexes[case["id"]], composers, budget)]
    print(f"project-completion: {lm.label}: {len(cases)} completion files, "
          f"{len(prompts) // len(composers)} lines, each under {len(composers)} composers",
          file=sys.stderr)
    texts = scoring.generate_texts(lm, [""] * len(prompts), line_cfg, ("\n",),
                                   desc="project-completion",
                                   prompt_ids=[(p["ids"], (0, 0)) for p in prompts],
                                   start=lambda text: text.lstrip("\n"))  # indentation kept
    records = []
    for prompt, prediction in zip(prompts, texts):
        reference = prompt["reference"]
        records.append({"model": lm.label, "task": "project-completion", "variant": None,
                        "id": f"{prompt['case']}#{prompt['line']}", "case": prompt["case"],
                        "category": prompt["category"], "composer": prompt["composer"],
                        "context_files": prompt["files"], "reference": reference,
                        "prediction": prediction, **line_scores(prediction, reference)})
    metrics = {f"{c}/perplexity": p for c, p in perplexity.items()}
    metrics.update(_aggregate(records, composers))
    metrics.update({f"chosen/{k.split('/', 1)[1]}": v for k, v in list(metrics.items())
                    if k.startswith(f"{chosen}/")})
    records.append({"model": lm.label, "task": "project-completion", "variant": None,
                    "id": "composer", "perplexity": perplexity, "chosen": chosen,
                    "cases": [case["id"] for case in cases]})
    print(category_table(metrics, composers, lm.label), file=sys.stderr)
    return metrics, records


def category_table(metrics: dict[str, float], composers: Sequence[str], label: str) -> str:
    """A model's exact match (edit similarity) per composer and line category, as markdown."""
    columns = [*CATEGORIES, "all"]
    lines = [f"project-completion, {label}: EM (ES) by line category",
             "| composer | perplexity | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for composer in composers:
        cells = []
        for category in columns:
            suffix = "" if category == "all" else f"_{category}"
            em = metrics.get(f"{composer}/EM{suffix}")
            es = metrics.get(f"{composer}/ES{suffix}")
            cells.append("n/a" if em is None else f"{em:.1f} ({es:.1f})")
        perplexity = metrics[f"{composer}/perplexity"]
        lines.append(f"| {composer} | {perplexity:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def console_metric(name: str) -> bool:
    """The metrics eval's console table shows: the chosen composer's (every composer's are in
    the category table printed before it, and in table.md)."""
    return name.startswith("chosen/")


def run(lm: LoadedModel, task: str, cases: Sequence[dict], cfg: ProjectSettings,
        variant: str | None = None, data_cfg: DataConfig | None = None
        ) -> tuple[dict, list[dict]]:
    return run_project(lm, cases, cfg)

