"""The repository keeps its promises to a newcomer: README commands, CI, pins."""

import argparse
import ast
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import popen

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
    """The README opens with two commands: one that ends by training (python trainingmanager.py)
    and one that installs the dev requirements and runs the tests, a new user's first steps."""
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python trainingmanager.py")
    assert "requirements-dev.txt" in commands[1] and "pytest" in commands[1]


def test_readme_counts_parameters_as_the_presets_table_does_and_says_how_to_compare_runs():
    """README's parameter figures are `python architecture.py`'s (every weight once, at the
    default run's vocabulary), to the digits it gives; it says what a busy machine's default
    run gets and how to pin the model; it stays a page (150 lines)."""
    import dataclasses

    import architecture

    text = (ROOT / "README.md").read_text()
    figures = re.findall(r"`([\w.-]+)` \((\d+(?:\.(\d+))?)M", text)
    assert {name for name, *_ in figures} >= {"code-4x192", "code-3x128", "llama-60m"}
    for name, figure, decimals in figures:
        preset = dataclasses.replace(architecture.PRESETS[name],
                                     vocab_size=architecture.DEFAULT_RUN_VOCAB)
        count = architecture.parameter_count(preset) / 1e6
        assert float(figure) == round(count, len(decimals)), (name, figure, count)
    flat = " ".join(text.split())
    assert "busy machine" in flat and "`--preset code-4x192" in flat


def test_the_readme_is_a_page_of_at_most_150_lines():
    """The README opens the project: what it is, its two commands, a tour; the rest is in
    docs/, so it stays at most 150 lines (a new family joins a row of the Models table)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_ci_runs_the_readme_test_command():
    """CI runs the README's test command as written, so the command a user copies is the one that
    passes."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_torch_pinned_exactly():
    """requirements.txt pins torch to one version, the one the bit-exact checks were made under."""
    reqs = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in reqs


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a script built."""


def _script_parser(path: Path, monkeypatch) -> argparse.ArgumentParser:
    """The argparse parser a script's main() builds, without running it."""
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])  # as `python SCRIPT` has it
    monkeypatch.setattr(sys, "argv", [str(path)])
    with pytest.raises(_Parsed) as caught:
        runpy.run_path(str(path), run_name="__main__")
    return caught.value.args[0]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("bench_*.py")))
def test_bench_help_gives_every_flags_default(script, monkeypatch):
    """README: every script's --help gives each flag's meaning and default (an on/off switch
    that is off unless given needs none)."""
    parser = _script_parser(ROOT / "bench" / script, monkeypatch)
    for action in parser._actions:
        if (action.option_strings and action.help != argparse.SUPPRESS
                and not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))):
            assert "default" in action.help, f"{script} {action.option_strings[0]}"


@pytest.mark.slow  # prepares the stdlib corpus from scratch
def test_bench_train_drives_the_real_train_loop(tmp_path):
    """bench_train.py times trainingmanager.train itself against bare loops: on a tiny model it
    runs end to end and prints the manager's overhead."""
    out = subprocess.run([sys.executable, "bench/bench_train.py", "--steps", "2", "--preset",
                          "tiny", "--batch-size", "2", "--block-size", "32", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CODELM_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "manager overhead vs bare loop" in out.stdout


@pytest.mark.parametrize(("family", "width", "said"), [
    ("llama", "64", "--width 64: must be a positive multiple of 128"),
    ("codegen", "128", "--width 128: codegen needs a multiple of 256")])
def test_bench_lora_refuses_a_width_the_familys_heads_do_not_divide(family, width, said, capsys,
                                                                     monkeypatch):
    """A width whose heads a family cannot lay out is a usage error before any model is built:
    64 gives Llama no key/value head (not a ZeroDivisionError deep in transformers), 128 gives
    CodeGen two heads, which its qkv_proj's 4 chunks cannot hold."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts its folders first
    main = runpy.run_path(str(ROOT / "bench" / "bench_lora.py"))["main"]
    with pytest.raises(SystemExit) as stop:
        main(["--width", width, "--steps", "1", "--families", family, "--skip-memory"])
    assert stop.value.code == 2
    assert said in capsys.readouterr().err


# docs/contracts.md's import floors: what each project module may import directly at import
# time (settings and process, the ground-floor utilities, are open to all). A module may also load what those
# load.
PROCESS, SETTINGS, DISTRIBUTED = ("codelm.runtime.process", "codelm.runtime.settings",
                                  "codelm.runtime.distributed")
HUB, RNG = "codelm.runtime.hub", "codelm.runtime.rng"
WORKERS, CONSOLE = "codelm.runtime.workers", "codelm.runtime.console"
KERNELS, GENERATION = "codelm.kernels", "codelm.models.generation"
ENGINE, SERVING, ENDPOINTS = "codelm.models.engine", "codelm.serving", "codelm.endpoints"
TOOL_CALLS, OPENAI_API = "codelm.tool_calls", "codelm.openai_api"
FAMILIES, PRETRAINED = "codelm.models.families", "codelm.models.pretrained"
QUANTIZE, ADAPTER_CONFIG = "codelm.models.quantize", "codelm.models.adapter_config"
RUNDIR, CHECKPOINT, TRACKERS = ("codelm.runs.rundir", "codelm.runs.checkpoint",
                                "codelm.runs.trackers")
TOKENIZER_FILES, BATCHING, SOURCE = ("codelm.tokenization.files", "codelm.tokenization.batching",
                                     "codelm.tokenization.source")
BPE, CHAT = "codelm.tokenization.bpe", "codelm.tokenization.chat"
UNICODE9, NORMALIZATION, CUTS = ("codelm.tokenization.unicode9",
                                 "codelm.tokenization.normalization", "codelm.tokenization.cuts")
MERGES, SPIECE, ADDED, COMPILED = ("codelm.tokenization.merges", "codelm.tokenization.spiece",
                                   "codelm.tokenization.added", "codelm.tokenization.compiled")
GGUF_WRITER, GGUF_COMMAND = "codelm.gguf.writer", "codelm.gguf.__main__"
BOOTSTRAP, RUNNER, SANDBOX_COMMAND = ("codelm.sandbox.bootstrap", "codelm.sandbox.runner",
                                      "codelm.sandbox.__main__")
CROSSING = "codelm.sandbox.crossing"
TRAINCONFIG, LOADING = "codelm.trainconfig", "codelm.loading"
EVAL_CONFIG, METRICS, SCORING = ("codelm.evaluation.config", "codelm.evaluation.metrics",
                                 "codelm.evaluation.scoring")
EVAL_CORPUS, RESULTS = "codelm.evaluation.corpus", "codelm.evaluation.results"
INSTRUCT = "codelm.evaluation.instruct"
JOURNAL = "codelm.evaluation.journal"
PREFERENCE_PAIRS = "codelm.evaluation.preference_pairs"
PROBLEMS, PASSK, REGISTRY = ("codelm.evaluation.tasks.problems", "codelm.evaluation.tasks.passk",
                             "codelm.evaluation.tasks.registry")
LM_TASK, TEXT_TASK, FIM_TASK, INFILL_TASK, CODEXGLUE_TASK, PROJECT_TASK = (
    f"codelm.evaluation.tasks.{name}"
    for name in ("lm", "text", "fim", "infill", "codexglue", "project"))
HUMANEVAL, HUMANEVAL_PLUS, MBPP, MBPP_PLUS = (f"codelm.evaluation.tasks.{name}" for name in (
    "humaneval", "humaneval_plus", "mbpp", "mbpp_plus"))
TASK_MODULES = {LM_TASK, TEXT_TASK, FIM_TASK, INFILL_TASK, CODEXGLUE_TASK, HUMANEVAL,
                HUMANEVAL_PLUS, MBPP, MBPP_PLUS, PROJECT_TASK}
PLAN, BUILD, TRAINER, BATCHES = ("codelm.training.plan", "codelm.training.build",
                                 "codelm.training.trainer", "codelm.training.batches")
RECORD, FINISH, OPTIM = ("codelm.training.record", "codelm.training.finish",
                         "codelm.training.optim")
GRPO, PREFERENCE = "codelm.training.grpo", "codelm.training.preference"
REWARDS, ROLLOUT = "codelm.training.rewards", "codelm.training.rollout"
BUDGET = "codelm.training.budget"
PREFERENCE_BATCHES, PREFERENCE_RUN = ("codelm.training.preference_batches",
                                      "codelm.training.preference_run")
TOKENIZATION = {TOKENIZER_FILES, BATCHING, SOURCE, BPE, CHAT, UNICODE9, NORMALIZATION, CUTS, MERGES,
                SPIECE, ADDED, COMPILED}
DATA_CONFIG, DATA_CACHE = "codelm.data.config", "codelm.data.cache"
DATA_SOURCES, CLEANING = "codelm.data.sources", "codelm.data.cleaning"
DEDUPE, SHARDS = "codelm.data.dedupe", "codelm.data.shards"
SPLITS, EXAMPLES = "codelm.data.splits", "codelm.data.examples"
ENCODING, DATASETS = "codelm.data.encoding", "codelm.data.datasets"
GENERATED_PROBLEMS, PREFERENCE_DATA = "codelm.data.problems", "codelm.data.preferences"
COMPOSERS, HISTORY, PROJECT = ("codelm.data.composers", "codelm.data.history",
                              "codelm.data.project")
DATA = {DATA_CONFIG, DATA_CACHE, DATA_SOURCES, CLEANING, DEDUPE, SHARDS, SPLITS, EXAMPLES, ENCODING,
        DATASETS, GENERATED_PROBLEMS, PREFERENCE_DATA, COMPOSERS, HISTORY, PROJECT}
BELOW_FLOOR_3 = TOKENIZATION | DATA | {
    PROCESS, CONSOLE, SETTINGS, HUB, RNG, WORKERS, RUNDIR, CHECKPOINT, TRACKERS, "tokenizer", KERNELS,
    "architecture", GENERATION, OPTIM, "scraping", FAMILIES, PRETRAINED, QUANTIZE,
    ADAPTER_CONFIG, "lora", "dataset", BATCHES, TRAINCONFIG, DISTRIBUTED,
    TRAINER, RECORD, BUDGET, PLAN, BUILD, FINISH, BOOTSTRAP, CROSSING, RUNNER, GGUF_WRITER, ENGINE,
    SERVING, OPENAI_API, ENDPOINTS, TOOL_CALLS, GRPO, PREFERENCE, REWARDS, ROLLOUT, PREFERENCE_BATCHES,
    PREFERENCE_RUN}
# What a task module may import: the data's examples and encoding, a loaded model, the sandbox,
# the metrics and scoring, the problems files and pass@k.
TASK_FLOOR = {PROCESS, CONSOLE, SETTINGS, GENERATION, RUNNER, "tokenizer", BPE, SOURCE, DATA_CONFIG,
              DATA_SOURCES, EXAMPLES, ENCODING, LOADING, METRICS, SCORING, PROBLEMS, PASSK}
MAY_IMPORT = {
    PROCESS: set(),
    CONSOLE: set(),
    ENDPOINTS: set(),
    TOOL_CALLS: set(),
    SETTINGS: set(),
    DISTRIBUTED: set(),
    HUB: set(),
    RNG: set(),
    WORKERS: {PROCESS},
    RUNDIR: {PROCESS, SETTINGS, DISTRIBUTED},
    CHECKPOINT: {PROCESS, SETTINGS, RUNDIR, HUB},
    TRACKERS: {PROCESS, RUNDIR},
    TOKENIZER_FILES: {SETTINGS},
    BATCHING: {PROCESS},
    SOURCE: set(),
    CHAT: {TOKENIZER_FILES},
    UNICODE9: set(),
    NORMALIZATION: {UNICODE9},
    CUTS: set(),
    MERGES: set(),
    SPIECE: {CUTS, TOKENIZER_FILES},
    ADDED: {CUTS, TOKENIZER_FILES},
    COMPILED: {SETTINGS, PROCESS, MERGES, SPIECE},
    BPE: {TOKENIZER_FILES, BATCHING, CHAT, NORMALIZATION, CUTS, MERGES, SPIECE, ADDED, COMPILED},
    "tokenizer": {PROCESS, SETTINGS} | TOKENIZATION,
    KERNELS: set(),
    "architecture": {KERNELS},
    GENERATION: {"architecture", KERNELS},
    ENGINE: {"architecture", KERNELS, GENERATION},
    OPTIM: set(),
    "scraping": {CONSOLE, PROCESS, SETTINGS},
    FAMILIES: {SETTINGS, RUNDIR, "architecture"},
    PRETRAINED: {PROCESS, SETTINGS, HUB, "architecture", FAMILIES, TOKENIZER_FILES, BPE},
    QUANTIZE: set(),
    ADAPTER_CONFIG: {SETTINGS, HUB},
    "lora": {PROCESS, SETTINGS, RUNDIR, "architecture", KERNELS, FAMILIES, PRETRAINED, QUANTIZE,
             ADAPTER_CONFIG},
    GGUF_WRITER: {PROCESS, "architecture", BPE, CHAT, SPIECE, FAMILIES, PRETRAINED, "lora"},
    DATA_CONFIG: {PROCESS, SETTINGS},
    DATA_CACHE: {PROCESS},
    DATA_SOURCES: {SETTINGS, HUB, "scraping", DATA_CONFIG},
    CLEANING: {SOURCE, "scraping", DATA_SOURCES},
    DEDUPE: {DATA_SOURCES},
    SHARDS: {PROCESS, DATA_CONFIG, DATA_SOURCES, CLEANING, DEDUPE, DATA_CACHE},
    SPLITS: {DATA_CONFIG, DATA_SOURCES, SHARDS, DATA_CACHE},
    EXAMPLES: {PROCESS, SOURCE, BPE, DATA_CONFIG, DATA_SOURCES},
    ENCODING: {PROCESS, BATCHING, BPE, KERNELS, "tokenizer", DATA_CONFIG, DATA_CACHE, EXAMPLES,
               SPLITS},
    DATASETS: {KERNELS, BATCHING, EXAMPLES},
    GENERATED_PROBLEMS: {PROCESS, SETTINGS},
    COMPOSERS: {BPE, "tokenizer", HISTORY},
    HISTORY: {SOURCE, "scraping"},
    PROJECT: {COMPOSERS, DATA_CONFIG, DATA_SOURCES},
    PREFERENCE_DATA: {"tokenizer", BPE, "scraping", DATA_CONFIG, DATA_SOURCES},
    "dataset": {PROCESS, SETTINGS, BATCHING, BPE, KERNELS, "tokenizer"} | DATA,
    BATCHES: {DATASETS, KERNELS},
    TRAINCONFIG: {PROCESS, SETTINGS, RUNDIR, CHECKPOINT, TRACKERS, "architecture", DATA_CONFIG},
    LOADING: {PROCESS, SETTINGS, HUB, RUNDIR, CHECKPOINT, "architecture", "tokenizer", BPE,
              TOKENIZER_FILES, PRETRAINED, QUANTIZE, ADAPTER_CONFIG, "lora", TRAINCONFIG},
    OPENAI_API: {"architecture", ENDPOINTS, GENERATION, TOOL_CALLS, "tokenizer"},
    SERVING: {CONSOLE, ENGINE, GENERATION, OPENAI_API, TOOL_CALLS},
    BOOTSTRAP: set(),
    CROSSING: set(),
    RUNNER: {PROCESS, BOOTSTRAP, CROSSING},
    SANDBOX_COMMAND: {PROCESS, SETTINGS, RUNNER},
    METRICS: set(),
    INSTRUCT: set(),
    JOURNAL: {GENERATION},
    SCORING: {PROCESS, "tokenizer", BPE, DATA_CONFIG, DATASETS, ENCODING, EXAMPLES, LOADING,
              ENGINE, GENERATION, JOURNAL},
    PROBLEMS: {SETTINGS, HUB, DATA_SOURCES},
    PASSK: {PROCESS, SETTINGS, GENERATION, RUNNER, DATA_CONFIG, LOADING, METRICS, INSTRUCT, SCORING,
            PROBLEMS},
    LM_TASK: TASK_FLOOR | {DATASETS},  # its windows' files kept apart as training keeps them
    TEXT_TASK: TASK_FLOOR,
    FIM_TASK: TASK_FLOOR,
    INFILL_TASK: TASK_FLOOR | {FIM_TASK, TEXT_TASK},
    CODEXGLUE_TASK: TASK_FLOOR | {TEXT_TASK},
    PROJECT_TASK: TASK_FLOOR | {COMPOSERS, HISTORY},
    HUMANEVAL: TASK_FLOOR,
    HUMANEVAL_PLUS: TASK_FLOOR | {HUMANEVAL},
    MBPP: TASK_FLOOR,
    MBPP_PLUS: TASK_FLOOR | {MBPP},
    REGISTRY: {RUNNER, PROBLEMS, PASSK} | TASK_MODULES,
    EVAL_CONFIG: {SETTINGS, DATA_CONFIG, COMPOSERS, ENDPOINTS, GENERATION, RUNNER, PROBLEMS,
                  REGISTRY},
    EVAL_CORPUS: {SETTINGS, RUNDIR, CHECKPOINT, DATA_CONFIG, DATA_SOURCES, SPLITS, LOADING,
                  EVAL_CONFIG},
    RESULTS: {PROCESS, SETTINGS, DATA_SOURCES, EXAMPLES, ENCODING, LOADING, EVAL_CONFIG, REGISTRY},
    PREFERENCE_PAIRS: {PROCESS},
    "eval": {PROCESS, SETTINGS, RUNDIR, GENERATION, SERVING, ENDPOINTS, DATA_CONFIG, DATA_SOURCES,
             LOADING, INSTRUCT, EVAL_CONFIG, EVAL_CORPUS, RESULTS, SCORING, PASSK, REGISTRY,
             PREFERENCE_PAIRS, JOURNAL},
    GGUF_COMMAND: {PROCESS, SETTINGS, FAMILIES, GGUF_WRITER, LOADING},
    TRAINER: {CONSOLE, PROCESS, SETTINGS, "architecture", CHECKPOINT, DISTRIBUTED, OPTIM, TRAINCONFIG},
    RECORD: {CONSOLE, PROCESS, SETTINGS, RNG, RUNDIR, CHECKPOINT, TRACKERS, DISTRIBUTED},
    GRPO: {"architecture", "lora", KERNELS},
    PREFERENCE: {"architecture", "lora", KERNELS, GRPO, DATA_CONFIG},
    REWARDS: {CONSOLE, SETTINGS, RUNNER},
    ROLLOUT: {PROCESS, SETTINGS, "architecture", "lora", "tokenizer", ENCODING, PASSK, ENGINE,
              GENERATION, CHECKPOINT, DISTRIBUTED, RUNNER, TRAINCONFIG, GRPO, REWARDS, BATCHES,
              TRAINER},
    BUDGET: {CONSOLE, SETTINGS, "architecture", QUANTIZE, DATA_CONFIG, TRAINCONFIG},
    PLAN: {PROCESS, SETTINGS, HUB, RUNDIR, "architecture", "lora", FAMILIES, QUANTIZE,
           ADAPTER_CONFIG, TRAINCONFIG, DATA_CONFIG, PREFERENCE, BUDGET},
    PREFERENCE_BATCHES: {PREFERENCE_DATA, BATCHES, PREFERENCE},
    PREFERENCE_RUN: {PROCESS, "lora", DATA_CONFIG, EXAMPLES, PREFERENCE_DATA, DISTRIBUTED,
                     TRAINCONFIG, PREFERENCE, PREFERENCE_BATCHES, TRAINER},
    BUILD: {PROCESS, SETTINGS, RNG, RUNDIR, CHECKPOINT, "architecture", "tokenizer", BPE,
            TOKENIZER_FILES, PRETRAINED, QUANTIZE, ADAPTER_CONFIG, "lora", GGUF_WRITER,
            DATA_CONFIG, DATA_CACHE, ENCODING, EXAMPLES, "dataset", BATCHES, TRAINCONFIG,
            DISTRIBUTED, TRAINER, RECORD, BUDGET, PLAN, LOADING, ROLLOUT, PREFERENCE_RUN},
    FINISH: {PROCESS, SETTINGS, RUNDIR, CHECKPOINT, PRETRAINED, "lora", GGUF_WRITER, ENCODING,
             EXAMPLES, GENERATION, "tokenizer", TRAINER, RECORD, BUILD, LOADING, RESULTS,
             "eval"},
    "trainingmanager": BELOW_FLOOR_3 | {LOADING, "eval"},
    "codelm.search_space": {SETTINGS, CHECKPOINT, TRAINCONFIG},
    "codelm.tuneconfig": {SETTINGS},
    "codelm.studies": {PROCESS, SETTINGS, WORKERS, "codelm.tuneconfig"},
    "hyperparam_tune": {PROCESS, SETTINGS, WORKERS, RUNDIR, "trainingmanager",
                        "codelm.search_space", "codelm.tuneconfig", "codelm.studies"},
    "codelm.recipes": BELOW_FLOOR_3 | {LOADING, EVAL_CONFIG, RESULTS, "trainingmanager", "eval"},
}

# Imports each module once, bottom up, recording every import statement its loading runs (at
# any depth: a function it calls while loading too) as an edge from the module whose code runs
# it to the imported one, then prints each module's closure over those edges: the project
# modules a fresh `import MODULE` loads (a project module by its dotted name, scraping's as the
# one package). A load no statement made (importlib.import_module, a package's __init__.py)
# still shows in sys.modules: one outside the closure of the module being imported is an error.
_LOADED_BY_EACH = """
import builtins, json, sys, types
project = set(sys.argv[1].split())
names = {}
def named(module):  # kept per name: the hook asks about every import torch and the rest run
    if module not in names:
        names[module] = next((p for p in project if module == p or module.startswith(p + ".")),
                             None)
    return names[module]
edges = {}
load = builtins.__import__
def recorded(name, globals=None, locals=None, fromlist=(), level=0):
    module = load(name, globals, locals, fromlist, level)
    importer = named((globals or {}).get("__name__") or "")
    if importer is None:
        return module
    targets = [module.__name__]
    if level == 0 and not fromlist:  # import a.b.c: a.b.c loads, the name bound is a
        targets.append(name)
    for item in fromlist or ():  # from package import submodule
        value = getattr(module, item, None)
        if isinstance(value, types.ModuleType):
            targets.append(value.__name__)
    for target in targets:
        imported = named(target)
        if imported is not None and imported != importer:
            edges.setdefault(importer, set()).add(imported)
    return module
builtins.__import__ = recorded
def reached(module):
    seen, todo = set(), [module]
    while todo:
        for imported in edges.get(todo.pop(), ()):
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return sorted(seen - {module})
def loaded_now():
    return {named(m) for m in sys.modules} - {None}
order = sys.argv[2].split()
for module in order:
    before = loaded_now()
    __import__(module)
    unseen = loaded_now() - before - {module} - set(reached(module))
    if unseen:
        sys.exit(f"import {module} loads {sorted(unseen)} through no import statement it runs")
print(json.dumps({module: reached(module) for module in order}))
"""


def _project_modules() -> set[str]:
    """The root modules, the scraping package, and every module under codelm/ by dotted name."""
    under = {".".join(p.relative_to(ROOT).with_suffix("").parts)
             for p in ROOT.glob("codelm/**/*.py") if p.name != "__init__.py"}
    return {p.stem for p in ROOT.glob("*.py")} | {"scraping"} | under


def test_every_module_imports_only_what_its_floor_allows():
    """docs/contracts.md's import floors, as a fresh `import MODULE` really loads them: no import
    runs upward (dataset never loads trainingmanager, the ground floor nothing but settings and process),
    so no two modules import each other; a new module must be given its floor here."""
    project = _project_modules()
    assert project == set(MAY_IMPORT), ("place each module on a floor: its entry in MAY_IMPORT "
                                        "here, its line in docs/contracts.md")
    order = list(MAY_IMPORT)  # bottom up: a module's allowed imports come before it
    run = subprocess.run([sys.executable, "-c", _LOADED_BY_EACH, " ".join(project),
                          " ".join(order)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.splitlines()[-1])
    for module in order:
        direct = MAY_IMPORT[module]
        allowed = direct.union(*(loaded[d] for d in direct))
        assert set(loaded[module]) <= allowed, (
            f"import {module} loads {sorted(set(loaded[module]) - allowed)}, above its floor")


def _source_modules() -> dict[str, Path]:
    """Every project file by its dotted module name: the root modules, scraping's and codelm's
    (a package's __init__.py by the package's name)."""
    found = [*ROOT.glob("*.py"), *ROOT.glob("scraping/**/*.py"), *ROOT.glob("codelm/**/*.py")]
    modules = {}
    for path in found:
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules ``name`` (at ``path``) imports, each with the line of its first
    import: every import statement, at any depth (a function's, a TYPE_CHECKING block's),
    relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x: x in the package, from .. : in the one above
                above = package.rsplit(".", node.level - 1)[0]
                base = f"{above}.{base}" if base else above
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


def _circle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One import loop of ``graph`` (module -> {imported module: line}) as its modules in
    order, the first repeated last; [] when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return [*path[path.index(module):], module]
        if module in done:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            loop = visit(imported)
            if loop:
                return loop
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        loop = visit(module)
        if loop:
            return loop
    return []


def test_the_imports_form_no_circle():
    """Read from the source, the project's imports form no circle: no module reaches itself
    through any import, lazy or under TYPE_CHECKING included (a lazy import that closes a loop
    passes the floors' check, which only sees what an import at load time loads)."""
    modules = _source_modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    loop = _circle(graph)
    steps = [f"{modules[a].relative_to(ROOT)}:{graph[a][b]} imports {b}"
             for a, b in zip(loop, loop[1:])]
    assert not loop, "import circle: " + " -> ".join(steps)


def test_scripts_the_readme_says_list_flags_by_section_do():
    """README: the --help of these scripts lists their flags by section: every flag of the
    config dataclass sits under a group title (hyperparam_tune.py's included)."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    claim = re.search(r"Those of (.*?) list their flags by section", readme)
    assert claim, "README.md names no scripts that list their flags by section"
    scripts = re.findall(r"`(\w+\.py)`", claim.group(1))
    assert "hyperparam_tune.py" in scripts and len(scripts) >= 4
    for script in scripts:
        with pytest.MonkeyPatch.context() as monkeypatch:
            parser = _script_parser(ROOT / script, monkeypatch)
        loose = [a.option_strings[0] for a in parser._optionals._group_actions
                 if a.option_strings and a.dest not in ("help", "config", "print_config", "tokenizer")
                 and a.help != argparse.SUPPRESS]  # hidden aliases are not listed
        assert not loose, f"{script} --help lists {loose} under no section"
        assert len(parser._action_groups) > 3, f"{script} --help has no sections"


def test_docs_point_only_at_what_the_repository_holds():
    """A `runs/NAME` the README or docs name is a directory a recipe really writes (its own
    name, the `--name NAME` a command of the same doc gives it, or the `Path("runs/NAME")` a
    snippet of that doc writes), and no doc sends the reader outside the repository
    (../shared/ is not shipped)."""
    names = {json.loads(p.read_text())["train"]["name"] for p in (ROOT / "configs").glob("*.json")}
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text()
        named = set(re.findall(r"--name ([\w-]+)", text))
        named |= set(re.findall(r'Path\("runs/([\w-]+)"\)', text))
        for name in re.findall(r"runs/([\w-]+)", text):
            assert name in names | named | {"smoke", "eval"}, f"{doc.name}: runs/{name}"  # eval.py's
        assert "../shared" not in text, doc.name


def test_the_readme_leads_to_the_generations_formats_and_says_how_long_the_tests_take():
    """A newcomer scoring a generations file finds its format from the README's evaluation
    lines: the document they link names the stripped-prompt convention, both formats and both
    spellings of the flag. The paragraph under the set-up commands says how long the quick
    suite runs. Every docs/*.md a document names exists."""
    readme = (ROOT / "README.md").read_text()
    evaluation = readme.split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert "`docs/evaluation.md`" in evaluation and "--load-generations" in evaluation
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    for words in ("prompt.strip()", "generations.json", "samples-", "--load-generations FILE",
                  "--load_generations_path"):
        assert words in doc, words
    setup = readme.split("```", 2)[2].split("\n\n", 2)[1]  # the paragraph after the commands
    assert "minutes" in setup and "-m slow" in setup
    for text in [readme, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"docs/([\w-]+\.md)", text):
            assert (ROOT / "docs" / name).is_file(), name


def test_readme_layout_names_every_module():
    """README's Layout table names every top-level module and package, and codelm/'s modules
    and sub-packages (`codelm/runtime/`)."""
    table = (ROOT / "README.md").read_text().split("## Layout\n", 1)[1]
    first_cells = re.findall(r"^\| ([^|]+) \|", table, re.M)
    named = {name.rstrip("/") for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)}
    inside = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("codelm/*.py")
              if p.name != "__init__.py"}
    inside |= {p.parent.relative_to(ROOT).as_posix() for p in ROOT.glob("codelm/*/__init__.py")}
    modules = ({p.name for p in ROOT.glob("*.py")}
               | {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"codelm"} | inside)
    assert modules <= named, sorted(modules - named)


# The modules a researcher opens first, named by the project's users: the root holds them alone,
# and everything that serves them lives in the codelm package.
NAMED_ROOT_MODULES = {"architecture", "tokenizer", "lora", "dataset", "trainingmanager",
                      "hyperparam_tune", "eval"}


def test_the_root_holds_the_named_modules_and_two_packages_alone():
    """``pip install .`` puts these names in site-packages: the seven named modules, codelm and
    scraping, and nothing a user's own ``settings.py`` or PyPA's ``build`` could collide with."""
    assert {p.stem for p in ROOT.glob("*.py")} == NAMED_ROOT_MODULES
    assert {p.parent.name for p in ROOT.glob("*/__init__.py")} == {"codelm", "scraping"}


def test_the_package_installs_every_top_level_module():
    """pyproject's py-modules lists every top-level module and its packages every package
    (codelm's sub-packages included): ``pip install .`` (and the console scripts it makes) import
    them from site-packages, where a module left out is missing."""
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(\w+)"', text.split("py-modules = [", 1)[1].split("]", 1)[0]))
    assert listed == {p.stem for p in ROOT.glob("*.py")}
    packages = set(re.findall(r'"([\w.]+)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    found = [*ROOT.glob("*/__init__.py"), *ROOT.glob("codelm/**/__init__.py")]
    assert packages == {".".join(p.parent.relative_to(ROOT).parts) for p in found}


def test_the_package_ships_the_recipes_where_codelm_recipes_finds_them():
    """pyproject's data-files put every recipe of configs/ under share/codelm/configs, the
    directory ``settings.bundled("configs")`` names outside a checkout, and codelm.recipes looks
    for a recipe named alone there: ``pip install .`` then runs ``codelm-recipe refactotron``."""
    from codelm import recipes
    from codelm.runtime import settings

    text = (ROOT / "pyproject.toml").read_text()
    data_files = text.split("[tool.setuptools.data-files]", 1)[1].split("\n[", 1)[0]
    shipped = dict(re.findall(r'^"([^"]+)" = \[(.*)\]$', data_files, flags=re.MULTILINE))
    globs = re.findall(r'"([^"]+)"', shipped.get("share/codelm/configs", ""))
    installed = {p for pattern in globs for p in ROOT.glob(pattern)}
    assert installed == set((ROOT / "configs").glob("*.json"))
    assert recipes.SHIPPED == settings.bundled("configs")


SCRIPTS = ["trainingmanager.py", "eval.py", "dataset.py", "hyperparam_tune.py", "codelm/recipes.py",
           "scraping/__main__.py", "tokenizer.py", "architecture.py", "lora.py",
           "codelm/sandbox/__main__.py", "codelm/gguf/__main__.py", "codelm/models/pretrained.py",
           "codelm/data/problems.py"]
# Run as a script but no command: the program each sandboxed run starts, isolated (-I -S -B),
# which imports the standard library alone (tests/test_sandbox.py)
SANDBOX_BOOTSTRAP = "codelm/sandbox/bootstrap.py"


def test_every_script_guards_its_start_up_and_runs_main_through_process():
    """Each script's first statement quiets Ctrl-C/SIGTERM while its imports load torch, and
    its main runs through process.run_main, which gives the signals back."""
    found = [*ROOT.glob("*.py"), *ROOT.glob("scraping/*.py"), *ROOT.glob("codelm/**/*.py")]
    scripts = {p.relative_to(ROOT).as_posix() for p in found
               if 'if __name__ == "__main__":' in p.read_text()}
    assert scripts == {*SCRIPTS, SANDBOX_BOOTSTRAP}
    for script in SCRIPTS:
        body = ast.parse((ROOT / script).read_text()).body
        body = body[1:] if isinstance(body[0], ast.Expr) else body  # the docstring
        first, last = ast.unparse(body[1]), ast.unparse(body[-1])
        assert "process.quiet_start_up_stops(" in first, script
        assert last == "if __name__ == '__main__':\n    sys.exit(process.run_main(main))", script


# A mistake on each script's command line: a bad int, a bad choice, a flag without its value,
# a missing operand, an unknown flag (subcommands included), and what the line must say.
MISTAKES = [
    ("trainingmanager.py --max-steps x", "invalid int value: 'x'"),
    ("eval.py --print-config xml", "invalid choice: 'xml'"),
    ("dataset.py --block-size", "--block-size: expected one argument"),
    ("hyperparam_tune.py --pruner best", "invalid choice: 'best'"),
    ("codelm/recipes.py", "required: recipe"),
    ("scraping/__main__.py github --max-repos x", "invalid int value: 'x'"),
    ("tokenizer.py", "required: tokenizer"),
    ("architecture.py --presets", "unknown flag --presets"),
    ("codelm/gguf/__main__.py RUN out.gguf --outtype q4", "invalid choice: 'q4'"),
    ("codelm/models/pretrained.py x", "required: out"),
    ("lora.py adapter out --dtype", "--dtype: expected one argument"),
    ("codelm/sandbox/__main__.py --timeout-s soon", "invalid float value: 'soon'"),
    ("codelm/data/problems.py --n some --out x.jsonl", "invalid int value: 'some'"),
]


def _command(script: str) -> list[str]:
    """The arguments after ``python`` that run ``script`` (a module of a package through -m,
    which puts the working directory, ROOT, first on the path; a package's __main__ by the
    package's name)."""
    name, *args = script.split()
    if "/" in name:
        return ["-m", ".".join(Path(name).with_suffix("").parts).removesuffix(".__main__"), *args]
    return [str(ROOT / name), *args]


# The mistakes run as the user runs them in the quick suite: one of each kind the parser's
# error tells apart (an unknown flag; a bad value, a missing value or operand, of a script and
# of a subcommand), the scripts that do not load torch among them; the rest, each a process
# importing torch, in the slow suite.
QUICK_MISTAKES = {"trainingmanager.py", "architecture.py", "scraping/__main__.py", "tokenizer.py",
                  "codelm/sandbox/__main__.py", "codelm/data/problems.py"}


@pytest.mark.parametrize("scripts", [
    QUICK_MISTAKES,
    pytest.param(set(SCRIPTS) - QUICK_MISTAKES, marks=pytest.mark.slow),  # quick cover:
    #   test_every_scripts_parser_answers_its_mistake_in_one_line
], ids=["quick", "rest"])
def test_a_command_line_mistake_is_one_line_on_stderr_in_every_script(scripts):
    """Each script (and subcommand) answers a mistake with one stderr line and exit 2: the
    usage block of every flag would bury it. Each of ``scripts`` runs its MISTAKES line in its
    own process, as the user types it."""
    assert {script.split()[0] for script, _ in MISTAKES} == set(SCRIPTS)
    mistakes = [(script, said) for script, said in MISTAKES if script.split()[0] in scripts]
    procs = [subprocess.Popen([sys.executable, *_command(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for script, _ in mistakes]  # all at once: each spends its seconds importing torch
    for (script, said), proc in zip(mistakes, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out, err.count("\n")) == (2, "", 1), (script, err)
        assert said in err and "usage:" not in err, (script, err)


def test_every_scripts_parser_answers_its_mistake_in_one_line(capsys):
    """The parser each script's main builds (read in this process, torch loaded once) is
    settings.ArgumentParser, and it answers that script's MISTAKES line with exit 2 and the one
    line, without the usage block: what the command does in its own process above."""
    from codelm.runtime import settings

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers = [signal.getsignal(sig) for sig in stops]  # a script's start-up guard sets them
    try:
        for script, said in MISTAKES:
            name, *args = script.split()
            with pytest.MonkeyPatch.context() as monkeypatch:
                parser = _script_parser(ROOT / name, monkeypatch)
            assert isinstance(parser, settings.ArgumentParser), script
            capsys.readouterr()
            with pytest.raises(SystemExit) as stop:
                parser.parse_args(args)
            out, err = capsys.readouterr()
            assert (stop.value.code, out, err.count("\n")) == (2, "", 1), (script, err)
            assert said in err and "usage:" not in err, (script, err)
    finally:
        for sig, handler in zip(stops, handlers, strict=True):
            signal.signal(sig, handler)


STARTING = "interrupted while starting: nothing was written\n"


@pytest.mark.parametrize("script, sig, code, told", [
    ("trainingmanager.py", signal.SIGINT, 130, STARTING),
    ("trainingmanager.py", signal.SIGTERM, 143, STARTING),
    ("trainingmanager.py", signal.SIGHUP, 129, STARTING),  # a hangup (not a terminal here)
    ("hyperparam_tune.py --worker 1", signal.SIGINT, 130, ""),  # its sweep tells it, once
])
def test_a_stop_while_torch_loads_ends_in_one_line(script, sig, code, told):
    """A Ctrl-C, SIGTERM or hangup in the first seconds of any command, while torch loads,
    exits with its code and at most one line, not a traceback from inside importlib or a bare
    signal death."""
    name, *args = script.split()
    proc = popen([sys.executable, str(ROOT / name), *args, "--help"], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (code, "", told)


_HANDLERS_AFTER_MAIN = """
import runpy, signal, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
      signal.getsignal(signal.SIGTERM) is signal.SIG_IGN,
      signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,
      signal.getsignal(signal.SIGINT) is signal.default_int_handler,
      signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
      signal.getsignal(signal.SIGHUP) is signal.SIG_DFL)
"""


@pytest.mark.parametrize("ignored", [False, True])
def test_main_gets_the_signal_handling_the_script_started_with(ignored):
    """A job a shell script starts with `&` ignores Ctrl-C, one under nohup SIGHUP: the
    start-up guard must neither replace that nor leave its own handlers to main."""
    def start() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN if ignored else signal.SIG_DFL)

    run = subprocess.run([sys.executable, "-c", _HANDLERS_AFTER_MAIN,
                          str(ROOT / "trainingmanager.py")], preexec_fn=start,
                         capture_output=True, text=True, timeout=120)
    flags = run.stdout.split()[-6:]
    assert flags == (["True"] * 3 + ["False"] * 3 if ignored else
                     ["False"] * 3 + ["True"] * 3), run.stderr[-2000:]
