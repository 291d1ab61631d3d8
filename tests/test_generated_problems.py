"""codelm.data.problems: generated execution problems in HumanEval's format, the same for a
seed, disjoint across seeds, each canonical solution passing its test in the sandbox, and
eval.py reading the file the command writes."""

from __future__ import annotations

import ast
import json
import random
import re

import pytest

from codelm.data import problems as generated
from codelm.data.problems import PROBES, SEEDS, generate_problems, seed_of
from codelm.evaluation.config import EvalConfig
from codelm.evaluation.tasks import passk, registry
from codelm.sandbox.runner import SandboxConfig
from codelm.training import rewards


def _outputs(problem: dict) -> tuple[int, ...]:
    """What the canonical solution computes on PROBES, run here."""
    namespace: dict = {}
    exec(problem["prompt"] + problem["canonical_solution"], namespace)
    return tuple(namespace[problem["entry_point"]](x) for x in PROBES)


def test_a_seed_gives_the_same_problems_in_humanevals_format():
    """The same seed, the same problems (a shorter set is the longer one's start); each has
    HumanEval's fields, a prompt ending in its entry point's docstring with 3 to 5 examples the
    canonical solution agrees with, and a test of those inputs and 6 more."""
    problems = generate_problems(60, 3)
    assert problems == generate_problems(60, 3)
    assert generate_problems(20, 3) == problems[:20]
    assert len({p["task_id"] for p in problems}) == 60
    for problem in problems:
        assert set(problem) == {"task_id", "prompt", "entry_point", "canonical_solution", "test"}
        name = problem["entry_point"]
        assert problem["prompt"].startswith(f"def {name}(x: int) -> int:\n")
        assert problem["prompt"].endswith('    """\n')
        examples = re.findall(rf">>> {name}\((-?\d+)\)\n    (-?\d+)\n", problem["prompt"])
        assert 3 <= len(examples) <= 5
        value = dict(zip(PROBES, _outputs(problem)))
        assert all(value[int(x)] == int(y) for x, y in examples)
        asserts = re.findall(r"assert candidate\((-?\d+)\) == (-?\d+)\n", problem["test"])
        assert len(asserts) == len(examples) + 6
        assert all(value[int(x)] == int(y) for x, y in asserts)
        ast.parse(problem["prompt"] + problem["canonical_solution"] + problem["test"])


def test_seeds_share_no_problem_and_no_function():
    """Two seeds share no prompt, solution or test, nor any function (its outputs on PROBES):
    each problem's function hashes to its own seed, and no seed repeats a function."""
    sets = {seed: generate_problems(150, seed) for seed in range(4)}
    functions = {}
    for seed, problems in sets.items():
        outputs = [_outputs(problem) for problem in problems]
        assert {seed_of(o) for o in outputs} == {seed}
        assert len(set(outputs)) == len(outputs)
        functions[seed] = set(outputs)
    for field in ("prompt", "canonical_solution", "test"):
        seen = [p[field] for problems in sets.values() for p in problems]
        assert len(set(seen)) == len(seen), field
    for a in sets:
        for b in sets:
            assert a == b or not functions[a] & functions[b]


@pytest.fixture(scope="module")
def seed_0() -> list[dict]:
    """generate_problems(400, 0), made once for the tests that read it (none changes it)."""
    return generate_problems(400, 0)


def test_every_form_appears_and_every_canonical_solution_passes_in_the_sandbox(seed_0):
    """One problem of each form, run through the reward path's trusted test: each canonical
    solution earns its reward."""
    problems = seed_0
    first = {}
    for problem in problems:
        first.setdefault(problem["entry_point"], problem)
    assert set(first) == set(generated.FORMS)
    rewards.check_problems(list(first.values()), passk.run_check, SandboxConfig(timeout_s=10.0),
                           workers=2)


def test_the_command_writes_a_file_evals_pass_at_k_reads(tmp_path, capsys):
    """`python -m codelm.data.problems --n N --seed S --out FILE` writes JSONL that eval.py's
    loader reads as --problems passk=FILE, each canonical solution passing its test apart from
    the candidate (none needs the candidate's interpreter); its folder is made (the docs'
    data/exec/ is no folder of a fresh clone). Every form's canonical solution passing apart
    is test_every_form_appears_and_every_canonical_solution_passes_in_the_sandbox's; here 12
    problems go through the command and the loader."""
    out = tmp_path / "exec" / "heldout.jsonl"
    assert generated.main(["--n", "12", "--seed", "5", "--out", str(out)]) == 0
    assert f"wrote 12 problems of seed 5 to {out}" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == generate_problems(12, 5)
    cfg = EvalConfig(tasks=["passk"], problems=[f"passk={out}"])
    file = registry.problem_files(cfg)["passk"]
    loaded = passk.load_problems(file, SandboxConfig(timeout_s=10.0), workers=2)
    assert len(loaded) == 12
    assert all(problem.get("trusted", True) for problem in loaded)


def test_the_command_counts_each_form_and_names_one_that_ran_out(tmp_path, capsys):
    """Forms are drawn alike, but a seed holds few clamp functions: of 200 problems of two
    forms, clamp has all 16 of seed 3's (17 cannot be made) and the output says so; sign_code,
    with thousands, fills the rest and is not called out."""
    out = tmp_path / "two.jsonl"
    argv = ["--n", "200", "--seed", "3", "--forms", "sign_code", "clamp", "--out", str(out)]
    assert generated.main(argv) == 0
    printed = capsys.readouterr().out
    assert "sign_code 184," in printed
    assert "clamp 16 (all this seed holds)" in printed
    with pytest.raises(ValueError, match="only 16 distinct"):
        generate_problems(17, 3, ["clamp"])


def test_several_seeds_and_at_most_write_every_function_the_seeds_hold(tmp_path, capsys):
    """--seed A B --at-most: each seed's problems in turn, as generate_problems makes them, and
    where a seed holds fewer than --n of the forms, all it holds instead of an error."""
    out = tmp_path / "small.jsonl"
    argv = ["--n", "30", "--seed", "3", "4", "--forms", "clamp", "--at-most", "--out", str(out)]
    assert generated.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote 42 problems of seeds 3 4 to {out}" in printed
    assert "seed 3 by form: clamp 16 (16 of --n 30" in printed and "all it holds" in printed
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == generate_problems(16, 3, ["clamp"]) + generate_problems(26, 4, ["clamp"])
    with pytest.raises(ValueError, match="only 26 distinct"):
        generate_problems(27, 4, ["clamp"])
    for seeds, message in ((["4", "4"], "named twice"), (["4", "99"], "--seed 99: must be 0 to")):
        with pytest.raises(SystemExit) as refused:
            generated.main([*argv[:3], *seeds, *argv[5:]])
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_the_command_writes_supervised_pairs_of_the_same_problems(tmp_path, capsys):
    """--pairs: each problem as {prompt, completion}, its canonical solution the completion
    (trainingmanager.py --task completion --data FILE reads them as pairs)."""
    out = tmp_path / "sft.jsonl"
    assert generated.main(["--n", "5", "--seed", "2", "--pairs", "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs == [{"prompt": p["prompt"], "completion": p["canonical_solution"]}
                     for p in generate_problems(5, 2)]
    text = tmp_path / "lm.jsonl"
    assert generated.main(["--n", "5", "--seed", "2", "--text", "--out", str(text)]) == 0
    assert [json.loads(line) for line in text.read_text().splitlines()] == [
        {"text": p["prompt"] + p["canonical_solution"]} for p in generate_problems(5, 2)]


def test_a_seed_out_of_range_or_too_many_problems_is_one_message(monkeypatch):
    """A seed outside 0..SEEDS-1, a negative n, or more problems than the seed's set holds: a
    ValueError that says what to do."""
    with pytest.raises(ValueError, match=rf"seed {SEEDS}: must be 0 to {SEEDS - 1}"):
        generate_problems(1, SEEDS)
    with pytest.raises(ValueError, match="n -1: must be >= 0"):
        generate_problems(-1, 0)
    monkeypatch.setattr(generated, "FORMS", {"wrap": generated.FORMS["wrap"]})
    with pytest.raises(ValueError, match=r"seed 0: only \d+ distinct problems .* ask for fewer"):
        generate_problems(50, 0)


def test_forms_draws_those_forms_only_and_keeps_seeds_apart(tmp_path, capsys):
    """--forms: every problem of the named forms, the same for the same seed and forms, two
    seeds still sharing no function; an unknown form is one message naming the known ones (and
    the one a typo misspells)."""
    forms = ["sign_code", "in_range"]
    problems = generate_problems(40, 4, forms)
    assert {p["entry_point"] for p in problems} == set(forms)
    assert problems == generate_problems(40, 4, forms)
    other = {_outputs(p) for p in generate_problems(40, 5, forms)}
    assert not {_outputs(p) for p in problems} & other
    out = tmp_path / "few.jsonl"
    assert generated.main(["--n", "10", "--seed", "4", "--forms", *forms, "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == problems[:10]
    with pytest.raises(ValueError, match="forms squares: not a form .* name one or more of"):
        generate_problems(5, 0, ["squares", "sign_code"])
    with pytest.raises(ValueError, match=r"forms \(none\)"):
        generate_problems(5, 0, [])
    assert generated.main(["--n", "5", "--forms", "sign_cod", "--out",
                           str(tmp_path / "t.jsonl")]) == 2  # a typo: the form it misspells
    assert "forms sign_cod: not a form of codelm.data.problems (did you mean sign_code?)" in \
        capsys.readouterr().err


def _body_constants(solution: str) -> set[int]:
    """The integers a canonical solution's body writes (a slice's step, ``[::-1]``, is syntax of
    reversal rather than a drawn constant)."""
    tree = ast.parse("def f(x):\n" + solution)
    in_slices = {id(node) for slice_ in ast.walk(tree) if isinstance(slice_, ast.Slice)
                 for node in ast.walk(slice_)}
    return {abs(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and type(node.value) is int
            and id(node) not in in_slices}


def test_described_problems_name_every_constant_and_pass_in_the_sandbox(seed_0):
    """--describe: the same functions, examples and tests as without it, the docstring's first
    line the function in words, naming every integer of the body (in the body's order for the
    drawn ones); one canonical solution of each form passes its test through the reward path."""
    plain = seed_0
    described = generate_problems(400, 0, describe=True)
    assert described == generate_problems(400, 0, describe=True)
    assert generate_problems(20, 0, describe=True) == described[:20]
    first = {}
    for before, problem in zip(plain, described):
        assert {k: v for k, v in before.items() if k != "prompt"} == {
            k: v for k, v in problem.items() if k != "prompt"}
        summary, examples = problem["prompt"].split("\n", 2)[1:]
        assert before["prompt"].split("\n", 2)[2] == examples
        assert summary.startswith('    """') and summary.endswith(".")
        assert generated.INFER not in summary
        words = {abs(int(number)) for number in re.findall(r"-?\d+", summary)}
        missing = _body_constants(problem["canonical_solution"]) - words
        assert not missing, (summary, problem["canonical_solution"])
        first.setdefault(problem["entry_point"], problem)
    assert set(first) == set(generated.FORMS)
    rewards.check_problems(list(first.values()), passk.run_check, SandboxConfig(timeout_s=10.0),
                           workers=2)


@pytest.mark.parametrize(("form", "body", "words"), [
    ("in_range", ["if 10 <= x <= 17:", "    return -19", "return -6"],
     "If x is between 10 and 17 (inclusive), return -19; otherwise return -6."),
    ("scale_and_shift", ["return -3 * x + 7"], "Return -3 times x plus 7."),
    ("clamp", ["return max(-2, min(x, 9))"], "Return x, but at least -2 and at most 9."),
    ("piecewise", ["if x > 4:", "    return -x - 2", "return 3 * x"],
     "If x is greater than 4, return -x minus 2; otherwise return 3 times x."),
])
def test_a_description_writes_the_constants_in_the_bodys_order(form, body, words):
    """The words of a drawn body are what a person would write, constants in the code's order:
    found by drawing until that body comes up."""
    rng = random.Random(0)
    for _ in range(200_000):
        drawn = generated.FORMS[form](rng)
        if drawn.body == body:
            assert drawn.words == words
            return
    pytest.fail(f"{body} not drawn")


def test_the_command_writes_described_problems(tmp_path):
    """--describe on the command line: the file generate_problems(..., describe=True) gives."""
    out = tmp_path / "described.jsonl"
    assert generated.main(["--n", "8", "--seed", "2", "--describe", "--forms", "in_range",
                           "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == generate_problems(8, 2, ["in_range"], True)
    assert "(inclusive), return" in json.loads(lines[0])["prompt"]


def test_bugs_are_one_slip_from_the_solution_and_fail_its_test_in_the_sandbox(tmp_path, capsys):
    """--bugs SHARE: the same problems, about SHARE of their solutions replaced by a body one
    slip from the canonical one (an integer one off, a comparison's equality flipped) that the
    problem's test, run in the sandbox, fails; the rest unchanged."""
    out = tmp_path / "sft.jsonl"
    forms = ["sign_code", "in_range", "clamp", "replace_multiples"]
    assert generated.main(["--n", "40", "--seed", "2", "--forms", *forms, "--describe",
                           "--pairs", "--bugs", "0.5", "--out", str(out)]) == 0
    assert "carry a bug" in capsys.readouterr().out
    problems = generate_problems(40, 2, forms, describe=True)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [pair["prompt"] for pair in pairs] == [p["prompt"] for p in problems]
    buggy = [(problem, pair["completion"]) for problem, pair in zip(problems, pairs)
             if pair["completion"] != problem["canonical_solution"]]
    assert 10 <= len(buggy) <= 30
    for problem, completion in buggy:
        canonical = problem["canonical_solution"].splitlines()
        written = completion.splitlines()
        assert len(written) == len(canonical)
        changed = [(a, b) for a, b in zip(canonical, written) if a != b]
        assert len(changed) == 1
        tokens = [(re.findall(r"-?\d+|[<>=!]+|\w+", line)) for line in changed[0]]
        assert len(tokens[0]) == len(tokens[1])
        differ = [(a, b) for a, b in zip(*tokens) if a != b]
        assert len(differ) == 1
        a, b = differ[0]
        assert abs(int(a) - int(b)) == 1 if a.lstrip("-").isdigit() else {a, b} in (
            {"<", "<="}, {">", ">="}, {"==", "!="})
    jobs = [(problem, completion) for problem, completion in buggy]
    results = rewards.verdicts(jobs, passk.run_check, SandboxConfig(timeout_s=10.0), workers=2)
    assert not any(result.passed for result in results)


def test_bugs_outside_a_share_or_without_solutions_written_is_one_message(tmp_path, capsys):
    """--bugs must be a share, and it slips the solutions of --pairs or --text only."""
    out = str(tmp_path / "x.jsonl")
    with pytest.raises(SystemExit):
        generated.main(["--n", "5", "--pairs", "--bugs", "1.5", "--out", out])
    assert "--bugs 1.5: a share" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generated.main(["--n", "5", "--bugs", "0.3", "--out", out])
    assert "--pairs or --text" in capsys.readouterr().err


def test_an_existing_out_file_is_kept_unless_force(tmp_path, capsys):
    """A file already at --out is refused in one line, not replaced; --force replaces it."""
    out = tmp_path / "keep.jsonl"
    out.write_text("precious\n")
    with pytest.raises(SystemExit):
        generated.main(["--n", "2", "--seed", "0", "--out", str(out)])
    assert "exists; --force replaces it" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    assert generated.main(["--n", "2", "--seed", "0", "--out", str(out), "--force"]) == 0
    assert len(out.read_text().splitlines()) == 2
