"""MBPP+ (EvalPlus's Hugging Face dataset) as bigcode-evaluation-harness's ``mbppplus`` prompts
and runs it: MBPP's prompt, then EvalPlus's whole test; its tests compare floats with numpy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from codelm.data.config import DataConfig
from codelm.evaluation.tasks import passk
from codelm.evaluation.tasks.mbpp import MBPP_STOPS, tested_definitions
from codelm.evaluation.tasks.passk import EVALPLUS_DATASETS, PasskSettings, PasskTask
from codelm.loading import LoadedModel
from codelm.runtime import settings

KIND = "benchmark"


def _mbpp_plus_problem(record: dict, where: str) -> dict:
    """An MBPP+ record (EvalPlus: task_id, prompt the description, code, test_list, test the
    whole test) as the harness's ``mbppplus`` prompts and runs it: MBPP's prompt, then ``test``,
    its float comparisons checking shapes first."""
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"{where}: test_list must be a non-empty list of strings")
    if missing := [k for k in ("prompt", "code", "test") if not isinstance(record.get(k), str)]:
        raise ValueError(f"{where}: missing string field(s) {missing}")
    if not settings.is_number(record.get("task_id"), int):
        raise ValueError(f"{where}: task_id must be MBPP's integer id")
    problem = {"task_id": f"Mbpp/{record['task_id']}",
               "prompt": f'"""\n{record["prompt"]}\n{tests[0]}\n"""\n',
               "canonical_solution": record["code"], "test": "\n" + record["test"],
               "entry_point": None,
               "functions": tested_definitions(record["code"], record["test"])}
    return passk.with_shapes_checked(problem)


PASSK = PasskTask("mbpp-plus", MBPP_STOPS, strip_prompt=False, read=_mbpp_plus_problem,
                  packages=("numpy",))


def source() -> str:
    """MBPP+'s problems where ``--problems`` names none: EvalPlus's dataset id."""
    return EVALPLUS_DATASETS["mbpp-plus"]


def load(file: Path, cfg: PasskSettings) -> list[dict]:
    return passk.task_problems(file, cfg, PASSK)


def run(lm: LoadedModel, task: str, problems: Sequence[dict], cfg: PasskSettings,
        variant: str | None = None, data_cfg: DataConfig | None = None
        ) -> tuple[dict, list[dict]]:
    return passk.run_passk(lm, PASSK, problems, cfg)
