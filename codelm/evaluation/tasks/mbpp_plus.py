"""MBPP+ (EvalPlus's Hugging Face dataset) as bigcode-evaluation-harness's ``mbppplus`` prompts
and runs it: MBPP's prompt, then EvalPlus's whole test; its tests compare floats with numpy."""

from __future__ import annotations

from codelm.evaluation.tasks import passk
from codelm.evaluation.tasks.mbpp import MBPP_STOPS, checked_tests, tested_definitions
from codelm.evaluation.tasks.passk import EVALPLUS_DATASETS, PasskTask

KIND = "benchmark"


def _mbpp_plus_problem(record: dict, where: str) -> dict:
    """An MBPP+ record (EvalPlus: task_id, prompt the description, code, test_list, test the
    whole test) as the harness's ``mbppplus`` prompts and runs it: MBPP's prompt, then ``test``,
    its float comparisons checking shapes first."""
    if "plus_input" in record:  # EvalPlus's inputs, without a test that runs them
        raise ValueError(f"{where}: an EvalPlus release record (base_input, plus_input), which "
                         "holds no test: use EvalPlus's Hugging Face dataset "
                         f"({EVALPLUS_DATASETS['mbpp-plus']}), whose test runs every input")
    tests = checked_tests(record, where, ("prompt", "code", "test"))
    problem = {"task_id": f"Mbpp/{record['task_id']}",
               "prompt": f'"""\n{record["prompt"]}\n{tests[0]}\n"""\n',
               "canonical_solution": record["code"], "test": "\n" + record["test"],
               "entry_point": None,
               "functions": tested_definitions(record["code"], record["test"])}
    return passk.with_shapes_checked(problem)


PASSK = PasskTask("mbpp-plus", MBPP_STOPS, strip_prompt=False, read=_mbpp_plus_problem,
                  timeout_s=10.0)


def source() -> str:
    """MBPP+'s problems where ``--problems`` names none: EvalPlus's dataset id."""
    return EVALPLUS_DATASETS["mbpp-plus"]


load = PASSK.load
run = PASSK.run
