"""MBPP (its Hugging Face dataset, the 500 problems of its test split) as
bigcode-evaluation-harness's ``mbpp`` prompts, stops and runs it."""

from __future__ import annotations

import ast

from codelm.evaluation.tasks.passk import PasskTask
from codelm.runtime import settings

# bigcode-evaluation-harness's stop sequences (bigcode_eval/tasks/mbpp.py)
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
MBPP_TEST_IDS = range(11, 511)  # MBPP's test split, the problems the harness scores
MBPP_DATASET = "google-research-datasets/mbpp"  # its Hugging Face dataset (config "full")
KIND = "benchmark"


def _mbpp_problem(record: dict, where: str) -> dict | None:
    """An MBPP record (task_id, text, code, test_list) of its test split as
    bigcode-evaluation-harness's ``mbpp`` prompts and runs it: the description and the first test
    in a docstring, the completion, then every test (test_setup_code is not run, as there);
    None for a record of another split."""
    if record.get("task_id") not in MBPP_TEST_IDS:
        return None
    tests = checked_tests(record, where, ("text", "code"))
    test = "\n".join(tests)
    return {"task_id": f"MBPP/{record['task_id']}",
            "prompt": f'"""\n{record["text"]}\n{tests[0]}\n"""\n',
            "canonical_solution": record["code"], "test": test, "entry_point": None,
            "functions": tested_definitions(record["code"], test)}


def checked_tests(record: dict, where: str, fields: tuple[str, ...]) -> list[str]:
    """An MBPP record's test_list, its integer task_id and its string ``fields`` checked (MBPP's
    records and EvalPlus's MBPP+ ones); what is wrong is one line naming ``where``."""
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"{where}: test_list must be a non-empty list of strings")
    if missing := [k for k in fields if not isinstance(record.get(k), str)]:
        raise ValueError(f"{where}: missing string field(s) {missing}")
    if not settings.is_number(record.get("task_id"), int):
        raise ValueError(f"{where}: task_id must be MBPP's integer id")
    return tests


def tested_definitions(code: str, test: str) -> list[str]:
    """The names a solution defines at its top level that its test uses: the functions (and
    classes) a trusted test calls the candidate's own of (none where either does not parse)."""
    try:
        defined = [node.name for node in ast.parse(code).body if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        used = {node.id for node in ast.walk(ast.parse(test)) if isinstance(node, ast.Name)}
    except (SyntaxError, ValueError):
        return []
    return [name for name in defined if name in used]


PASSK = PasskTask("mbpp", MBPP_STOPS, strip_prompt=False, read=_mbpp_problem,
                  split_files=("full/test-*.parquet", "**/test-*.parquet"),
                  subset=" of MBPP's test split (task_id 11-510)")


def source() -> str:
    """MBPP's problems where ``--problems`` names none: its Hugging Face dataset id."""
    return MBPP_DATASET


load = PASSK.load
run = PASSK.run
