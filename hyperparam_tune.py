"""Hyperparameter sweeps: an Optuna study whose trials are ``trainingmanager`` runs.

Each trial trains a step budget and reports its validation losses to the pruner. Storage: a
journal file under ``runs/<study>/`` or any SQLAlchemy URL (several machines; heartbeats requeue
a dead worker's trial). Re-running the command continues the study. Outputs in
``runs/<study>/``: best.json (a ready ``--config``), trials.csv, importances.json, trials/.
Every choice and bound of the space is checked before the first trial; sampled values the
trainer refuses together (an n_head that does not divide the n_embd drawn with it) fail their
trial, naming why. A trial names its model (preset auto, which times the machine, is refused).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    import sys

    from codelm.runtime import process

    process.quiet_start_up_stops(quiet="--worker" in sys.argv)  # its parent tells a stop

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from filelock import FileLock
from optuna.storages._heartbeat import get_heartbeat_thread  # what Study.optimize runs
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

import trainingmanager
from codelm import search_space, studies, trainconfig
from codelm.data.config import DataConfig
from codelm.runs import checkpoint as checkpoint_module
from codelm.runs import rundir
from codelm.runtime import console, process, settings, workers
from codelm.runtime.console import progress_bar
from codelm.search_space import SearchSpace
from codelm.trainconfig import TrainConfig
from codelm.training import budget, plan
from codelm.training.record import NonFiniteLossError
from codelm.tuneconfig import TuneConfig, build_parser, parse_config

ROOT = Path(__file__).resolve().parent
# Trial attributes: what the reports need, so that any process can write them (the study's
# bookkeeping reads codelm.studies' own).
ATTR_CONFIG, ATTR_STEP = "train_config", "step"
ATTR_RUN = "run_dir"  # the trial's run directory (a re-run of an interrupted trial continues it)
ATTR_FRESH = "fresh_rerun"  # a re-run of an interrupted trial that had no run to continue
ATTR_SETTINGS = "trial_settings"  # study attribute: the TrainConfig values all trials share
ATTR_METRIC = "value_metric"  # study attribute: the validation metric the trials' values are
# A trial's value: its best validation bits per byte, which compares tokenizers too; where its
# task's evaluation has none (preference tuning, GRPO: 1 - pass@1), its validation loss.
METRIC_NAMES = {"val_bpb": "validation bits per byte", "val_loss": "validation loss"}
# The version of the study's recorded settings (2: trials valued by val bits per byte).
FORMAT_VERSION = 2
STEP_REFUSED = "this machine refuses the step"  # a trial's reason where budget.StepRefused ended it
# The sweep stops when this many trials are refused by the machine and none has trained: the
# search space's values, or the time budget, are beyond it whatever the sampler picks next.
REFUSED_BEFORE_STOP = 3
# Completes the trainer's "checkpoint saved at step N; continue with ...".
RESUME_HINT = ("the same hyperparam_tune.py command, which continues this trial's run from its "
               "checkpoint where a signal stopped it")
# The TrainConfig values a time budget sizes (budget.fit_budget), recorded in the run's config.json.
BUDGET_SIZED = ("time_budget_min", "max_steps", "epochs", "eval_every", "save_every",
                "warmup_steps", "decay_steps")




# ------------------------------------------------------------------------------------ one trial

def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def _budget(cfg: TuneConfig) -> dict:
    if cfg.time_budget_min is not None:  # sized by the trainer, eval_every included
        return {"max_steps": None, "epochs": None, "time_budget_min": cfg.time_budget_min}
    return {"max_steps": cfg.max_steps, "epochs": None, "eval_every": cfg.eval_every}


def _trial_run(cfg: TuneConfig, number: int, resume: Path | None = None) -> dict:
    """A trial's own run directory (absolute; ``resume``: the interrupted trial's, continued),
    no bars, no export, one checkpoint kept: at the end of a trial of steps (a time budget
    sizes its trial's checkpoints: budget.fit_budget)."""
    run = resume or (studies.study_dir(cfg) / "trials" / f"trial-{number:04d}").absolute()
    return {"name": run.name, "out_dir": str(run.parent), "resume": resume and str(resume),
            "progress": False, "export": False, "save_every": cfg.max_steps, "keep_last": 1}


# TrainConfig keys the sweep sets on every trial: a search space may not set them.
SWEEP_KEYS = (frozenset(_budget(TuneConfig())) | frozenset(_budget(TuneConfig(time_budget_min=1)))
              | frozenset(_trial_run(TuneConfig(), 0)))


def load_space(space: str) -> SearchSpace:
    """The search space ``space`` names (a built-in one or a JSON file), checked."""
    return search_space.load_space(space, SWEEP_KEYS)


def trial_recipe(cfg: TuneConfig, space: SearchSpace, base: dict, trial: optuna.Trial) -> dict:
    """The trial's TrainConfig values as a user would run them (best.json is one):
    space base < --train-config < sampled values < the sweep's step budget."""
    return {**space.base, **base, **space.values(trial.params), **_budget(cfg)}


def where_set(cfg: TuneConfig, space: SearchSpace, base: dict) -> Callable[[str], str]:
    """Where a sweep's user sets a trial's TrainConfig ``key``, for the trainer's messages."""
    def where(key: str) -> str:
        if key in space.params:
            spec = space.params[key]
            values = (f"choices {spec['choices']}" if spec["type"] == "categorical" else
                      f"{spec['low']} to {spec['high']}")
            return f"the range of params.{key} in {space.source} (now {values})"
        if key in ("max_steps", "eval_every", "time_budget_min"):  # the sweep's flags
            return settings.flag_of(key)
        if key == "data" and cfg.data is not None:
            return "--data"
        if key in base:
            return f"--train-config {cfg.train_config}"
        if key in space.base:
            return f"the base of {space.source}"
        return "TrainConfig's default; a --train-config file sets it"

    return where


class Rerun(typing.NamedTuple):
    """What a trial re-runs: the interrupted trial's number (None: it re-runs none), its run
    directory where that run began (None: the trial trains from its start), and the validation
    losses reported up to the checkpoint it continues from (the pruner sees the whole curve)."""

    trial: int | None
    run: Path | None
    reported: dict[int, float]


def interrupted_run(trial: optuna.Trial) -> Rerun:
    """What ``trial`` re-runs of the interrupted trial it was queued for (``Rerun``)."""
    trials = {t.number: t for t in trial.study.get_trials(deepcopy=False)}
    history = trials[trial.number].system_attrs.get("retry_history") or []
    if not history:
        return Rerun(None, None, {})
    before = trials.get(history[-1])
    run = before and before.user_attrs.get(ATTR_RUN)
    if not run or not (Path(run) / rundir.CONFIG_FILE).is_file():
        return Rerun(history[-1], None, {})
    lock = Path(run) / rundir.LOCK_FILE  # held by a worker declared dead that still trains it
    if rundir.lock_is_held(lock):  # until its next evaluation
        holder = rundir.lock_holder(lock) or "another process"
        tqdm.write(f"trial {trial.number}: waiting for {run}, the run it continues: {holder} "
                   "holds it", file=sys.stderr)
    while rundir.lock_is_held(lock):
        time.sleep(2)
    checkpoints = rundir.list_checkpoints(Path(run))
    step = rundir.checkpoint_step(checkpoints[-1]) if checkpoints else 0
    reported: dict[int, float] = {}
    for t in (trials[n] for n in history if n in trials):  # oldest first: the latest wins
        if t.user_attrs.get(ATTR_RUN) == run:
            reported.update(t.intermediate_values)
    return Rerun(history[-1], Path(run), {s: v for s, v in reported.items() if s <= step})


def recorded_precision(run: Path) -> str | None:
    """The precision ("auto" resolved) of the checkpoint a resume of ``run`` continues from."""
    for checkpoint in reversed(rundir.list_checkpoints(run)):
        with contextlib.suppress(checkpoint_module.CorruptCheckpointError):
            return checkpoint_module.read_state(checkpoint, mmap=True).precision
    return None


def _mark_interrupted(trial: optuna.Trial) -> None:
    """Record the interrupt; a trial another worker already declared dead is left as it is."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        trial.set_user_attr(studies.ATTR_REASON, studies.INTERRUPTED)


def _prepare_trial(cfg: TuneConfig, space: SearchSpace, base: dict,
                   trial: optuna.Trial) -> tuple[TrainConfig, float]:
    """The trial's TrainConfig, and the best value it continues from; its recipe and run
    recorded, the values it continues re-reported."""
    recipe = trial_recipe(cfg, space, base, trial)
    trial.set_user_attr(ATTR_CONFIG, recipe)
    rerun = interrupted_run(trial)
    resume, reported = rerun.run, rerun.reported
    if resume is not None:
        tqdm.write(f"trial {trial.number}: continues {resume.name}'s run (interrupted, queued "
                   "again as this trial)")  # beside the trainer's lines, as they say it resumed
    elif rerun.trial is not None:
        trial.set_user_attr(ATTR_FRESH, True)
        tqdm.write(f"trial {trial.number}: re-runs trial {rerun.trial} from its start (it "
                   "stopped before its run began training)")
    values = {**recipe, **_trial_run(cfg, trial.number, resume)}
    if resume and cfg.time_budget_min is not None:  # the run as its budget sized it
        sized = json.loads((resume / rundir.CONFIG_FILE).read_text("utf-8"))
        values.update({key: sized[key] for key in BUDGET_SIZED})
    train_cfg = trainconfig.config_from_dict(values, f"trial {trial.number}")
    if resume is None:  # each sampled value passed alone (check_before_trials); together?
        try:
            _check_trial(train_cfg, where_set(cfg, space, base))
        except ValueError as e:
            raise RefusedValues(str(e)) from None
    # A continued "auto" run keeps its checkpoint's precision (the trainer refuses a change; a
    # GPU without bf16 refuses bf16).
    if resume and train_cfg.precision == "auto":
        trained = recorded_precision(resume)
        if trained:
            train_cfg = dataclasses.replace(train_cfg, precision=trained)
    run_dir = Path(train_cfg.out_dir) / train_cfg.name
    if resume is None and (run_dir / rundir.CONFIG_FILE).exists():  # not this study's
        raise ValueError(f"{run_dir} holds a trial run this study does not record (another "
                         "study's, or this one's whose storage lost it): move it away, or give "
                         "this study its own --out-dir or --study-name")
    trial.set_user_attr(ATTR_RUN, str(run_dir))
    for step, value in sorted(reported.items()):
        trial.report(value, step)
    return train_cfg, min(reported.values(), default=math.inf)


class RefusedValues(ValueError):
    """The trainer refuses a trial's sampled values together (each passes alone)."""


def _check_trial(train_cfg: TrainConfig, where_is: Callable[[str], str]) -> None:
    """Refuse a trial the trainer would refuse: its settings, its model's shape."""
    plan.validate_config(train_cfg, where_is)
    if train_cfg.init_from is None:  # the vocabulary size (the tokenizer's) checks nothing
        if train_cfg.preset == "auto":
            raise ValueError(f"{settings.setting(train_cfg, 'preset', where_is)}: preset auto "
                             "times the machine for each trial, whose models could then "
                             "differ: set preset (python architecture.py lists them)")
        trainconfig.model_config(train_cfg, 1, None, None)


def _trial_value(trial: optuna.Trial, metrics: dict) -> tuple[str, float]:
    """Which of an evaluation's ``metrics`` values the trial (one of METRIC_NAMES, recorded on
    the study as ATTR_METRIC), and its value."""
    metric = "val_bpb" if "val_bpb" in metrics else "val_loss"
    if trial.study.user_attrs.get(ATTR_METRIC) != metric:
        trial.study.set_user_attr(ATTR_METRIC, metric)
    return metric, metrics[metric]


def _logged_best(trial: optuna.Trial, result: trainingmanager.TrainResult) -> float:
    """The trial's value of its run's best evaluation as metrics.jsonl logs it: a continued run
    whose worker died between an evaluation and its report has no report of it, nor evaluates
    again where it checkpointed after it. Infinite where none is logged."""
    if result.best_step is None:
        return math.inf
    logged = rundir.evaluation_at(result.run_dir / rundir.METRICS_FILE, result.best_step)
    return math.inf if logged is None else _trial_value(trial, logged)[1]


def run_trial(cfg: TuneConfig, space: SearchSpace, base: dict,
              trial: optuna.Trial) -> tuple[TrialState, float | None]:
    """Train the trial: the state and value to tell (a failure's reason recorded and told). The
    value is the best of a METRIC_NAMES metric, recorded on the study (ATTR_METRIC)."""
    best = math.inf

    def on_eval(step: int, metrics: dict) -> None:
        nonlocal best
        metric, value = _trial_value(trial, metrics)
        best = min(best, value)
        trial.set_user_attr(ATTR_STEP, step)
        trial.report(value, step)
        # Not at the final evaluation: the trial trained its whole budget (COMPLETE).
        if cfg.time_budget_min is None and step < cfg.max_steps and trial.should_prune():
            raise optuna.TrialPruned(f"{METRIC_NAMES[metric]} {value:.4f} at step {step} is "
                                     "worse than the pruner's threshold")

    try:
        train_cfg, best = _prepare_trial(cfg, space, base, trial)
        with console.labelled_lines(f"trial {trial.number}: "):  # workers' lines interleave
            result = trainingmanager.train(train_cfg, on_eval=on_eval, resume_hint=RESUME_HINT,
                                           where_set=where_set(cfg, space, base),
                                           checked=train_cfg.resume is None)  # _check_trial
    except KeyboardInterrupt:
        _mark_interrupted(trial)
        raise
    except optuna.exceptions.UpdateFinishedTrialError:
        raise
    except optuna.TrialPruned:
        return TrialState.PRUNED, None
    except RefusedValues as e:
        reason = f"the trainer refuses these values together: {e}"
    except budget.StepRefused as e:  # these values' step on this machine: the next may fit
        reason = f"{STEP_REFUSED}: {e}"
        _stop_if_every_step_refused(trial, reason)
    except NonFiniteLossError as e:  # never continued: no resume advice in its reason
        reason = e.diagnosis
        if not reason.startswith("non-finite"):
            reason = f"non-finite loss: {reason}"
        if e.step is not None:
            trial.set_user_attr(ATTR_STEP, e.step)
    except Exception as e:
        if not _is_out_of_memory(e):  # not the parameters' fault: the sweep stops
            trial.set_user_attr(studies.ATTR_STOPPED, True)
            trial.set_user_attr(studies.ATTR_REASON, f"stopped the sweep: {type(e).__name__}: {e}")
            if isinstance(e, (ValueError, OSError)):  # the configuration or a path
                raise ValueError(f"trial {trial.number} {trial.params}: {e} (not counted; in a "
                                 "sweep a trainingmanager flag named here is a key of "
                                 "--train-config FILE or of the search space; a change to a "
                                 "parameter's type or choices needs another --study-name)"
                                 ) from None
            raise
        reason = f"out of memory: {e}"
    else:
        trial.set_user_attr(ATTR_STEP, result.step)
        if result.interrupted:  # the trainer checkpointed and returned on a stop signal
            _mark_interrupted(trial)
            raise KeyboardInterrupt(result.interrupted)
        if result.stopped_by_budget:
            tqdm.write(f"trial {trial.number}: ranked at step {result.step}, where its time "
                       "budget ended it (a sweep does not continue it)", file=sys.stderr)
        best = min(best, _logged_best(trial, result))  # one whose report a dead worker lost
        if not math.isfinite(best):  # no evaluation reported or logged: the run's best loss
            best = result.best_val_loss if result.best_val_loss is not None else math.nan
        if math.isfinite(best):
            return TrialState.COMPLETE, best
        reason = f"no finite validation loss (best_val_loss={result.best_val_loss})"
    trial.set_user_attr(studies.ATTR_REASON, reason)
    tqdm.write(f"trial {trial.number} failed with parameters {trial.params}: {reason}",
               file=sys.stderr)
    return TrialState.FAIL, None


def _stop_if_every_step_refused(trial: optuna.Trial, reason: str) -> None:
    """Stop the sweep (a ValueError; this trial not counted) where no trial has trained and
    this one is the REFUSED_BEFORE_STOP-th the machine refused: every trial would be."""
    earlier = trial.study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in earlier):
        return
    refused = [t for t in earlier if str(t.user_attrs.get(studies.ATTR_REASON, "")).startswith(
        STEP_REFUSED)]
    if len(refused) + 1 < REFUSED_BEFORE_STOP:  # (this trial's reason is not recorded yet)
        return
    trial.set_user_attr(studies.ATTR_STOPPED, True)
    trial.set_user_attr(studies.ATTR_REASON, f"stopped the sweep: {reason}")
    raise ValueError(f"{REFUSED_BEFORE_STOP} trials refused by this machine and none trained "
                     f"(the last: {reason}): narrow the search space's block_size, batch_size "
                     "or model size, or raise --time-budget-min")


def run_worker(cfg: TuneConfig, study: optuna.Study, storage: optuna.storages.BaseStorage,
               space: SearchSpace, base: dict, progress: tqdm | None = None) -> None:
    """Start trials until the study holds ``n_trials`` finished ones; wait while the last ones
    run elsewhere (a dead worker's trial may come back to the queue)."""
    # 'count the trials, then start one' is serialised among this machine's workers
    lock = FileLock(studies.study_dir(cfg) / "claim.lock")
    heartbeats = isinstance(storage, optuna.storages.RDBStorage)
    while True:
        with lock:
            studies.recover_dead_trials(study, storage, cfg)
            finished, running, waiting = studies.study_progress(study)
            if progress is not None:
                progress.update(finished - progress.n)
            if finished >= cfg.n_trials:
                return
            trial = None
            if finished + running < cfg.n_trials or waiting:
                trial = study.ask(space.distributions())  # a queued retry first
                _claim(trial, storage if heartbeats else None)
            elif not (heartbeats or any(studies.local_owner_alive(t, cfg) for t in study.get_trials(
                    deepcopy=False, states=(TrialState.RUNNING,)))):
                return  # the last trials run on machines whose death nobody would notice
        if trial is None:
            time.sleep(min(cfg.heartbeat_interval, 5) if heartbeats else 2)
            continue
        with get_heartbeat_thread(trial._trial_id, storage):
            try:
                state, value = run_trial(cfg, space, base, trial)
            except optuna.exceptions.UpdateFinishedTrialError:
                state, value = None, None
            except BaseException:  # a stop: the sweep ends
                with lock:  # queued before the FAIL that another sweep's recovery would queue
                    studies.queue_interrupted(study, trial, cfg)
                    _tell(trial, TrialState.FAIL)
                raise
        if state is None or not _tell(trial, state, value):
            tqdm.write(f"trial {trial.number}: another worker declared it dead (no heartbeat "
                       "within --grace-period); this worker goes on", file=sys.stderr)


def _claim(trial: optuna.Trial, heartbeats: optuna.storages.RDBStorage | None) -> None:
    """Make a trial just asked this worker's: in a database its first heartbeat sent at once
    (a trial without one is never found stale), its worker named, before other workers (which
    judge RUNNING trials by them) look at it; what a retried trial took over of its
    predecessor's record (its reason, its re-run from the start, the step it reached) cleared.
    A stop meanwhile fails it as interrupted."""
    try:
        if heartbeats is not None:
            heartbeats.record_heartbeat(trial._trial_id)
        trial.set_user_attr(studies.ATTR_WORKER, workers.worker_id())
        for key in (studies.ATTR_REASON, studies.ATTR_STOPPED, ATTR_FRESH, ATTR_STEP):
            if trial.user_attrs.get(key) is not None:
                trial.set_user_attr(key, None)
    except BaseException:
        _mark_interrupted(trial)
        _tell(trial, TrialState.FAIL)
        raise


def _tell(trial: optuna.Trial, state: TrialState, value: float | None = None) -> bool:
    """Tell the trial's end; False when another worker had failed it first (no heartbeats)."""
    try:
        trial.study.tell(trial, value, state=state)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # "Cannot tell a FAIL trial"
        return False
    return True


# --------------------------------------------------- checks before the first trial costs anything

def base_overridden(space: SearchSpace, base: dict) -> str:
    """The space's base values --train-config's ``base`` replaces, as "key (space -> file)"
    ("" where it replaces none)."""
    changed = [f"{key} ({space.base[key]!r} -> {base[key]!r})" for key in sorted(space.base)
               if key in base and base[key] != space.base[key]]
    return ", ".join(changed)


# A run's own keys, which its directory as --train-config does not give the trials: its name,
# place and length (the sweep sets each trial's).
RUN_OWN_KEYS = ("resume", "name", "out_dir", "max_steps", "epochs", "decay_steps",
                "time_budget_min", "max_time_s")


def train_config_values(path: str) -> dict:
    """--train-config's values: a file of trainingmanager keys, or a run's directory: the
    settings its config.json sets to other than TrainConfig's defaults, less RUN_OWN_KEYS and
    those the run sized for its own length (``_sized_by_the_run``)."""
    if not Path(path).is_dir():
        return trainconfig.load_config_file(path)
    run_config = Path(path) / rundir.CONFIG_FILE
    if not run_config.is_file():
        raise ValueError(f"--train-config {path}: a directory without {rundir.CONFIG_FILE}: "
                         "name a config file, or a run's directory")
    values = trainconfig.load_config_file(run_config)
    ran = trainconfig.config_from_dict(values, str(run_config))
    left_out = set(RUN_OWN_KEYS) | _sized_by_the_run(ran)
    kept = {}
    for key, value in values.items():
        if key not in left_out and trainconfig.is_set(ran, key):
            kept[key] = value
    return kept


def _sized_by_the_run(ran: TrainConfig) -> set[str]:
    """{"warmup_steps"} where a run's config.json holds the warmup the run sized for its own
    steps (plan.warmup_for's, or a time budget's share of them), which each trial sizes for
    its own length; else nothing. (A budget's other sized values are the sweep's own keys.)"""
    if ran.max_steps is None:
        return set()
    sized = (plan.warmup_for(ran.max_steps), int(budget.WARMUP_SHARE * ran.max_steps))
    return {"warmup_steps"} if ran.warmup_steps in sized else set()


def _training_flags() -> dict[str, str]:
    """The flags of trainingmanager's settings (HF Trainer's spellings too) that are no sweep
    flags, each with where a sweep takes it: --train-config."""
    sweep_keys = {f.name for f in dataclasses.fields(TuneConfig)}
    where = ("a training setting: give it in --train-config FILE.json (trainingmanager keys), "
             "or name a run's directory there")
    flags = {}
    for f in dataclasses.fields(trainconfig.TrainConfig):
        if f.name in sweep_keys:
            continue
        for flag in (settings.flag_of(f.name), *trainconfig.HF_FLAGS.get(f.name, ())):
            flags[flag] = where
    return flags


TRAINING_FLAGS = _training_flags()


def check_before_trials(cfg: TuneConfig) -> tuple[SearchSpace, dict]:
    """The space and the ``--train-config`` values (paths absolute), checked: an example trial
    and each choice and range bound pass the trainer's checks."""
    space = load_space(cfg.space)
    base: dict = {}
    if cfg.train_config:
        base = train_config_values(cfg.train_config)
        search_space.check_no_resume_or_time_budget(base, cfg.train_config)
        base = search_space.absolute_paths(base, cfg.train_config)
    if cfg.data is not None:
        base = {**base, **search_space.absolute_paths({"data": cfg.data}, "--data")}
    for key in space.requires:
        if {**space.base, **base}.get(key) is None:
            raise ValueError(f"search space {space.source} needs {key!r} set in "
                             f"{cfg.train_config or '--train-config'} (e.g. --train-config "
                             f"FILE.json with \"{key}\": ...)")
    where = " with ".join(filter(None, (space.source, cfg.train_config)))
    drawn = trial_space(cfg, space, base)  # what trials draw: its values are checked
    example = {name: spec["choices"][0] if spec["type"] == "categorical" else spec["low"]
               for name, spec in drawn.params.items()}  # a trial to check before any runs
    trials = [("", example), *((f"params.{name}={value!r}: ", {**example, name: value})
                               for name, value in drawn.extremes())]
    where_is = where_set(cfg, drawn, base)
    checked_data: list[DataConfig] = []  # each trial's data listed once
    for label, params in trials:
        values = {**space.base, **base, **params, **_budget(cfg), **_trial_run(cfg, 0)}
        train_cfg = trainconfig.config_from_dict(values, where)
        try:
            _check_trial(train_cfg, where_is)
            # lora_* values the sweep sets that differ from its init_adapter's are refused
            plan.with_init_adapter(train_cfg, typed={*space.base, *base, *params},
                                              where_set=where_is)
            data = trainconfig.data_config(train_cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {label}{e}") from None
        for key in ("data", "val_data", "test_data", "tokenizer"):
            value = getattr(train_cfg, key)
            for path in [value] if isinstance(value, str) else value or []:
                if path != "stdlib" and not Path(path).expanduser().exists():
                    raise ValueError(f"{where_is(key)}: {label}{key}: {path} not found")
        if data not in checked_data:  # the data itself: a directory of another language's files
            checked_data.append(data)
            try:
                trainingmanager.check_data(train_cfg)
            except ValueError as e:
                raise ValueError(f"{where}: {label}{e}") from None
    return space, base


def space_warnings(cfg: TuneConfig, space: SearchSpace, base: dict) -> list[str]:
    """What makes the space's trials unlike to compare: a batch sampled under one step budget
    (a larger batch sees more data), a block size or vocabulary sampled while validation is a
    number of windows (another stretch of the split for each), and a warmup that can outlast
    the step budget."""
    found = []
    where = " with ".join(filter(None, (space.source, cfg.train_config)))
    batch = [name for name in ("batch_size", "grad_accum") if name in space.params]
    if batch and cfg.time_budget_min is None:
        found.append(f"warning: {where}: params {', '.join(batch)}: under one step budget a "
                     "trial of a larger batch sees more data and tends to win for that alone; "
                     "fix it in base, or sweep under --time-budget-min")
    shaped = [name for name in space.params if name == "block_size"
              or name.startswith("tokenizer_")]
    eval_examples = {**space.base, **base}.get("eval_examples", TrainConfig().eval_examples)
    if shaped and eval_examples is not None:
        found.append(f"warning: {where}: params {', '.join(shaped)} with eval_examples "
                     f"{eval_examples}: each trial is ranked on its first {eval_examples} "
                     "validation windows, another stretch of the split for another block size "
                     "or vocabulary; eval_examples null ranks every trial on the whole "
                     "split")
    longest = search_space.largest_value(space, "warmup_steps")
    if cfg.time_budget_min is None and longest is not None and longest >= cfg.max_steps:
        found.append(f"note: {where}: params.warmup_steps reaches {longest}: trials draw it "
                     f"below --max-steps {cfg.max_steps} (a warmup as long as the trial never "
                     "reaches its lr); a larger --max-steps draws from the whole range")
    sweep = {**_budget(cfg), **_trial_run(cfg, 0)}
    given = {**space.base, **base}
    overridden = [f"{key} {given[key]!r} (a trial's: {sweep[key]!r})" for key in sorted(given)
                  if key in sweep and key not in ("name", "out_dir")
                  and given[key] != sweep[key]]
    if overridden:
        found.append(f"warning: {where}: {', '.join(overridden)}: the sweep sets these for "
                     "every trial (its step budget: --max-steps, --eval-every or "
                     "--time-budget-min), so the file's values are not used")
    return found


def trial_space(cfg: TuneConfig, space: SearchSpace, base: dict) -> SearchSpace:
    """The space trials draw from: under a step budget, warmup_steps below --max-steps (a
    warmup as long as the trial never reaches its lr, and would be ranked all the same); a
    warmup fixed there (the space's base, ``base``: --train-config's) is refused."""
    if cfg.time_budget_min is not None:  # the budget sizes each trial's warmup
        return space
    fixed = {**space.base, **base}.get("warmup_steps")
    if "warmup_steps" not in space.params and fixed is not None and fixed >= cfg.max_steps:
        where = cfg.train_config if "warmup_steps" in base else f"the base of {space.source}"
        raise ValueError(f"warmup_steps {fixed} ({where}) >= --max-steps {cfg.max_steps}: no "
                         "trial would reach its lr; lower it there, or raise --max-steps")
    try:
        return search_space.below(space, "warmup_steps", cfg.max_steps)
    except ValueError as e:
        raise ValueError(f"{e} (--max-steps {cfg.max_steps}), or raise --max-steps") from None


# TrainConfig keys that change how a trial is computed, not its result: a continued study may
# change them.
STUDY_MAY_CHANGE = ("device", "compile", "gradient_checkpointing", "offload_activations",
                    "log_every",
                    "export_merged", "sample_prompt", "sample_tokens")


def check_study_settings(cfg: TuneConfig, space: SearchSpace, base: dict,
                         study: optuna.Study) -> None:
    """Record the TrainConfig values every trial's result depends on besides its sampled
    parameters with a study that has none; refuse a continuation that changed them (its trials
    would be ranked against each other)."""
    shared = trainconfig.config_from_dict({**space.base, **base, **_budget(cfg)}, space.source)
    values = dataclasses.asdict(shared)
    values["data_options"] = {k: v for k, v in shared.data_options.items()
                              if k not in checkpoint_module.RESUME_DATA_OPTIONS_MAY_CHANGE}
    skip = {*space.params, *STUDY_MAY_CHANGE, *_trial_run(cfg, 0)}
    now = {"format_version": FORMAT_VERSION,
           **json.loads(json.dumps({k: v for k, v in values.items() if k not in skip}))}
    recorded = study.user_attrs.get(ATTR_SETTINGS)
    if recorded is None:
        study.set_user_attr(ATTR_SETTINGS, now)
        return
    version = recorded.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"study {cfg.study_name!r}: recorded by format_version {version}, not "
                         f"{FORMAT_VERSION}: start a new study with another --study-name")
    changed = [f"{k}={recorded[k]!r} (now {now[k]!r})" for k in now
               if k in recorded and recorded[k] != now[k]]
    if changed:
        raise ValueError(f"study {cfg.study_name!r}: its trials ran with other settings: "
                         f"{'; '.join(changed)}. Drop those changes, or use another --study-name")


def check_space_fits_study(cfg: TuneConfig, space: SearchSpace, study: optuna.Study) -> None:
    """A study ranks its trials against each other, so all are drawn from one space: a
    continuation's space samples the keys every trial of the study was drawn with (finished,
    queued again, or running: a killed sweep's trial, failed by recover_dead_trials, runs again
    with its parameters), each from the same distribution. A trial without any (enqueued by
    hand) is drawn as it runs."""
    drawn = space.distributions()
    for trial in study.get_trials(deepcopy=False):
        if not trial.distributions:
            continue
        for name in sorted(set(drawn) | set(trial.distributions)):
            misfit = _misfit(trial.distributions.get(name), drawn.get(name))
            if misfit:
                raise ValueError(f"{space.source}: params.{name} does not fit study "
                                 f"{cfg.study_name!r} (trial {trial.number}): {misfit}, or use "
                                 "another --study-name")


def _misfit(before: optuna.distributions.BaseDistribution | None,
            now: optuna.distributions.BaseDistribution | None) -> str:
    """How a parameter's distribution in the space (``now``; None: not sampled) differs from a
    trial's (``before``), as the fix to name; "" where they are the same."""
    if before is None:
        return "its trials were drawn without it: remove it from params"
    if now is None:
        return "its trials sample it: keep it in params"
    if before != now:
        return f"its trials drew it from {before}, the space now from {now}: restore that"
    return ""


# --------------------------------------------------- reports: best config, trials, importances

def _predecessor(trial: FrozenTrial) -> int | None:
    """The trial this one was queued again for (the last of its retry history; Optuna's
    failed_trial names the first); None where it runs none again."""
    history = trial.system_attrs.get("retry_history") or [None]
    return history[-1]


def trial_reason(trial: FrozenTrial, retried_by: dict[int, int]) -> str:
    if trial.state == TrialState.WAITING:  # its attributes are those it continues
        retried = _predecessor(trial)
        return "queued" if retried is None else f"queued to continue trial {retried}"
    if trial.state == TrialState.PRUNED:
        return f"pruned at step {trial.last_step}"
    reason = trial.user_attrs.get(studies.ATTR_REASON)
    if trial.number in retried_by:  # no reason recorded: its worker stopped sending heartbeats
        return f"{reason or 'worker died'}; queued again as trial {retried_by[trial.number]}"
    if trial.state == TrialState.FAIL and not studies.counts(trial, set()):
        return f"{reason or 'no reason recorded'}; not counted toward n_trials"
    continued = _predecessor(trial)
    if continued is not None and not reason:
        if trial.user_attrs.get(ATTR_FRESH):
            return f"re-runs trial {continued} from its start"
        return f"continues trial {continued}'s run (duration_s: this part)"
    return reason or ""


class Reports(typing.NamedTuple):
    """What a study's reports hold: trials.csv's rows (its heading first), best.json's config
    (None before a trial completes), importances.json's, and the complete trials' count."""

    rows: list[list]
    best: dict | None
    importances: dict
    complete: int


# Parameter importances over fewer complete trials than this are named a rough guide.
FEW_TRIALS = 10
# The widest cell of the printed trials table; a longer text is cut, ending "...".
CELL_WIDTH = 72


def write_reports(study: optuna.Study, cfg: TuneConfig) -> Reports:
    """best.json (a trainingmanager config), trials.csv and importances.json."""
    out = studies.study_dir(cfg)
    trials = study.get_trials(deepcopy=False)
    retried_by = {t.system_attrs["retry_history"][-1]: t.number
                  for t in trials if t.system_attrs.get("retry_history")}
    names = sorted({p for t in trials for p in t.params})
    rows = [["number", "state", "value", "steps", "duration_s", *names, "run_dir", "reason"]]
    for t in trials:
        rows.append([t.number, t.state.name, t.value, t.user_attrs.get(ATTR_STEP),
                     None if t.duration is None else round(t.duration.total_seconds(), 1),
                     *(t.params.get(p) for p in names), t.user_attrs.get(ATTR_RUN),
                     trial_reason(t, retried_by)])
    table = io.StringIO(newline="")
    csv.writer(table).writerows(rows)
    process.write_atomic(out / "trials.csv", table.getvalue())
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        recipe = study.best_trial.user_attrs[ATTR_CONFIG]
        best = {**search_space.absolute_paths(recipe, "best trial"),
                "name": f"{cfg.study_name}-best", "out_dir": str(Path(cfg.out_dir).absolute())}
        process.write_atomic(out / "best.json", json.dumps(best, indent=2) + "\n")
    importances = {}
    if len(complete) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as e:  # e.g. no parameter varied among complete trials
            importances = {"unavailable": str(e)}
    process.write_atomic(out / "importances.json", json.dumps(importances, indent=2) + "\n")
    return Reports(rows, best, importances, len(complete))


def show_reports(study: optuna.Study, cfg: TuneConfig, reports: Reports) -> None:
    """The reports' summary: the trials' table, the importances, the best trial and the values
    sampled for it, and how to train its config."""
    out = studies.study_dir(cfg)
    widths = [max(len(_short(value)) for value in column) for column in zip(*reports.rows)]
    metric = study.user_attrs.get(ATTR_METRIC, "val_bpb")
    print(f"study {cfg.study_name}: value is a trial's best {METRIC_NAMES[metric]} ({metric}; "
          "lower is better)")
    for row in reports.rows:
        print("  ".join(_short(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    if reports.importances:
        rough = "; with so few, a rough guide at best" if reports.complete < FEW_TRIALS else ""
        listed = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                  for k, v in reports.importances.items()]
        print(f"parameter importances (over {reports.complete} complete trials{rough}):",
              ", ".join(listed))
    if reports.best is None:
        print(f"study {cfg.study_name}: no trial completed yet")
        return
    sampled = ", ".join(f"{name} {_short(value)}"
                        for name, value in study.best_trial.params.items())
    print(f"best trial {study.best_trial.number}: {METRIC_NAMES[metric]} {study.best_value:.4f}"
          f"{f' ({sampled})' if sampled else ''}")
    print(f"best config: {out / 'best.json'}  (python trainingmanager.py --config "
          f"{out / 'best.json'}; it trains the trial's length: add --max-steps none "
          "--time-budget-min M for M minutes)")
    print(f"dashboard: optuna-dashboard {cfg.storage or out / studies.JOURNAL_FILE}  (pip install "
          "optuna-dashboard)")


def _short(value: typing.Any) -> str:
    """A table cell: a float to 4 digits, a text longer than CELL_WIDTH cut."""
    if isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    return text if len(text) <= CELL_WIDTH else text[:CELL_WIDTH - 3] + "..."


# -------------------------------------------------------------------------------- workers

# What runs one worker (its arguments follow); tests put a stand-in trainer in front of main.
WORKER_COMMAND = (sys.executable, str(ROOT / "hyperparam_tune.py"))
SWEEP_PID = "CODELM_SWEEP_PID"  # a worker's environment: its main process, which it dies with


def write_worker_config(cfg: TuneConfig) -> Path:
    """The study's tune_config.json, which each worker reads (``--config``): ``cfg`` without
    progress bars."""
    config_file = studies.study_dir(cfg) / "tune_config.json"
    values = {**dataclasses.asdict(cfg), "progress": False}
    process.write_atomic(config_file, json.dumps(values, indent=2) + "\n")
    return config_file


def _run_workers(cfg: TuneConfig, study: optuna.Study, bar: tqdm) -> int:
    """Run ``cfg.workers`` worker processes to the end, passing a stop signal on; a worker's
    configuration error (exit 2) stops the others. The first failed worker's status, else 0."""
    config_file = write_worker_config(cfg)
    # Their own session: a stop signal reaches them once, forwarded by this process.
    env = {**os.environ, SWEEP_PID: str(os.getpid())}
    procs = [subprocess.Popen([*WORKER_COMMAND, "--config", str(config_file), "--worker", str(i)],
                              start_new_session=True, env=env) for i in range(1, cfg.workers + 1)]
    stopped: list[subprocess.Popen] = []  # the workers another's error stopped
    try:
        # poll() every worker: a dead one's process id must vanish for its trial to be orphaned
        while None in [p.poll() for p in procs]:
            if not stopped and any(p.returncode == 2 for p in procs):
                stopped = [p for p in procs if p.returncode is None]
                for p in stopped:
                    p.send_signal(signal.SIGTERM)
            bar.update(min(studies.study_progress(study).finished, cfg.n_trials) - bar.n)
            time.sleep(1)
    except KeyboardInterrupt as e:
        stop = process.stop_signal(e)
        for p in procs:
            if p.poll() is None:
                p.send_signal(stop)
        for p in procs:
            p.wait()
        raise
    failed = 0
    for i, p in enumerate(procs, start=1):
        if p.returncode and (p not in stopped or p.returncode == 2):  # stopped: interrupted
            how = (f"was killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0
                   else f"failed: exit status {p.returncode}")
            print(f"worker {i} (pid {p.pid}) {how}", file=sys.stderr)
            failed = failed or max(p.returncode, 0)
    return failed


def tune(cfg: TuneConfig) -> int:
    """Run (or continue) the sweep until the study holds ``cfg.n_trials`` finished trials: as
    the sweep (``sweep``), or as one of its --workers N processes. The exit status: the sweep's,
    or 0 for a worker (its sweep judges the study)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and table tell
    # Heartbeats are "experimental" (since Optuna 2.9); run_worker records them as optimize does.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study")
    space, base = check_before_trials(cfg)
    drawn = trial_space(cfg, space, base)
    try:
        studies.study_dir(cfg).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out-dir {cfg.out_dir}: cannot create {studies.study_dir(cfg)} "
                         f"({err.strerror}); give a writable directory") from None
    storage = studies.open_storage(cfg)
    study = studies.open_study(cfg, storage)
    check_study_settings(cfg, drawn, base, study)  # first: a changed --max-steps clips a space
    check_space_fits_study(cfg, drawn, study)
    if not cfg.worker:
        for line in space_warnings(cfg, space, base):  # said once, by the sweep
            print(line, file=sys.stderr)
        if over := base_overridden(space, base):
            print(f"note: --train-config {cfg.train_config} sets over the base of "
                  f"{space.source}: {over}", file=sys.stderr)
        return sweep(cfg, study, storage, drawn, base)
    # one of --workers N processes: share this machine's cores among them
    process.exit_with_parent(int(os.environ.get(SWEEP_PID, os.getppid())))
    torch.set_num_threads(max(1, process.usable_cores() // cfg.workers))
    with workers.worker_mark(studies.worker_marks(cfg)):
        run_worker(cfg, study, storage, drawn, base)
    return 0


def sweep(cfg: TuneConfig, study: optuna.Study, storage: optuna.storages.BaseStorage,
          space: SearchSpace, base: dict) -> int:
    """The sweep's trials, in this process or its --workers N, then its reports. The exit
    status: the first failed worker's, else 1 short of ``n_trials`` or without a best config
    (so that ``tune && train --config best.json`` stops there), else 0."""
    done = studies.study_progress(study).finished
    if done >= cfg.n_trials:
        print(f"study {cfg.study_name}: {done} of {cfg.n_trials} trials finished already, so "
              "none runs now (a larger --n-trials runs more); its reports:")
    bar = progress_bar(total=cfg.n_trials, initial=min(done, cfg.n_trials), unit="trial",
                       desc=cfg.study_name, enabled=cfg.progress)
    worker_status = 0
    try:
        if cfg.workers == 1:
            with workers.worker_mark(studies.worker_marks(cfg)):
                run_worker(cfg, study, storage, space, base, progress=bar)
        else:
            worker_status = _run_workers(cfg, study, bar)
    except BaseException:  # interrupted or stopped: what the finished trials found is kept
        if studies.study_progress(study).finished:
            write_reports(study, cfg)
        raise
    finished = studies.study_progress(study).finished
    bar.update(min(finished, cfg.n_trials) - bar.n)
    bar.close()
    if finished < cfg.n_trials:
        print(f"study {cfg.study_name}: {finished} of {cfg.n_trials} trials finished; run the "
              "same command again to continue", file=sys.stderr)
    reports = write_reports(study, cfg)
    show_reports(study, cfg, reports)
    # A worker's error was told by the worker (and its status by _run_workers).
    return worker_status or (0 if finished >= cfg.n_trials and reports.best is not None else 1)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = None
    try:
        with process.interrupt_on_sigterm():
            cfg = parse_config(argv, TRAINING_FLAGS)
            if settings.printed_config(build_parser(), argv, cfg, "tune"):
                return 0
            return tune(cfg)
    except (ValueError, OSError) as e:  # OSError: e.g. an --out-dir that cannot be made
        print(f"error: {process.os_error_message(e) if isinstance(e, OSError) else e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if cfg is None or not cfg.worker:  # a worker's parent says it, once
            print("interrupted: run the same command again to continue the study",
                  file=sys.stderr)
        return process.interrupted_exit_code(e)


if __name__ == "__main__":
    sys.exit(process.run_main(main))
