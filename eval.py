"""Evaluation for codelm: models compared side by side on the field's code metrics as published.

Tasks (``--tasks``, codelm.evaluation.tasks' registry): lm, line, completion, method, docstring,
refactor on the corpus's split, and the benchmarks: pass@k (samples run in ``codelm.sandbox``) on
passk's problems, HumanEval(+) and MBPP(+) as bigcode-evaluation-harness runs them, FIM and
CodeXGLUE method generation, and Long Code Arena's project-level completion on a git history
(project-completion). Every model of ``--models`` is scored on the same examples; results
are written after each model, so the same command with the same ``--out-dir`` resumes, and
within a model samples only the generations its journal had not kept (codelm.evaluation.journal).
``--prompt TEXT`` streams each model's completion; ``--serve`` serves the models over the OpenAI
API; ``--models x=openai:URL`` scores an endpoint's pass@k.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import contextlib
import errno
import hashlib
import json
import os
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

from codelm import loading
from codelm.data.config import GRPO_TASK, NO_CORPUS_TASKS, DataConfig
from codelm.data.sources import Doc
from codelm.endpoints import Endpoint, Sampling, endpoint_model, is_endpoint, parse_endpoint
from codelm.endpoints import complete as complete_at
from codelm.evaluation import corpus, instruct, journal, scoring
from codelm.evaluation.config import (
    EvalConfig,
    build_parser,
    limit_unused,
    mode_unused,
    parse_config,
    reference_loss_unused,
)
from codelm.evaluation.preference_pairs import labelled_path, write_preference_data
from codelm.evaluation.results import (
    FORMAT_VERSION,
    OtherEvaluation,
    examples_digest,
    file_name_of,
    finished_models,
    identity,
    markdown_table,
    problem_paths,
    save,
    saved_results,
    tokenizer_note,
    unique_label,
)
from codelm.evaluation.tasks import passk, registry
from codelm.evaluation.tasks.registry import TaskSettings
from codelm.evaluation.tasks.text import GENERATION_EXAMPLES
from codelm.loading import LoadedModel
from codelm.models.generation import SEED_SPREAD, seed_of_sample, truncate_at_stops
from codelm.openai_api import served_model
from codelm.runs import rundir
from codelm.runtime import process, settings
from codelm.runtime.console import blank_text, progress_bar
from codelm.serving import check_address, pool_slots, serve

# ---- Models, served or completing a prompt -------------------------------------------------

def model_specs(cfg: EvalConfig) -> list[str]:
    """``cfg.models`` (a run's name as under ``cfg.runs_dir``), or else the latest run, named on
    stderr so that it is no guess."""
    if cfg.models:
        return [run_by_name(spec, cfg.runs_dir) for spec in cfg.models]
    run = latest_run(cfg.runs_dir)
    passed_over = ""
    if newer := newer_runs_without_a_model(cfg.runs_dir, run):
        passed_over = (f"; {newer[-1].name}, newer, holds checkpoints only: --models "
                       f"{newer[-1].name} scores its latest")
    print(f"latest run: {run} (name others with --models{passed_over})", file=sys.stderr)
    return [str(run)]


# A run of one of these tasks is scored on its eval task here where --tasks is not given (on the
# run's held-out data: a fim run on infill, eval's fim being SantaCoder's benchmark); other
# runs, and models that are no runs, on lm and line.
OWN_TASKS = {"completion": "completion", "method": "method", "docstring": "docstring",
             "refactor": "refactor", "fim": "infill"}

# Under an evaluation's --out-dir: each model's finished generations while it is evaluated
# (codelm.evaluation.journal), removed once its results are saved.
JOURNAL_DIR = "journal"


def runs_own_tasks(cfg: EvalConfig) -> list[str]:
    """For --tasks unset: the OWN_TASKS the evaluated runs trained on, said on stderr; [] where
    none did, or where no task is scored (--prompt, --serve, --load-generations, endpoints)."""
    if cfg.prompt is not None or cfg.serve or cfg.load_generations is not None or any(
            is_endpoint(model) for model in cfg.models):
        return []
    try:
        specs, configs = _run_configs(cfg)
    except (ValueError, OSError):  # the evaluation reports it where it loads the models
        return []
    trained = [None if config is None else config.get("task", "lm") for config in configs]
    for spec, config, task in zip(specs, configs, trained):
        if cfg.data is None and task in NO_CORPUS_TASKS:
            flags, note = scored_by(config)
            raise ValueError(f"{spec} trained with task {task}, on no corpus whose "
                             f"held-out split could score it: name the tasks that do, {flags}"
                             f"{f' ({note})' if note else ''}, or the data with --data")
    tasks, runs = [], []
    for spec, task in zip(specs, trained):
        if task in OWN_TASKS:
            runs.append(spec)
            if OWN_TASKS[task] not in tasks:
                tasks.append(OWN_TASKS[task])
    if "infill" in tasks and set(trained) != {"fim"}:  # other models may have no FIM tokens
        fim_runs = [spec for spec, task in zip(specs, trained) if task == "fim"]
        print(f"note: {', '.join(fim_runs)} trained on fim: --tasks infill scores their "
              "held-out lines (every model evaluated with it needs FIM tokens)", file=sys.stderr)
        tasks.remove("infill")
        runs = [spec for spec in runs if spec not in fim_runs]
    if tasks:
        print(f"tasks: {' '.join(tasks)}, for what {', '.join(runs)} trained on (--tasks names "
              "others)", file=sys.stderr)
    return tasks


def _run_configs(cfg: EvalConfig) -> tuple[list[str], list[dict | None]]:
    """The specs of the models evaluated (a run named under ``cfg.runs_dir`` resolved quietly:
    model_specs names it) and each one's run config.json (None: no run)."""
    specs = []
    for spec in cfg.models:
        _, path = loading.split_label(spec)
        specs.append(str(rundir.named_run(path, cfg.runs_dir) or path))
    specs = specs or [str(latest_run(cfg.runs_dir))]
    return specs, [loading.run_config_of(spec) for spec in specs]


def runs_data_options(cfg: EvalConfig) -> dict:
    """The data options ``cfg.data_options`` are laid over: those of the first model that is
    a run trained on a corpus, as corpus.corpus_config reads its data; {} where none is (or
    the models do not load: the evaluation reports it where it loads them)."""
    if cfg.load_generations is not None or any(is_endpoint(model) for model in cfg.models):
        return {}
    try:
        _, configs = _run_configs(cfg)
    except (ValueError, OSError):
        return {}
    for config in configs:
        if config is not None and config.get("task", "lm") not in NO_CORPUS_TASKS:
            return corpus.run_data_options(config)
    return {}


class ScoredBy(NamedTuple):
    """What scores a run trained on no corpus: eval.py's flags, and a note on them ("" none)."""

    flags: str
    note: str


def scored_by(config: dict) -> ScoredBy:
    """The --tasks that score a run of a task of NO_CORPUS_TASKS (``config``: its config.json):
    a GRPO run's held-out problems (else those it trained on), a preference run's benchmarks."""
    problems = config.get("val_problems") or config.get("problems")
    if config.get("task") == GRPO_TASK and problems:
        flags = f"--tasks passk --problems passk={shlex.quote(problems)}"
        if config.get("val_problems"):
            return ScoredBy(flags, "")
        return ScoredBy(flags, "the problems it trained on: held-out ones score it fairly")
    return ScoredBy("--tasks humaneval", "or --tasks passk --problems passk=FILE: held-out "
                                         "problems like those its pairs came from")


def newer_runs_without_a_model(runs_dir: str | Path, chosen: Path) -> list[Path]:
    """The runs under ``runs_dir`` with checkpoints but no export/ or best/ whose latest
    checkpoint is newer than ``chosen``'s model, oldest first: what latest_run passed over."""
    if not any((chosen / d).is_dir() for d in (rundir.EXPORT_DIR, rundir.BEST_DIR)):
        return []
    since = max((chosen / d).stat().st_mtime for d in (rundir.EXPORT_DIR, rundir.BEST_DIR)
                if (chosen / d).exists())
    newer = []
    for run in Path(runs_dir).iterdir():
        checkpoints = rundir.list_checkpoints(run) if rundir.is_run_dir(run) else []
        if checkpoints and checkpoints[-1].stat().st_mtime > since and not any(
                (run / d).is_dir() for d in (rundir.EXPORT_DIR, rundir.BEST_DIR)):
            newer.append((checkpoints[-1].stat().st_mtime, run))
    return [run for _, run in sorted(newer)]


def run_by_name(spec: str, runs_dir: str | Path) -> str:
    """``spec`` with a PATH that is no file or directory here but a directory under
    ``runs_dir`` (``--models small`` for runs/small, the run trainingmanager's ``--name small``
    made) as that directory, named on stderr; any other spec as given."""
    if is_endpoint(spec):
        return spec
    label, path = loading.split_label(spec)
    found = rundir.run_or_path(path, runs_dir)
    return f"{label}={found}" if label else found


def latest_run(runs_dir: str | Path) -> Path:
    """The most recently written run directory that holds a model (export/ or best/); where
    none does, the latest that holds a checkpoint (a run stopped before its first evaluation,
    scored from its latest checkpoint, with a note)."""
    root = Path(runs_dir)
    runs = [p for p in (root.iterdir() if root.is_dir() else [])
            if rundir.is_run_dir(p)]
    if not runs:
        raise ValueError(f"no trained model under {root}/: run `python trainingmanager.py` first, "
                         "or name models with --models")
    models = (rundir.EXPORT_DIR, rundir.BEST_DIR)
    evaluated = [p for p in runs if any((p / d).is_dir() for d in models)]
    if evaluated:
        return max(evaluated, key=lambda p: max((p / d).stat().st_mtime for d in models
                                                if (p / d).exists()))
    return max(runs, key=lambda p: rundir.list_checkpoints(p)[-1].stat().st_mtime)


def serve_models(cfg: EvalConfig) -> int:
    """``--serve``: the models over an OpenAI-compatible API until SIGTERM or Ctrl-C, each
    prompt encoded as the tasks prompt it, ``cfg.batch_size`` sequences decoded at once (unset:
    as many as the memory free holds, serving.pool_slots)."""
    check_address(cfg.host, cfg.port)
    device = loading.device_named(cfg.device)
    served = []
    seen: Counter = Counter()
    for spec in model_specs(cfg):
        lm = loading.load_model(spec, device, cfg.tokenizer, cfg.dtype)
        lm.label = unique_label(lm.label, seen)
        served.append(served_model(lm.label, lm.model, lm.tokenizer,
                                   partial(scoring.served_prompt, lm, cfg),
                                   len(lm.prompt_start), scoring.stop_ids(lm),
                                   scoring.chat_stop_ids(lm), cfg.block_size,
                                   journal_key(lm, identity(lm))))
        if cfg.block_size and cfg.block_size > lm.model.cfg.block_size:
            print(f"note: --block-size {cfg.block_size} is past {lm.label}'s context of "
                  f"{lm.model.cfg.block_size} tokens: it serves {lm.model.cfg.block_size}",
                  file=sys.stderr)
    slots = pool_slots(served, cfg.batch_size, process.free_memory(device))
    return serve(served, cfg.host, cfg.port, cfg.api_key, slots, cfg.compile)


def _print_now(text: str) -> None:
    """``text`` on stdout at once (a streamed completion's piece)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def complete(cfg: EvalConfig, write: Callable[[str], object] | None = None
             ) -> dict[str, list[str]]:
    """``--prompt``: each model's ``cfg.num_samples`` completions of it, printed as they come;
    returned by label. Sample i is drawn as a pass@k task draws its first problem's sample i."""
    write = write or _print_now
    device = loading.device_named(cfg.device)
    specs = model_specs(cfg)
    completions = {}
    seen: Counter = Counter()
    for spec in specs:  # one model in memory at a time
        lm = loading.load_model(spec, device, cfg.tokenizer, cfg.dtype)
        lm.label = unique_label(lm.label, seen)  # no completion overwritten
        if len(specs) > 1:
            write(("\n" if completions else "") + f"=== {lm.label} ({lm.source})\n")
        for note in scoring.completion_room_notes(lm, cfg.prompt, cfg):
            print(f"note: {note}", file=sys.stderr, flush=True)
        samples = []
        for i in range(cfg.num_samples):
            if cfg.num_samples > 1:
                write(f"--- sample {i + 1} of {cfg.num_samples}\n")
            write(cfg.prompt)
            sample = scoring.stream_completion(lm, cfg.prompt, cfg, write, sample=i)
            samples.append(sample)
            write("\n")
            _note_blank(sample, lm.label, f" {i + 1}" if cfg.num_samples > 1 else "")
        completions[lm.label] = samples
        del lm
    return completions


def _note_blank(completion: str, label: str, number: str) -> None:
    """A note on stderr for a streamed completion a console shows as nothing: empty (the model
    wrote its end of text first) or whitespace alone."""
    blank = blank_text(completion)
    if blank is None:
        return
    said = "is empty: the model wrote its end of text first" if not completion else f"holds {blank}"
    print(f"note: {label}: completion{number} {said}", file=sys.stderr, flush=True)


# ---- Running a comparison ------------------------------------------------------------------

@dataclass
class EvalProgress:
    """How far ``evaluate`` got: what a caller reports when the evaluation stops early."""

    out_dir: Path | None = None
    models: list[str] = field(default_factory=list)  # labels, in evaluation order
    saved: list[str] = field(default_factory=list)  # models whose results are on disk
    running: str | None = None  # the model being evaluated or saved
    journal: Path | None = None  # where the running model's finished generations are kept
    table: str = ""  # the finished models' table as the console shows it

    def summary(self) -> list[str]:
        """Where a stopped evaluation stopped and what it left on disk, a line each (none
        before the models)."""
        lines = []
        if self.running:
            lines.append(f"stopped at model {self.running}")
        if self.journal is not None and any(self.journal.glob("*.jsonl")):
            lines.append(f"its finished generations are kept in {self.journal} (the same "
                         f"command with --out-dir {self.out_dir} samples only the rest)")
        if not self.saved:
            if lines:  # a model was under way
                lines.append("no model's results were saved")
            return lines
        rest = "" if len(self.saved) == len(self.models) else (
            f" (the same command with --out-dir {self.out_dir} evaluates the rest)")
        lines.append(f"results of {len(self.saved)} of {len(self.models)} models "
                     f"({', '.join(self.saved)}) saved in {self.out_dir}{rest}")
        return lines


def _new_default_dir(parent: Path) -> Path:
    """A directory of this evaluation's own under ``parent``: the first of ``eval-<time>``,
    ``-2``, ``-3``, ... not there yet (two evaluations started in one second each get theirs)."""
    parent.mkdir(parents=True, exist_ok=True)
    for out in rundir.stamped_names(parent, "eval"):
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue
    raise ValueError(f"{parent}: no free eval-<time>-N directory; name one with --out-dir")


def evaluate(cfg: EvalConfig, progress: EvalProgress | None = None,
             remedy: str | None = None, replace_other_weights: bool = False,
             checked: bool = False) -> dict:
    """Evaluate every model of ``cfg`` on the same examples, saving after each model. ``remedy``
    ends the refusal of an out_dir holding another evaluation; ``replace_other_weights`` sets
    aside results there of the same settings but other weights (codelm.recipes' ``<run>/eval``).
    ``cfg`` is checked first, as the command line's is, unless ``checked``: its caller did
    (parse_config does)."""
    if not checked:
        cfg.validate(run_options=runs_data_options(cfg))
    torch.manual_seed(cfg.seed)
    device, specs = None, []
    if cfg.load_generations is None:  # errors before out_dir is made
        device, specs = loading.device_named(cfg.device), model_specs(cfg)
    default_parent = Path(cfg.runs_dir).absolute() / rundir.EVAL_DIR
    out = Path(cfg.out_dir) if cfg.out_dir else None
    created = out is None or not out.exists()
    # the directories a failure leaves behind unless removed again (empty ones only)
    made = [d for d in (default_parent, default_parent.parent) if out is None and not d.exists()]
    try:  # before any model runs: a bad --out-dir must not cost the evaluation's results
        if out is None:
            out = _new_default_dir(default_parent)
        else:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        where = str(out) if out else f"{default_parent}/ (under runs_dir {cfg.runs_dir!r})"
        raise ValueError(f"cannot create the output directory {where} ({err.strerror})"
                         ) from None
    progress = progress or EvalProgress()
    progress.out_dir = out
    # what the tasks read, apart: no task sees a model, output or serving setting
    settings = TaskSettings(**{f.name: getattr(cfg, f.name) for f in fields(TaskSettings)})
    try:
        lock = _lock_out_dir(out)
    except ValueError:
        if created:
            _remove_empty([out, *made])
        raise
    try:
        _refuse_others_pairs(cfg, out)
        if cfg.load_generations is not None:  # saved once, at the end: done, or to do whole
            results = _scored_generations(cfg, out) or _evaluate_generations(cfg, settings, out)
        elif any(is_endpoint(spec) for spec in specs):
            _refuse_results(out)  # these save once, at the end: no results to resume
            results = _evaluate_endpoints(cfg, settings, [parse_endpoint(spec) for spec in specs],
                                          out, progress)
        else:
            results = _evaluate(cfg, settings, device, specs, progress,
                                remedy or f"name another --out-dir, or remove {out} to start "
                                "over", replace_other_weights)
    except BaseException:
        if created:  # only if still empty: no empty eval-* directory behind a failure
            _remove_empty([out, *made])
        raise
    finally:
        if lock is not None:
            os.close(lock)
    results["out_dir"] = str(out)
    return results


def _refuse_others_pairs(cfg: EvalConfig, out: Path) -> None:
    """An evaluation never writes its --preference-pairs over a file of pairs another wrote:
    one whose results in ``out`` name that file wrote it (continued or run again, it writes
    the same pairs from its predictions)."""
    if cfg.preference_pairs is None:
        return
    pairs = Path(cfg.preference_pairs)
    if (out / "results.json").is_file():
        with contextlib.suppress(ValueError, OSError):  # damaged: its own refusal follows
            saved = settings.read_json_object(out / "results.json", "evaluation results")
            written = (saved.get("config") or {}).get("preference_pairs")
            if isinstance(written, str) and Path(written).resolve() == pairs.resolve():
                return
    for path in (pairs, labelled_path(pairs)):
        if path.is_file() and path.stat().st_size:
            raise ValueError(f"--preference-pairs {cfg.preference_pairs}: {path} holds "
                             "another evaluation's preference data: name a new file, or remove "
                             "it to write this evaluation's there")


def _remove_empty(directories: list[Path]) -> None:
    """Each of ``directories`` that is empty, in order (a child before its parent)."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _lock_out_dir(out: Path) -> int | None:
    """The out-dir's lock (flock on the directory itself: no file left there), held while this
    evaluation writes there (None on a filesystem without such locks): a second evaluation of
    the same out-dir is refused before either's results.json could be written over."""
    try:
        fd = process.locked_fd(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # NFS: unguarded
            return None
        raise ValueError(f"{out}: cannot lock the output directory ({err.strerror})") from None
    if fd is None:
        raise ValueError(f"{out} is in use by another evaluation: wait for it to end, or name "
                         "another --out-dir")
    return fd


def _evaluate(cfg: EvalConfig, settings: TaskSettings, device: torch.device,
              specs: Sequence[str], progress: EvalProgress, remedy: str,
              replace_other_weights: bool) -> dict:
    """The work of ``evaluate``: load, build the examples, then each model in turn, saved;
    ``settings``: what the tasks read of ``cfg``."""
    benchmarks = registry.load_benchmarks(settings)
    problems = benchmarks.problems
    models = [loading.load_model(spec, device, cfg.tokenizer, cfg.dtype) for spec in specs]
    if cfg.chat and (base := next((lm for lm in models
                                   if getattr(lm.tokenizer, "chat_template", None) is None), None)):
        raise ValueError(f"--chat prompts through a chat template; {base.label}'s tokenizer has "
                         "none (a base model): evaluate it without --chat")
    seen: Counter = Counter()
    for lm in models:
        lm.label = unique_label(lm.label, seen)
    if cfg.block_size is None:  # results.json records the context used
        cfg = replace(cfg, block_size=scoring.shared_context(models))
        settings = replace(settings, block_size=cfg.block_size)
    own_prompts = _trained_prompts(settings, models)
    if own_prompts:  # each model asked in its own: the examples of each
        settings = replace(settings, docstring_prompts=list(dict.fromkeys(own_prompts.values())))
    docs, data_cfg, items = _corpus_items(settings, models)
    examples = {(task, variant): built for (task, variant), built in items.items()
                if registry.TASKS[task].KIND == "examples"}
    counts = {f"{t}/{v}" if v else t: len(e) for (t, v), e in examples.items()}
    listed = ", ".join(f"{key} {count}" for key, count in counts.items())
    counts.update({task: len(task_problems) for task, task_problems in problems.items()})
    items.update({(task, None): task_problems for task, task_problems in problems.items()})

    note = tokenizer_note(models)
    progress.models = [lm.label for lm in models]
    results = {"format_version": FORMAT_VERSION, "complete": False, "pending": progress.models,
               "config": asdict(cfg), "models": [identity(lm) for lm in models],
               "problems": problem_paths(benchmarks.files),
               "examples": counts, "examples_digest": examples_digest(docs, examples, problems),
               "tests_in_the_candidates_interpreter": passk.shared_interpreter_tests(problems),
               "rows": [], "table": ""}
    rows, records = finished_models(progress.out_dir, results, remedy, replace_other_weights)
    progress.saved = list(dict.fromkeys(row["model"] for row in rows))
    if progress.saved:
        print(f"resuming {progress.out_dir}: {len(progress.saved)} of {len(models)} models "
              f"already evaluated ({', '.join(progress.saved)})", file=sys.stderr)
    if listed:
        most = cfg.limit or GENERATION_EXAMPLES
        print(f"data: examples of the {settings.split} split: {listed} (at most {most} each: "
              "--limit)")
    for lm, model_identity in zip(models, results["models"]):
        if lm.label in progress.saved:
            continue
        progress.running = lm.label
        progress.journal = progress.out_dir / JOURNAL_DIR / file_name_of(lm.label)
        with journal.journaled(progress.journal, journal_key(lm, model_identity)):
            model_rows, model_records = _evaluate_model(lm, settings, items, data_cfg,
                                                        own_prompts.get(lm.label))
        rows += model_rows
        records += model_records
        pending = progress.models[progress.models.index(lm.label) + 1 :]
        results.update(complete=not pending, pending=pending, rows=rows,
                       table=markdown_table(rows, note))
        # printed on a stop, even one in save: not lost
        progress.table = markdown_table(rows, note, shown=registry.on_console)
        with process.stops_deferred():  # a stop's report must say what results.json holds
            save(progress.out_dir, results, records)
            progress.saved.append(lm.label)
            progress.running = None
            _remove_journal(progress)
            _remove_unscored(progress.out_dir, [lm.label], cfg.tasks)
    results.update(complete=True, pending=[], rows=rows, table=markdown_table(rows, note))
    progress.table = markdown_table(rows, note, shown=registry.on_console)
    return results


def journal_key(lm: LoadedModel, model_identity: dict) -> str:
    """What names a model in its journal: its identity (weights' fingerprint), and the dtype
    and device it computes in (a bf16 file's norms are the same loaded in fp32)."""
    parameter = next(lm.model.parameters())
    computes = {"dtype": str(parameter.dtype), "device": parameter.device.type}
    return json.dumps({**model_identity, **computes}, sort_keys=True)


def unscored_file(out_dir: Path, label: str, task: str) -> Path:
    """Where a stop during ``label``'s ``task`` sandbox runs keeps its samples
    (``_kept_unscored``)."""
    return out_dir / f"unscored-{file_name_of(label)}-{task}.json"


def _remove_unscored(out_dir: Path, labels: Sequence[str], tasks: Sequence[str]) -> None:
    """The kept samples of a stop during the sandbox runs of ``labels``' ``tasks``, once their
    scores are saved."""
    for label in labels:
        for task in tasks:
            unscored_file(out_dir, label, task).unlink(missing_ok=True)


def _remove_journal(progress: EvalProgress) -> None:
    """A saved model's journal of generations, and the journals' directory once empty."""
    shutil.rmtree(progress.journal, ignore_errors=True)
    _remove_empty([progress.journal.parent])
    progress.journal = None


def _refuse_results(out: Path) -> None:
    """Before any work: an --out-dir holding results is not written over."""
    if (out / "results.json").exists():
        raise ValueError(f"{out} holds an evaluation's results (results.json): name another "
                         "--out-dir")


def _scored_generations(cfg: EvalConfig, out: Path) -> dict | None:
    """The results ``out`` holds of this --load-generations evaluation (the same settings and
    generations file, complete), said so; None where it holds none. Another's are refused."""
    path = out / "results.json"
    remedy = "name another --out-dir"
    file = Path(cfg.load_generations)
    settings_now = asdict(cfg)
    del settings_now["load_generations"]  # the file as its path and bytes say, below
    saved = saved_results(path, settings_now, remedy)
    if saved is None or not file.is_file():  # a missing file: named as a new run names it
        return None
    recorded = saved.get("generations")
    if not isinstance(recorded, dict) or saved.get("complete") is not True:
        raise OtherEvaluation(f"{path}: the results of an unfinished evaluation; {remedy}")
    if recorded.get("path") != str(file.resolve()) \
            or recorded.get("sha256") != hashlib.sha256(file.read_bytes()).hexdigest():
        raise OtherEvaluation(f"{path}: the scores of another generations file "
                              f"({recorded.get('path')}, or its bytes then); {remedy}")
    print(f"note: {out} holds these generations' scores (results.json): shown as saved",
          file=sys.stderr)
    return saved


def _evaluate_generations(cfg: EvalConfig, settings: TaskSettings, out: Path) -> dict:
    """``--load-generations``: the file's generations of its pass@k task scored, one row named
    after the file, saved as a model's results are; ``settings``: what the tasks read of
    ``cfg``."""
    task = settings.tasks[0]
    passk_task = registry.PASSK_TASKS[task]
    benchmarks = registry.load_benchmarks(settings)
    problems = passk.prompted_problems(passk_task, benchmarks.problems[task])
    file = Path(cfg.load_generations)
    programs = passk.read_generations(file, passk_task, problems, settings.num_samples)
    metrics, records = passk.score_passk(file.stem, passk_task, passk.whole_programs(problems),
                                         programs, settings)
    row = {"model": file.stem, "source": str(file.resolve()), "prompt": None,
           "metrics": {f"{task}/{key}": value for key, value in metrics.items()}}
    results = {"format_version": FORMAT_VERSION, "complete": True, "pending": [],
               "config": asdict(cfg), "models": [],
               "problems": problem_paths(benchmarks.files),
               "generations": {"path": str(file.resolve()),
                               "sha256": hashlib.sha256(file.read_bytes()).hexdigest()},
               "examples": {task: len(problems)},
               "tests_in_the_candidates_interpreter": passk.shared_interpreter_tests(
                   {task: problems}),
               "rows": [row], "table": markdown_table([row])}
    save(out, results, records)
    return results


def _evaluate_endpoints(cfg: EvalConfig, settings: TaskSettings, endpoints: Sequence[Endpoint],
                        out: Path, progress: EvalProgress) -> dict:
    """OpenAI-compatible endpoints' samples of each pass@k task, scored in the sandbox as a
    model's are; one row an endpoint, saved once all have run (each endpoint's samples kept in
    its journal as they come); ``settings``: what the tasks read of ``cfg``."""
    benchmarks = registry.load_benchmarks(settings)
    rows, records, served = [], [], []
    seen: Counter = Counter()
    for endpoint in endpoints:
        label = unique_label(endpoint.label, seen)
        served.append(endpoint_model(endpoint))  # the model it serves, as results.json names it
        progress.running = label
        progress.journal = out / JOURNAL_DIR / file_name_of(label)
        with journal.journaled(progress.journal, json.dumps([label, endpoint.url])):
            rows.append(_endpoint_row(endpoint, label, settings, benchmarks, records))
    results = {"format_version": FORMAT_VERSION, "complete": True, "pending": [],
               "config": asdict(cfg),
               "models": [{"label": row["model"], "source": row["source"],
                           "served_model": model.name, "served_weights": model.weights}
                          for row, model in zip(rows, served)],
               "problems": problem_paths(benchmarks.files),
               "examples": {task: len(benchmarks.problems[task]) for task in settings.tasks},
               "tests_in_the_candidates_interpreter": passk.shared_interpreter_tests(
                   benchmarks.problems),
               "rows": rows, "table": markdown_table(rows)}
    with process.stops_deferred():  # the journals go once the results are on disk
        save(out, results, records)
        progress.running = None
        shutil.rmtree(out / JOURNAL_DIR, ignore_errors=True)
        progress.journal = None
        _remove_unscored(out, [row["model"] for row in rows], settings.tasks)
    return results


def _endpoint_row(endpoint: Endpoint, label: str, settings: TaskSettings,
                  benchmarks: registry.Benchmarks, records: list[dict]) -> dict:
    """One endpoint's row: its samples of each pass@k task scored (their records appended to
    ``records``)."""
    metrics = {}
    for task in settings.tasks:
        passk_task = registry.PASSK_TASKS[task]
        problems = benchmarks.problems[task]
        if settings.chat:  # EvalPlus's request of a chat endpoint: a message, no stops
            messages = [instruct.endpoint_message(p["prompt"]) for p in problems]
            problems = passk.chat_problems(problems, messages, messages, "")
        else:
            problems = passk.prompted_problems(passk_task, problems)
        samples = _endpoint_samples(endpoint, label, passk_task, problems, settings)
        task_metrics, task_records = passk.score_passk(label, passk_task, problems, samples,
                                                       settings)
        metrics.update({f"{task}/{key}": value for key, value in task_metrics.items()})
        records += task_records
    return {"model": label, "source": endpoint.url, "prompt": None, "metrics": metrics}


def _endpoint_samples(endpoint: Endpoint, label: str, passk_task: passk.PasskTask,
                      problems: Sequence[dict], cfg: TaskSettings) -> list[list[str]]:
    """cfg.num_samples completions of each problem from the endpoint, cfg.batch_size requests
    in flight, each cut at the task's stops as a local model's are. As a local model samples
    them: at most half the context (--block-size, at most the one the endpoint lists) new and
    the prompt cut at its left to the rest (vLLM's truncate_prompt_tokens), problem p's sample j
    seeded seed_of_sample(cfg.seed, p x num_samples + j)."""
    stops = () if cfg.chat else passk_task.stops
    model = endpoint_model(endpoint)
    new_tokens, keep = cfg.max_new_tokens, None
    context = cfg.block_size or model.context  # the scoring context
    if model.context is not None and context is not None:
        context = min(context, model.context)
    if context is not None:
        new_tokens = min(new_tokens, context // 2)
        keep = None if cfg.chat else context - new_tokens
    n = cfg.num_samples

    def ask(index: int) -> list[str]:
        sampling = Sampling(new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, n,
                            seed_of_sample(cfg.seed, index * n), tuple(stops), keep)
        problem = problems[index]
        return complete_at(endpoint, model.name, problem.get("chat_prompt", problem["prompt"]),
                           sampling, cfg.chat)

    prompts = [problem.get("chat_prompt", problem["prompt"]) for problem in problems]
    kept_in = journal.task_file(passk_task.name, {
        "url": endpoint.url, "served_model": model.name, "weights": model.weights,
        "prompts": journal.digest(prompts), "max_new_tokens": new_tokens,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
        "num_samples": n, "seed": cfg.seed, "seed_spread": SEED_SPREAD, "stop": list(stops),
        "prompt_room": keep, "chat": cfg.chat})
    texts = journal.kept_outputs(kept_in, len(problems), f"{label} {passk_task.name}")
    rest = [index for index in range(len(problems)) if index not in texts]
    with (ThreadPoolExecutor(max_workers=cfg.batch_size) as pool,
          journal.appending(kept_in if rest else None) as kept):
        asked = progress_bar(pool.map(ask, rest), total=len(problems),
                             initial=len(problems) - len(rest),
                             desc=f"{label} {passk_task.name}", unit="problem",
                             enabled=cfg.progress, leave=False)
        for index, group in zip(rest, asked):
            texts[index] = group
            journal.keep(kept, index, group)
    return [[truncate_at_stops(text, stops) for text in texts[index]]
            for index in range(len(problems))]


def _corpus_items(cfg: TaskSettings, models: Sequence[LoadedModel]
                  ) -> tuple[list[Doc], DataConfig | None, dict[tuple[str, str | None], list]]:
    """The split's documents, the corpus's DataConfig (None: no task reads the corpus), and
    each corpus task's items by (task, variant), the variants (docstring prompts) last."""
    tasks = [task for task in cfg.tasks if registry.TASKS[task].KIND in ("text", "examples")]
    if not tasks:
        return [], None, {}
    docs, data_cfg = corpus.split_documents(cfg, models)
    items = {}
    for task in tasks:
        built = registry.TASKS[task].items(task, docs, cfg, models[0].tokenizer, data_cfg)
        items.update({(task, variant): task_items for variant, task_items in built.items()})
    return docs, data_cfg, dict(sorted(items.items(), key=_a_variant))


def _a_variant(entry: tuple[tuple[str, str | None], list]) -> bool:
    """Whether a corpus task's items (``_corpus_items``) are of a variant (a docstring prompt)."""
    (_task, variant), _items = entry
    return variant is not None


def _trained_prompts(cfg: TaskSettings, models: Sequence[LoadedModel]) -> dict[str, str]:
    """The docstring prompt each model is asked in where --docstring-prompts names none: the
    one --data-options gives, else the one its run trained with, else DataConfig's ({} where
    the docstring task is not run or the variants are named)."""
    if "docstring" not in cfg.tasks or cfg.docstring_prompts is not None:
        return {}
    given = cfg.data_options.get("docstring_prompt")
    prompts = {}
    for lm in models:
        run_options = (lm.run_config or {}).get("data_options") or {}
        trained = run_options.get("docstring_prompt", DataConfig.docstring_prompt)
        prompts[lm.label] = given or trained
    return prompts


def _evaluate_model(lm: LoadedModel, cfg: TaskSettings, items: dict[tuple[str, str | None], list],
                    data_cfg: DataConfig | None, own_prompt: str | None = None
                    ) -> tuple[list[dict], list[dict]]:
    """One model's table rows (one per docstring prompt variant: ``own_prompt`` alone where
    given) and prediction records: each task's ``run`` on its items, a variant's metrics in
    that variant's row alone."""
    records = []
    shared: dict = {}
    context = scoring.context(lm, cfg)
    if cfg.block_size is not None and context < cfg.block_size:
        print(f"note: {lm.label} is scored and prompted with its own context, {context} "
              f"tokens, not block_size {cfg.block_size} (results.json's rows record each "
              "model's)", file=sys.stderr)
    for task in cfg.tasks:
        if (task, None) in items:
            run = registry.TASKS[task].run
            metrics, task_records = run(lm, task, items[(task, None)], cfg, None, data_cfg)
            records += task_records
            shared.update({f"{task}/{k}": v for k, v in metrics.items()})
    rows = []
    variants = list(dict.fromkeys(v for _, v in items if v is not None))
    if own_prompt is not None:
        variants = [own_prompt]
    for variant in variants or [None]:
        row = {"model": lm.label, "source": lm.source, "prompt": variant,
               "batch_size": cfg.batch_size,  # may differ between models of a resumed evaluation
               "block_size": context,  # the context used: a model's own where cfg's is longer
               "metrics": dict(shared)}
        for task in cfg.tasks:  # each once: validate refuses a task named twice
            if variant is not None and (task, variant) in items:
                run = registry.TASKS[task].run
                metrics, task_records = run(lm, task, items[(task, variant)], cfg, variant,
                                            data_cfg)
                records += task_records
                row["metrics"].update({f"{task}/{k}": v for k, v in metrics.items()})
        rows.append(row)
    return rows, records


class KeptUnscored(NamedTuple):
    """What a stop during a pass@k task's sandbox runs says of that model's samples: where it
    came (after "interrupted"), and where the samples are kept and how to score them."""

    during: str
    kept: str


def _kept_unscored(progress: EvalProgress, unscored: passk.UnscoredSamples | None
                   ) -> KeptUnscored:
    """Where a stop during a pass@k task's sandbox runs leaves that model's samples (in
    bigcode's generations format, beside the results), and how to score them; empty where
    the stop came elsewhere."""
    if unscored is None or progress.out_dir is None:
        return KeptUnscored("", "")
    during = f" during {unscored.label}'s {unscored.task} runs"
    path = unscored_file(progress.out_dir, unscored.label, unscored.task)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        process.write_atomic(path, process.json_text(unscored.programs))
    except OSError as err:  # a full disk: the stop is still reported
        return KeptUnscored(during, f"its samples could not be kept "
                                    f"({process.os_error_message(err)})")
    return KeptUnscored(during, f"its samples are kept in {path}: --load-generations {path} "
                                f"--tasks {unscored.task} {unscored.flags} (with the task's "
                                f"own --problems {unscored.task}=FILE, if one was given) "
                                "scores them")


def _stopped(progress: EvalProgress, message: str, code: int, first: str = "") -> int:
    """Report an evaluation that stopped early: the finished models' table, then why (one
    line), then what it left, a line each (``first`` first)."""
    if progress.table:
        print(progress.table)
    print(message, file=sys.stderr)
    for line in filter(None, [first, *progress.summary()]):
        print(f"  {line}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    progress = EvalProgress()
    try:
        with process.interrupt_on_sigterm():  # so finished models are saved, samples killed
            cfg = parse_config(argv, runs_own_tasks, runs_data_options)
            if settings.printed_config(build_parser(), argv, cfg, "eval"):
                return 0
            for unused in (mode_unused(cfg), limit_unused(cfg), reference_loss_unused(cfg)):
                if unused is not None:
                    print(f"note: {unused}", file=sys.stderr)
            if cfg.prompt is not None:
                complete(cfg)
                return 0
            if cfg.serve:
                return serve_models(cfg)
            results = evaluate(cfg, progress, checked=True)  # by parse_config
    except KeyboardInterrupt as stop:
        kept = _kept_unscored(progress, getattr(stop, "unscored", None))
        return _stopped(progress, f"interrupted{kept.during}", process.interrupted_exit_code(stop),
                        kept.kept)
    except ValueError as err:
        return _stopped(progress, f"error: {err}", 2)
    except OSError as err:  # an unreadable model file, a full disk
        return _stopped(progress, f"error: {process.os_error_message(err)}", 2)
    except (torch.OutOfMemoryError, MemoryError) as err:  # the run failed, not the settings
        return _stopped(progress, f"error: out of memory ({err}); a smaller --batch-size "
                        "needs less (a smaller --max-new-tokens too, in a new --out-dir)", 1)
    except Exception:  # a bug: its traceback follows what was saved
        _stopped(progress, "error: evaluation failed", 1)
        raise
    print(progress.table or results["table"])  # the console's, where evaluate made one
    if progress.table and progress.table != results["table"]:
        print("(table.md holds every column)")
    print()
    for task, path in results["problems"].items():  # which file each benchmark's scores are of
        print(f"{task} problems: {path}")
    print(f"results: {results['out_dir']}/results.json, predictions.jsonl, table.md")
    if cfg.preference_pairs is not None:
        print(write_preference_data(cfg.preference_pairs, Path(results["out_dir"]),
                                    [t for t in cfg.tasks if t in registry.PASSK_TASKS]))
    return 0


if __name__ == "__main__":
    sys.exit(process.run_main(main))
