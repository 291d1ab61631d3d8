"""Problems in the forms the pass@k tests share (tests/test_eval.py, tests/test_rewards.py):
EvalPlus's test form, as its Hugging Face datasets (evalplus/humanevalplus, evalplus/mbppplus)
hold it in "test" (numpy's float comparison, then every input, base and extra, against its
expected result), and a problem whose test cannot run apart from the candidate."""

from __future__ import annotations

HELPERS = """import numpy as np

def is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)):
        return all(isinstance(i, float) for i in x)
    if isinstance(x, np.ndarray):
        return x.dtype == np.float64 or x.dtype == np.float32
    return False


def assertion(out, exp, atol):
    exact_match = out == exp
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact_match and atol != 0:
        np.testing.assert_allclose(out, exp, atol=atol)
    else:
        assert exact_match
"""


def input_loop(call: str, inputs: list, results: list) -> str:
    """The loop asserting ``call(*input)`` against each expected result, at the top level."""
    return (f"inputs = {inputs!r}\nresults = {results!r}\n"
            "for i, (inp, exp) in enumerate(zip(inputs, results)):\n"
            f"    assertion({call}(*inp), exp, 0)\n")


def humaneval_plus_test(inputs: list, results: list) -> str:
    """HumanEval+'s test: the helpers, then ``check(candidate)`` running the loop."""
    body = "    " + input_loop("candidate", inputs, results).replace("\n", "\n    ")
    return HELPERS + "\n\ndef check(candidate):\n" + body


def mbpp_plus_test(name: str, inputs: list, results: list) -> str:
    """MBPP+'s test: a whole program, the helpers and the loop calling the function ``name``."""
    return HELPERS + "[]\n" + input_loop(name, inputs, results)


def callable_argument_problems() -> list[dict]:
    """Two problems: one whose test passes the candidate a function (which does not cross as
    plain data, so its test runs only in the candidate's interpreter), and a plain one."""
    return [
        {"task_id": "x/0", "prompt": "def apply(f, x):\n", "entry_point": "apply",
         "canonical_solution": "    return f(x)\n",
         "test": "def check(candidate):\n    assert candidate(lambda v: v + 1, 1) == 2\n"},
        {"task_id": "x/1", "prompt": "def inc(x):\n", "entry_point": "inc",
         "canonical_solution": "    return x + 1\n",
         "test": "def check(candidate):\n    assert candidate(1) == 2\n"},
    ]
