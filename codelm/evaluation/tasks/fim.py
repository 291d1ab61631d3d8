"""Fill-in-the-middle: SantaCoder's FIM task (its Hugging Face dataset) as
bigcode-evaluation-harness's ``santacoder_fim`` prompts and scores it, in the model's own FIM
tokens: exact match of the generated middle, over all problems and per language."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from codelm.data.config import DataConfig
from codelm.data.encoding import encode_text, fim_prompt, without_stripping
from codelm.evaluation import scoring
from codelm.evaluation.scoring import Scoring
from codelm.evaluation.tasks.problems import problem_records, record_id
from codelm.loading import LoadedModel
from codelm.tokenization.bpe import FIM_TOKENS

FIM_DATASET = "bigcode/santacoder-fim-task"  # the harness's santacoder_fim data
# The harness's stop words (santacoder_fim's, and starcoder_fim's <file_sep>): a middle ends
# where the model starts another file
HARNESS_STOPS = ("<|endoftext|>", "<|filename|>", "<file_sep>")
FIM_KEYS = ("prompt", "suffix", "canonical_solution")  # prefix, suffix and middle
SPLIT_FILES = ("**/*.parquet",)  # where a dataset snapshot holds the problems
KIND = "benchmark"


class Limited(Protocol):
    limit: int | None  # the first problems of the file (None: all)


def load_fim_problems(path: str | Path, limit: int | None = None) -> list[dict]:
    """SantaCoder's FIM task records as bigcode-evaluation-harness's santacoder_fim reads them:
    ``prompt`` the prefix, ``suffix``, ``canonical_solution`` the middle, ``language``."""
    problems = []
    for where, record in problem_records(path, SPLIT_FILES, "fim"):
        if missing := [k for k in FIM_KEYS if not isinstance(record.get(k), str)]:
            raise ValueError(f"{where}: missing string field(s) {missing}")
        problems.append({"id": record_id(record, "name", where),
                         "language": str(record.get("language") or "unknown"),
                         "prefix": record["prompt"], "suffix": record["suffix"],
                         "middle": record["canonical_solution"]})
    if not problems:
        raise ValueError(f"{path}: no problems: give a JSONL file of infilling records "
                         "(prompt, suffix, canonical_solution)")
    return problems[:limit]


def run_fim(lm: LoadedModel, problems: Sequence[dict], cfg: Scoring,
            max_prompt_tokens: int | None = None, task: str = "fim") -> tuple[dict, list[dict]]:
    """Each problem's middle generated from a prefix-suffix-middle prompt in the model's own FIM
    tokens (prefix and suffix encoded apart, as training encodes them), up to EOS or the
    harness's stop words (HARNESS_STOPS); exact match
    with the canonical middle, as bigcode-evaluation-harness's santacoder_fim scores it: EM over
    all problems and EM_<language> over each language's (0-100). Prefix and suffix are encoded
    as training encodes a FIM example's parts (special tokens' text is text), the prompt cut to
    the run's ``max_prompt_tokens`` as training cut it. ``task``: the task the records name."""
    tok = lm.tokenizer
    if None in (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id):
        spellings = ", ".join("/".join(spelling) for spelling in FIM_TOKENS)
        raise ValueError(f"--tasks {task}: the tokenizer of {lm.label} has no fill-in-the-middle "
                         f"tokens (one of {spellings}); evaluate a model trained with them")
    plain = without_stripping(tok)
    room = scoring.prompt_room(lm, cfg)
    if max_prompt_tokens is not None:
        room = min(room, max_prompt_tokens)
    ids = []
    for problem in problems:
        prompt = fim_prompt(tok, encode_text(plain, problem["prefix"]),
                            encode_text(plain, problem["suffix"]), room)
        ids.append((prompt, (0, 0)))
    middles = scoring.generate_texts(lm, [p["prefix"] for p in problems], cfg, HARNESS_STOPS,
                                     desc=task, prompt_ids=ids)
    records = []
    for problem, middle in zip(problems, middles):
        records.append({"model": lm.label, "task": task, "variant": None, "id": problem["id"],
                        "language": problem["language"], "prompt_tail": problem["prefix"][-300:],
                        "reference": problem["middle"], "prediction": middle,
                        # the harness's match: equal but for surrounding whitespace
                        "exact": middle.strip() == problem["middle"].strip()})
    metrics = {"EM": 100.0 * sum(r["exact"] for r in records) / len(records)}
    for language in sorted({r["language"] for r in records}):
        mine = [r["exact"] for r in records if r["language"] == language]
        metrics[f"EM_{language}"] = 100.0 * sum(mine) / len(mine)
    return metrics, records


def source() -> str:
    """The FIM task's problems where ``--problems`` names none: its Hugging Face dataset id."""
    return FIM_DATASET


def load(file: Path, cfg: Limited) -> list[dict]:
    return load_fim_problems(file, cfg.limit)


def run(lm: LoadedModel, task: str, problems: Sequence[dict], cfg: Scoring,
        variant: str | None = None, data_cfg: DataConfig | None = None
        ) -> tuple[dict, list[dict]]:
    trained = ((lm.run_config or {}).get("data_options") or {}).get("max_prompt_tokens")
    return run_fim(lm, problems, cfg, data_cfg.max_prompt_tokens if data_cfg else trained)
