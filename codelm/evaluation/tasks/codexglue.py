"""CodeXGLUE method generation (``codexglue-method``): each method's body generated after its
signature and docstring, normalized as CodeXGLUE's data normalizes its references, then scored
as its evaluator scores it (edit similarity, BLEU)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from codelm.data.config import DataConfig
from codelm.evaluation import scoring
from codelm.evaluation.metrics import (
    LITERAL,
    LITERAL_SPACES,
    codexglue_bleu,
    codexglue_method_normalize,
    codexglue_method_post_process,
    fuzz_ratio,
)
from codelm.evaluation.scoring import Scoring
from codelm.evaluation.tasks.problems import problem_records, record_id
from codelm.evaluation.tasks.text import GENERATION_EXAMPLES, method_body
from codelm.loading import LoadedModel
from codelm.models.generation import FUNCTION_STOPS
from codelm.runtime import settings

CODEXGLUE_METHOD_DATASET = "microsoft/codexglue_method_generation"  # its test.jsonl
# The literals CodeXGLUE's data keeps by value (py150's literals.json, which its method
# generation preprocessing reads): every other number or string is a bare <NUM_LIT>/<STR_LIT>.
LITERALS_FILE = settings.bundled("data", "codexglue_literals.json")
CODEXGLUE_METHOD_KEYS = ("signature", "body", "docstring")
SPLIT_FILES = ("test.jsonl", "**/test.jsonl", "**/test-*.parquet")  # where a snapshot holds it
KIND = "benchmark"


class Limited(Protocol):
    limit: int | None  # the first problems of the file (None: GENERATION_EXAMPLES)


def _literal_code(normalized: str) -> str:
    """A normalized signature as the code it came from: its literals (numbers not listed: 0)
    and the spaces and commas their values encode."""
    code = normalized.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    code = LITERAL.sub(lambda m: m.group(2), code)
    for char, encoded in LITERAL_SPACES.items():
        code = code.replace(encoded, char)
    return code


def _docstring_body(text: str) -> str:
    """``text`` as the inside of a triple-quoted docstring, as written in source: each quote of
    a run of three or more, and a final one, escaped (where a backslash does not escape it
    already), and a final odd run of backslashes doubled, so that no quote ends the literal
    early and no backslash escapes its closing quotes."""
    def escaped(match: re.Match) -> str:
        slashes, quotes = match.group(1), match.group(2)
        if len(quotes) < 3 and match.end() < len(text):
            return match.group(0)
        first = quotes[0] if len(slashes) % 2 else '\\"'  # after an odd run: escaped already
        return slashes + first + '\\"' * (len(quotes) - 1)

    body = re.sub(r'(\\*)("+)', escaped, text)
    if (len(body) - len(body.rstrip("\\"))) % 2:
        body += "\\"
    return body


def load_codexglue_methods(path: str | Path, limit: int | None = None) -> list[dict]:
    """CodeXGLUE method generation's records (signature and body normalized, docstring, id),
    each prompted as the function it was: its signature and docstring."""
    problems = []
    for where, record in problem_records(path, SPLIT_FILES, "codexglue-method"):
        if missing := [k for k in CODEXGLUE_METHOD_KEYS if not isinstance(record.get(k), str)]:
            raise ValueError(f"{where}: missing string field(s) {missing}")
        docstring = _docstring_body(record["docstring"])
        prompt = f'{_literal_code(record["signature"])}\n    """{docstring}"""\n'
        problems.append({"id": record_id(record, "id", where), "prompt": prompt,
                         "reference": record["body"]})
    if not problems:
        raise ValueError(f"{path}: no problems: give a JSONL file of CodeXGLUE method-generation "
                         "records (signature, docstring, body)")
    return problems[:limit]


def run_codexglue_method(lm: LoadedModel, problems: Sequence[dict], cfg: Scoring
                         ) -> tuple[dict, list[dict]]:
    """Each method's body generated after its signature and docstring, up to the end of the
    function; normalized as CodeXGLUE's data normalizes its references (the literals it lists
    kept, LITERALS_FILE), then scored as CodeXGLUE's evaluator scores it: edit similarity of
    the post-processed pair, BLEU of the normalized pair (0-100)."""
    raw = scoring.generate_texts(lm, [p["prompt"] for p in problems], cfg, FUNCTION_STOPS[:4],
                                 desc="codexglue-method")
    listed = settings.read_json_object(LITERALS_FILE, "CodeXGLUE literals")
    strings, numbers = set(listed["str"]), set(listed["num"])
    preds, refs = [], []
    for problem, text in zip(problems, raw):
        preds.append(codexglue_method_normalize(method_body(text), strings, numbers))
        refs.append(problem["reference"])
    edits = [fuzz_ratio(codexglue_method_post_process(p), codexglue_method_post_process(r))
             for p, r in zip(preds, refs)]
    records = [{"model": lm.label, "task": "codexglue-method", "variant": None, "id": p["id"],
                "prompt_tail": p["prompt"][-300:], "reference": r, "prediction": y,
                "edit_sim": e}
               for p, r, y, e in zip(problems, refs, preds, edits)]
    metrics = {"edit_sim": sum(edits) / len(edits), "BLEU": codexglue_bleu(preds, refs)}
    return metrics, records


def source() -> str:
    """The task's problems where ``--problems`` names none: its Hugging Face dataset id."""
    return CODEXGLUE_METHOD_DATASET


def load(file: Path, cfg: Limited) -> list[dict]:
    return load_codexglue_methods(file, cfg.limit or GENERATION_EXAMPLES)


def run(lm: LoadedModel, task: str, problems: Sequence[dict], cfg: Scoring,
        variant: str | None = None, data_cfg: DataConfig | None = None
        ) -> tuple[dict, list[dict]]:
    return run_codexglue_method(lm, problems, cfg)
