"""hyperparam_tune.py's settings: ``TuneConfig`` (its flags mirror it), its parsing and its
checks; it builds nothing."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import sqlalchemy.exc

from codelm.runtime import settings


@dataclass
class TuneConfig:
    """A sweep; the defaults are the default sweep (from-scratch model, stdlib corpus, 2 CPUs)."""

    # study and sampling
    study_name: str = "codelm-from-scratch"  # the Optuna study; rerunning one continues it
    space: str = "from-scratch"  # a built-in space name or a JSON file
    train_config: str | None = None  # trainingmanager JSON config (or a run's directory: its
    #   config.json, less its name, place, length and the warmup it sized), its values over
    #   the space's base values
    data: list[str] | None = None  # the trials' training data (files, directories, JSONL,
    #   Parquet; trainingmanager's --data) over --train-config's; None: theirs, or the stdlib
    n_trials: int = 12  # total finished trials the study should hold (shared by all workers)
    sampler_seed: int | None = None  # in [0, 2**32): a reproducible sweep; None: fresh streams
    # budget of each trial (a study's trials share it)
    max_steps: int | None = None  # step budget of one trial (None: TRIAL_STEPS, 150, unless
    #   time_budget_min sizes it)
    eval_every: int = 25  # evaluation (and pruning) interval in steps
    time_budget_min: float | None = None  # instead: minutes of one trial on this machine, its
    #   steps sized to them (trials then differ in steps, and none is pruned)
    # pruning (hopeless trials stop early)
    pruner: str = "median"  # median | hyperband | none
    prune_startup_trials: int = 3  # median pruner: trials completed before any pruning
    prune_warmup_steps: int = 0  # median pruner: steps of a trial never pruned
    # storage and workers
    out_dir: str = "runs"  # the study's files go to <out_dir>/<study_name>/
    storage: str | None = None  # SQLAlchemy URL or journal file (default: its journal.log)
    workers: int = 1  # worker processes on this machine
    heartbeat_interval: int = 30  # seconds between a trial's heartbeats (RDB storages)
    grace_period: int = 120  # seconds without a heartbeat before a trial is dead and requeued
    max_retry: int = 2  # times a trial whose worker died is queued again (an interrupted one:
    #   always)
    worker: int = field(default=0, metadata={"hidden": True})  # internal: i > 0 makes this
    #   process worker i of --workers (trials only); not in --help
    # output
    progress: bool = True  # a progress bar over the trials

    def __post_init__(self) -> None:
        if self.max_steps is None and self.time_budget_min is None:  # one number from here on
            self.max_steps = TRIAL_STEPS
        self.out_dir = settings.home_expanded(self.out_dir)
        self.train_config = settings.home_expanded(self.train_config)
        self.space = settings.home_expanded(self.space)
        if self.storage is not None and "://" not in self.storage:  # a journal file's path
            self.storage = settings.home_expanded(self.storage)


TRIAL_STEPS = 150  # a trial's steps where neither max_steps nor time_budget_min is given
_CHOICES = {"pruner": ("median", "hyperband", "none")}


def _check_ranges(cfg: TuneConfig, where_set: Callable[[str], str]) -> TuneConfig:
    """Value checks the types alone do not make, each naming where the user set the key."""
    def named(key: str) -> str:
        return settings.setting(cfg, key, where_set)

    name = cfg.study_name
    if name in ("", ".", "..") or any(sep in name for sep in {"/", os.sep, os.altsep or "/"}):
        raise ValueError(f"{named('study_name')}: must be a non-empty name of one directory "
                         "under --out-dir: no '/', not '.' or '..'")
    for key in ("n_trials", "max_steps", "eval_every", "workers", "heartbeat_interval"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ValueError(f"{named(key)}: must be at least 1")
    if cfg.time_budget_min is not None and not 0 < cfg.time_budget_min < math.inf:
        raise ValueError(f"{named('time_budget_min')}: must be a positive number of minutes")
    for key in ("worker", "max_retry", "prune_startup_trials", "prune_warmup_steps"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{named(key)}: must be at least 0")
    if cfg.sampler_seed is not None and not 0 <= cfg.sampler_seed < 2**32:
        raise ValueError(f"{named('sampler_seed')}: must be in [0, 2**32)")
    if cfg.grace_period <= cfg.heartbeat_interval:
        raise ValueError(f"{named('grace_period')}: must be more seconds than "
                         f"{named('heartbeat_interval')}")
    return cfg


def config_from_dict(values: dict, source: str = "<dict>") -> TuneConfig:
    """A TuneConfig from JSON-like values; errors name the source and the key."""
    cfg = settings.config_from_dict(TuneConfig, values, source, _CHOICES)
    return _check_ranges(cfg, lambda key: source if key in values else settings.flag_of(key))


def build_parser(foreign_flags: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The flags of TuneConfig; ``foreign_flags``: flags of other commands, each with what to
    do instead (an unknown flag's error says it)."""
    parser = settings.ArgumentParser(
        prog="hyperparam_tune.py", argument_default=argparse.SUPPRESS,
        description="Optuna sweep over trainingmanager runs. Flags override --config; with no "
        "flags, a small from-scratch sweep on the stdlib corpus.")
    parser.foreign_flags = dict(foreign_flags or {})
    parser.add_argument("--config", help="JSON or YAML file of TuneConfig keys; flags override it")
    settings.add_print_config(parser)
    return settings.add_config_flags(parser, TuneConfig, _CHOICES)


def parse_config(argv: Sequence[str] | None = None,
                 foreign_flags: Mapping[str, str] | None = None) -> TuneConfig:
    """Defaults < ``--config`` file < command-line flags (``foreign_flags``: build_parser's)."""
    args = vars(build_parser(foreign_flags).parse_args(argv))
    cfg = settings.resolve_config(TuneConfig, args, section="tune", choices=_CHOICES)
    cfg = dataclasses.replace(cfg, storage=absolute_sqlite(cfg.storage))
    where = settings.where_set_in(args, "tune")
    if cfg.time_budget_min is not None and cfg.max_steps is not None:
        raise ValueError(f"{settings.setting(cfg, 'max_steps', where)} with "
                         f"{settings.setting(cfg, 'time_budget_min', where)}: a trial's length "
                         "is its steps or its time budget: drop one")
    return _check_ranges(cfg, where)


def absolute_sqlite(url: str | None) -> str | None:
    """``sqlite:///x.db`` made absolute, so that every directory names the same database; an
    in-memory database (each connection and worker its own, gone at the end) refused."""
    if url is None or not url.startswith("sqlite"):
        return url
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"--storage {url}: not a database URL; an SQLite file is "
                         "sqlite:///PATH.db") from None
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError(f"--storage {url}: an in-memory database keeps no study (each worker "
                         "would have its own); name a file: sqlite:///PATH.db")
    if os.path.isabs(parsed.database):
        return url
    return parsed.set(database=os.path.abspath(parsed.database)).render_as_string(
        hide_password=False)
