"""An Optuna study of a sweep, kept where every worker reads it: its storage (a journal file,
checked before Optuna reads it, or a database with heartbeats), and its trials' bookkeeping
among workers: which trials count toward n_trials, which run again (an interrupted one, a dead
worker's), and which died with their worker."""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy
import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from codelm.runtime import workers
from codelm.tuneconfig import TuneConfig

JOURNAL_FILE = "journal.log"
# Trial attributes the bookkeeping reads (hyperparam_tune records the others).
ATTR_REASON, ATTR_WORKER = "fail_reason", "worker"
ATTR_STOPPED = "stopped_sweep"  # a trial whose error (a configuration error) stopped the sweep
INTERRUPTED = "interrupted (SIGINT/SIGTERM)"  # the reason of a trial that runs again
WORKER_DIED = "worker process died"  # a trial failed for its dead worker (it does not count)


def study_dir(cfg: TuneConfig) -> Path:
    return Path(cfg.out_dir) / cfg.study_name


SQLITE_MAGIC = b"SQLite format 3\0"  # the first bytes of every SQLite database file


def check_journal(path: Path) -> None:
    """Refuse a file Optuna's journal would misread (it appends after a bad last line); called
    under the journal's lock, so no other worker's append is half-written."""
    data = path.read_bytes() if path.is_file() else b""  # none yet: Optuna creates it
    if data.startswith(SQLITE_MAGIC):
        raise ValueError(f"{path}: an SQLite database, not an Optuna journal file: use "
                         f"--storage sqlite:///{path}")
    *lines, last = data.split(b"\n")
    if last.startswith(b"{"):  # an append cut off by a kill or a full disk
        raise ValueError(f"{path}:{len(lines) + 1}: the last line has no newline at its end: add "
                         "it if the record is whole, else remove that line (truncate -s "
                         f"{len(data) - len(last)} {shlex.quote(str(path))}) to continue the study")
    for number, line in enumerate([*lines, last] if last else lines, start=1):
        with contextlib.suppress(ValueError):  # UnicodeDecodeError too
            record = json.loads(line)
            if isinstance(record, dict) and type(record.get("op_code")) is int:  # not JSON true
                continue
        raise ValueError(f"{path}:{number}: not an Optuna journal line; is this the study's "
                         "journal file?")


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """A journal file (local, several processes) or an RDB URL with heartbeats and retries."""
    url = cfg.storage or str(study_dir(cfg) / JOURNAL_FILE)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        # An flock the kernel releases when its holder dies (Optuna's own journal lock, a file,
        # outlives a killed holder).
        lock = FileLock(url + ".flock")
        with lock:
            check_journal(Path(url))
        backend = optuna.storages.journal.JournalFileBackend(url, lock_obj=lock)
        return optuna.storages.journal.JournalStorage(backend)
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # workers take turns on one file
    else:
        engine_kwargs = {"pool_pre_ping": True}  # trials outlast idle database connections
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=QueueAgain(cfg.max_retry))
    except ImportError as e:
        missing = getattr(e.__cause__, "name", None) or e
        raise ValueError(f"--storage {url}: its database driver is not installed ({missing}); "
                         "for PostgreSQL: pip install 'psycopg[binary]'") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ValueError(f"--storage {url}: cannot use the database: {reason}") from None


def open_study(cfg: TuneConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    if cfg.pruner == "median":
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=cfg.prune_startup_trials, n_warmup_steps=cfg.prune_warmup_steps)
    elif cfg.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(
            min_resource=cfg.eval_every, max_resource=cfg.max_steps or "auto")  # budget: none
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="minimize",
                                pruner=pruner, load_if_exists=True)
    # A study the storage already holds keeps its own directions (Optuna loads it as it is).
    directions = [d.name.lower() for d in study.directions]
    if directions != ["minimize"]:
        raise ValueError(f"study {cfg.study_name!r}: its storage holds it with direction(s) "
                         f"{directions}, but a sweep minimizes its trials' values (a loss, bits "
                         "per byte): use another --study-name")
    study.sampler = (optuna.samplers.TPESampler() if cfg.sampler_seed is None
                     else TrialSeededTPE(cfg.sampler_seed))
    return study


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """With --sampler-seed: Optuna's TPE seeded for each trial with the seed and that trial's
    number together (trial_seed), made as the trial begins (TPE keeps no state but its random
    streams: the trials are stored). The storage numbers a study's trials one by one whichever
    worker or machine asks, so none draws another's stream, and a sweep of one seed samples
    the same in every run. A worker samples one trial at a time."""

    def __init__(self, seed: int) -> None:
        self.sweep_seed = seed
        self.tpe = optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe = optuna.samplers.TPESampler(seed=trial_seed(self.sweep_seed, trial.number))
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict
                        ) -> dict:
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution
                           ) -> typing.Any:
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.tpe.after_trial(study, trial, state, values)


def trial_seed(seed: int, number: int) -> int:
    """Trial ``number``'s sampler seed in a sweep of ``seed``: numpy's SeedSequence of the two,
    so that the sweeps of seeds 1 and 2 share no trial's stream (seed + number would: seed 2's
    trial 0 drawing seed 1's trial 1)."""
    return int(numpy.random.SeedSequence([seed, number]).generate_state(1)[0])


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def counts(trial: FrozenTrial, retried: set[int]) -> bool:
    """Whether a finished trial counts toward n_trials: not a FAIL that was queued again, was
    interrupted, stopped the sweep, or whose worker died (no recorded reason, as a database
    storage fails it, or WORKER_DIED, as the journal's recovery does)."""
    if trial.state != TrialState.FAIL:
        return trial.state.is_finished()
    reason = trial.user_attrs.get(ATTR_REASON)
    return (trial.number not in retried and bool(reason) and reason not in (INTERRUPTED,
                                                                            WORKER_DIED)
            and not trial.user_attrs.get(ATTR_STOPPED))


class StudyProgress(typing.NamedTuple):
    """A study's trials by where they are; ``finished`` counts those ``counts`` counts."""

    finished: int
    running: int
    waiting: int


def study_progress(study: optuna.Study) -> StudyProgress:
    """How many of the study's trials are finished, running and waiting."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    states = [t.state for t in trials]
    return StudyProgress(sum(counts(t, retried) for t in trials), states.count(TrialState.RUNNING),
                         states.count(TrialState.WAITING))


def worker_marks(cfg: TuneConfig) -> Path:
    """Where the study's workers keep their marks (codelm.runtime.workers)."""
    return study_dir(cfg) / "workers"


def local_owner_alive(trial: FrozenTrial, cfg: TuneConfig | None = None) -> bool | None:
    """Whether this trial's worker lives (``workers.worker_alive``; with ``cfg``, its mark beside
    the study tells first); None: it cannot be told here."""
    worker = str(trial.user_attrs.get(ATTR_WORKER, ""))
    return workers.worker_alive(worker, None if cfg is None else worker_marks(cfg))


class QueueAgain:
    """Optuna's RetryHeartbeatStaleTrialCallback (a failed trial queued again with its
    parameters), its ``max_retry`` counting the times the trial's worker died: an interrupted
    trial is always continued, however often it was interrupted."""

    def __init__(self, max_retry: int | None):
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        attempts = {t.number: t for t in study.get_trials(deepcopy=False)}
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        deaths = sum(attempts[n].user_attrs.get(ATTR_REASON) != INTERRUPTED
                     for n in history if n in attempts)
        if self.max_retry is None or deaths <= self.max_retry:
            # a copy, as Optuna's fail_stale_trials passes: the callback appends to the
            # retry_history list it is given, which a storage's cached record would share
            RetryHeartbeatStaleTrialCallback()(study, copy.deepcopy(trial))


def recover_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage,
                        cfg: TuneConfig) -> None:
    """Queue again interrupted trials, and fail and queue again those whose worker died."""
    retry = QueueAgain(cfg.max_retry)
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for trial in trials:
        if (trial.state == TrialState.FAIL and trial.number not in retried
                and trial.user_attrs.get(ATTR_REASON) == INTERRUPTED):
            retry(study, trial)
    if isinstance(storage, optuna.storages.RDBStorage):  # open_storage enables heartbeats,
        # the first sent as a trial is claimed, or here for one whose worker died before
        running = [t._trial_id for t in trials if t.state == TrialState.RUNNING]
        beat_for_silent_trials(storage, running)
        optuna.storages.fail_stale_trials(study)
        return
    # The claim lock is held from creating a trial to naming its owner: no owner, no worker.
    for trial in trials:
        if trial.state == TrialState.RUNNING and (
                ATTR_WORKER not in trial.user_attrs or local_owner_alive(trial, cfg) is False):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_user_attr(trial._trial_id, ATTR_REASON, WORKER_DIED)
                if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    retry(study, storage.get_trial(trial._trial_id))


def beat_for_silent_trials(storage: optuna.storages.RDBStorage, trial_ids: Sequence[int]
                           ) -> None:
    """A heartbeat for each of these trials that has none yet: Optuna never finds a trial
    without one stale, and one whose worker died between asking for it and claiming it would
    run forever. Its worker, alive, sends its own at once and then one every interval."""
    session = storage.scoped_session()
    try:
        beaten = {row.trial_id for row in session.query(models.TrialHeartbeatModel.trial_id)
                  .filter(models.TrialHeartbeatModel.trial_id.in_(trial_ids))}
    finally:
        session.close()
    for trial_id in trial_ids:
        if trial_id not in beaten:
            storage.record_heartbeat(trial_id)


def queue_interrupted(study: optuna.Study, trial: optuna.Trial, cfg: TuneConfig) -> None:
    """An interrupted trial queued again by its own worker as it stops, once: before it is told
    FAIL, so that no sweep's ``recover_dead_trials`` (which queues what a worker killed before it
    could left) queues it too."""
    trials = study.get_trials(deepcopy=False)
    stopped = next(t for t in trials if t.number == trial.number)
    if (stopped.user_attrs.get(ATTR_REASON) == INTERRUPTED
            and trial.number not in retried_numbers(trials)):
        QueueAgain(cfg.max_retry)(study, stopped)
