"""hyperparam_tune: Optuna sweeps over real (tiny) trainingmanager runs.

Workers are real processes on real storages: a journal file, SQLite (an RDB storage with
heartbeats) and, where .ci/run could start one, a PostgreSQL server.
"""

import concurrent.futures
import csv
import dataclasses
import datetime
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from procs import popen, signal_when
from tiny_hf import save_tiny_hf

import hyperparam_tune
import trainingmanager
from codelm import search_space, studies, trainconfig, tuneconfig
from codelm.data.config import DataError
from codelm.data.sources import stdlib_files, stdlib_root
from codelm.runs import rundir
from codelm.runtime import process, workers
from codelm.training import budget, plan, record, trainer
from tokenizer import CodeTokenizer

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("CODELM_TEST_POSTGRES_URL")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few small stdlib files: enough text for a tokenizer and a train/val split."""
    root = tmp_path_factory.mktemp("corpus")
    small = [p for p in stdlib_files() if 2_000 < p.stat().st_size < 6_000][:24]
    for p in small:
        dest = root / p.relative_to(stdlib_root())
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(p.read_text("utf-8", errors="replace"), "utf-8")
    return root


def tiny_space(tmp_path: Path, corpus: Path, extra_params: dict | None = None) -> str:
    """A search space over a tiny model on the tiny corpus; returns its JSON file."""
    space = {
        "base": {
            "preset": "tiny", "block_size": 32, "n_embd": 32, "n_layer": 1, "batch_size": 4,
            "warmup_steps": 0, "eval_examples": 8, "log_every": 1, "export": False,
            "tokenizer_max_vocab": 256, "tokenizer_min_freq": 2, "data": [str(corpus)],
            "data_options": {"cache_dir": str(corpus.parent / "cache"), "split_by": "file"},
            "device": "cpu",
        },
        "params": {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            **(extra_params or {}),
        },
    }
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space), "utf-8")
    return str(path)


def tune_args(tmp_path: Path, space: str, **flags) -> list[str]:
    steps = {} if "time_budget_min" in flags else {"max_steps": 4}  # a trial's length: one
    values = {"space": space, "out_dir": str(tmp_path / "runs"), **steps,
              "eval_every": 2, "progress": False, **flags}
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def load_study(storage, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def journal(tmp_path: Path, name: str) -> optuna.storages.BaseStorage:
    """The sweep's default storage, opened the way optuna-dashboard opens a journal file."""
    path = tmp_path / "runs" / name / studies.JOURNAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def assert_distinct_trials(trials, n: int) -> None:
    assert len(trials) == n
    assert sorted(t.number for t in trials) == list(range(n))
    assert all("lr" in t.params for t in trials)
    assert len({t.params["lr"] for t in trials}) == n, "two trials ran the same parameters"


def test_two_local_workers_share_one_journal(tmp_path, corpus, capfd):
    """--workers 2 share one journal file: each runs trials of its own, none sampled twice, and the
    sweep leaves trials.csv, the importances and best.json, which trainingmanager trains as is."""
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="two", n_trials=6, workers=2, pruner="none")
    assert hyperparam_tune.main(argv) == 0
    out, err = capfd.readouterr()
    assert "worker" not in err  # workers that ran their trials are not told
    evals = [line for line in out.splitlines() if "eval step" in line]
    assert evals and all(re.match(r"trial \d+: eval step", line) for line in evals), evals
    assert "(pip install optuna-dashboard)" in out  # not in the requirements
    (importances,) = [line for line in out.splitlines() if "parameter importances" in line]
    assert "over 6 complete trials" in importances and "rough guide" in importances
    assert "): lr " in importances

    trials = load_study(journal(tmp_path, "two"), "two").get_trials()
    assert_distinct_trials(trials, 6)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs[studies.ATTR_WORKER] for t in trials}
    assert len(workers) == 2, f"one worker ran every trial: {workers}"

    out = tmp_path / "runs" / "two"
    best_trial = min(trials, key=lambda t: t.value)
    best = plan.parse_config(["--config", str(out / "best.json")])
    assert best.lr == best_trial.params["lr"]
    assert best.max_steps == 4 and best.name == "two-best"
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 7 and table[0].startswith("number,state,value")
    assert "lr" in json.loads((out / "importances.json").read_text())

    # The best config is a ready trainingmanager config: what `--config best.json` runs.
    again = plan.parse_config(["--config", str(out / "best.json"), "--max-steps", "2",
                               "--out-dir", str(tmp_path / "again")])
    result = trainingmanager.train(again)
    assert result.step == 2 and result.run_dir == tmp_path / "again" / "two-best"


def test_rerun_continues_the_study(tmp_path, corpus, capsys):
    """The same command continues a study to --n-trials; once there, it says that none runs."""
    space = tiny_space(tmp_path, corpus)
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="again", n_trials=1)) == 0
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="again", n_trials=2)) == 0
    trials = load_study(journal(tmp_path, "again"), "again").get_trials()
    assert_distinct_trials(trials, 2)
    assert "finished already" not in capsys.readouterr().out
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="again", n_trials=2)) == 0
    assert "study again: 2 of 2 trials finished already, so none runs now" in (
        capsys.readouterr().out)
    assert len(load_study(journal(tmp_path, "again"), "again").get_trials()) == 2


def _running_trial(storage, name: str, timeout: float = 120.0):
    """The first trial that is training (past its first evaluation) in the study."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = load_study(storage, name).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            trials = []
        for t in trials:
            if t.user_attrs.get(studies.ATTR_WORKER) and t.intermediate_values:
                return t
        time.sleep(0.1)
    raise AssertionError("no trial started running")


def test_a_trial_whose_worker_died_before_naming_itself_is_queued_again(tmp_path):
    """A worker killed between creating its trial and recording itself as its owner (both under
    the claim lock) leaves a RUNNING trial: it is failed and queued again, else the study would
    never finish."""
    storage = journal(tmp_path, "orphan")
    study = optuna.create_study(study_name="orphan", storage=storage)
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    cfg = hyperparam_tune.TuneConfig()
    studies.recover_dead_trials(study, storage, cfg)
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.state == TrialState.WAITING and retry.params == trials[orphan.number].params


def test_queueing_a_retry_again_leaves_the_retried_trials_record_as_stored(tmp_path):
    """A retry whose worker died is queued again from its record, which the process reading the
    journal keeps: its retry history stays as the journal holds it (a fresh reader's), so the
    reports still say which trial continued the first."""
    cfg = hyperparam_tune.TuneConfig(out_dir=str(tmp_path / "runs"), study_name="chain")
    storage = journal(tmp_path, "chain")
    study = optuna.create_study(study_name="chain", storage=storage)
    first = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    first.set_user_attr(studies.ATTR_REASON, studies.INTERRUPTED)
    studies.queue_interrupted(study, first, cfg)
    study.tell(first, state=TrialState.FAIL)
    study.ask()  # the retry, its worker killed before naming itself
    studies.recover_dead_trials(study, storage, cfg)

    def histories(trials) -> list:
        return [t.system_attrs.get("retry_history") for t in trials]

    stored = load_study(journal(tmp_path, "chain"), "chain").get_trials()
    assert histories(study.get_trials()) == histories(stored) == [None, [0], [0, 1]]
    rows = hyperparam_tune.write_reports(study, cfg).rows
    assert "queued again as trial 1" in rows[1][-1]
    assert "queued again as trial 2" in rows[2][-1]


@pytest.mark.slow  # ~20 s: three processes train; recover_dead_trials is tested in-process above
@pytest.mark.parametrize("storage_kind", ["sqlite", "journal"])
def test_killed_worker_trial_fails_and_is_retried(tmp_path, corpus, storage_kind):
    """SIGKILL one worker mid-trial: its trial ends FAILED, is queued again with the same
    parameters, and the study still reaches its trial count. SQLite is an RDB storage: heartbeats
    find the dead worker; with the journal file, its process id on this machine does."""
    if storage_kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'study.db'}"
        flags, storage = {"storage": url}, optuna.storages.RDBStorage(url)
    else:
        flags, storage = {}, journal(tmp_path, "kill")
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="kill", n_trials=2, workers=2, max_steps=60,
                     eval_every=4, heartbeat_interval=1, grace_period=3, **flags)
    parent = popen([sys.executable, str(ROOT / "hyperparam_tune.py"), *argv],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = _running_trial(storage, "kill")
        os.kill(int(victim.user_attrs[studies.ATTR_WORKER].split(":")[1]),
                signal.SIGKILL)
        output, _ = parent.communicate(timeout=300)
    finally:
        parent.kill()
    assert parent.returncode == 0, output[-3000:]

    trials = load_study(storage, "kill").get_trials()
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    counted = [t for t in trials if t.number != victim.number]
    assert len(counted) == 2 and all(t.state == TrialState.COMPLETE for t in counted)
    assert f"; queued again as trial {retries[0].number}" in output  # the trials table
    assert f"continues trial {victim.number}'s run (duration_s: this part)" in output


def test_a_trial_declared_dead_elsewhere_is_left_and_the_worker_goes_on(tmp_path, corpus,
                                                                       capsys, monkeypatch):
    """Another worker may fail a trial that still trains (its heartbeats stalled): its worker
    leaves that trial with one line and goes on, instead of exiting 2 with Optuna's "Cannot
    tell a FAIL trial."."""
    storage = journal(tmp_path, "dead")

    def train(cfg, on_eval=None, resume_hint=None, **_):
        if cfg.name == "trial-0000":  # failed as fail_stale_trials fails it, then evaluated
            (mine,) = load_study(storage, "dead").get_trials(states=(TrialState.RUNNING,))
            storage.set_trial_state_values(mine._trial_id, TrialState.FAIL)
            on_eval(2, {"val_loss": 1.0})
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0,
                                           step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="dead", n_trials=2)
    assert hyperparam_tune.main(argv) == 0
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line.startswith("trial 0: ") and "declared it dead" in line, line
    assert "--grace-period" in line and "goes on" in line, line
    states = [t.state for t in load_study(storage, "dead").get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_stop_in_a_trial_declared_dead_elsewhere_is_still_a_stop(tmp_path, corpus, capsys,
                                                                 monkeypatch):
    """Optuna's failed tell ("Cannot tell a FAIL trial.") does not hide the stop: exit 143, not
    2, which a sweep of several workers reads as a configuration error."""
    storage = journal(tmp_path, "dead")

    def train(cfg, on_eval=None, resume_hint=None, **_):
        (mine,) = load_study(storage, "dead").get_trials(states=(TrialState.RUNNING,))
        storage.set_trial_state_values(mine._trial_id, TrialState.FAIL)  # another worker
        raise KeyboardInterrupt("SIGTERM")  # then the sweep is stopped

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="dead", n_trials=2)
    assert hyperparam_tune.main(argv) == 143
    assert "interrupted: run the same command again" in capsys.readouterr().err


def _declare_dead(storage, name: str) -> None:
    """What another worker does to a trial whose heartbeats stopped (Optuna's fail_stale_trials
    with the sweep's retry callback): fail it and queue it again."""
    study = load_study(storage, name)
    (trial,) = study.get_trials(states=(TrialState.RUNNING,))
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=2)
    retry(study, storage.get_trial(trial._trial_id))


@pytest.mark.parametrize("outcome, when, storage_kind", [
    *((outcome, when, "journal") for outcome in ("value", "pruned", "failed")
      for when in ("before the tell", "during the tell")),
    ("value", "before the tell", "sqlite"),  # heartbeats on: how a trial is declared dead
])
def test_a_trial_declared_dead_after_its_last_write_is_left_and_nothing_is_lost(
        tmp_path, corpus, capsys, monkeypatch, outcome, when, storage_kind):
    """The trial is declared dead after its worker's last write and before Optuna's tell reads
    it ("Cannot tell a FAIL trial.") or writes it (UpdateFinishedTrialError): not a stop of a
    sweep that had nothing wrong. Its worker leaves it with its one line;
    the retry continues its run from the checkpoint it left, so its result is not lost."""
    flags, storage, calls = {}, journal(tmp_path, "late"), []
    if storage_kind == "sqlite":
        flags = {"storage": f"sqlite:///{tmp_path / 'study.db'}"}
        storage = optuna.storages.RDBStorage(flags["storage"])

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append(cfg)
        run = Path(cfg.out_dir) / cfg.name
        if len(calls) == 1:  # trains its whole budget: checkpoint and last evaluation at step 4
            (run / "checkpoints" / f"{rundir.CHECKPOINT_PREFIX}4").mkdir(parents=True)
            (run / rundir.CONFIG_FILE).write_text("{}")
            for step, loss in ((2, 3.0), (4, 2.5)):
                on_eval(step, {"val_loss": loss})
            if outcome == "pruned":
                raise optuna.TrialPruned("pruned")
            if outcome == "failed":
                raise record.NonFiniteLossError("non-finite loss at step 4", 4)
        return trainingmanager.TrainResult(run_dir=run, best_val_loss=2.5, step=4)

    if when == "before the tell":
        tell = optuna.study.study._tell_with_warning

        def late_tell(study, trial, **kwargs):
            if len(calls) == 1:
                _declare_dead(storage, "late")
            return tell(study, trial, **kwargs)

        monkeypatch.setattr(optuna.study.study, "_tell_with_warning", late_tell)
    else:  # after the tell read the trial RUNNING, before it writes the state
        after_trial = optuna.samplers.TPESampler.after_trial

        def late_after_trial(self, study, trial, state, values):
            if len(calls) == 1:
                _declare_dead(storage, "late")
            return after_trial(self, study, trial, state, values)

        monkeypatch.setattr(optuna.samplers.TPESampler, "after_trial", late_after_trial)
    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="late", n_trials=1,
                     pruner="none", **flags)
    assert hyperparam_tune.main(argv) == 0
    err = capsys.readouterr().err
    told = ("trial 0: another worker declared it dead (no heartbeat within --grace-period); "
            "this worker goes on")
    assert err.splitlines()[-1] == told and err.count(told) == 1 and "Traceback" not in err
    if outcome != "failed":  # a NaN trial's failure is told as every failure is
        assert err.splitlines() == [told]
    first, retry = load_study(storage, "late").get_trials()
    assert first.state == TrialState.FAIL and retry.system_attrs["failed_trial"] == 0
    run = tmp_path / "runs" / "late" / "trials" / "trial-0000"
    assert calls[1].resume == str(run)  # the retry continues the run
    assert retry.state == TrialState.COMPLETE and retry.value == 2.5
    assert retry.intermediate_values == {2: 3.0, 4: 2.5}


def test_a_retry_of_a_run_evaluated_at_its_end_but_not_reported_is_valued_by_the_log(
        tmp_path, corpus, monkeypatch):
    """A worker declared dead (or killed) between its run's last evaluation and that
    evaluation's report leaves a checkpoint after it: the retry continues the run at its end,
    evaluates nothing, and is valued by the evaluation metrics.jsonl logs there, in the study's
    metric (bits per byte), not by the run's best validation loss."""
    storage, calls = journal(tmp_path, "unreported"), []
    logged = {"val_loss": 2.5, "val_bpb": 3.75}

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append(cfg)
        run = Path(cfg.out_dir) / cfg.name
        if len(calls) == 1:  # its whole budget, evaluated and checkpointed at step 4
            (run / "checkpoints" / f"{rundir.CHECKPOINT_PREFIX}4").mkdir(parents=True)
            (run / rundir.CONFIG_FILE).write_text("{}")
            line = {"step": 4, "kind": "val", **logged, "best_val_loss": 2.5, "epoch": 0.1}
            (run / rundir.METRICS_FILE).write_text(json.dumps(line) + "\n")
            _declare_dead(storage, "unreported")
            on_eval(4, dict(logged))  # the report the failed trial refuses
        return trainingmanager.TrainResult(run_dir=run, best_val_loss=2.5, step=4, best_step=4)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="unreported",
                     n_trials=1, pruner="none", eval_every=4)
    assert hyperparam_tune.main(argv) == 0
    study = load_study(storage, "unreported")
    first, retry = study.get_trials()
    assert first.intermediate_values == {} and calls[1].resume is not None
    assert retry.state == TrialState.COMPLETE and retry.value == logged["val_bpb"]
    assert study.user_attrs[hyperparam_tune.ATTR_METRIC] == "val_bpb"


def test_a_retry_waits_while_another_process_still_trains_its_run(tmp_path, corpus, capsys,
                                                                 monkeypatch):
    """A trial queued again may find its run directory held by a live process: the worker of a
    trial declared dead that still trains it (until its next evaluation, where it finds its
    trial failed). The trainer's lock refuses the resume, which must not stop the sweep as a
    configuration error: the retry waits for the lock (one line), then continues the run;
    stopped while it waits, its own retry continues the same run. Here the test holds the lock
    and its stand-in for time.sleep lets go of it (deterministic: no race with a clock)."""
    real, calls = trainingmanager.train, []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append(cfg)
        result = real(cfg, on_eval=on_eval, resume_hint=resume_hint)
        if len(calls) == 1:  # trial 0 stops: the next sweep queues it again
            result.interrupted = "SIGTERM"
        return result

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="held", n_trials=1,
                     pruner="none")
    assert hyperparam_tune.main(argv) == 143
    run = tmp_path / "runs" / "held" / "trials" / "trial-0000"
    held = os.open(run / rundir.LOCK_FILE, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # trial 0's worker, still training
    capsys.readouterr()

    def stopped(seconds):  # the user stops the waiting sweep
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(hyperparam_tune.time, "sleep", stopped)
    assert hyperparam_tune.main(argv) == 143
    holder = f"process {os.getpid()} on {socket.gethostname()}"  # trial 0's trainer wrote it
    told = f"trial 1: waiting for {run}, the run it continues: {holder} holds it"
    err = capsys.readouterr().err
    assert err.startswith(told) and err.count("trial 1: waiting") == 1, err
    assert len(calls) == 1  # no trainer started on the held run
    trials = load_study(journal(tmp_path, "held"), "held").get_trials()
    assert trials[1].user_attrs[studies.ATTR_REASON] == studies.INTERRUPTED
    assert trials[1].user_attrs[hyperparam_tune.ATTR_RUN] == str(run)  # left to its retry

    looks = []

    def let_go_at_the_second_look(seconds):
        looks.append(seconds)
        if len(looks) == 2:
            os.close(held)

    monkeypatch.setattr(hyperparam_tune.time, "sleep", let_go_at_the_second_look)
    assert hyperparam_tune.main(argv) == 0
    assert capsys.readouterr().err.count("trial 2: waiting for") == 1  # told once, not per look
    assert len(looks) >= 2 and [c.resume for c in calls] == [None, str(run)]
    first, _, retry = load_study(journal(tmp_path, "held"), "held").get_trials()
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    # trial 0 had trained its whole budget: its retry's result is trial 0's
    assert retry.intermediate_values == first.intermediate_values
    assert retry.value == min(first.intermediate_values.values())


@pytest.mark.slow
def test_interrupted_sweep_reruns_the_interrupted_trial(tmp_path, corpus):
    """SIGINT mid-trial exits 130 and queues the trial again once; the same command continues its
    run from the checkpoint the stop wrote, no step trained twice."""
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="int", n_trials=2, max_steps=60, eval_every=4)
    storage = journal(tmp_path, "int")
    sweep = popen([sys.executable, str(ROOT / "hyperparam_tune.py"), *argv],
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _running_trial(storage, "int")
        sweep.send_signal(signal.SIGINT)
        output, _ = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 130, output[-3000:]
    assert "run the same command again" in output and "Traceback" not in output
    assert "--resume" not in output  # the trial's own message speaks the sweep's terms
    # queued again by its own worker as it stopped: once, however many sweeps restart
    stopped = load_study(storage, "int").get_trials()
    assert [t.state for t in stopped] == [TrialState.FAIL, TrialState.WAITING]
    assert stopped[1].system_attrs["retry_history"] == [0]

    assert hyperparam_tune.main(argv) == 0
    first, *rest = load_study(storage, "int").get_trials()
    assert first.state == TrialState.FAIL
    assert first.user_attrs[studies.ATTR_REASON] == studies.INTERRUPTED
    assert rest[0].system_attrs["failed_trial"] == 0 and rest[0].params == first.params
    assert len(rest) == 2 and all(t.state == TrialState.COMPLETE for t in rest)
    # The re-run continued the interrupted run from the checkpoint the stop wrote.
    run = Path(first.user_attrs[hyperparam_tune.ATTR_RUN])
    assert rest[0].user_attrs[hyperparam_tune.ATTR_RUN] == str(run)
    stopped_at = first.user_attrs[hyperparam_tune.ATTR_STEP]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if line["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one pass, no step run twice
    assert {s: v for s, v in rest[0].intermediate_values.items() if s <= stopped_at} == {
        s: v for s, v in first.intermediate_values.items() if s <= stopped_at}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stopped_or_killed_sweep_stops_its_workers(tmp_path, corpus, sig):
    """SIGTERM (a scheduler's stop, ``kill``) to the command is passed on to the workers, which
    run in their own sessions: each ends its trial as interrupted, and the command exits 143
    (SIGHUP, its terminal's hangup: 129). Its output goes to a file: a hangup points a terminal
    or a pipe at /dev/null."""
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="term", n_trials=2, workers=2, max_steps=5000,
                     eval_every=4, pruner="none")
    storage = journal(tmp_path, "term")
    running = []

    def both_training() -> bool:
        try:
            trials = load_study(storage, "term").get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            return False
        running[:] = [t for t in trials if t.intermediate_values]
        return len(running) == 2

    def workers() -> list[int]:
        return [int(t.user_attrs[studies.ATTR_WORKER].split(":")[1])
                for t in running]

    with open(tmp_path / "output", "w") as log:
        sweep = popen([sys.executable, str(ROOT / "hyperparam_tune.py"), *argv],
                      stdout=log, stderr=subprocess.STDOUT, text=True)
        signal_when(sweep, both_training, sig)
    output = (tmp_path / "output").read_text()
    assert sweep.returncode == 128 + sig, output[-3000:]
    assert "Traceback" not in output and "run the same command again" in output
    for pid in workers():
        with pytest.raises(ProcessLookupError):  # it has ended (and was waited for)
            os.kill(pid, 0)
    trials = load_study(storage, "term").get_trials(states=(TrialState.FAIL,))
    assert len(trials) == 2  # each queued again to continue (WAITING)
    assert all(t.user_attrs[studies.ATTR_REASON] == studies.INTERRUPTED
               for t in trials)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_trial_stopped_by_two_sigterms_still_writes_its_checkpoint(tmp_path, corpus,
                                                                     monkeypatch, capsys, sig,
                                                                     hangup_at_default):
    """Slurm's scancel (or `pkill -f`) signals every process of a job: a worker gets SIGTERM
    directly and again forwarded by its sweep. The second is not "stop now": the trial still
    writes its checkpoint, so the re-run does not go back to the one before (here: none at all).
    A hangup's SIGHUP comes twice too (the kernel's, the shell's); it stops the trial the same
    way, 129 (capsys: it would point a terminal running pytest -s at /dev/null)."""
    real_step, calls = trainer.Trainer.train_step, [0]

    def step_with_two_sigterms(self, *args, **kwargs):
        calls[0] += 1
        stats = real_step(self, *args, **kwargs)
        if calls[0] == 1:  # as the run's first step ends: nothing is saved before the stop's own
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)
        return stats

    monkeypatch.setattr(trainer.Trainer, "train_step", step_with_two_sigterms)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="twice", n_trials=1)
    assert hyperparam_tune.main(argv) == 128 + sig
    (trial,) = load_study(journal(tmp_path, "twice"), "twice").get_trials(
        states=(TrialState.FAIL,))
    assert trial.user_attrs[studies.ATTR_REASON] == studies.INTERRUPTED
    run = Path(trial.user_attrs[hyperparam_tune.ATTR_RUN])
    checkpoints = rundir.list_checkpoints(run)
    assert [rundir.checkpoint_step(c) for c in checkpoints] == [1]
    assert trial.user_attrs[hyperparam_tune.ATTR_STEP] == 1


def test_interrupted_sweep_keeps_the_reports_of_finished_trials(tmp_path, corpus, monkeypatch):
    """The trainer stops on SIGTERM after a checkpoint and returns; the sweep exits 143, writes
    the reports of the trials that finished, and tells the trainer what a re-run does."""
    hints = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        hints.append(resume_hint)
        interrupted = "SIGTERM" if len(hints) == 2 else None
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4,
                                           interrupted=interrupted)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="keep", n_trials=3)
    assert hyperparam_tune.main(argv) == 143
    out = tmp_path / "runs" / "keep"
    assert json.loads((out / "best.json").read_text())["name"] == "keep-best"
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith("1,FAIL") and studies.INTERRUPTED in rows[2]
    assert rows[3].startswith("2,WAITING") and rows[3].endswith("queued to continue trial 1")
    assert "continues this trial's run from its checkpoint" in hints[1]


def test_a_trial_stopped_before_its_run_began_is_rerun_from_its_start(tmp_path, corpus,
                                                                     monkeypatch, capsys):
    """A trial stopped while its data is prepared has no run to continue: its re-run trains
    from the start in a run of its own, and says so (on the console and in trials.csv), never
    that it continues the stopped trial's run."""
    names = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        names.append((cfg.name, cfg.resume))
        if len(names) == 1:  # stopped before the trainer wrote anything
            raise KeyboardInterrupt("SIGINT")
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="fresh", n_trials=1)
    assert hyperparam_tune.main(argv) == 130
    capsys.readouterr()
    assert hyperparam_tune.main(argv) == 0
    assert names == [("trial-0000", None), ("trial-0001", None)]
    assert "trial 1: re-runs trial 0 from its start" in capsys.readouterr().out
    rows = (tmp_path / "runs" / "fresh" / "trials.csv").read_text().splitlines()
    assert rows[2].startswith("1,COMPLETE") and rows[2].endswith("re-runs trial 0 from its start")


def test_a_continued_fresh_rerun_is_reported_as_continuing_its_own_run(tmp_path, corpus,
                                                                       monkeypatch):
    """A re-run from the start (trial 1, its own run trial-0001) stopped in turn is continued by
    trial 2 from trial-0001's checkpoint: trials.csv names trial 1 as the trial whose run it
    continues and is queued for, as the console says, never a re-run of trial 0 from its
    start (a retry takes over its predecessor's attributes; the fresh mark is not its own)."""
    calls = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append((cfg.name, cfg.resume))
        run = Path(cfg.out_dir) / cfg.name
        if len(calls) == 1:  # stopped before the trainer wrote anything
            raise KeyboardInterrupt("SIGINT")
        if len(calls) == 2:  # trains to a checkpoint at step 2, then is stopped
            run.mkdir(parents=True)
            (run / "config.json").write_text("{}")
            (run / "checkpoints" / f"{rundir.CHECKPOINT_PREFIX}2").mkdir(parents=True)
            on_eval(2, {"val_loss": 3.0})
            return trainingmanager.TrainResult(run_dir=run, best_val_loss=3.0, step=2,
                                               interrupted="SIGTERM")
        on_eval(4, {"val_loss": 2.0})
        return trainingmanager.TrainResult(run_dir=run, best_val_loss=2.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="chain", n_trials=1)
    assert hyperparam_tune.main(argv) == 130
    assert hyperparam_tune.main(argv) == 143
    queued = load_study(journal(tmp_path, "chain"), "chain").get_trials()[2]
    assert hyperparam_tune.trial_reason(queued, {}) == "queued to continue trial 1"
    assert hyperparam_tune.main(argv) == 0
    first_rerun = tmp_path / "runs" / "chain" / "trials" / "trial-0001"
    assert calls[2] == ("trial-0001", str(first_rerun))
    rows = (tmp_path / "runs" / "chain" / "trials.csv").read_text().splitlines()
    assert rows[3].startswith("2,COMPLETE")
    assert rows[3].endswith("continues trial 1's run (duration_s: this part)")


def test_a_retry_that_fails_before_its_first_evaluation_has_no_steps(tmp_path, corpus,
                                                                     monkeypatch):
    """A retry takes over its predecessor's attributes as Optuna queues it, but trains steps of
    its own: one that fails before its first evaluation has none, in its record and in
    trials.csv's steps column, while the interrupted trial keeps the step it reached."""
    calls = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append(cfg.name)
        if len(calls) == 1:  # evaluated at step 2, then stopped
            on_eval(2, {"val_loss": 3.0})
            return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=3.0, step=2,
                                               interrupted="SIGTERM")
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="steps", n_trials=1)
    assert hyperparam_tune.main(argv) == 143
    assert hyperparam_tune.main(argv) == 1
    (stopped, retry) = load_study(journal(tmp_path, "steps"), "steps").get_trials()[:2]
    assert stopped.user_attrs[hyperparam_tune.ATTR_STEP] == 2
    assert retry.system_attrs["retry_history"] == [0] and retry.state == TrialState.FAIL
    assert retry.user_attrs.get(hyperparam_tune.ATTR_STEP) is None
    with open(tmp_path / "runs" / "steps" / "trials.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert [(row["number"], row["steps"]) for row in rows[:2]] == [("0", "2"), ("1", "")]


def test_a_sweep_that_ends_short_of_n_trials_exits_1_even_with_a_best(tmp_path, corpus,
                                                                       monkeypatch, capsys):
    """The last trial runs on another machine (no heartbeats: nobody would see it die): this
    command stops waiting, says how many finished, and exits 1 although best.json exists, so
    that `tune && train --config best.json` does not go on with a partial sweep."""
    monkeypatch.setattr(trainingmanager, "train", lambda cfg, on_eval=None, resume_hint=None, **_:
                        trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4))
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="short", n_trials=1)
    assert hyperparam_tune.main(argv) == 0
    study = load_study(journal(tmp_path, "short"), "short")
    elsewhere = study.ask()
    study._storage.set_trial_user_attr(elsewhere._trial_id, studies.ATTR_WORKER,
                                       f"{socket.gethostname()}-elsewhere:1")
    capsys.readouterr()
    assert hyperparam_tune.main([*argv, "--n-trials", "2"]) == 1
    assert "study short: 1 of 2 trials finished; run the same command again" in (
        capsys.readouterr().err)
    assert (tmp_path / "runs" / "short" / "best.json").is_file()


def test_one_completed_trial_ranks_no_parameter(tmp_path, corpus, monkeypatch):
    """Importances compare completed trials: of one, Optuna would call every parameter equally
    important (a warning, and 1.0 for a single one); importances.json stays empty."""
    monkeypatch.setattr(trainingmanager, "train", lambda cfg, on_eval=None, resume_hint=None, **_:
                        trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4))
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="one", n_trials=1)
    assert hyperparam_tune.main(argv) == 0
    assert json.loads((tmp_path / "runs" / "one" / "importances.json").read_text()) == {}


def test_a_rerun_sweep_continues_the_interrupted_trial_from_its_checkpoint(
        tmp_path, corpus, monkeypatch):
    """The trial queued again after an interrupt continues its predecessor's run directory
    (``resume``) and first reports again the losses its predecessor reported up to the
    checkpoint it continues from."""
    calls = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append(cfg)
        run = Path(cfg.out_dir) / cfg.name
        if len(calls) == 1:  # evaluates at steps 2, 4 and 6, checkpoints at 4, then is stopped
            run.mkdir(parents=True)
            (run / "config.json").write_text("{}")
            (run / "checkpoints" / f"{rundir.CHECKPOINT_PREFIX}4").mkdir(parents=True)
            for step, loss in ((2, 3.0), (4, 2.5), (6, 2.4)):
                on_eval(step, {"val_loss": loss})
            return trainingmanager.TrainResult(run_dir=run, best_val_loss=2.4, step=6,
                                               interrupted="SIGTERM")
        on_eval(8, {"val_loss": 2.0})
        return trainingmanager.TrainResult(run_dir=run, best_val_loss=2.0, step=8)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="cont", n_trials=1,
                     max_steps=8)
    assert hyperparam_tune.main(argv) == 143
    assert hyperparam_tune.main(argv) == 0
    first_run = tmp_path / "runs" / "cont" / "trials" / "trial-0000"
    assert calls[0].resume is None and Path(calls[0].out_dir) / calls[0].name == first_run
    assert calls[1].resume == str(first_run) and calls[1].name == "trial-0000"
    first, second = load_study(journal(tmp_path, "cont"), "cont").get_trials()
    assert second.params == first.params and second.state == TrialState.COMPLETE
    assert second.intermediate_values == {2: 3.0, 4: 2.5, 8: 2.0}  # not step 6: after step-4
    assert second.user_attrs[hyperparam_tune.ATTR_RUN] == str(first_run)
    rows = (tmp_path / "runs" / "cont" / "trials.csv").read_text().splitlines()
    assert rows[0].endswith(",run_dir,reason") and f",{first_run},interrupted" in rows[1]


def _first_trial_trains_in_bf16_and_stops(monkeypatch) -> list:
    """The real trainer, except that the first run records bf16 in its checkpoint and stops,
    as a worker on an A100 ("auto": bf16) would have; returns the TrainConfigs of every run."""
    real, calls = trainingmanager.train, []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append(cfg)
        result = real(cfg, on_eval=on_eval, resume_hint=resume_hint)
        if len(calls) == 1:
            state_file = rundir.list_checkpoints(result.run_dir)[-1] / \
                rundir.STATE_FILE
            state = torch.load(state_file, weights_only=True)
            state["precision"] = "bf16"
            torch.save(state, state_file)
            process.write_manifest(state_file.parent)  # as a bf16 machine would have saved it
            result.interrupted = "SIGTERM"
        return result

    monkeypatch.setattr(trainingmanager, "train", train)
    return calls


def test_a_trial_continued_on_another_kind_of_machine_keeps_the_precision_it_trained_in(
        tmp_path, corpus, monkeypatch, capsys):
    """A trial trained in bf16 ("auto" on an A100) and queued again on a machine where "auto"
    computes in fp32 continues its run in bf16, as its checkpoint recorded (the trainer refuses
    a resume whose precision would change, which would stop the sweep), while the recipe, the
    study's settings and a fresh trial keep "auto"."""
    calls = _first_trial_trains_in_bf16_and_stops(monkeypatch)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="prec", n_trials=2,
                     max_steps=4, pruner="none")
    assert hyperparam_tune.main(argv) == 143
    assert hyperparam_tune.main(argv) == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "prec" / "trials" / "trial-0000"
    assert [(c.resume, c.precision) for c in calls] == [
        (None, "auto"), (str(run), "bf16"), (None, "auto")]
    checkpoint = rundir.list_checkpoints(run)[-1] / rundir.STATE_FILE
    assert torch.load(checkpoint, weights_only=True)["precision"] == "bf16"
    study = load_study(journal(tmp_path, "prec"), "prec")
    assert [t.state for t in study.get_trials()] == [
        TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.user_attrs[hyperparam_tune.ATTR_SETTINGS]["precision"] == "auto"
    best = json.loads((tmp_path / "runs" / "prec" / "best.json").read_text())
    assert trainconfig.config_from_dict(best).precision == "auto"


@pytest.mark.skipif(POSTGRES_URL is None, reason="no PostgreSQL server: CODELM_TEST_POSTGRES_URL "
                    "is unset (.ci/run starts one; it could not start here)")
def test_two_workers_on_postgresql(tmp_path, corpus):
    """Two workers on one PostgreSQL storage split the trials, none sampled twice, as workers on
    several machines share one database."""
    name = f"pg-{uuid.uuid4().hex[:12]}"
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name=name, n_trials=4, workers=2, pruner="none",
                     storage=POSTGRES_URL)
    assert hyperparam_tune.main(argv) == 0
    trials = load_study(POSTGRES_URL, name).get_trials()
    assert_distinct_trials(trials, 4)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs[studies.ATTR_WORKER] for t in trials}) == 2


def test_hopeless_trial_is_pruned_early(tmp_path, corpus):
    """A trial worse than the median at an early evaluation is pruned there, its run stopped short
    of --max-steps: the budget goes to trials that may win."""
    space = tiny_space(tmp_path, corpus)
    storage = journal(tmp_path, "prune")
    study = optuna.create_study(study_name="prune", storage=storage)
    study.enqueue_trial({"lr": 1e-2})
    study.enqueue_trial({"lr": 1e-4})  # barely learns: worse at the first evaluation
    argv = tune_args(tmp_path, space, study_name="prune", n_trials=2, max_steps=12,
                     eval_every=2, prune_startup_trials=1)
    assert hyperparam_tune.main(argv) == 0

    good, bad = load_study(storage, "prune").get_trials()
    assert good.state == TrialState.COMPLETE
    assert bad.state == TrialState.PRUNED
    assert max(bad.intermediate_values) < 12
    metrics = tmp_path / "runs" / "prune" / "trials" / "trial-0001" / "metrics.jsonl"
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()]
    assert max(steps) < 12, "the pruned trial trained its whole budget"


def test_trial_that_trained_its_whole_budget_is_complete_not_pruned(tmp_path, corpus,
                                                                    monkeypatch):
    """At the final evaluation pruning saves nothing: a worse trial still completes."""
    def trained(cfg, on_eval=None, resume_hint=None, **_):
        on_eval(cfg.max_steps, {"val_loss": 5.0})
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=5.0,
                                           step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", trained)
    storage = journal(tmp_path, "last")
    study = optuna.create_study(study_name="last", storage=storage)
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions={"lr": optuna.distributions.FloatDistribution(
            1e-4, 1e-2, log=True)}, value=1.0, intermediate_values={4: 1.0},
        user_attrs={hyperparam_tune.ATTR_CONFIG: {"lr": 1e-3}}))
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="last", n_trials=2,
                     max_steps=4, prune_startup_trials=1)
    assert hyperparam_tune.main(argv) == 0
    assert load_study(storage, "last").get_trials()[1].state == TrialState.COMPLETE


@pytest.mark.parametrize("warmup", [5, 8])
def test_prune_warmup_steps_reach_the_median_pruner(tmp_path, corpus, monkeypatch, warmup):
    """--prune-warmup-steps W spares a hopeless trial until step W, as Optuna's own
    MedianPruner(n_warmup_steps=W) given the same reports decides: pruned at the first
    evaluation from W on, or COMPLETE when W covers the budget. test_pruner_flag checks only the
    pruner's class; without W this trial is pruned at its first evaluation (step 2)."""
    def hopeless(cfg, on_eval=None, resume_hint=None, **_):
        for step in range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every):
            on_eval(step, {"val_loss": 5.0})
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=5.0,
                                           step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", hopeless)
    steps = [2, 4, 6, 8]
    good = optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions={"lr": optuna.distributions.FloatDistribution(
            1e-4, 1e-2, log=True)}, value=1.0, intermediate_values=dict.fromkeys(steps, 1.0),
        user_attrs={hyperparam_tune.ATTR_CONFIG: {"lr": 1e-3}})
    reference = optuna.create_study(pruner=optuna.pruners.MedianPruner(
        n_startup_trials=1, n_warmup_steps=warmup))
    reference.add_trial(good)
    trial, pruned_at = reference.ask(), None
    for step in steps[:-1]:  # never at the final evaluation (the sweep's rule, tested above)
        trial.report(5.0, step)
        if trial.should_prune():
            pruned_at = step
            break
    assert pruned_at == {5: 6, 8: None}[warmup]

    storage = journal(tmp_path, "warm")
    optuna.create_study(study_name="warm", storage=storage).add_trial(good)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="warm", n_trials=2,
                     max_steps=8, eval_every=2, prune_startup_trials=1, prune_warmup_steps=warmup)
    assert hyperparam_tune.main(argv) == 0
    swept = load_study(storage, "warm").get_trials()[1]
    assert swept.state == (TrialState.PRUNED if pruned_at else TrialState.COMPLETE)
    assert max(swept.intermediate_values) == (pruned_at or 8)


def test_nan_trial_is_failed_with_reason_and_the_study_goes_on(tmp_path, corpus):
    """A non-finite loss fails its trial with the step and the likely causes, and no resume advice
    (a NaN trial is never continued); the next trial runs, and best.json is its config."""
    space = tiny_space(tmp_path, corpus, {
        "inject_nan_at_step": {"type": "categorical", "choices": [None, 2]}})
    storage = journal(tmp_path, "nan")
    study = optuna.create_study(study_name="nan", storage=storage)
    study.enqueue_trial({"inject_nan_at_step": 2})
    study.enqueue_trial({"inject_nan_at_step": None})
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="nan", n_trials=2)) == 0

    nan, ok = load_study(storage, "nan").get_trials()
    assert nan.state == TrialState.FAIL
    reason = nan.user_attrs[studies.ATTR_REASON]
    assert reason.startswith("non-finite loss") and " at step 2: " in reason
    assert "Likely causes: injected on purpose" in reason and "lower lr" in reason
    # A NaN trial is counted and never continued: no resume advice, no trainingmanager flags.
    assert "the same" not in reason and "new run" not in reason and "--" not in reason
    assert nan.user_attrs[hyperparam_tune.ATTR_STEP] == 2
    assert ok.state == TrialState.COMPLETE
    best = json.loads((tmp_path / "runs" / "nan" / "best.json").read_text())
    assert best["inject_nan_at_step"] is None and best["lr"] == ok.params["lr"]


def test_out_of_memory_trial_is_failed_with_reason(tmp_path, corpus, monkeypatch, capsys):
    """An OOM cannot be provoked on a CPU test machine; the trainer raising it is simulated."""
    def out_of_memory(cfg, on_eval=None, resume_hint=None, **_):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1TB")

    monkeypatch.setattr(trainingmanager, "train", out_of_memory)
    space = tiny_space(tmp_path, corpus)
    # Every trial failed: no best.json, so not exit 0 (`tune && train --config best.json`).
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="oom", n_trials=2)) == 1
    assert "no trial completed" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "oom" / "best.json").exists()
    trials = load_study(journal(tmp_path, "oom"), "oom").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.user_attrs[studies.ATTR_REASON].startswith("out of memory")
               for t in trials)


def test_builtin_spaces_are_valid_trainingmanager_values():
    """The shipped spaces sample TrainConfig keys and hold the batch fixed in their base (a sampled batch
    would win by the data it saw); lora needs init_from, a misspelled name gets the close one."""
    for name in ("from-scratch", "lora"):
        space = hyperparam_tune.load_space(name)
        assert {"lr", "warmup_steps", "weight_decay", "label_smoothing"} <= set(space.params)
        # Under one step budget a sampled batch would win by the data it saw: fixed in the base.
        assert not {"batch_size", "grad_accum"} & set(space.params)
        assert {"batch_size", "grad_accum"} <= set(space.base)
    assert {"n_embd", "n_layer"} <= set(hyperparam_tune.load_space("from-scratch").params)
    lora = hyperparam_tune.load_space("lora")
    assert {"lora_r", "lora_alpha", "lora_dropout", "lora_targets"} <= set(lora.params)
    with pytest.raises(ValueError, match="init_from"):
        hyperparam_tune.check_before_trials(hyperparam_tune.TuneConfig(space="lora"))
    with pytest.raises(ValueError, match="not a built-in space.*did you mean 'from-scratch'"):
        hyperparam_tune.load_space("fromscratch")


@pytest.mark.parametrize("name", sorted(p.stem for p in search_space.SPACES_DIR.glob("*.json")))
def test_each_shipped_space_passes_the_checks_before_the_first_trial(tmp_path, name):
    """Every choice of a shipped space (a preset name, a range bound) is one the trainer takes."""
    space = hyperparam_tune.load_space(name)
    base = {}
    if "init_from" in space.requires:
        save_tiny_hf("llama", tmp_path / "base", vocab_size=512)
        base = {"init_from": str(tmp_path / "base")}
    train = tmp_path / "train.json"
    train.write_text(json.dumps(base), "utf-8")
    cfg = hyperparam_tune.TuneConfig(space=name, train_config=str(train),
                                     out_dir=str(tmp_path / "runs"))
    loaded, _ = hyperparam_tune.check_before_trials(cfg)
    assert loaded.params


def test_readme_example_space_passes_the_checks_before_the_first_trial(tmp_path):
    """configs/search_spaces/README.md's worked example is what a user copies: it passes every
    check the sweep makes before its first trial (no lora_targets sampled without lora_r), given
    what its `requires` names, and is refused without it."""
    text = (search_space.SPACES_DIR / "README.md").read_text("utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "one worked example"
    space = tmp_path / "example.json"
    space.write_text(blocks[0], "utf-8")
    requires = json.loads(blocks[0]).get("requires", [])
    assert set(requires) <= {"init_from"}, "give this test a value for each required key"
    train = tmp_path / "train.json"
    train.write_text("{}", "utf-8")
    cfg = hyperparam_tune.TuneConfig(space=str(space), train_config=str(train),
                                     out_dir=str(tmp_path / "runs"))
    if requires:
        with pytest.raises(ValueError, match="needs 'init_from' set in"):
            hyperparam_tune.check_before_trials(cfg)
        save_tiny_hf("llama", tmp_path / "base", vocab_size=512)
        train.write_text(json.dumps({"init_from": str(tmp_path / "base")}), "utf-8")
    loaded, base = hyperparam_tune.check_before_trials(cfg)
    assert set(loaded.params) and base.keys() == set(requires)
    assert not (tmp_path / "runs").exists()  # checked before anything is written


@pytest.mark.parametrize("params, message", [
    ({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}, "params.learning_rate"),
    ({"lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}}, "params.lr.type: must be one of"),
    ({"lr": {"type": ["float"], "low": 1e-4, "high": 1e-2}}, "params.lr.type: must be one of"),
    ({"lr": ["float", 1e-4, 1e-2]}, "params.lr: must be an object"),
    ({"lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "`low <= high` must hold"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "log"),
    ({"lr": {"type": "float", "low": "1e-4", "high": 1e-2}},
     "params.lr.low: must be a finite number, got '1e-4'"),
    ({"lr": {"type": "float", "low": 1e-4, "high": True}}, "params.lr.high: must be a finite"),
    ({"lr": {"type": "float", "low": 1e-4, "high": float("inf")}},  # JSON's Infinity
     "params.lr.high: must be a finite number, got inf"),
    # Optuna would take the string "false" as true: log-uniform sampling
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": "false"}},
     "params.lr.log: must be true or false"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": 0}}, "params.lr.log: must be"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "step": None}},
     "params.lr.step: must be a finite number"),
    ({"warmup_steps": {"type": "int", "low": 0, "high": 30, "step": "5"}},  # not a TypeError
     "params.warmup_steps.step: must be an integer, got '5'"),
    ({"warmup_steps": {"type": "int", "low": 0, "high": 30.5}},
     "params.warmup_steps.high: must be an integer"),
    ({"warmup_steps": {"type": "int", "low": False, "high": 30}},
     "params.warmup_steps.low: must be an integer"),
    ({"batch_size": {"type": "categorical", "choices": "8"}},
     "params.batch_size.choices: must be a non-empty list"),
    ({"batch_size": {"type": "categorical", "choices": []}},
     "params.batch_size.choices: must be a non-empty list"),
    ({"batch_size": {"type": "categorical", "choices": ["8"]}}, "'batch_size' must be an integer"),
    # keys the sweep sets on every trial: a sampled value would be silently overwritten
    ({"max_steps": {"type": "int", "low": 2, "high": 3}}, "params.max_steps: the sweep sets"),
    ({"epochs": {"type": "float", "low": 1.0, "high": 2.0}}, "params.epochs: the sweep sets"),
    ({"save_every": {"type": "int", "low": 1, "high": 4}}, "params.save_every: the sweep sets"),
])
def test_bad_space_is_a_clear_error(tmp_path, params, message):
    """Each malformed space is refused before any trial, naming its file and the dotted key of what
    is wrong (params.lr.low), not with Optuna's traceback mid-sweep."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"params": params}))
    with pytest.raises(ValueError, match=message) as e:
        hyperparam_tune.load_space(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("where", ["space base", "train config"])
def test_a_resume_in_the_base_values_is_refused(tmp_path, corpus, capsys, where):
    """Each trial is a new run: trials would ignore a resume, and best.json would carry it on, so
    that the `--config best.json` command the sweep prints would continue (or be refused by) the
    unrelated run it names. Refused before any trial."""
    space = Path(tiny_space(tmp_path, corpus))
    source = space
    if where == "space base":
        values = json.loads(space.read_text())
        values["base"]["resume"] = "runs/mine"
        space.write_text(json.dumps(values))
        flags = {}
    else:
        source = tmp_path / "train.json"
        source.write_text(json.dumps({"resume": "runs/mine", "lr": 1e-3}))
        flags = {"train_config": str(source)}
    argv = tune_args(tmp_path, str(space), study_name="res", **flags)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}{': base' if where == 'space base' else ''}: "
                          "resume: each trial is a new run"), err
    assert err.rstrip().endswith("remove 'resume'") and not (tmp_path / "runs" / "res").exists()


@pytest.mark.parametrize("where", ["space base", "space params", "train config"])
def test_a_time_budget_is_refused(tmp_path, corpus, capsys, where):
    """Trials share --max-steps: trials stopped by max_time_s at whatever step their machine
    reached would be recorded COMPLETE and ranked against each other, while the trainer tells
    the user that the same command continues them (it would finish the study instead)."""
    space = Path(tiny_space(tmp_path, corpus))
    values = json.loads(space.read_text())
    source, flags = f"{space}: base", {}
    if where == "space base":
        values["base"]["max_time_s"] = 1
    elif where == "space params":
        values["params"]["max_time_s"] = {"type": "float", "low": 1, "high": 2}
        source = f"{space}: params"
    else:
        train = tmp_path / "train.json"
        train.write_text(json.dumps({"max_time_s": 1}))
        source, flags = str(train), {"train_config": str(train)}
    space.write_text(json.dumps(values))
    argv = tune_args(tmp_path, str(space), study_name="time", **flags)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}: max_time_s: trials share --max-steps"), err
    assert not (tmp_path / "runs" / "time").exists()


def test_bad_space_field_type_exits_2_with_one_line(tmp_path, capsys):
    """A string where the space wants an integer exits 2 with one line naming the file, the key and
    the value, not a TypeError's traceback."""
    space = tmp_path / "step.json"
    space.write_text(json.dumps({"params": {"warmup_steps": {
        "type": "int", "low": 0, "high": 30, "step": "5"}}}))
    assert hyperparam_tune.main(tune_args(tmp_path, str(space), study_name="step")) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (str(space), "params.warmup_steps.step", "integer", "'5'")), err


@pytest.mark.parametrize("top, message", [
    ({"base": []}, "key 'base' must be a JSON object, got []"),
    ({"base": None}, "key 'base' must not be null"),
    ({"base": "x"}, "key 'base' must be a JSON object, got 'x'"),
    ({"requires": [["init_from"]]}, "key 'requires' must be a list of strings"),
    ({"requires": 3}, "key 'requires' must be a list of strings"),
    ({"requires": ["init_frm"]}, "requires: not TrainConfig key(s) ['init_frm']"),
    ({"description": ["what"]}, "key 'description' must be a string"),
    ({"descripton": "what"}, "unknown key 'descripton'; did you mean 'description'?"),
])
def test_space_of_wrong_top_level_types_is_a_clear_error(tmp_path, top, message):
    """Each is a one-line error, not a traceback (AttributeError, TypeError) or a misleading
    'unknown key'."""
    path = tmp_path / "space.json"
    path.write_text(json.dumps({**top, "params": {"lr": {"type": "float", "low": 1e-4,
                                                         "high": 1e-2}}}))
    with pytest.raises(ValueError) as e:
        hyperparam_tune.load_space(str(path))
    assert str(e.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("name, hint", [
    ("lrr", "did you mean 'lr'?"),
    ("learning_rate", "did you mean 'lr'?"),  # HF Trainer's spelling, as --learning_rate
    ("velocity", "TrainConfig keys are: adam_eps, base_dtype, "),
])
def test_a_misspelled_space_param_gets_the_close_key(tmp_path, name, hint):
    """A space param that is no TrainConfig key is refused with the close key (HF's learning_rate
    reads as lr), or with the whole list where none is close."""
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"params": {name: {"type": "float", "low": 1e-4, "high": 1e-2}}}))
    with pytest.raises(ValueError) as e:
        hyperparam_tune.load_space(str(path))
    assert str(e.value).startswith(f"{path}: params.{name}: not a TrainConfig key; {hint}")


def test_a_misspelled_key_of_a_param_names_the_keys_it_takes(tmp_path):
    """A param's unknown key (lo for low) is refused with the keys its type takes, so the message
    says what to write."""
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"params": {"lr": {"type": "float", "lo": 1e-4, "high": 1e-2}}}))
    with pytest.raises(ValueError, match=r"params\.lr: .*\['lo'\].*high, log, low, step, type"):
        hyperparam_tune.load_space(str(path))


@pytest.mark.parametrize("flags, message", [
    (["--heartbeat-interval", "10", "--grace-period", "1"],
     "grace_period (1, --grace-period): must be more seconds than heartbeat_interval (10, "
     "--heartbeat-interval)"),
    (["--heartbeat-interval", "10", "--grace-period", "10"],
     "grace_period (10, --grace-period): must be more seconds than heartbeat_interval (10, "
     "--heartbeat-interval)"),
    (["--grace-period", "-1"], "grace_period (-1, --grace-period): must be more seconds than"),
    (["--sampler-seed", "-1"], "sampler_seed (-1, --sampler-seed): must be in [0, 2**32)"),
    (["--sampler-seed", str(2**32)], f"sampler_seed ({2**32}, --sampler-seed): must be in"),
])
def test_heartbeat_and_seed_flags_are_checked(tmp_path, capsys, flags, message):
    """A grace period within one heartbeat interval would let workers fail each other's live
    trials: refused, naming the flag, which Optuna's own errors do not."""
    argv = ["--space", str(tmp_path / "no-space.json"), "--out-dir", str(tmp_path), *flags]
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", "/abs"])
def test_study_name_is_one_directory_under_out_dir(tmp_path, capsys, name):
    """The study's files go to <out_dir>/<study_name>/: "" would spread them over --out-dir
    itself, "../x" outside it."""
    argv = tune_args(tmp_path / "out", "from-scratch", study_name=name, n_trials=1)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: study_name ({name!r}, --study-name)") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, inside --out-dir or beside it
    with pytest.raises(ValueError, match="study_name"):
        tuneconfig.config_from_dict({"study_name": name}, "tune.json")


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    """An unknown key in --config's file exits 2 naming the file and the key, with no traceback."""
    config = tmp_path / "tune.json"
    config.write_text(json.dumps({"n_trials": 3, "workerz": 2}))
    assert hyperparam_tune.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "'workerz'" in err and "Traceback" not in err


@pytest.mark.parametrize("pruner, kind", [("median", optuna.pruners.MedianPruner),
                                          ("hyperband", optuna.pruners.HyperbandPruner),
                                          ("none", optuna.pruners.NopPruner)])
def test_pruner_flag(tmp_path, pruner, kind):
    """--pruner median, hyperband and none open the study with Optuna's pruner of that name."""
    cfg = hyperparam_tune.parse_config(["--pruner", pruner, "--out-dir", str(tmp_path)])
    study = studies.open_study(cfg, studies.open_storage(cfg))
    assert isinstance(study.pruner, kind)


def test_a_printed_budgeted_config_reads_back_to_the_same_settings(tmp_path, capsys):
    """--print-config of a sweep sized by --time-budget-min is a --config file that reads back
    to the same settings (no step count beside the budget); without a budget, 150 steps."""
    argv = ["--time-budget-min", "0.5", "--n-trials", "1", "--out-dir", str(tmp_path)]
    assert hyperparam_tune.main([*argv, "--print-config", "json"]) == 0
    printed = tmp_path / "printed.json"
    printed.write_text(capsys.readouterr().out)
    assert json.loads(printed.read_text())["max_steps"] is None
    assert hyperparam_tune.parse_config(["--config", str(printed)]) == \
        hyperparam_tune.parse_config(argv)
    assert hyperparam_tune.parse_config([]).max_steps == 150


def test_a_trial_length_of_steps_and_of_minutes_together_is_refused(tmp_path):
    """--max-steps and --time-budget-min both given: one line naming both, whichever is set
    where (a --config file's max_steps counts); the budget alone is a trial's length."""
    with pytest.raises(ValueError, match=r"max_steps.*--max-steps.*time_budget_min.*drop one"):
        hyperparam_tune.parse_config(["--time-budget-min", "1", "--max-steps", "30",
                                      "--out-dir", str(tmp_path)])
    config = tmp_path / "tune.json"
    config.write_text(json.dumps({"max_steps": 30}))
    with pytest.raises(ValueError, match=r"max_steps.*tune.json.*time_budget_min"):
        hyperparam_tune.parse_config(["--config", str(config), "--time-budget-min", "1",
                                      "--out-dir", str(tmp_path)])
    cfg = hyperparam_tune.parse_config(["--time-budget-min", "1", "--out-dir", str(tmp_path)])
    assert cfg.time_budget_min == 1.0
    (tmp_path / cfg.study_name).mkdir()
    worker = hyperparam_tune.write_worker_config(cfg)  # what --workers N starts each with
    assert hyperparam_tune.parse_config(["--config", str(worker), "--worker", "1"]) == \
        dataclasses.replace(cfg, worker=1, progress=False)


def test_data_of_the_sweep_replaces_the_space_s_and_a_continued_study_keeps_it(
        tmp_path, corpus, monkeypatch, capsys):
    """--data gives every trial its training data (absolute, over the space's and
    --train-config's); a study continued on other data is refused naming data."""
    import shutil

    trained = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        trained.append(cfg.data)
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", train)
    mine = tmp_path / "mine"
    shutil.copytree(corpus, mine)
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="own", n_trials=2)
    monkeypatch.chdir(tmp_path)
    assert hyperparam_tune.main([*argv, "--data", "mine"]) == 0
    assert trained == [[str(mine)], [str(mine)]]
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    capsys.readouterr()
    assert hyperparam_tune.main([*argv, "--n-trials", "3", "--data", str(other)]) == 2
    assert "data=" in capsys.readouterr().err


def test_hyperband_brackets_span_one_evaluation_to_the_whole_budget(tmp_path):
    """Trials report at every --eval-every steps up to --max-steps: Hyperband's resources are
    those steps, not Optuna's defaults."""
    cfg = hyperparam_tune.parse_config(["--pruner", "hyperband", "--out-dir", str(tmp_path),
                                        "--max-steps", "40", "--eval-every", "5"])
    pruner = studies.open_study(cfg, studies.open_storage(cfg)).pruner
    assert (pruner._min_resource, pruner._max_resource) == (5, 40)


@pytest.mark.parametrize("key, value, least", [
    ("n_trials", 0, 1), ("max_steps", 0, 1), ("eval_every", 0, 1), ("workers", 0, 1),
    ("heartbeat_interval", 0, 1), ("worker", -1, 0), ("max_retry", -1, 0),
    ("prune_startup_trials", -1, 0), ("prune_warmup_steps", -1, 0)])
def test_counts_and_intervals_below_their_least_are_refused(key, value, least):
    """A count or interval below its least (0 trials, a negative worker index) is refused naming
    the key, its value, the file and the least, before a sweep that could not run starts."""
    with pytest.raises(ValueError, match=rf"{key} \({value}, tune.json\): must be at least "
                                         f"{least}$"):
        tuneconfig.config_from_dict({key: value}, "tune.json")


def test_each_trial_draws_its_own_reproducible_stream(tmp_path):
    """--sampler-seed: the sampler is seeded with the seed and the number of the trial it
    samples, so a study samples the same in every sweep (reproducible), and the sweeps of
    neighbouring seeds draw none of each other's trials (repeated sweeps measure variance)."""
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)

    def lrs(name: str, trials: int, seed: int = 7) -> list[float]:
        cfg = tuneconfig.config_from_dict({"out_dir": str(tmp_path), "study_name": name,
                                                "sampler_seed": seed})
        study = studies.open_study(cfg, studies.open_storage(cfg))
        return [study.ask({"lr": lr}).params["lr"] for _ in range(trials)]

    first, again = lrs("a", 3), lrs("b", 3)
    assert first == again and len(set(first)) == 3
    assert not set(lrs("c", 4, seed=8)) & set(lrs("d", 4, seed=9))


def test_machines_asking_at_once_draw_their_own_trials(tmp_path):
    """Two machines on one database share no claim lock: each may create its trial before the
    other samples. Each trial still draws its own number's stream, as it would in a lone
    study of that seed, so the two never run the same parameters."""
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    url = f"sqlite:///{tmp_path / 'study.db'}"

    def study_of(out_dir: str, storage: str | None = url) -> optuna.Study:
        cfg = tuneconfig.config_from_dict({"out_dir": str(tmp_path / out_dir), "sampler_seed": 7,
                                           "storage": storage})
        return studies.open_study(cfg, studies.open_storage(cfg))

    first, second = study_of("machine-a"), study_of("machine-b")
    trials = [first.ask(), second.ask()]  # both created before either samples
    drawn = [trial.suggest_float("lr", 1e-4, 1e-2, log=True) for trial in reversed(trials)]
    lone = study_of("lone", storage=None)
    assert drawn[::-1] == [lone.ask({"lr": lr}).params["lr"] for _ in range(2)]
    assert drawn[0] != drawn[1]


def test_a_live_worker_of_another_user_is_alive(monkeypatch):
    """kill(pid, 0) refused with EPERM means the process lives (another user's): its trial
    must not be failed as orphaned. Gone is dead; another machine's worker is not judged."""
    here = socket.gethostname()

    def owned_by(worker: str):
        return optuna.trial.create_trial(state=TrialState.RUNNING,
                                         user_attrs={studies.ATTR_WORKER: worker})

    def kill(error):
        def refuse(pid, sig):
            raise error
        return refuse

    monkeypatch.setattr(hyperparam_tune.os, "kill", kill(PermissionError()))
    assert studies.local_owner_alive(owned_by(f"{here}:4242")) is True
    monkeypatch.setattr(hyperparam_tune.os, "kill", kill(ProcessLookupError()))
    assert studies.local_owner_alive(owned_by(f"{here}:4242")) is False
    assert studies.local_owner_alive(owned_by(f"{here}-elsewhere:4242")) is None


def test_a_worker_whose_pid_another_process_took_is_dead(monkeypatch):
    """A worker is named by its pid and the pid's start: a restarted container's new entry
    process, pid 1 again, is not the worker that died there; the live worker itself is."""
    me = workers.worker_id()
    host, pid, started, namespace = me.split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid())) and started.isdigit()

    def owned_by(worker: str):
        return optuna.trial.create_trial(state=TrialState.RUNNING,
                                         user_attrs={studies.ATTR_WORKER: worker})

    assert studies.local_owner_alive(owned_by(me)) is True
    reused = f"{host}:{pid}:{int(started) + 1}:{namespace}"
    assert studies.local_owner_alive(owned_by(reused)) is False
    assert studies.local_owner_alive(owned_by(f"{host}:{pid}")) is True  # no start
    # another container of this host name: its pids are not this one's to judge
    elsewhere = f"{host}:{pid}:{int(started) + 1}:{namespace}0"
    assert studies.local_owner_alive(owned_by(elsewhere)) is None
    # /proc mounted with hidepid: another user's start cannot be read, and it may live
    monkeypatch.setattr(workers, "process_start", lambda pid: "")
    assert studies.local_owner_alive(owned_by(reused)) is True


def test_a_database_trial_is_judged_by_its_heartbeat_sent_as_it_is_claimed(tmp_path,
                                                                           monkeypatch):
    """In a database a trial's first heartbeat goes as it is claimed, before its worker is
    named (a trial without a heartbeat is never found stale); a RUNNING trial is judged by its
    heartbeats alone: one that names a dead worker of this machine (a retry just asked on
    another machine still carries its predecessor's) is left running."""
    cfg = hyperparam_tune.TuneConfig(storage=f"sqlite:///{tmp_path / 'study.db'}",
                                     out_dir=str(tmp_path), study_name="beat")
    storage = studies.open_storage(cfg)
    study = optuna.create_study(study_name="beat", storage=storage)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    order = []
    beat = storage.record_heartbeat
    monkeypatch.setattr(storage, "record_heartbeat",
                        lambda trial_id: order.append("heartbeat") or beat(trial_id))
    named = trial.set_user_attr
    monkeypatch.setattr(trial, "set_user_attr",
                        lambda key, value: order.append(key) or named(key, value))
    hyperparam_tune._claim(trial, storage)
    assert order[:2] == ["heartbeat", studies.ATTR_WORKER]
    host, pid, started, namespace = workers.worker_id().split(":")
    named(studies.ATTR_WORKER, f"{host}:{pid}:{int(started) + 1}:{namespace}")
    studies.recover_dead_trials(study, storage, cfg)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING]


def test_a_database_trial_whose_worker_died_before_its_first_heartbeat_is_queued_again(
        tmp_path):
    """In a database a worker killed between asking for its trial and claiming it leaves a
    RUNNING trial with no heartbeat, which Optuna never finds stale: the next recovery sends one
    for it, so that it fails once the grace period passes and is queued again, else the study
    would never finish. A trial's own heartbeat is left as it is (a dead worker's goes stale)."""
    cfg = hyperparam_tune.TuneConfig(storage=f"sqlite:///{tmp_path / 'study.db'}",
                                     out_dir=str(tmp_path), study_name="silent")
    storage = studies.open_storage(cfg)
    study = optuna.create_study(study_name="silent", storage=storage)
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    claimed = study.ask(space)
    hyperparam_tune._claim(claimed, storage)
    silent = study.ask(space)  # its worker killed before _claim
    past = datetime.datetime(2000, 1, 1)

    def age_heartbeats() -> None:
        with storage.engine.begin() as connection:
            connection.execute(sqlalchemy.update(models.TrialHeartbeatModel).values(
                heartbeat=past))

    age_heartbeats()
    studies.recover_dead_trials(study, storage, cfg)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[claimed.number] == TrialState.FAIL
    assert states[silent.number] == TrialState.RUNNING  # its grace period starts now
    age_heartbeats()
    studies.recover_dead_trials(study, storage, cfg)
    trials = study.get_trials()
    assert trials[silent.number].state == TrialState.FAIL
    retried = [t.system_attrs.get("failed_trial") for t in trials if t.state == TrialState.WAITING]
    assert sorted(retried) == [claimed.number, silent.number]
    assert studies.study_progress(study) == studies.StudyProgress(0, 0, 2)


def test_a_workers_mark_beside_the_study_tells_whether_it_lives_in_any_container(tmp_path):
    """A worker holds its mark beside the study locked while it lives: held, its trial's worker
    lives; left unheld (the worker died, in a container since restarted in another PID
    namespace, whose pids say nothing here), it is dead; gone (the worker ended), the pid
    decides."""
    cfg = hyperparam_tune.TuneConfig(out_dir=str(tmp_path), study_name="marks")
    me = workers.worker_id()
    host, pid, started, namespace = me.split(":")

    def owned_by(worker: str):
        return optuna.trial.create_trial(state=TrialState.RUNNING,
                                         user_attrs={studies.ATTR_WORKER: worker})

    with workers.worker_mark(studies.worker_marks(cfg)):
        assert studies.local_owner_alive(owned_by(me), cfg) is True
    assert not workers.mark_path(studies.worker_marks(cfg), me).exists()
    assert studies.local_owner_alive(owned_by(me), cfg) is True  # the pid's answer
    restarted = f"{host}:1:{started}:{namespace}0"  # a container's entry process, now gone
    assert studies.local_owner_alive(owned_by(restarted), cfg) is None
    workers.mark_path(studies.worker_marks(cfg), restarted).write_text("")  # left behind by its death
    assert studies.local_owner_alive(owned_by(restarted), cfg) is False


def test_an_interrupted_trial_already_queued_is_not_queued_twice(tmp_path):
    """The stopping worker queues its trial again only where no sweep has (``retry_history``),
    and a mark gone between two looks is no answer (the pid decides)."""
    cfg = hyperparam_tune.TuneConfig(out_dir=str(tmp_path), study_name="once")
    study = optuna.create_study()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr(studies.ATTR_REASON, studies.INTERRUPTED)
    studies.queue_interrupted(study, trial, cfg)
    studies.queue_interrupted(study, trial, cfg)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]
    assert workers.mark_held(tmp_path / "gone.lock") is None


def test_a_filesystem_without_locks_leaves_the_worker_to_its_pid(tmp_path, monkeypatch):
    """Where the study's directory has no file locks (some NFS), a worker runs without its mark
    and its trials' worker is judged by its pid, as without marks."""
    def no_locks(path, flags, mode=0o644):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(hyperparam_tune.process, "locked_fd", no_locks)
    cfg = hyperparam_tune.TuneConfig(out_dir=str(tmp_path), study_name="nfs")
    me = workers.worker_id()
    trial = optuna.trial.create_trial(state=TrialState.RUNNING,
                                      user_attrs={studies.ATTR_WORKER: me})
    with workers.worker_mark(studies.worker_marks(cfg)):
        workers.mark_path(studies.worker_marks(cfg), me).write_text("")  # as another worker's would be
        assert studies.local_owner_alive(trial, cfg) is True


def test_a_trial_whose_worker_died_does_not_count_whatever_the_storage():
    """A FAIL for a dead worker (the journal's recovery names it WORKER_DIED, a database's
    records no reason) never counts toward n_trials: the study runs another."""
    trial = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
        studies.ATTR_REASON: studies.WORKER_DIED})
    unnamed = optuna.trial.create_trial(state=TrialState.FAIL)
    failed = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
        studies.ATTR_REASON: "RuntimeError: boom"})
    assert [studies.counts(t, set()) for t in (trial, unnamed, failed)] == [
        False, False, True]


def test_a_continued_study_may_change_a_sampled_keys_base_value(tmp_path, corpus):
    """Each trial's sampled value replaces the base's: a continuation's --train-config that sets
    lr (sampled by the space) changes no trial, and is no change of the study's settings."""
    cfg = tuneconfig.config_from_dict({"out_dir": str(tmp_path)})
    space = hyperparam_tune.load_space(tiny_space(tmp_path, corpus))
    study = optuna.create_study()
    hyperparam_tune.check_study_settings(cfg, space, {"lr": 0.1, "weight_decay": 0.05}, study)
    hyperparam_tune.check_study_settings(cfg, space, {"lr": 0.2, "weight_decay": 0.05}, study)
    with pytest.raises(ValueError, match=r"weight_decay=0\.05 \(now 0\.2\)"):
        hyperparam_tune.check_study_settings(cfg, space, {"lr": 0.2, "weight_decay": 0.2}, study)


def test_which_finished_trials_count_toward_n_trials():
    """A FAIL counts only with a reason of its own: not one interrupted, queued again, that
    stopped the sweep, or whose worker died without a word (the study runs another instead)."""
    def trial(state, number=0, **attrs):
        frozen = optuna.trial.create_trial(state=state, user_attrs=attrs)
        frozen.number = number
        return frozen

    reason = studies.ATTR_REASON
    counts = studies.counts
    assert counts(trial(TrialState.FAIL, **{reason: "out of memory: x"}), set())
    assert not counts(trial(TrialState.FAIL, 3, **{reason: "out of memory: x"}), {3})
    assert not counts(trial(TrialState.FAIL, **{reason: studies.INTERRUPTED}), set())
    assert not counts(trial(TrialState.FAIL), set())
    assert not counts(trial(TrialState.FAIL, **{reason: "stopped the sweep: ValueError: x",
                                                studies.ATTR_STOPPED: True}), set())
    assert counts(optuna.trial.create_trial(value=1.0), set())
    assert counts(trial(TrialState.PRUNED), set())
    assert not counts(trial(TrialState.RUNNING), set())


@pytest.mark.slow
def test_builtin_lora_space_sweeps_a_pretrained_model(tmp_path, corpus):
    """The built-in LoRA space end to end on a tiny HF Llama: rank, alpha, dropout and the target
    modules reach the trainer, and the best config is a LoRA config."""
    save_tiny_hf("llama", tmp_path / "base", vocab_size=512)
    texts = [p.read_text("utf-8") for p in sorted(corpus.rglob("*.py"))]
    tok = CodeTokenizer.train(texts, min_freq=2, max_vocab=200)
    assert tok.vocab_size <= 512
    tok.save(tmp_path / "tokenizer.json")
    train_config = tmp_path / "train.json"
    train_config.write_text(json.dumps({
        "init_from": str(tmp_path / "base"), "tokenizer": str(tmp_path / "tokenizer.json"),
        "block_size": 32, "eval_examples": 4, "export": False, "device": "cpu",
        "data": [str(corpus)], "data_options": {"cache_dir": str(tmp_path / "cache"),
                                                "split_by": "file"}}))
    argv = tune_args(tmp_path, "lora", study_name="lora", n_trials=2, max_steps=2,
                     train_config=str(train_config))
    assert hyperparam_tune.main(argv) == 0

    trials = load_study(journal(tmp_path, "lora"), "lora").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    best = json.loads((tmp_path / "runs" / "lora" / "best.json").read_text())
    best_trial = min(trials, key=lambda t: t.value)
    assert best["lora_r"] == best_trial.params["lora_r"] > 0
    assert best["lora_targets"] == json.loads(best_trial.params["lora_targets"])
    assert best["init_from"] == str(tmp_path / "base")
    config = json.loads((tmp_path / "runs" / "lora" / "trials" /
                         f"trial-{best_trial.number:04d}" / "config.json").read_text())
    assert config["lora_targets"] == best["lora_targets"]
    assert config["lora_alpha"] == best["lora_alpha"]


def test_sweep_keys_are_every_key_the_sweep_sets():
    """SWEEP_KEYS holds every key a trial's run sets over its recipe: a space sampling one of them
    is refused by it, else the sampled value would be overwritten unseen."""
    cfg = hyperparam_tune.TuneConfig()
    space = hyperparam_tune.load_space("from-scratch")
    recipe = hyperparam_tune.trial_recipe(cfg, space, {},
                                          optuna.create_study().ask(space.distributions()))
    run = {**recipe, **hyperparam_tune._trial_run(cfg, 0)}
    assert {k for k in run if k not in recipe or run[k] != recipe[k]} <= hyperparam_tune.SWEEP_KEYS
    assert {"max_steps", "epochs", "eval_every"} <= hyperparam_tune.SWEEP_KEYS


def test_sampled_values_win_over_the_train_config_which_is_told(tmp_path, corpus, monkeypatch,
                                                                capsys):
    """A --train-config that sets a swept key (a config.json copied from an earlier run sets
    them all) lies under the sampled values: each trial trains with, and records in its recipe,
    the value Optuna sampled (trial.params), the file's other keys still apply. The other order
    would run every trial at the file's lr."""
    seen = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        seen.append((cfg.lr, cfg.weight_decay))
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0 + cfg.lr,
                                           step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", train)
    train_config = tmp_path / "train.json"
    train_config.write_text(json.dumps({"lr": 0.5, "weight_decay": 0.2}))
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="over", n_trials=2,
                     train_config=str(train_config))
    assert hyperparam_tune.main(argv) == 0
    trials = load_study(journal(tmp_path, "over"), "over").get_trials()
    assert seen == [(t.params["lr"], 0.2) for t in trials]
    assert all(t.user_attrs[hyperparam_tune.ATTR_CONFIG]["lr"] == t.params["lr"] for t in trials)


def test_config_mistake_stops_before_any_trial(tmp_path, corpus, capsys):
    """A missing data source is one error line naming the file, and costs no trial."""
    bad = tmp_path / "tc_bad.json"
    bad.write_text(json.dumps({"data": [str(tmp_path / "nonexistent")]}))
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="bad", n_trials=1)
    assert hyperparam_tune.main([*argv, "--train-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(bad) in err and str(tmp_path / "nonexistent") in err
    assert not (tmp_path / "runs" / "bad" / studies.JOURNAL_FILE).exists()

    assert hyperparam_tune.main(argv) == 0  # the fixed config gets its whole trial count
    assert [t.state for t in load_study(journal(tmp_path, "bad"), "bad").get_trials()] == [
        TrialState.COMPLETE]


@pytest.mark.parametrize("params, fixed, message", [
    ({"n_embd": {"type": "categorical", "choices": [32, 30]}},  # the tiny preset: n_head 4
     {"n_embd": {"type": "categorical", "choices": [32, 64]}},
     ["params.n_embd=30: preset ('tiny', the base of ", "n_embd (30, the range of params.n_embd",
      "): ModelConfig.n_embd=30: not divisible by n_head=4"]),
    ({"label_smoothing": {"type": "float", "low": 0.0, "high": 1.0}},
     {"label_smoothing": {"type": "float", "low": 0.0, "high": 0.5}},
     ["params.label_smoothing=1.0: label_smoothing (1.0, the range of params.label_smoothing "
      "in ", "(now 0.0 to 1.0)): must be in [0, 1)"]),
])
def test_every_choice_and_bound_is_checked_before_any_trial(tmp_path, corpus, capsys, params,
                                                            fixed, message):
    """A bad choice met only by a trial would stop the sweep after the study recorded the
    choices, so that the fixed space would not fit it: each is checked before the first trial."""
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus, params), study_name="ch", n_trials=1)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(m in err for m in message) and "Traceback" not in err
    assert not (tmp_path / "runs" / "ch" / studies.JOURNAL_FILE).exists()

    tiny_space(tmp_path, corpus, fixed)
    assert hyperparam_tune.main(argv) == 0  # the same command, once the space is fixed


def test_data_of_another_language_is_refused_before_the_study(tmp_path, corpus):
    """A --train-config whose data holds only Kotlin files, in a sweep of the default .py
    extensions, is refused by the checks before any trial, with the data's own hint, and
    nothing is written."""
    kotlin = tmp_path / "kotlin"
    kotlin.mkdir()
    (kotlin / "Main.kt").write_text("fun main() {\n    println(1)\n}\n", "utf-8")
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"data": [str(kotlin)]}), "utf-8")
    cfg = tuneconfig.config_from_dict({"space": tiny_space(tmp_path, corpus),
                                            "train_config": str(train),
                                            "out_dir": str(tmp_path / "runs")})
    with pytest.raises(ValueError, match=r"train\.json: sources .* hold no files with "
                                         r"extensions .*\.kt"):
        hyperparam_tune.check_before_trials(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_stepped_bound_is_checked_where_the_step_lets_a_trial_reach(tmp_path, corpus):
    """min_lr_ratio in [0, 1.1] by 0.25 never samples past 1.0 (Optuna lowers high to the last
    step): the space is valid; by 0.25 up to 1.25 it is not, and is refused before any trial."""
    def check(high: float) -> None:
        space = tiny_space(tmp_path, corpus, {"min_lr_ratio": {
            "type": "float", "low": 0.0, "high": high, "step": 0.25}})
        with warnings.catch_warnings():  # Optuna says it lowered high
            warnings.simplefilter("ignore", UserWarning)
            hyperparam_tune.check_before_trials(tuneconfig.config_from_dict(
                {"space": space, "out_dir": str(tmp_path / "runs")}))

    check(1.1)
    with pytest.raises(ValueError, match=r"params\.min_lr_ratio=1\.25: .*must be in \[0, 1\]"):
        check(1.25)


def test_lora_keys_without_lora_r_are_refused_in_the_sweeps_terms(tmp_path, corpus, capsys):
    """The refusal names keys, not the trainer's --lora-r, a flag the sweep does not have."""
    params = {"lora_r": {"type": "categorical", "choices": [0, 4]},
              "lora_alpha": {"type": "categorical", "choices": [8, 16]}}
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus, params), study_name="lo", n_trials=1)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert "lora_alpha (8.0, the range of params.lora_alpha in " in err
    assert "LoRA settings, but lora_r (0, the range of params.lora_r in " in err
    assert "set lora_r > 0, or drop them" in err and "--lora-r" not in err
    assert err.count("\n") == 1


def test_a_swept_lora_value_at_its_default_that_differs_from_the_init_adapter_is_refused(
        tmp_path, corpus):
    """lora_alpha choices [4, 16] with an --init-adapter of alpha 4: the trials of 16 (the
    default) would train with 4 and be recorded as 16; refused before any trial, as
    trainingmanager.py --lora-alpha 16 is. So is a lora_alpha 16 in the space's base or in
    --train-config."""
    from tiny_hf import save_tiny_adapter

    _, adapter = save_tiny_adapter(tmp_path)
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"init_adapter": str(adapter)}), "utf-8")
    fixes = (f"(the adapter's: 4): init_adapter ({str(adapter)!r}, --train-config {train}) fixes "
             "these")

    def check(choices: list, **space_base) -> None:
        space = tiny_space(tmp_path, corpus, {"lora_alpha": {"type": "categorical",
                                                              "choices": choices}} if choices
                           else None)
        values = json.loads(Path(space).read_text("utf-8"))  # the adapter's base: its shape
        values["base"] = {k: v for k, v in values["base"].items() if k not in ("n_embd",
                                                                                "n_layer")}
        values["base"].update(space_base)
        Path(space).write_text(json.dumps(values), "utf-8")
        hyperparam_tune.check_before_trials(tuneconfig.config_from_dict(
            {"space": space, "train_config": str(train), "out_dir": str(tmp_path / "runs")}))

    check([4])
    with pytest.raises(ValueError) as refused:
        check([4, 16])
    message = str(refused.value)
    assert "params.lora_alpha=16: lora_alpha (16.0, " in message and fixes in message
    assert f"{tmp_path / 'space.json'}" in message and "choices [4, 16]" in message, message
    check([], lora_alpha=4)
    with pytest.raises(ValueError) as refused:
        check([], lora_alpha=16)
    assert (f"lora_alpha (16.0, the base of {tmp_path / 'space.json'}) {fixes}"
            in str(refused.value))
    train.write_text(json.dumps({"init_adapter": str(adapter), "lora_alpha": 16}), "utf-8")
    with pytest.raises(ValueError) as refused:  # in --train-config
        check([])
    assert f"lora_alpha (16.0, --train-config {train}) {fixes}" in str(refused.value)
    assert not (tmp_path / "runs").exists()


def test_config_error_in_a_trial_stops_the_sweep_and_is_not_counted(tmp_path, corpus, capsys,
                                                                    monkeypatch):
    """A configuration error in a trial (missing data) stops the sweep in one line, exit 2, as
    every trial would fail alike; the trial is failed, not counted toward n_trials, so the rerun
    runs one."""
    def missing_data(cfg, on_eval=None, resume_hint=None, **_):
        raise DataError("data source not found: /gone")

    monkeypatch.setattr(trainingmanager, "train", missing_data)
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="stop", n_trials=1)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trial 0 ") and "/gone" in err and "not counted" in err
    assert "choices needs another --study-name" in err  # a fixed space may not fit the study
    assert "key of --train-config FILE or of the search space" in err  # not a sweep's flag
    assert err.count("\n") == 1 and "Traceback" not in err

    study = load_study(journal(tmp_path, "stop"), "stop")
    (stopped,) = study.get_trials()
    assert stopped.state == TrialState.FAIL
    assert "/gone" in stopped.user_attrs[studies.ATTR_REASON]
    assert studies.study_progress(study).finished == 0
    failed_without_reason = study.ask()  # a FAIL recorded with no reason
    study.tell(failed_without_reason, state=TrialState.FAIL)
    assert studies.study_progress(study).finished == 0

    def trained(cfg, on_eval=None, resume_hint=None, **_):
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", trained)
    assert hyperparam_tune.main(argv) == 0  # runs the one trial that counts
    states = [t.state for t in load_study(journal(tmp_path, "stop"), "stop").get_trials()]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    rows = (tmp_path / "runs" / "stop" / "trials.csv").read_text().splitlines()
    assert "/gone" in rows[1] and rows[1].endswith("not counted toward n_trials")
    assert rows[2].endswith("no reason recorded; not counted toward n_trials")


def test_sampled_values_refused_together_fail_their_trial_and_the_sweep_goes_on(
        tmp_path, corpus, capsys, monkeypatch):
    """Each choice passes alone (checked before any trial); n_head 3 with n_embd 32 is refused
    together (a width of 32 is not divisible by 3 heads): that trial FAILs naming why, never
    trains, and counts as a trial, as a diverged one does; the other trials run."""
    trained = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        trained.append((cfg.n_head, cfg.n_embd))
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", train)
    space = tiny_space(tmp_path, corpus, {"n_head": {"type": "categorical", "choices": [2, 3]},
                                          "n_embd": {"type": "categorical", "choices": [48, 32]}})
    argv = tune_args(tmp_path, space, study_name="together", n_trials=6, sampler_seed=1)
    assert hyperparam_tune.main(argv) == 0
    trials = load_study(journal(tmp_path, "together"), "together").get_trials()
    refused = [t for t in trials if (t.params["n_head"], t.params["n_embd"]) == (3, 32)]
    assert refused and all(t.state == TrialState.FAIL for t in refused)
    assert "refuses these values together" in refused[0].user_attrs[studies.ATTR_REASON]
    assert "n_embd" in refused[0].user_attrs[studies.ATTR_REASON]
    assert (3, 32) not in trained and len(trained) == 6 - len(refused)
    assert "failed with parameters" in capsys.readouterr().err


def test_a_step_budgets_trials_draw_their_warmup_below_it(tmp_path, corpus, monkeypatch,
                                                          capsys):
    """--max-steps 4 with warmup_steps drawn from 2 or 6: a warmup of 6 would never reach its
    lr (and be ranked all the same), so trials draw 2 alone, said once; an int range keeps the
    values its step reaches below the budget; a range with none there, or a warmup fixed at or
    past it (the space's base, --train-config), is refused; a time budget sizes the warmup."""
    trained = []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        trained.append(cfg.warmup_steps)
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", train)
    space = tiny_space(tmp_path, corpus,
                       {"warmup_steps": {"type": "categorical", "choices": [2, 6]}})
    argv = tune_args(tmp_path, space, study_name="warm", n_trials=3, sampler_seed=1)
    assert hyperparam_tune.main(argv) == 0
    assert trained == [2, 2, 2]
    assert capsys.readouterr().err.count("trials draw it below --max-steps 4") == 1
    ranged = hyperparam_tune.SearchSpace(
        params={"warmup_steps": {"type": "int", "low": 0, "high": 30, "step": 5}}, source="s")
    fitted = hyperparam_tune.trial_space(hyperparam_tune.TuneConfig(max_steps=11), ranged, {})
    assert fitted.params["warmup_steps"] == {"type": "int", "low": 0, "high": 10, "step": 5}
    assert hyperparam_tune.trial_space(hyperparam_tune.TuneConfig(max_steps=40), ranged,
                                       {}) == ranged
    late = hyperparam_tune.SearchSpace(
        params={"warmup_steps": {"type": "int", "low": 20, "high": 30}}, source="s")
    with pytest.raises(ValueError, match=r"draws nothing below 10.*--max-steps 10"):
        hyperparam_tune.trial_space(hyperparam_tune.TuneConfig(max_steps=10), late, {})
    fixed = hyperparam_tune.SearchSpace(params={}, base={"warmup_steps": 30}, source="s")
    with pytest.raises(ValueError, match=r"warmup_steps 30 \(the base of s\) >= --max-steps 10"
                                         r".*raise --max-steps"):
        hyperparam_tune.trial_space(hyperparam_tune.TuneConfig(max_steps=10), fixed, {})
    with pytest.raises(ValueError, match=r"warmup_steps 12 \(mine.json\) >= --max-steps 10"):
        hyperparam_tune.trial_space(
            hyperparam_tune.TuneConfig(max_steps=10, train_config="mine.json"), fixed,
            {"warmup_steps": 12})
    budgeted = hyperparam_tune.TuneConfig(time_budget_min=1)  # the budget sizes the warmup
    assert hyperparam_tune.trial_space(budgeted, fixed, {}) == fixed


def test_a_trial_whose_step_the_machine_refuses_fails_and_the_sweep_goes_on(
        tmp_path, corpus, monkeypatch):
    """A trial's step beyond the machine (its values' model too slow or too large here) fails
    that trial, naming why; the next trials run."""
    checked = []

    def check_step_cost(cfg, *args):
        checked.append(cfg.lr)
        if len(checked) == 1:
            raise budget.StepRefused("block_size 32 x batch_size 2: one step takes about 9 min")
        return None

    monkeypatch.setattr(budget, "check_step_cost", check_step_cost)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="slowstep", n_trials=2,
                     pruner="none")
    assert hyperparam_tune.main(argv) == 0
    trials = load_study(journal(tmp_path, "slowstep"), "slowstep").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # a failure counts
    assert "machine refuses the step" in trials[0].user_attrs[studies.ATTR_REASON]


def test_a_sweep_whose_first_trials_the_machine_all_refuses_stops(tmp_path, corpus, monkeypatch,
                                                                  capsys):
    """Where the machine refuses the step of every trial so far (a time budget or a space beyond
    it), the REFUSED_BEFORE_STOP-th refusal stops the sweep naming what to change, instead of
    failing every trial the study asks for; the stopping trial does not count."""
    def check_step_cost(cfg, *args):
        raise budget.StepRefused("block_size 32 x batch_size 2: one step takes about 9 min")

    monkeypatch.setattr(budget, "check_step_cost", check_step_cost)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="refused", n_trials=6,
                     pruner="none")
    assert hyperparam_tune.main(argv) == 2
    trials = load_study(journal(tmp_path, "refused"), "refused").get_trials()
    assert len(trials) == hyperparam_tune.REFUSED_BEFORE_STOP
    assert all(t.state == TrialState.FAIL for t in trials)
    assert trials[-1].user_attrs[studies.ATTR_STOPPED]
    err = capsys.readouterr().err
    assert "refused by this machine and none trained" in err and "--time-budget-min" in err
    assert "9 min" in err


def test_preset_auto_in_a_sweep_is_refused_naming_why(tmp_path, corpus, capsys):
    """Preset auto would time the machine in each trial, whose models could then differ."""
    space = json.loads(Path(tiny_space(tmp_path, corpus)).read_text())
    del space["base"]["preset"]
    (tmp_path / "auto.json").write_text(json.dumps(space))
    assert hyperparam_tune.main(tune_args(tmp_path, str(tmp_path / "auto.json"))) == 2
    err = capsys.readouterr().err
    assert "preset auto times the machine for each trial" in err and "unknown preset" not in err


def test_a_time_budget_trial_continues_as_its_budget_sized_it(tmp_path, corpus, monkeypatch,
                                                              capsys):
    """An interrupted trial of a --time-budget-min sweep continues its run with the steps its
    budget sized (config.json's), which the trainer takes; a trial its budget ends is ranked
    where it stopped, and said so."""
    real, calls = trainingmanager.train, []

    def train(cfg, on_eval=None, resume_hint=None, **_):
        calls.append(cfg)
        result = real(cfg, on_eval=on_eval, resume_hint=resume_hint)
        if len(calls) == 1:
            result.interrupted = "SIGTERM"
        else:
            result.stopped_by_budget = True
        return result

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="budget", n_trials=1,
                     time_budget_min=0.05, pruner="none")
    assert hyperparam_tune.main(argv) == 143
    sized = json.loads((Path(calls[0].out_dir) / calls[0].name / "config.json").read_text())
    assert sized["time_budget_min"] is None and sized["max_steps"] > 0
    assert hyperparam_tune.main(argv) == 0
    assert calls[1].resume and calls[1].time_budget_min is None
    assert calls[1].max_steps == sized["max_steps"]
    (trial, rerun) = load_study(journal(tmp_path, "budget"), "budget").get_trials()
    assert rerun.state == TrialState.COMPLETE
    assert "where its time budget ended it" in capsys.readouterr().err


def test_space_that_does_not_fit_the_study_is_refused_before_a_trial(tmp_path, corpus, capsys):
    """A space whose param changed kind since the study's trials (float to categorical) is refused
    before a trial, naming the file, the param and the study, which could not mix the two."""
    space = tiny_space(tmp_path, corpus)
    study = optuna.create_study(study_name="kind", storage=journal(tmp_path, "kind"))
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions={"lr": optuna.distributions.FloatDistribution(
            1e-4, 1e-2, log=True)}, value=1.0))
    changed = json.loads(Path(space).read_text())
    changed["params"]["lr"] = {"type": "categorical", "choices": [1e-3, 1e-2]}
    Path(space).write_text(json.dumps(changed))
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="kind", n_trials=2)) == 2
    err = capsys.readouterr().err
    assert f"{space}: params.lr does not fit study 'kind'" in err and "Traceback" not in err
    assert len(load_study(journal(tmp_path, "kind"), "kind").get_trials()) == 1


WEIGHT_DECAY = {"type": "float", "low": 0.0, "high": 0.1}


@pytest.mark.parametrize("params, words", [
    ({"weight_decay": WEIGHT_DECAY}, "params.weight_decay does not fit study 'grown' (trial 0): "
     "its trials were drawn without it: remove it from params"),
    ({"lr": None, "weight_decay": WEIGHT_DECAY}, "params.lr does not fit study 'grown' (trial 0): "
     "its trials sample it: keep it in params"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
     "params.lr does not fit study 'grown' (trial 0): its trials drew it from FloatDistribution("),
], ids=["added", "removed", "range"])
def test_a_continued_study_refuses_a_space_that_samples_other_keys_or_ranges(
        tmp_path, corpus, capsys, monkeypatch, params, words):
    """A continued study ranks its new trials against those it holds, so its space samples the
    same keys from the same distributions: a param added, removed, or given another range (which
    Optuna itself lets a study change) is refused in one line naming the param and another
    --study-name, before a trial runs; the same space continues the study."""
    def trained(cfg, on_eval=None, resume_hint=None, **_):
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", trained)
    space = tiny_space(tmp_path, corpus)
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="grown", n_trials=1)) == 0
    original = Path(space).read_text()
    changed = json.loads(original)
    changed["params"] = {k: v for k, v in {**changed["params"], **params}.items() if v is not None}
    Path(space).write_text(json.dumps(changed))
    capsys.readouterr()
    argv = tune_args(tmp_path, space, study_name="grown", n_trials=2)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "--study-name" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert len(load_study(journal(tmp_path, "grown"), "grown").get_trials()) == 1
    Path(space).write_text(original)
    assert hyperparam_tune.main(argv) == 0
    assert len(load_study(journal(tmp_path, "grown"), "grown").get_trials()) == 2


def test_a_trial_to_run_again_refuses_a_space_without_its_parameters(tmp_path, corpus,
                                                                      capsys):
    """An interrupted trial runs again with the parameters it was drawn with: a space that has
    dropped one (moved to base, say) would train other values than its record says, so the
    continuation is refused, naming the trial, before anything runs."""
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    layers = optuna.distributions.IntDistribution(1, 4)
    study = optuna.create_study(study_name="moved", storage=journal(tmp_path, "moved"))
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.FAIL, params={"lr": 1e-3, "n_layer": 4},
        distributions={"lr": lr, "n_layer": layers},
        user_attrs={studies.ATTR_REASON: studies.INTERRUPTED}))
    space = tiny_space(tmp_path, corpus)  # lr alone: n_layer is the base's now
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="moved", n_trials=2)) == 2
    err = capsys.readouterr().err
    assert "params.n_layer does not fit study 'moved' (trial 0): its trials sample it" in err
    assert len(load_study(journal(tmp_path, "moved"), "moved").get_trials()) == 1
    queued = optuna.create_study(study_name="queued", storage=journal(tmp_path, "queued"))
    queued.add_trial(optuna.trial.create_trial(
        state=TrialState.FAIL, params={"lr": 1e-3, "n_layer": 4},
        distributions={"lr": lr, "n_layer": layers}))  # its worker died: queued again
    studies.QueueAgain(max_retry=None)(queued, queued.get_trials()[0])
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="queued", n_trials=2)) == 2
    assert "params.n_layer does not fit study 'queued'" in capsys.readouterr().err


def test_a_killed_sweeps_running_trial_refuses_a_space_without_its_parameters(
        tmp_path, corpus, capsys, monkeypatch):
    """A sweep killed outright (SIGKILL) leaves its trial RUNNING in the storage; the next sweep
    fails it (its worker is dead) and runs it again with the parameters it was drawn with, so a
    space that has dropped one of them is refused before anything runs, naming the param and
    the trial; with its parameters kept, the study continues and runs the trial again."""
    def trained(cfg, on_eval=None, resume_hint=None, **_):
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=4)

    monkeypatch.setattr(trainingmanager, "train", trained)
    host, pid, started, namespace = workers.worker_id().split(":")
    killed = f"{host}:{pid}:{int(started) + 1}:{namespace}"  # this pid's earlier process
    study = optuna.create_study(study_name="killed", storage=journal(tmp_path, "killed"))
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.RUNNING, params={"lr": 1e-3, "n_layer": 2},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                       "n_layer": optuna.distributions.IntDistribution(1, 4)},
        user_attrs={studies.ATTR_WORKER: killed}))
    space = tiny_space(tmp_path, corpus)  # lr alone: n_layer is the base's now
    argv = tune_args(tmp_path, space, study_name="killed", n_trials=1)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert "params.n_layer does not fit study 'killed' (trial 0): its trials sample it" in err
    assert [t.state for t in load_study(journal(tmp_path, "killed"), "killed").get_trials()] == [
        TrialState.RUNNING]
    kept = tiny_space(tmp_path, corpus, {"n_layer": {"type": "int", "low": 1, "high": 4}})
    assert hyperparam_tune.main(tune_args(tmp_path, kept, study_name="killed", n_trials=1)) == 0
    (dead, rerun) = load_study(journal(tmp_path, "killed"), "killed").get_trials()
    assert dead.state == TrialState.FAIL and rerun.state == TrialState.COMPLETE
    assert rerun.params == dead.params


def test_continuing_with_another_budget_or_base_is_refused(tmp_path, corpus, capsys,
                                                          monkeypatch):
    """Trials of one study are ranked against each other, so a continuation that changes what
    they share (budget, base config) is refused, naming each key; a study of trials added by
    hand records them at its first sweep."""
    def trained(cfg, on_eval=None, resume_hint=None, **_):
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", trained)
    storage = journal(tmp_path, "budget")
    by_hand = optuna.create_study(study_name="budget", storage=storage)  # nothing recorded
    by_hand.add_trial(optuna.trial.create_trial(
        params={"lr": 1e-3}, distributions={"lr": optuna.distributions.FloatDistribution(
            1e-4, 1e-2, log=True)}, value=2.0))
    space = tiny_space(tmp_path, corpus)
    assert hyperparam_tune.main(tune_args(tmp_path, space, study_name="budget", n_trials=2)) == 0
    capsys.readouterr()

    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({"seed": 7, "log_every": 3}))  # log_every changes no result
    argv = tune_args(tmp_path, space, study_name="budget", n_trials=3, max_steps=20)
    assert hyperparam_tune.main([*argv, "--train-config", str(changed)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--study-name" in err
    assert "other settings: seed=1337 (now 7); max_steps=4 (now 20). " in err
    assert len(load_study(storage, "budget").get_trials()) == 2

    changed.write_text(json.dumps({"log_every": 3, "device": "cpu"}))
    argv = tune_args(tmp_path, space, study_name="budget", n_trials=3, pruner="none")
    assert hyperparam_tune.main([*argv, "--train-config", str(changed)]) == 0
    assert len(load_study(storage, "budget").get_trials()) == 3


def test_a_train_configs_model_id_stays_an_id_and_its_paths_turn_absolute(tmp_path,
                                                                         monkeypatch):
    """--train-config's init_from as a Hugging Face id is the model's id (the run fetches its
    snapshot), not a path under the current directory; a local model's path turns absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    values = search_space.absolute_paths({"init_from": "microsoft/phi-1_5"}, "tc.json")
    assert values["init_from"] == "microsoft/phi-1_5"
    values = search_space.absolute_paths({"init_from": "models/mine", "data": ["src"]}, "tc.json")
    assert values["init_from"] == str(tmp_path / "models" / "mine")
    assert values["data"] == [str(tmp_path / "src")]


def test_relative_paths_name_the_files_they_name_from_any_directory(tmp_path, corpus, capsys,
                                                                   monkeypatch):
    """Relative paths of the space's base and of --train-config are recorded absolute: a study
    continued from another directory is refused when they name other files, and best.json
    names the files themselves."""
    def trained(cfg, on_eval=None, resume_hint=None, **_):
        return trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", trained)
    space = json.loads(Path(tiny_space(tmp_path, corpus)).read_text())
    space["base"]["data"] = ["corpus"]
    (tmp_path / "space.json").write_text(json.dumps(space))
    for d in ("a", "b"):
        (tmp_path / d / "corpus").mkdir(parents=True)
        (tmp_path / d / "val").mkdir()
        (tmp_path / d / "corpus" / "one.py").write_text("x = 1\n")
        (tmp_path / d / "val" / "two.py").write_text("y = 2\n")
        (tmp_path / d / "tc.json").write_text(json.dumps({"val_data": ["val"]}))
    argv = [*tune_args(tmp_path, str(tmp_path / "space.json"), study_name="rel",
                       out_dir="../runs"), "--train-config", "tc.json"]
    monkeypatch.chdir(tmp_path / "a")
    assert hyperparam_tune.main([*argv, "--n-trials", "1"]) == 0
    best = json.loads((tmp_path / "runs" / "rel" / "best.json").read_text())
    assert best["data"] == [str(tmp_path / "a" / "corpus")]
    assert best["val_data"] == [str(tmp_path / "a" / "val")]
    assert best["out_dir"] == str(tmp_path / "a" / ".." / "runs")
    # the trial's run, which a continuation from another directory resumes
    [trial] = load_study(journal(tmp_path, "rel"), "rel").get_trials()
    assert Path(trial.user_attrs[hyperparam_tune.ATTR_RUN]).is_absolute()
    capsys.readouterr()

    monkeypatch.chdir(tmp_path / "b")
    assert hyperparam_tune.main([*argv, "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert f"data=['{tmp_path / 'a' / 'corpus'}'] (now ['{tmp_path / 'b' / 'corpus'}'])" in err
    assert "val_data=" in err and err.count("\n") == 1


def _study_settings_of_another_version(tmp_path):
    study = optuna.create_study(study_name="fmt", storage=journal(tmp_path, "fmt"))
    study.set_user_attr(hyperparam_tune.ATTR_SETTINGS, {"seed": 1337})


@pytest.mark.parametrize("write, words", [
    (_study_settings_of_another_version, ("study 'fmt'", "format_version None", "--study-name")),
])
def test_a_study_of_another_format_version_is_refused(tmp_path, corpus, capsys, write, words):
    """A study written under another format version is refused in one line naming the study, its
    version and --study-name, the way to start a new one."""
    write(tmp_path)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="fmt", n_trials=2)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and err.count("\n") == 1, err


def test_study_dir_belongs_to_one_storage(tmp_path, corpus, capsys):
    """A study's run directory belongs to the storage that made it: another storage's trial 0 would
    train into trial-0000, so it is refused saying to move it away, the run left in place."""
    space = tiny_space(tmp_path, corpus)
    argv = tune_args(tmp_path, space, study_name="own", n_trials=1)
    assert hyperparam_tune.main(argv) == 0
    assert (tmp_path / "runs" / "own" / "trials" / "trial-0000" / "config.json").is_file()
    capsys.readouterr()

    url = f"sqlite:///{tmp_path / 'x.db'}"  # another storage's study: its trial 0 is refused
    assert hyperparam_tune.main([*argv, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "trial-0000 holds a trial run this study does not record" in err, err
    assert "move it away" in err, err
    assert "--resume" not in err and "Traceback" not in err
    assert (tmp_path / "runs" / "own" / "trials" / "trial-0000" / "config.json").is_file()


@pytest.mark.parametrize("directions", [["maximize"], ["minimize", "minimize"]])
def test_a_stored_study_of_another_direction_is_refused(tmp_path, corpus, capsys, directions):
    """Optuna loads a stored study with the directions it was created with, whatever
    create_study asks: a sweep ranks validation losses, lowest first, so a study kept to
    maximize (or of several objectives) is refused before a trial runs; Optuna's own record of
    the study names the directions."""
    storage = journal(tmp_path, "other")
    optuna.create_study(study_name="other", storage=storage, directions=directions)
    stored = [d.name.lower() for d in load_study(storage, "other").directions]
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="other", n_trials=1)
    assert hyperparam_tune.main(argv) == 2
    err = capsys.readouterr().err
    assert f"direction(s) {stored}" in err and "minimizes" in err, err
    assert "--study-name" in err and "Traceback" not in err
    assert load_study(storage, "other").get_trials() == []


@pytest.mark.parametrize("flag", ["--out-dir", "--storage"])
def test_unusable_path_is_a_clear_error(tmp_path, corpus, capsys, flag):
    """An --out-dir or --storage below a file exits 2 with one line naming the path, not an
    OSError's traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = str(blocker / ("runs" if flag == "--out-dir" else "journal.log"))
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="path", n_trials=1)
    assert hyperparam_tune.main([*argv, flag, path]) == 2
    err = capsys.readouterr().err
    named = f"error: {blocker}"
    if flag == "--out-dir":
        named = f"error: --out-dir {path}: cannot create"
    assert err.startswith(named) and "Traceback" not in err


# hyperparam_tune's parse_config and storage, without the torch that hyperparam_tune imports
_DIES_HOLDING_THE_JOURNAL_LOCK = """
import os, signal, sys
from codelm import studies
from codelm.tuneconfig import parse_config
cfg = parse_config(sys.argv[1:])
studies.open_storage(cfg)._backend._lock.acquire()  # as mid-write, then SIGKILL/OOM
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_killed_holding_the_journal_lock_does_not_stall_the_next(tmp_path):
    """Optuna's journal lock is a file a killed holder leaves behind, which the next sweep would
    wait out (30 s, four warnings). codelm's is an flock, released by the kernel."""
    argv = ["--out-dir", str(tmp_path / "runs"), "--study-name", "jl"]
    died = subprocess.run([sys.executable, "-c", _DIES_HOLDING_THE_JOURNAL_LOCK, *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr
    cfg = hyperparam_tune.parse_config(argv)
    start = time.monotonic()
    studies.open_study(cfg, studies.open_storage(cfg)).set_user_attr("x", 1)
    assert time.monotonic() - start < 10


def journal_of_one_study(tmp_path: Path) -> tuple[hyperparam_tune.TuneConfig, Path]:
    """A real journal file of study "jt" with a study attribute: two records."""
    cfg = hyperparam_tune.parse_config(["--out-dir", str(tmp_path / "runs"), "--study-name", "jt"])
    studies.open_study(cfg, studies.open_storage(cfg)).set_user_attr("x", 1)
    path = studies.study_dir(cfg) / studies.JOURNAL_FILE
    assert path.read_bytes().count(b"\n") == 2
    return cfg, path


@pytest.mark.parametrize("damage, told", [
    (lambda b: b + b"garbage\n", ":3: not an Optuna journal line"),
    (lambda b: b + b"\xfb\n", ":3: not an Optuna journal line"),
    (lambda b: b + b"[1]\n", ":3: not an Optuna journal line"),
    (lambda b: b + b'{"op_code": "x", "worker_id": "w"}\n', ":3: not an Optuna journal line"),
    # JSON's true is a Python int: Optuna would replay it as operation 1
    (lambda b: b + b'{"op_code": true, "worker_id": "w"}\n', ":3: not an Optuna journal line"),
    (lambda b: b"\n" + b, ":1: not an Optuna journal line"),
    (lambda b: b + b"notes", ":3: not an Optuna journal line"),
    (lambda b: b[:-1], ":2: the last line has no newline at its end: add it if the record is "
     "whole"),
])
def test_damaged_journal_is_refused_untouched(tmp_path, damage, told):
    """Optuna skips a bad last line and appends after it (a later read fails on the merged
    line), or fails obscurely: the file is refused by line, before anything is written."""
    cfg, path = journal_of_one_study(tmp_path)
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    before = sorted(os.listdir(path.parent))
    with pytest.raises(ValueError) as e:
        studies.open_storage(cfg)
    assert str(e.value).startswith(f"{path}{told}")
    assert path.read_bytes() == damaged
    assert sorted(os.listdir(path.parent)) == before  # nothing written, no lock taken


def test_journal_with_a_torn_last_record_is_refused_with_its_fix(tmp_path):
    """A write cut off by a kill or a full disk: the error names the line and a command that
    removes it; after that the study continues with its other records."""
    cfg, path = journal_of_one_study(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])
    with pytest.raises(ValueError) as e:
        studies.open_storage(cfg)
    offset = whole.rindex(b"\n", 0, len(whole) - 1) + 1
    said = str(e.value)
    assert all(w in said for w in (f"{path}:2", "no newline", "add it",
                                   f"truncate -s {offset} {path}")), said
    assert path.read_bytes() == whole[:-20]
    os.truncate(path, offset)  # the fix it names
    study = studies.open_study(cfg, studies.open_storage(cfg))
    assert study.study_name == "jt" and study.user_attrs == {}


def test_last_line_a_worker_is_appending_is_waited_for(tmp_path):
    """Another worker's append in progress is not a torn record: the check reads the journal
    under its lock, which that worker holds while it appends."""
    cfg, path = journal_of_one_study(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])
    held = os.open(f"{path}.flock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # the other worker, mid-append
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        opening = pool.submit(studies.open_storage, cfg)
        time.sleep(0.5)
        assert not opening.done()
        path.write_bytes(whole)
        os.close(held)
        storage = opening.result(timeout=60)
    assert storage.get_study_user_attrs(storage.get_study_id_from_name("jt")) == {"x": 1}


@pytest.mark.parametrize("content, told", [
    (b"SQLite format 3\0" + bytes(100), "an SQLite database, not an Optuna journal file: use "
     "--storage sqlite:///"),
    (b"my notes\n", ":1: not an Optuna journal line"),
])
def test_storage_that_is_another_file_is_refused_untouched(tmp_path, corpus, capsys, content,
                                                           told):
    """A --storage file that is no Optuna journal (an SQLite database, notes) is refused and left
    as it was, as journal lines appended would spoil it; the database is told its sqlite:///
    URL."""
    path = tmp_path / "mine.db"
    path.write_bytes(content)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="other", n_trials=1)
    assert hyperparam_tune.main([*argv, "--storage", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and told in err and "Traceback" not in err
    assert path.read_bytes() == content
    assert not (tmp_path / "runs" / "other" / "trials").exists()


FAKE_TRAIN = """
import sys
import hyperparam_tune, trainingmanager
from codelm.training import record
def train(cfg, on_eval=None, resume_hint=None, **_):
    raise {error}
trainingmanager.train = train
sys.exit(hyperparam_tune.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("error, code, line", [
    ("record.NonFiniteLossError('non-finite gradient at step 2')", 1,
     "trial 0 failed with parameters"),  # exit 1: the sweep's only trial failed, no best.json
    ("KeyboardInterrupt()", 130, "interrupted: run the same command again"),
    pytest.param("KeyboardInterrupt('SIGTERM')", 143, "interrupted: run the same command again",
                 marks=pytest.mark.slow),
])
def test_failed_or_interrupted_trial_prints_one_line(tmp_path, corpus, error, code, line):
    """What the command prints (Optuna logs failures with their traceback by default)."""
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="one", n_trials=1)
    done = subprocess.run([sys.executable, "-c", FAKE_TRAIN.format(error=error), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == code, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and line in lines[0], done.stderr[-3000:]


FAKE_WORKER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
if sys.argv[-1] == "2" and {fault!r} == "error":  # before the imports, which load torch
    print("error: worker 2 cannot run", file=sys.stderr)
    sys.exit(2)
if sys.argv[-1] == "2" and {fault!r} == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
import hyperparam_tune, trainingmanager
def train(cfg, on_eval=None, resume_hint=None, **_):
    run_dir = Path(cfg.out_dir) / cfg.name
    return trainingmanager.TrainResult(run_dir=run_dir, best_val_loss=cfg.lr, step=cfg.max_steps)
trainingmanager.train = train
sys.exit(hyperparam_tune.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fault, code, told", [
    pytest.param(None, 0, None, marks=pytest.mark.slow),  # every worker ran its trials:
    #   nothing to tell, exit 0 (the other sweep tests pass through it too)
    ("error", 2, r"worker 2 \(pid \d+\) failed: exit status 2"),
    # as a dead worker elsewhere: told, its trials run by the others, the trial count decides
    ("kill", 0, r"worker 2 \(pid \d+\) was killed by SIGKILL"),
])
def test_parent_tells_and_returns_only_worker_failures(tmp_path, corpus, capfd, monkeypatch,
                                                       fault, code, told):
    """A worker's own run has no best config to judge: it exits 0 once it ran its trials. The
    parent tells each worker that ended otherwise, and a failed worker's status is its own."""
    script = FAKE_WORKER.format(root=str(ROOT), fault=fault)
    monkeypatch.setattr(hyperparam_tune, "WORKER_COMMAND", (sys.executable, "-c", script))
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="w", n_trials=3,
                     workers=2)
    assert hyperparam_tune.main(argv) == code
    err = capfd.readouterr().err
    told_lines = [line for line in err.splitlines() if line.startswith("worker ")]
    if told is None:
        assert told_lines == [], err
    else:
        assert len(told_lines) == 1 and re.fullmatch(told, told_lines[0]), err
    if fault != "error":  # an error stops worker 1 too (see the test below)
        assert (tmp_path / "runs" / "w" / "best.json").is_file()  # worker 1 ran every trial


def test_the_first_failed_workers_status_is_the_commands(tmp_path, corpus, capfd, monkeypatch):
    """Workers 1 and 2 both fail (exit 3 and 4, no configuration error): each is told, and the
    command exits with worker 1's status, whatever order they ended in."""
    monkeypatch.setattr(hyperparam_tune, "WORKER_COMMAND",
                        (sys.executable, "-c", "import sys\nsys.exit(2 + int(sys.argv[-1]))"))
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="ff", n_trials=2,
                     workers=2)
    assert hyperparam_tune.main(argv) == 3
    err = capfd.readouterr().err
    assert re.search(r"^worker 1 \(pid \d+\) failed: exit status 3$", err, re.M), err
    assert re.search(r"^worker 2 \(pid \d+\) failed: exit status 4$", err, re.M), err


FAKE_STOPPED_WORKER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
started = Path({started!r})
if sys.argv[-1] == "2":  # a configuration error, met while worker 1 trains (no torch loaded)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("error: worker 2 cannot run", file=sys.stderr)
    sys.exit(2)
import hyperparam_tune, trainingmanager
def train(cfg, on_eval=None, resume_hint=None, **_):
    started.touch()
    time.sleep(20)
    return trainingmanager.TrainResult(run_dir=Path(cfg.out_dir) / cfg.name, best_val_loss=1.0,
                                       step=cfg.max_steps)
trainingmanager.train = train
sys.exit(hyperparam_tune.main(sys.argv[1:]))
"""


def test_a_workers_config_error_stops_the_other_workers(tmp_path, corpus, capfd, monkeypatch):
    """As with one worker, a configuration error stops the sweep: the parent stops the other
    workers as at a Ctrl-C (their trials end interrupted, and run again with the fixed
    command), so that "fix this and run the same command again" holds for --workers N."""
    script = FAKE_STOPPED_WORKER.format(root=str(ROOT), started=str(tmp_path / "started"))
    monkeypatch.setattr(hyperparam_tune, "WORKER_COMMAND", (sys.executable, "-c", script))
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="ws", n_trials=1,
                     workers=2)
    assert hyperparam_tune.main(argv) == 2
    err = capfd.readouterr().err
    assert not re.search(r"^worker 1 ", err, re.M), err  # stopped: its trial runs again
    assert re.search(r"^worker 2 \(pid \d+\) failed: exit status 2$", err, re.M), err
    trial, queued = load_study(journal(tmp_path, "ws"), "ws").get_trials()
    assert trial.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert trial.user_attrs[studies.ATTR_REASON] == studies.INTERRUPTED


def test_a_trials_settings_are_named_where_the_sweeps_user_sets_them(tmp_path, corpus,
                                                                       monkeypatch):
    """A trial's settings are checked, and its run's warnings given, naming no trainer flag a
    sweep user cannot pass: the search space's range of a sampled key, the sweep's own flag,
    the --train-config file or the space's base that sets a key, else a --train-config file."""
    told, validate = [], plan.validate_config
    monkeypatch.setattr(plan, "validate_config",
                        lambda cfg, where_set: told.append(where_set) or validate(cfg, where_set))
    monkeypatch.setattr(trainingmanager, "train", lambda cfg, on_eval=None, resume_hint=None,
                        where_set=None, checked=False: told.append(where_set) or
                        trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=cfg.lr,
                                                    step=cfg.max_steps))
    space_file = tiny_space(tmp_path, corpus, {
        "warmup_steps": {"type": "int", "low": 2, "high": 3},
        "dropout": {"type": "categorical", "choices": [0.0, 0.1]}})
    train_config = tmp_path / "mine.json"
    train_config.write_text(json.dumps({"grad_clip": 0.5, "block_size": 32}))  # the file's
    #   block_size overrides the space's base: the file is where the user set it
    argv = tune_args(tmp_path, space_file, study_name="wt", n_trials=1,
                     train_config=train_config)
    assert hyperparam_tune.main(argv) == 0
    where = told[0]
    keys = ("warmup_steps", "max_steps", "grad_clip", "batch_size", "weight_decay")
    assert len(told) > 1 and all([w(k) for k in keys] == [where(k) for k in keys] for w in told)
    space = hyperparam_tune.load_space(space_file)
    assert where("warmup_steps") == (f"the range of params.warmup_steps in {space.source} "
                                     "(now 2 to 3)")
    assert where("dropout") == (f"the range of params.dropout in {space.source} "
                                "(now choices [0.0, 0.1])")
    assert (where("max_steps"), where("eval_every")) == ("--max-steps", "--eval-every")
    assert where("grad_clip") == where("block_size") == f"--train-config {train_config}"
    assert where("batch_size") == f"the base of {space.source}"
    assert where("weight_decay") == "TrainConfig's default; a --train-config file sets it"


def test_a_relative_sqlite_url_is_recorded_absolute(tmp_path, corpus, monkeypatch, capsys):
    """sqlite:///sq.db is relative to the directory the sweep ran in: recorded as typed, the
    study could not be continued from elsewhere, and the advice to pass the recorded URL would
    create an empty database there. So it is recorded absolute."""
    monkeypatch.setattr(trainingmanager, "train", lambda cfg, on_eval=None, resume_hint=None, **_:
                        trainingmanager.TrainResult(run_dir=tmp_path, best_val_loss=cfg.lr,
                                                    step=cfg.max_steps))
    space = tiny_space(tmp_path, corpus)
    monkeypatch.chdir(tmp_path)
    argv = tune_args(tmp_path, space, study_name="sq", n_trials=1, storage="sqlite:///sq.db")
    assert hyperparam_tune.main(argv) == 0
    recorded = hyperparam_tune.parse_config(argv).storage
    assert recorded == f"sqlite:///{tmp_path / 'sq.db'}"
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    argv = tune_args(tmp_path, space, study_name="sq", n_trials=2, storage=recorded)
    assert hyperparam_tune.main(argv) == 0, capsys.readouterr().err
    assert len(load_study(recorded, "sq").get_trials()) == 2
    assert list((tmp_path / "other").iterdir()) == []


def test_a_trials_lines_carry_its_number_and_the_table_names_its_objective(tmp_path, corpus,
                                                                          monkeypatch, capsys):
    """Workers' trials print at once: each line a trial's training prints, on stdout or stderr,
    starts with "trial N: ". The table's heading says its value column is the validation bits
    per byte."""
    def train(cfg, on_eval=None, resume_hint=None, **_):
        print(f"eval step {cfg.max_steps}/{cfg.max_steps} | val loss 1.0")
        print("note: a data note", file=sys.stderr)
        return trainingmanager.TrainResult(run_dir=Path(cfg.out_dir) / cfg.name,
                                           best_val_loss=1.0 + cfg.lr, step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="lab", n_trials=2,
                     pruner="none")
    assert hyperparam_tune.main(argv) == 0
    out, err = capsys.readouterr()
    for n in (0, 1):
        assert f"trial {n}: eval step 4/4 | val loss 1.0" in out.splitlines(), out
        assert f"trial {n}: note: a data note" in err.splitlines(), err
    lines = out.splitlines()
    heading = lines[next(i for i, line in enumerate(lines) if line.startswith("number")) - 1]
    assert "value" in heading and "bits per byte" in heading, heading


@pytest.mark.parametrize("metrics", [{"val_loss": 2.0, "val_bpb": 0.25}, {"val_loss": 0.25}])
def test_a_trials_value_is_its_bits_per_byte_or_its_tasks_loss_named_as_it_is(
        tmp_path, corpus, monkeypatch, capsys, metrics):
    """A trial's value is its best validation bits per byte; where its task's evaluation gives
    none (preference tuning, GRPO), its validation loss, which the table and the best trial's
    line then name, the line with the values sampled for that trial."""
    def train(cfg, on_eval=None, resume_hint=None, **_):
        on_eval(cfg.max_steps, metrics)
        return trainingmanager.TrainResult(run_dir=Path(cfg.out_dir) / cfg.name,
                                           best_val_loss=metrics["val_loss"], step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", train)
    argv = tune_args(tmp_path, tiny_space(tmp_path, corpus), study_name="metric", n_trials=1,
                     pruner="none")
    assert hyperparam_tune.main(argv) == 0
    out = capsys.readouterr().out
    name = "validation bits per byte" if "val_bpb" in metrics else "validation loss"
    metric = "val_bpb" if "val_bpb" in metrics else "val_loss"
    assert f"value is a trial's best {name} ({metric};" in out
    assert f"best trial 0: {name} 0.2500 (lr " in out  # with the values sampled for it
    assert '"lr":' not in out  # best.json's path, not its whole config


def test_reports_hold_each_trials_values_and_best_json_is_the_best_recipe(tmp_path, corpus,
                                                                        monkeypatch):
    """Two parameters (one would leave trials.csv's column order untested) and a space that leaves
    export to the default: trials.csv holds each trial's own values under its column names,
    best.json is the best recipe as a user runs it (not the trial's run settings: no export,
    save_every = budget, keep_last 1), and importances.json names both parameters."""
    def train(cfg, on_eval=None, resume_hint=None, **_):  # the loss depends on lr only
        return trainingmanager.TrainResult(run_dir=Path(cfg.out_dir) / cfg.name,
                                           best_val_loss=1.0 + 100 * cfg.lr, step=cfg.max_steps)

    monkeypatch.setattr(trainingmanager, "train", train)
    space_file = Path(tiny_space(tmp_path, corpus, {
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.3}}))
    space = json.loads(space_file.read_text())
    del space["base"]["export"]
    space_file.write_text(json.dumps(space))
    argv = tune_args(tmp_path, str(space_file), study_name="rep", n_trials=6, pruner="none")
    assert hyperparam_tune.main(argv) == 0
    out = tmp_path / "runs" / "rep"
    trials = {t.number: t for t in load_study(journal(tmp_path, "rep"), "rep").get_trials()}

    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        t = trials[int(row["number"])]
        assert row["state"] == "COMPLETE" and float(row["value"]) == pytest.approx(t.value)
        assert float(row["lr"]) == pytest.approx(t.params["lr"])
        assert float(row["weight_decay"]) == pytest.approx(t.params["weight_decay"])
        assert int(row["steps"]) == 4
        assert row["run_dir"] == str(out / "trials" / f"trial-{t.number:04d}")

    best_trial = min(trials.values(), key=lambda t: t.value)
    cfg = plan.parse_config(["--config", str(out / "best.json")])
    assert (cfg.lr, cfg.weight_decay) == (best_trial.params["lr"],
                                          best_trial.params["weight_decay"])
    assert (cfg.max_steps, cfg.eval_every, cfg.epochs) == (4, 2, None)
    defaults = trainconfig.TrainConfig()
    assert (cfg.export, cfg.progress, cfg.keep_last, cfg.save_every, cfg.resume) == (
        defaults.export, defaults.progress, defaults.keep_last, defaults.save_every, None)
    assert cfg.name == "rep-best" and cfg.out_dir == str((tmp_path / "runs").absolute())

    importances = json.loads((out / "importances.json").read_text())  # too few trials to rank
    assert set(importances) == {"lr", "weight_decay"}
    assert sum(importances.values()) == pytest.approx(1.0)


def test_the_reports_rows_and_importances_are_optunas_own_of_the_study(tmp_path):
    """On a study whose value depends on lr alone, trials.csv's rows hold what Optuna's
    trials_dataframe holds (number, state, value, duration in seconds, each parameter under its
    name) and importances.json is optuna.importance.get_param_importances of the same study:
    the same order, lr first, and the same shares."""
    study = optuna.create_study(study_name="imp")
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "warmup_steps": optuna.distributions.IntDistribution(0, 10)}
    start = datetime.datetime(2026, 1, 1)
    for i in range(12):
        params = {"lr": 1e-4 * 100 ** (i / 11), "warmup_steps": (i * 7) % 11}
        trial = optuna.trial.create_trial(
            params=params, distributions=space, value=1.0 + 100 * params["lr"],
            user_attrs={hyperparam_tune.ATTR_CONFIG: {"lr": params["lr"]}})
        trial.datetime_start = start
        trial.datetime_complete = start + datetime.timedelta(seconds=30 + 7 * i)
        study.add_trial(trial)
    cfg = hyperparam_tune.TuneConfig(out_dir=str(tmp_path / "runs"), study_name="imp")
    out = tmp_path / "runs" / "imp"
    out.mkdir(parents=True)
    hyperparam_tune.write_reports(study, cfg)

    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    frame = study.trials_dataframe()
    assert len(rows) == len(frame)
    for row, (_, expected) in zip(rows, frame.iterrows()):
        assert int(row["number"]) == expected["number"]
        assert row["state"] == expected["state"]
        assert float(row["value"]) == pytest.approx(expected["value"])
        assert float(row["duration_s"]) == pytest.approx(expected["duration"].total_seconds())
        assert float(row["lr"]) == pytest.approx(expected["params_lr"])
        assert int(row["warmup_steps"]) == expected["params_warmup_steps"]

    ours = json.loads((out / "importances.json").read_text())
    reference = optuna.importance.get_param_importances(study)
    assert list(ours) == list(reference) == ["lr", "warmup_steps"]
    for name, share in reference.items():
        assert ours[name] == pytest.approx(share, abs=0.02)


def test_a_sweep_setting_is_named_where_it_was_set(tmp_path, capsys):
    """With --config, each key in an error names its own source: a flag typed beside the file
    is named, not the file; the grace period's error names the flag and the file's
    heartbeat_interval, each where it was set."""
    config = tmp_path / "tune.json"
    config.write_text(json.dumps({"heartbeat_interval": 10}))
    argv = ["--config", str(config), "--out-dir", str(tmp_path / "runs")]
    assert hyperparam_tune.main([*argv, "--grace-period", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in ("grace_period (8, --grace-period)", "more seconds",
                                  f"heartbeat_interval (10, --config {config})")), err
    assert hyperparam_tune.main([*argv, "--eval-every", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(config) not in err, err  # the flag, not the file
    assert all(w in err for w in ("eval_every (0, --eval-every)", "at least 1")), err
    assert not (tmp_path / "runs").exists()


def test_an_interrupted_trial_is_always_queued_again_and_a_dead_one_max_retry_times():
    """max_retry bounds the times a trial's worker dies; interrupting the same trial (a user's
    stop, a preemption) any number of times continues it each time (Optuna's own callback
    counts both, and would drop it at the third stop)."""
    def attempts(reason: str, times: int) -> int:
        study = optuna.create_study()
        queue = studies.QueueAgain(max_retry=2)
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        for _ in range(times):
            trial.set_user_attr(studies.ATTR_REASON, reason)
            study.tell(trial, state=TrialState.FAIL)
            queue(study, study.trials[trial.number])
            if not [t for t in study.trials if t.state == TrialState.WAITING]:
                return trial.number + 1
            trial = study.ask()
        return len(study.trials)

    assert attempts(studies.INTERRUPTED, 5) == 6  # five stops, a sixth attempt
    assert attempts(studies.WORKER_DIED, 5) == 3  # the first, then 2 retries


@pytest.mark.parametrize("url, words", [("sqlite://", "an in-memory database"),
                                        ("sqlite:///:memory:", "an in-memory database"),
                                        ("sqlite:/rel.db", "not a database URL")])
def test_a_storage_url_that_keeps_no_study_is_one_line(url, words):
    """An in-memory SQLite URL keeps no study past its worker, and sqlite:/rel.db is no database
    URL: each is refused in one line naming --storage."""
    with pytest.raises(ValueError, match=f"--storage {re.escape(url)}: {words}"):
        hyperparam_tune.parse_config(["--storage", url])


def test_a_space_sampling_the_batch_or_the_validation_text_is_warned_of(tmp_path):
    """Trials of another batch see more data a step; trials of another block size or
    vocabulary, validated on a number of windows, are ranked on other text."""
    space = hyperparam_tune.SearchSpace(
        params={"batch_size": {"type": "categorical", "choices": [4, 8]},
                "block_size": {"type": "categorical", "choices": [64, 128]}},
        base={"eval_examples": 16}, source="s.json")
    said = hyperparam_tune.space_warnings(hyperparam_tune.TuneConfig(), space, {})
    assert len(said) == 2 and "batch_size" in said[0] and "eval_examples 16" in said[1]
    whole = hyperparam_tune.space_warnings(
        hyperparam_tune.TuneConfig(time_budget_min=5), space, {"eval_examples": None})
    assert whole == []


def test_the_workers_own_flag_is_read_but_not_in_help(capsys):
    """--worker is what the sweep passes its worker processes: parsed, not offered in --help."""
    assert hyperparam_tune.parse_config(["--worker", "2"]).worker == 2
    with pytest.raises(SystemExit):
        hyperparam_tune.parse_config(["--help"])
    helped = capsys.readouterr().out
    assert "--workers" in helped and "--worker " not in helped and "--worker\n" not in helped


def test_a_warmup_range_reaching_the_step_budget_is_warned_of_once():
    """A sampled warmup_steps whose range reaches --max-steps would draw trials that never
    reach their lr (trials draw it below the budget): the sweep says so once, naming the
    space's range and its own flag; under a time budget or a range below it, nothing."""
    space = hyperparam_tune.SearchSpace(
        params={"warmup_steps": {"type": "int", "low": 0, "high": 30, "step": 5}}, base={},
        source="s.json")
    said = hyperparam_tune.space_warnings(hyperparam_tune.TuneConfig(max_steps=20), space, {})
    assert len(said) == 1 and all(w in said[0] for w in ("params.warmup_steps reaches 30",
                                                         "--max-steps 20"))
    assert hyperparam_tune.space_warnings(hyperparam_tune.TuneConfig(max_steps=150), space,
                                          {}) == []
    assert hyperparam_tune.space_warnings(hyperparam_tune.TuneConfig(time_budget_min=5), space,
                                          {}) == []
    # what a trial can draw: a step short of the range's end, a categorical's largest choice
    stepped = hyperparam_tune.SearchSpace(
        params={"warmup_steps": {"type": "int", "low": 0, "high": 150, "step": 20}}, base={},
        source="s.json")
    assert hyperparam_tune.space_warnings(hyperparam_tune.TuneConfig(max_steps=150), stepped,
                                          {}) == []
    chosen = hyperparam_tune.SearchSpace(
        params={"warmup_steps": {"type": "categorical", "choices": [0, 200]}}, base={},
        source="s.json")
    said = hyperparam_tune.space_warnings(hyperparam_tune.TuneConfig(max_steps=150), chosen, {})
    assert len(said) == 1 and "reaches 200" in said[0]


def test_a_train_config_setting_what_the_sweep_sets_is_warned_of(tmp_path):
    """A --train-config (a run's config.json sets every key) whose step budget, checkpoints
    or export differ from a trial's is told which of its values the sweep replaces; its name
    and out_dir, always a trial's own, and values equal to the sweep's are not listed."""
    space = hyperparam_tune.SearchSpace(params={"lr": {"type": "float", "low": 1e-4,
                                                       "high": 1e-2}}, base={}, source="s.json")
    train = {"max_steps": 1000, "eval_every": 50, "export": True, "name": "mine",
             "out_dir": "runs", "keep_last": 1}
    said = hyperparam_tune.space_warnings(hyperparam_tune.TuneConfig(max_steps=150), space,
                                          train)
    assert len(said) == 1
    assert all(w in said[0] for w in ("max_steps 1000 (a trial's: 150)", "export True",
                                      "eval_every 50", "--max-steps"))
    assert not any(w in said[0] for w in ("keep_last", "name", "out_dir"))


@pytest.mark.parametrize("ran, kept", [
    (dict(max_steps=40, warmup_steps=4), {}),  # plan.warmup_for(40): the run sized it
    (dict(max_steps=40, warmup_steps=7), {"warmup_steps": 7}),  # set for the run: kept
    (dict(time_budget_min=None, max_steps=900, warmup_steps=18), {}),  # a budget's 2%
])
def test_a_runs_directory_gives_no_setting_the_run_sized_for_its_own_length(ran, kept,
                                                                            tmp_path):
    """A run's config.json records the warmup it sized for its own steps (a fixed run's or a
    time budget's): as a --train-config it is left to each trial, which sizes its own for its
    length; a warmup the run was given is kept."""
    from codelm import trainconfig

    run = tmp_path / "runs" / "base-run"
    run.mkdir(parents=True)
    config = trainconfig.TrainConfig(preset="tiny", resume=str(run), name="base-run",
                                     out_dir=str(tmp_path / "runs"), **ran)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config)), "utf-8")
    assert hyperparam_tune.train_config_values(str(run)) == {"preset": "tiny", **kept}


def test_a_recipe_s_tune_section_is_read_beside_its_train_section(tmp_path):
    """A recipe holds one section per script: hyperparam_tune.py reads its "tune" one (the
    training settings beside it are trainingmanager.py's)."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"tune": {"n_trials": 3, "study_name": "from-recipe"},
                                  "train": {"max_steps": 5}, "_note": "both"}))
    cfg = hyperparam_tune.parse_config(["--config", str(recipe)])
    assert (cfg.n_trials, cfg.study_name) == (3, "from-recipe")


def test_a_runs_directory_is_a_train_config_and_training_flags_point_there(tmp_path, capsys):
    """--train-config takes a run's directory (the settings its config.json sets, less the
    run's own name, place and length), the space's base values it replaces named; a
    trainingmanager flag typed on the sweep's command line is named as a training setting
    that goes there; a directory holding no config.json is refused."""
    from codelm import trainconfig

    run = tmp_path / "runs" / "base-run"
    run.mkdir(parents=True)
    ran = trainconfig.TrainConfig(preset="tiny", tokenizer_kind="bpe", tokenizer_max_vocab=300,
                                  block_size=64, resume=str(run), name="base-run",
                                  out_dir=str(tmp_path / "runs"), max_steps=40, decay_steps=8)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(ran)), "utf-8")
    # what the run set, not its defaults, nor its own name, place and length
    assert hyperparam_tune.train_config_values(str(run)) == {
        "preset": "tiny", "tokenizer_kind": "bpe", "tokenizer_max_vocab": 300, "block_size": 64}
    cfg = hyperparam_tune.TuneConfig(train_config=str(run), out_dir=str(tmp_path / "out"))
    space, base = hyperparam_tune.check_before_trials(cfg)
    assert base["tokenizer_kind"] == "bpe" and "resume" not in base
    # what the sweep says it replaces of its space's base
    assert hyperparam_tune.base_overridden(space, base) == (
        "block_size (128 -> 64), preset ('llama-14m' -> 'tiny')")
    with pytest.raises(ValueError, match=r"a directory without config.json: name a config"):
        hyperparam_tune.train_config_values(str(tmp_path))
    with pytest.raises(SystemExit):
        hyperparam_tune.main(["--tokenizer-kind", "bpe"])
    assert ("unknown flag --tokenizer-kind: a training setting: give it in --train-config"
            in capsys.readouterr().err)
