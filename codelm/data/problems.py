"""Small execution problems, generated: integer functions of one integer argument, each to be
inferred from the input/output examples of its docstring, in HumanEval's format (task_id,
prompt, entry_point, canonical_solution, test), as eval.py's pass@k and the GRPO reward read it.

    python -m codelm.data.problems --n 500 --seed 0 --out train.jsonl
    python -m codelm.data.problems --n 500 --seed 0 --pairs --out sft.jsonl  # SFT pairs
    python -m codelm.data.problems --n 500 --seed 0 --text --out lm.jsonl  # LM documents
    python -m codelm.data.problems --n 500 --seed 0 --describe --out d.jsonl  # in words too
    python -m codelm.data.problems --n 500 --seed 0 --pairs --bugs 0.5 --out b.jsonl  # slips
    python -m codelm.data.problems --n 100 --at-most --seed 4 5 6 --forms clamp --out c.jsonl
    python eval.py --tasks passk --problems passk=heldout.jsonl ...

A seed (0 to SEEDS - 1) names a set: the same seed gives the same problems, and two seeds share
no function: a function belongs to the one seed its outputs on PROBES hash to, so a seed never
trained on is a held-out set. Within a set no two problems compute the same function either.
Each function is one of FORMS (arithmetic, a condition, a loop, digits) with drawn constants;
its docstring shows 3 to 5 examples, which between them run every line of its body that any
probe runs (each branch, a loop's body), and its test checks those and 6 more inputs.
``--forms`` draws from some forms only: their difficulty differs (sign_code asks to copy the
examples' outputs, scale_and_shift to solve for its constants), and so does a small model's
pass rate. The examples alone leave a function under-determined (in_range's bounds lie
somewhere between two examples, and the test probes them); ``--describe`` states each function
in words before its examples, as HumanEval's docstrings do, naming its constants in the order
its code uses them, so the prompt determines the function.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, as in every script
    from codelm.runtime import process

    process.quiet_start_up_stops()

import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from codelm.runtime import process, settings

SEEDS = 16  # the sets: seeds 0 .. SEEDS - 1
PROBES = tuple(range(-10, 31))  # the inputs a function is known by: its examples and tests
EXAMPLE_INPUTS = range(-5, 21)  # where the docstring's examples come from
MAX_OUTPUT = 10**6  # a larger output on a probe: the function is drawn again
# Draws in a row that find no function not drawn before, after which the forms have none left
# (a remaining one of a form of a few hundred would be missed about once in e^20 runs).
EXHAUSTED_AFTER = 200_000
INFER = "Return an integer computed from x, as the examples show."  # the docstring without --describe


class _Spelling(NamedTuple):
    """How a sum and a product are written: as code, or in words."""

    minus: str
    plus: str
    times: str


CODE = _Spelling(" - ", " + ", " * ")
WORDS = _Spelling(" minus ", " plus ", " times ")


def _signed(value: int, term: str = "", spelling: _Spelling = CODE) -> str:
    """`` + value * term`` written as a person would: `` - 3 * x``, `` + x``, or nothing for 0
    (in WORDS: `` minus 3 times x``, `` plus x``)."""
    if value == 0:
        return ""
    sign = spelling.minus if value < 0 else spelling.plus
    size = abs(value)
    if not term:
        return f"{sign}{size}"
    return f"{sign}{term}" if size == 1 else f"{sign}{size}{spelling.times}{term}"


def _times(value: int, term: str = "x", spelling: _Spelling = CODE) -> str:
    """``value * term`` written as a person would: ``3 * x``, ``x``, ``-x`` (in WORDS:
    ``3 times x``)."""
    if value in (1, -1):
        return term if value == 1 else f"-{term}"
    return f"{value}{spelling.times}{term}"


def _plus(value: int, term: str = "") -> str:
    """_signed in words."""
    return _signed(value, term, WORDS)


def _by(value: int, term: str = "x") -> str:
    """_times in words."""
    return _times(value, term, WORDS)


class _Drawn(NamedTuple):
    """A function of a form: its body (lines, unindented) and the body in words, naming its
    constants in the order the body uses them (what a small model copies, it copies in order)."""

    body: list[str]
    words: str


def _nonzero(rng: random.Random, low: int, high: int, skip: tuple[int, ...] = (0,)) -> int:
    return rng.choice([value for value in range(low, high + 1) if value not in skip])


def _scale_and_shift(rng: random.Random) -> _Drawn:
    a, b = _nonzero(rng, -9, 9, (0, 1)), rng.randint(-20, 20)
    return _Drawn([f"return {_times(a)}{_signed(b)}"], f"Return {_by(a)}{_plus(b)}.")


def _square_plus(rng: random.Random) -> _Drawn:
    a, b = rng.randint(-9, 9), rng.randint(-20, 20)
    return _Drawn([f"return x * x{_signed(a, 'x')}{_signed(b)}"],
                  f"Return x times x{_plus(a, 'x')}{_plus(b)}.")


def _wrap(rng: random.Random) -> _Drawn:
    m = rng.randint(2, 12)
    a = rng.randint(0, m - 1)
    if a:
        return _Drawn([f"return (x + {a}) % {m}"],
                      f"Return the remainder of x plus {a}, divided by {m}.")
    return _Drawn([f"return x % {m}"], f"Return the remainder of x divided by {m}.")


def _divide_down(rng: random.Random) -> _Drawn:
    d, b = rng.randint(2, 9), rng.randint(-20, 20)
    return _Drawn([f"return x // {d}{_signed(b)}"],
                  f"Return x divided by {d}, rounded down{_plus(b)}.")


def _distance_from(rng: random.Random) -> _Drawn:
    a, k = rng.randint(-9, 20), rng.randint(1, 5)
    scale = f" * {k}" if k > 1 else ""
    times = f", times {k}" if k > 1 else ""
    return _Drawn([f"return abs(x{_signed(-a)}){scale}"],
                  f"Return the distance between x and {a}{times}.")


def _bounded(rng: random.Random) -> _Drawn:
    which, a, b = rng.choice(("max", "min")), rng.randint(-9, 20), rng.randint(-20, 20)
    larger = "larger" if which == "max" else "smaller"
    return _Drawn([f"return {which}(x, {a}){_signed(b)}"],
                  f"Return the {larger} of x and {a}{_plus(b)}.")


def _clamp(rng: random.Random) -> _Drawn:
    low = rng.randint(-9, 12)
    high = low + rng.randint(2, 18)
    return _Drawn([f"return max({low}, min(x, {high}))"],
                  f"Return x, but at least {low} and at most {high}.")


def _piecewise(rng: random.Random) -> _Drawn:
    t = rng.randint(-5, 15)
    a1, a2 = _nonzero(rng, -4, 4), _nonzero(rng, -4, 4)
    b1, b2 = rng.randint(-10, 10), rng.randint(-10, 10)
    return _Drawn([f"if x > {t}:", f"    return {_times(a1)}{_signed(b1)}",
                   f"return {_times(a2)}{_signed(b2)}"],
                  f"If x is greater than {t}, return {_by(a1)}{_plus(b1)}; "
                  f"otherwise return {_by(a2)}{_plus(b2)}.")


def _even_odd(rng: random.Random) -> _Drawn:
    d, a, b = rng.randint(2, 3), rng.randint(2, 5), rng.randint(-9, 9)
    return _Drawn(["if x % 2 == 0:", f"    return x // {d}", f"return {_times(a)}{_signed(b)}"],
                  f"If x divided by 2 leaves remainder 0, return x divided by {d}, rounded "
                  f"down; otherwise return {_by(a)}{_plus(b)}.")


def _replace_multiples(rng: random.Random) -> _Drawn:
    m, a = rng.randint(2, 9), rng.randint(-20, 20)
    return _Drawn([f"if x % {m} == 0:", f"    return {a}", "return x"],
                  f"If x divided by {m} leaves remainder 0, return {a}; otherwise return x.")


def _sum_up(rng: random.Random) -> _Drawn:
    k, c = rng.randint(1, 4), rng.randint(-5, 5)
    step = "i" if k == 1 else f"{k} * i"
    return _Drawn(["total = 0", "for i in range(x):", f"    total += {step}{_signed(c)}",
                   "return total"],
                  f"Start a total at 0; for each i from 0 up to x - 1, add {_by(k, 'i')}"
                  f"{_plus(c)} to it; return the total.")


def _count_multiples(rng: random.Random) -> _Drawn:
    m = rng.randint(2, 9)
    r = rng.randint(0, m - 1)
    return _Drawn(["count = 0", "for i in range(1, x + 1):", f"    if i % {m} == {r}:",
                   "        count += 1", "return count"],
                  f"Start a count at 0; for each i from 1 up to x, if i divided by {m} leaves "
                  f"remainder {r}, add 1 to it; return the count.")


def _digit_sum(rng: random.Random) -> _Drawn:
    k, b = rng.randint(1, 4), rng.randint(-20, 20)
    scale = f"{k} * " if k > 1 else ""
    times = f"{k} times " if k > 1 else ""
    return _Drawn([f"return {scale}sum(int(d) for d in str(abs(x))){_signed(b)}"],
                  f"Return {times}the sum of the digits of x (its sign ignored){_plus(b)}.")


def _digit_count(rng: random.Random) -> _Drawn:
    k, b = rng.randint(1, 9), rng.randint(-20, 20)
    return _Drawn([f"return len(str(abs(x))) * {k}{_signed(b)}"],
                  f"Return the number of digits of x (its sign ignored) times {k}{_plus(b)}.")


def _halving_steps(rng: random.Random) -> _Drawn:
    d, t = rng.randint(2, 5), rng.randint(0, 6)
    return _Drawn(["count = 0", f"while x > {t}:", f"    x = x // {d}", "    count += 1",
                   "return count"],
                  f"Start a count at 0; while x is greater than {t}, divide x by {d}, rounded "
                  f"down, and add 1 to the count; return the count.")


def _repeat(rng: random.Random) -> _Drawn:
    k, a, b = rng.randint(2, 3), rng.choice((-2, -1, 2, 3)), rng.randint(-5, 5)
    return _Drawn([f"for _ in range({k}):", f"    x = {_times(a)}{_signed(b)}", "return x"],
                  f"Do this {k} times: set x to {_by(a)}{_plus(b)}; then return x.")


def _sign_code(rng: random.Random) -> _Drawn:
    a, b, c = rng.sample(range(-20, 21), 3)
    return _Drawn(["if x < 0:", f"    return {a}", "if x == 0:", f"    return {b}",
                   f"return {c}"],
                  f"If x is less than 0, return {a}; if x equals 0, return {b}; "
                  f"otherwise return {c}.")


def _scaled_remainder(rng: random.Random) -> _Drawn:
    a, m, b = rng.randint(2, 9), rng.randint(3, 13), rng.randint(-20, 20)
    return _Drawn([f"return (x * {a}) % {m}{_signed(b)}"],
                  f"Return the remainder of x times {a}, divided by {m}{_plus(b)}.")


def _reverse_digits(rng: random.Random) -> _Drawn:
    k, b = rng.randint(1, 3), rng.randint(-20, 20)
    scale = f" * {k}" if k > 1 else ""
    times = f", times {k}" if k > 1 else ""
    return _Drawn([f"return int(str(abs(x))[::-1]){scale}{_signed(b)}"],
                  f"Return the number whose digits are those of x (its sign ignored) in "
                  f"reverse{times}{_plus(b)}.")


def _count_ones(rng: random.Random) -> _Drawn:
    k, b = rng.randint(1, 5), rng.randint(-20, 20)
    scale = f" * {k}" if k > 1 else ""
    times = f", times {k}" if k > 1 else ""
    return _Drawn([f'return bin(x).count("1"){scale}{_signed(b)}'],
                  f"Return the number of 1 digits of x in binary{times}{_plus(b)}.")


def _in_range(rng: random.Random) -> _Drawn:
    low = rng.randint(-9, 20)
    high = low + rng.randint(1, 12)
    a, b = rng.sample(range(-20, 21), 2)
    return _Drawn([f"if {low} <= x <= {high}:", f"    return {a}", f"return {b}"],
                  f"If x is between {low} and {high} (inclusive), return {a}; "
                  f"otherwise return {b}.")


# Each form: its entry point's name, and the function it draws (its body: no else, elif or
# except line, for _behaviour notes each line's run before it).
FORMS: dict[str, Callable[[random.Random], _Drawn]] = {
    "scale_and_shift": _scale_and_shift, "square_plus": _square_plus, "wrap": _wrap,
    "divide_down": _divide_down, "distance_from": _distance_from, "bounded": _bounded,
    "clamp": _clamp, "piecewise": _piecewise, "even_odd": _even_odd,
    "replace_multiples": _replace_multiples, "sum_up": _sum_up,
    "count_multiples": _count_multiples, "digit_sum": _digit_sum, "digit_count": _digit_count,
    "halving_steps": _halving_steps, "repeat": _repeat, "sign_code": _sign_code,
    "scaled_remainder": _scaled_remainder, "reverse_digits": _reverse_digits,
    "count_ones": _count_ones, "in_range": _in_range,
}


class _Behaviour(NamedTuple):
    """What a function does on PROBES: its outputs, and the body lines each input runs."""

    outputs: tuple[int, ...]
    lines: tuple[frozenset[int], ...]


def _behaviour(name: str, body: list[str]) -> _Behaviour | None:
    """The function of ``body`` run on PROBES, each line first noting that it ran (a FORMS body
    has no else, elif or except line, so a note before each line keeps its meaning); None where
    an output is larger than MAX_OUTPUT."""
    noted = "".join(f"    {line[: len(line) - len(line.lstrip())]}_ran.add({i})\n    {line}\n"
                    for i, line in enumerate(body))
    namespace: dict = {}
    exec(f"def {name}(x, _ran):\n{noted}", namespace)
    outputs, lines = [], []
    for x in PROBES:
        ran: set[int] = set()
        outputs.append(namespace[name](x, ran))
        lines.append(frozenset(ran))
    if any(abs(y) > MAX_OUTPUT for y in outputs):
        return None
    return _Behaviour(tuple(outputs), tuple(lines))


def seed_of(outputs: tuple[int, ...]) -> int:
    """The one seed whose set a function with these outputs on PROBES belongs to."""
    digest = hashlib.blake2b(repr(outputs).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEEDS


def _examples(done: _Behaviour, rng: random.Random) -> list[int] | None:
    """3 to 5 inputs of EXAMPLE_INPUTS that run every line any probe runs and show more than
    one output, in order; None where none do."""
    value = dict(zip(PROBES, done.outputs))
    runs = dict(zip(PROBES, done.lines))
    every_line = frozenset().union(*done.lines)
    for _ in range(20):
        order = rng.sample(EXAMPLE_INPUTS, len(EXAMPLE_INPUTS))
        shown: list[int] = []
        covered: frozenset[int] = frozenset()
        for x in order:  # first an input for each line not yet run
            if runs[x] - covered:
                shown.append(x)
                covered |= runs[x]
        if covered != every_line or len(shown) > 5:
            return None
        count = rng.randint(max(3, len(shown)), 5)
        shown += [x for x in order if x not in shown][: count - len(shown)]
        if len({value[x] for x in shown}) > 1:
            return sorted(shown)
    return None


def _problem(task_id: str, name: str, drawn: _Drawn, done: _Behaviour, shown: list[int],
             rng: random.Random, describe: bool) -> dict:
    """The problem in HumanEval's format: ``shown`` in the docstring, 6 more inputs in the test;
    ``describe``: the docstring's first line the function in words, else a request to infer it."""
    value = dict(zip(PROBES, done.outputs))
    tested = shown + rng.sample([x for x in PROBES if x not in shown], 6)
    examples = "".join(f"    >>> {name}({x})\n    {value[x]}\n" for x in shown)
    summary = drawn.words if describe else INFER
    prompt = (f"def {name}(x: int) -> int:\n"
              f'    """{summary}\n'
              f'{examples}    """\n')
    test = "def check(candidate):\n" + "".join(f"    assert candidate({x}) == {value[x]}\n"
                                                for x in tested)
    return {"task_id": task_id, "prompt": prompt, "entry_point": name,
            "canonical_solution": "".join(f"    {line}\n" for line in drawn.body), "test": test}


def generate_problems(n: int, seed: int, forms: Sequence[str] | None = None,
                      describe: bool = False, at_most: bool = False) -> list[dict]:
    """``n`` problems of set ``seed`` (0 to SEEDS - 1), the same ones for the same seed and
    ``forms`` (names of FORMS; None: all of them, drawn alike); where the set holds fewer
    distinct functions of those forms, a ValueError, or with ``at_most`` the ones it holds.
    ``describe``: each docstring states its function in words before the examples (the same
    functions, examples and tests), so that the prompt determines the function, as
    HumanEval's do."""
    if forms is not None:
        unknown = sorted(set(forms) - set(FORMS))
        close = settings.closest_key(unknown[0], FORMS) if unknown else None
        hint = f" (did you mean {close}?)" if close else ""
        if unknown or not forms:
            raise ValueError(f"forms {', '.join(unknown) or '(none)'}: not a form of "
                             f"codelm.data.problems{hint}; name one or more of "
                             f"{', '.join(sorted(FORMS))}")
    if not 0 <= seed < SEEDS:
        raise ValueError(f"seed {seed}: must be 0 to {SEEDS - 1} (each seed a set of its own)")
    if n < 0:
        raise ValueError(f"n {n}: must be >= 0")
    rng = random.Random(seed)
    names = sorted(FORMS if forms is None else set(forms))
    problems: list[dict] = []
    seen: set[tuple[int, ...]] = set()
    tried: set[tuple[str, ...]] = set()
    repeats = 0  # draws in a row of a function drawn before
    while len(problems) < n:
        if repeats > EXHAUSTED_AFTER:  # every function of these forms has been drawn
            if at_most:
                break
            raise ValueError(f"seed {seed}: only {len(problems)} distinct problems were found; "
                             "ask for fewer, name more forms, or --at-most")
        name = rng.choice(names)
        drawn = FORMS[name](rng)
        if (name, *drawn.body) in tried:
            repeats += 1
            continue
        repeats = 0
        tried.add((name, *drawn.body))
        done = _behaviour(name, drawn.body)
        if done is None or done.outputs in seen or seed_of(done.outputs) != seed:
            continue
        shown = _examples(done, rng)
        if shown is None:
            continue
        seen.add(done.outputs)
        problems.append(_problem(f"generated-{seed}/{len(problems)}", name, drawn, done, shown,
                                 rng, describe))
    return problems


# A slip in a written body: an integer one off, or a comparison with or without its equality.
_INTEGER = re.compile(r"(?<![\w\"])\d+(?![\w\"])")
_COMPARISON = re.compile(r"<=|>=|==|!=|<|>")
_SLIPPED = {"<=": "<", "<": "<=", ">=": ">", ">": ">=", "==": "!=", "!=": "=="}


def _slips(line: str) -> list[str]:
    """``line`` with each one slip of it made: each integer one up and one down, each
    comparison with its equality flipped."""
    slipped = []
    for found in _INTEGER.finditer(line):
        for step in (-1, 1):
            value = int(found.group()) + step
            if value >= 0:
                slipped.append(line[: found.start()] + str(value) + line[found.end():])
    for found in _COMPARISON.finditer(line):
        slipped.append(line[: found.start()] + _SLIPPED[found.group()] + line[found.end():])
    return slipped


def buggy_solution(problem: dict, rng: random.Random) -> str | None:
    """A body of ``problem`` one slip away from its canonical solution that fails its test (a
    bound one off, ``<`` for ``<=``), drawn by ``rng``, as written code holds such bugs; None
    where no slip fails the test. Slips are made in ``if`` and ``return`` lines only (a slipped
    loop could run forever)."""
    body = [line[4:] for line in problem["canonical_solution"].splitlines()]
    name = problem["entry_point"]
    canonical = _behaviour(name, body)
    tested = {int(x) for x in re.findall(r"candidate\((-?\d+)\)", problem["test"])}
    failing = []
    for number, line in enumerate(body):
        if not line.lstrip().startswith(("if ", "return ")):
            continue
        for slipped in _slips(line):
            candidate = body[:number] + [slipped] + body[number + 1:]
            try:
                done = _behaviour(name, candidate)
            except (ArithmeticError, ValueError):  # a slip to ``% 0`` or ``[::0]``
                continue
            if done is None:
                continue
            differ = {x for x, ours, theirs in zip(PROBES, done.outputs, canonical.outputs)
                      if ours != theirs}
            if differ & tested:
                failing.append(candidate)
    if not failing:
        return None
    return "".join(f"    {line}\n" for line in rng.choice(failing))


def with_bugs(problems: list[dict], share: float, seed: int) -> tuple[list[dict], int]:
    """``problems`` with the canonical solutions of about ``share`` of them (each drawn with
    that chance, by a generator of its own for ``seed``, so the problems are those of the seed
    without bugs) replaced by ``buggy_solution``; and how many were."""
    rng = random.Random(f"bugs of seed {seed}")
    written, bugs = [], 0
    for problem in problems:
        buggy = buggy_solution(problem, rng) if rng.random() < share else None
        if buggy is not None:
            problem = {**problem, "canonical_solution": buggy}
            bugs += 1
        written.append(problem)
    return written, bugs


def form_counts(names: Sequence[str]) -> str:
    """How many problems of each form, the most first. Forms are drawn alike, so a form more
    than 4 standard deviations below an even share (chance alone almost never) has run out: a
    seed holds few distinct functions of it (clamp, replace_multiples about 20 each), and the
    rest of a large --n is the other forms."""
    counts = Counter(names).most_common()
    share = 1 / max(len(counts), 1)
    mean = len(names) * share
    spread = (len(names) * share * (1 - share)) ** 0.5
    parts = []
    for form, count in counts:
        ran_out = count < mean - 4 * spread
        parts.append(f"{form} {count}" + (" (all this seed holds)" if ran_out else ""))
    return "by form: " + (", ".join(parts) or "(none)")


def main(argv: list[str] | None = None) -> int:
    """Write a set of generated problems as JSONL, one problem a line."""
    parser = settings.ArgumentParser(
        prog="python -m codelm.data.problems",
        description="Write generated execution problems (integer functions of one argument, "
        "inferred from the examples of their docstrings) as HumanEval-format JSONL: eval.py "
        "--tasks passk --problems passk=FILE scores a model on them.")
    parser.add_argument("--n", type=int, required=True, help="how many problems of each seed")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED",
                        help=f"which set, 0 to {SEEDS - 1}: sets share no function; several: "
                        "--n of each, one after the other (default: 0)")
    parser.add_argument("--at-most", action="store_true",
                        help="where a seed holds fewer than --n distinct functions of --forms, "
                        "write those (a seed holds about 20 of clamp or replace_multiples)")
    parser.add_argument("--out", required=True, help="the JSONL file written (an existing one "
                        "is refused unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--forms", nargs="+", default=None, metavar="FORM",
                        help="draw only these forms (the problems' difficulty: sign_code and "
                        "in_range ask to copy constants from the examples, scale_and_shift or "
                        "count_ones to infer them by arithmetic); default: all of "
                        f"{', '.join(sorted(FORMS))}")
    parser.add_argument("--pairs", action="store_true",
                        help="write {prompt, completion} pairs (the canonical solution the "
                        "completion), supervised training data: trainingmanager.py --task "
                        "completion --data FILE")
    parser.add_argument("--text", action="store_true",
                        help="write {text} documents (the prompt, then the canonical solution): "
                        "language-model data, the docstring's examples trained on too "
                        "(trainingmanager.py --task lm --data FILE)")
    parser.add_argument("--bugs", type=float, default=0.0, metavar="SHARE",
                        help="with --pairs or --text: about this share of the solutions "
                        "written carry a bug that fails the problem's test, one slip from the "
                        "canonical solution (an integer one off, < for <=, in an if or return "
                        "line), as written code holds bugs; a solution with no such slip stays "
                        "right (sum_up, halving_steps, repeat); the same problems (default: 0)")
    parser.add_argument("--describe", action="store_true",
                        help="state each function in words in its docstring, before the "
                        "examples, HumanEval-style: the prompt then determines the function "
                        "(the same functions, examples and tests as without it)")
    args = parser.parse_args(argv)
    if args.pairs and args.text:
        parser.error("--pairs and --text: choose one")
    if not 0 <= args.bugs <= 1:
        parser.error(f"--bugs {args.bugs}: a share, 0 to 1")
    if args.bugs and not (args.pairs or args.text):
        parser.error("--bugs: the solutions of --pairs or --text carry them; add one")
    if len(set(args.seed)) < len(args.seed):
        parser.error("--seed: a seed named twice would write its problems twice")
    if outside := [seed for seed in args.seed if not 0 <= seed < SEEDS]:
        parser.error(f"--seed {outside[0]}: must be 0 to {SEEDS - 1} (each seed a set of its own)")
    if Path(args.out).exists() and not args.force:
        parser.error(f"--out {args.out}: exists; --force replaces it")

    def write() -> None:
        problems, counts, bugs = [], [], 0
        for seed in args.seed:
            made = generate_problems(args.n, seed, args.forms, args.describe, args.at_most)
            written, slipped = with_bugs(made, args.bugs, seed)  # share 0: none slipped
            problems += written
            bugs += slipped
            line = form_counts([problem["entry_point"] for problem in made])
            if len(made) < args.n:
                line += f" ({len(made)} of --n {args.n}: all it holds)"
            if len(args.seed) > 1:
                line = f"seed {seed} {line}"
            counts.append(line)
        if args.pairs:
            problems = [{"prompt": p["prompt"], "completion": p["canonical_solution"]}
                        for p in problems]
        elif args.text:
            problems = [{"text": p["prompt"] + p["canonical_solution"]} for p in problems]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        process.write_atomic(args.out, "".join(json.dumps(p) + "\n" for p in problems))
        seeds = " ".join(str(seed) for seed in args.seed)
        print(f"wrote {len(problems)} problems of seed{'s' * (len(args.seed) > 1)} {seeds} "
              f"to {args.out}")
        if args.bugs:
            print(f"{bugs} of the {len(problems)} solutions carry a bug that fails the test")
        print("\n".join(counts))

    return process.run_tool(write, "interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
