"""HumanEval+ (EvalPlus's Hugging Face dataset, whose test runs every input) as
bigcode-evaluation-harness's ``humanevalplus`` prompts and stops it; its tests compare floats
with numpy, as EvalPlus's harness does."""

from __future__ import annotations

from codelm.evaluation.tasks import passk
from codelm.evaluation.tasks.humaneval import HARNESS_STOPS
from codelm.evaluation.tasks.passk import EVALPLUS_DATASETS, PasskTask


def _humaneval_plus_problem(record: dict, where: str) -> dict:
    """A HumanEval+ record (HumanEval's fields, EvalPlus's test of every input), its float
    comparisons checking shapes first."""
    return passk.with_shapes_checked(passk.humaneval_problem(record, where))


PASSK = PasskTask("humaneval-plus", HARNESS_STOPS, strip_prompt=True,
                  read=_humaneval_plus_problem, timeout_s=20.0)
KIND = "benchmark"


def source() -> str:
    """HumanEval+'s problems where ``--problems`` names none: EvalPlus's dataset id."""
    return EVALPLUS_DATASETS["humaneval-plus"]


load = PASSK.load
run = PASSK.run
