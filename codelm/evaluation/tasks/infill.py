"""Line infilling on the corpus's split: a line of a held-out file filled in from the code
before and after it, in the model's own FIM tokens, scored as SantaCoder's FIM task scores its
single-line problems (``fim``'s run: exact match of the middle, over all problems and per
language, the language named by the file's extension where it is a known language's), with the
line's CodeXGLUE edit similarity beside it (whitespace around the line stripped, as for its
exact match). What a run of
``--task fim`` is scored on by default: its own held-out files, in any language."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Protocol

from codelm.data.config import DataConfig
from codelm.data.examples import line_completion_examples
from codelm.data.sources import Doc
from codelm.evaluation.metrics import edit_sim, fuzz_ratio
from codelm.evaluation.scoring import Scoring
from codelm.evaluation.tasks import fim
from codelm.evaluation.tasks.text import GENERATION_EXAMPLES
from codelm.loading import LoadedModel
from codelm.tokenization.bpe import BPETokenizer
from codelm.tokenization.source import line_comment
from tokenizer import CodeTokenizer

KIND = "examples"


class InfillSettings(Scoring, Protocol):
    """What line infilling reads of an evaluation's settings (EvalConfig has each)."""

    limit: int | None
    lines_per_file: int
    split: str


def infill_problems(docs: Sequence[Doc], cfg: InfillSettings) -> list[dict]:
    """The first ``cfg.limit`` (default GENERATION_EXAMPLES) problems of the split's code files:
    in each, the lines that line completion draws (``cfg.lines_per_file``, seeded), each a
    middle between the file's text before it and after it."""
    limit = GENERATION_EXAMPLES if cfg.limit is None else cfg.limit
    problems = []
    for doc in docs:
        if doc.target is not None:  # a pair record: no file to fill in
            continue
        language = "unknown"  # a record's id (code.jsonl:3) names no language
        if line_comment(doc.id, unknown=None) is not None:
            language = posixpath.splitext(doc.id)[1].lstrip(".").lower()
        for j, example in enumerate(line_completion_examples(doc, cfg.lines_per_file, cfg.seed)):
            after = len(example.prompt) + len(example.completion)
            problems.append({"id": f"{doc.id}#{j}", "language": language,
                             "prefix": example.prompt, "middle": example.completion,
                             "suffix": doc.text[after:]})
        if len(problems) >= limit:
            break
    if not problems:
        raise ValueError(f"task 'infill': no code file with a line to fill in the {cfg.split} "
                         "split; choose other --data or --split")
    return problems[:limit]


def items(task: str, docs: Sequence[Doc], cfg: InfillSettings,
          tok: CodeTokenizer | BPETokenizer | None, data_cfg: DataConfig
          ) -> dict[str | None, list[dict]]:
    return {None: infill_problems(docs, cfg)}


def run(lm: LoadedModel, task: str, problems: Sequence[dict], cfg: Scoring,
        variant: str | None = None, data_cfg: DataConfig | None = None
        ) -> tuple[dict, list[dict]]:
    metrics, records = fim.run_fim(lm, problems, cfg,
                                   data_cfg.max_prompt_tokens if data_cfg else None,
                                   task="infill")
    predictions = [record["prediction"].strip() for record in records]
    references = [record["reference"].strip() for record in records]
    for record, prediction, reference in zip(records, predictions, references):
        record["edit_sim"] = fuzz_ratio(prediction, reference)
    metrics["edit_sim"] = edit_sim(predictions, references)
    return metrics, records
