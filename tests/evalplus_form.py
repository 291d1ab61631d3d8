"""EvalPlus's test form, as its Hugging Face datasets (evalplus/humanevalplus,
evalplus/mbppplus) hold it in "test": numpy's float comparison, then every input, base and
extra, against its expected result."""

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
