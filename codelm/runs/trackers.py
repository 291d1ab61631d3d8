"""metrics.jsonl and the trackers a run reports to (TensorBoard, W&B, MLflow): ``RunLog`` writes
both; W&B's and MLflow's run ids are kept in the run directory, so that a resume continues them."""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from codelm.runs.rundir import METRICS_FILE, TB_DIR
from codelm.runtime import process


class _TensorBoard:
    """TensorBoard's event files in the run directory; a resume purges the events from its
    step on and writes again the points metrics.jsonl (trimmed to the checkpoint) holds at that
    step, so that an evaluation at the resumed step, run again, is there once."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        if resume_step is None:  # a new run: nothing of an attempt it replaces (rundir._lock_dir)
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
        self.path = run_dir / TB_DIR
        if resume_step is not None:
            _after_the_newest_event_file(self.path)
        self.writer = SummaryWriter(str(self.path), purge_step=resume_step)
        if resume_step is None:  # the config in the hparams plugin, beside the scalars
            plain = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                     for k, v in config.items()}
            for summary in hparams(plain, {"val/val_loss": 0.0, "train/loss": 0.0}):
                self.writer._get_file_writer().add_summary(summary)
            return
        for line in (run_dir / METRICS_FILE).read_text("utf-8").splitlines():
            entry = json.loads(line)
            if entry["step"] == resume_step:
                values = {k: v for k, v in entry.items() if k not in ("step", "kind")}
                self.log(resume_step, scalars_of(entry["kind"], values))

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, outcome: str) -> None:
        self.writer.close()


def _after_the_newest_event_file(path: Path) -> None:
    """Wait, where needed, into the second after the newest event file's: TensorBoard reads a
    directory's event files in name order (the second each was made, then host, process id
    and a counter, compared as text), and a resume's purge holds for the files read before
    its own only."""
    made = [int(found[1]) for file in path.glob("events.out.tfevents.*")
            if (found := re.match(r"events\.out\.tfevents\.(\d+)\.", file.name))]
    if made:
        wait = max(made) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)


class _WandB:
    """A W&B run named after the run directory; a resume continues it (its id in the run dir)
    and keeps the config it started with. WANDB_MODE=offline keeps it in the run directory;
    WANDB_PROJECT names the project."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        import wandb

        self.path = run_dir / "wandb"
        run_id = _tracker_id(run_dir, "wandb", lambda: uuid.uuid4().hex[:12])
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "codelm"),
                                  dir=run_dir, name=run_dir.name, id=run_id, resume="allow",
                                  config=config if resume_step is None else None)
        except wandb.errors.UsageError as e:  # no API key: a login, or offline
            raise ValueError(_wandb_not_ready(e)) from None

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self, outcome: str) -> None:
        self.run.finish(exit_code=0 if outcome == FINISHED else 1)


def _wandb_not_ready(error: Exception) -> str:
    return (f"--report-to wandb: {error} (`wandb login`, WANDB_API_KEY, or WANDB_MODE=offline "
            "to keep the run in its directory)")


def _wandb_key_found() -> bool:
    """Whether W&B has credentials without asking: WANDB_API_KEY, an identity token file, or
    the netrc entry of its host (as `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no netrc file, or one W&B could not read either
        return False


def check_ready(report_to: Sequence[str]) -> None:
    """Raise ValueError where a tracker of ``report_to`` cannot start, before a run prepares its
    data: W&B with no credentials (in a terminal, W&B's login prompt comes here) and not
    WANDB_MODE=offline or disabled."""
    offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")
    if "wandb" not in report_to or offline or _wandb_key_found():
        return
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as e:
        raise ValueError(_wandb_not_ready(e)) from None


class _MLflow:
    """An MLflow run named after the run directory, at MLFLOW_TRACKING_URI (MLflow's default
    else); a resume continues it (its id in the run directory), logging no point of a metric
    at or before the last step the run holds of it (the interrupted attempt's, replayed)."""

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None):
        import mlflow

        self.path, self.mlflow = run_dir, mlflow
        saved = _tracker_id(run_dir, "mlflow", lambda: None)
        run = mlflow.start_run(run_id=saved, run_name=run_dir.name)
        self.run_id = run.info.run_id
        _tracker_id(run_dir, "mlflow", lambda: run.info.run_id)
        self.logged_through: dict[str, int] = {}  # metric -> the last step the run holds
        if saved is None:
            mlflow.log_params({k: json.dumps(v)[:6000] for k, v in config.items()})
        else:
            client = mlflow.MlflowClient()
            for key in client.get_run(saved).data.metrics:
                history = client.get_metric_history(saved, key)
                self.logged_through[key] = max(point.step for point in history)

    def log(self, step: int, scalars: dict) -> None:
        metrics = {}
        for key, value in scalars.items():
            name = mlflow_name(key)
            if step > self.logged_through.get(name, -1):
                metrics[name] = value
        if metrics:
            self.mlflow.log_metrics(metrics, step=step, run_id=self.run_id)

    def close(self, outcome: str) -> None:
        """The run ended as ``outcome``, from any thread (MLflow's active run is per thread: a
        stop's watcher thread ends it through the client)."""
        active = self.mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self.mlflow.end_run(status=outcome)
        else:
            self.mlflow.MlflowClient().set_terminated(self.run_id, status=outcome)


def mlflow_name(key: str) -> str:
    """A metric's name as MLflow takes it: "/" as "_" (kind_key), "@" as "_at_"
    (val/pass@1: val_pass_at_1), and any other character MLflow refuses as "_"."""
    name = key.replace("/", "_").replace("@", "_at_")
    return re.sub(r"[^\w\-. :]", "_", name)


TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
# How a run's attempt ended, in MLflow's words (W&B: exit code 0 or 1)
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
TRACKER_IDS = "trackers.json"  # each tracker's run id, so that a resume continues that run


def _tracker_id(run_dir: Path, tracker: str, new: Callable[[], str | None]) -> str | None:
    """The id ``tracker`` gave this run, or ``new()``'s, recorded."""
    path = run_dir / TRACKER_IDS
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if ids.get(tracker) is None:
        made = new()
        if made is not None:
            ids[tracker] = made
            process.write_atomic(path, json.dumps(ids))
    return ids.get(tracker)


def scalars_of(kind: str, values: dict) -> dict:
    """A metrics.jsonl line's values as the trackers take them: the finite numbers, each
    named kind/key."""
    return {f"{kind}/{k}": v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class RunLog:
    """metrics.jsonl (one line per log step and per evaluation) and the trackers; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None,
                 config: dict | None = None, report_to: Sequence[str] = ("tensorboard",)):
        """``resume_step``: the step a resumed run continues from (None: a new run);
        ``config``: the run's, which each tracker records; ``report_to``: TRACKERS or "none"."""
        self.enabled, self.run_dir = enabled, run_dir
        self.file, self.trackers = None, []
        self._failed = False  # a write failed (a full disk): its error said so, close stays quiet
        if not enabled:
            return
        path = run_dir / METRICS_FILE  # a resumed run's is trimmed (rundir.trim_metrics)
        if resume_step is None:  # a new run: nothing of an attempt it replaces (rundir._lock_dir)
            path.unlink(missing_ok=True)
            (run_dir / TRACKER_IDS).unlink(missing_ok=True)  # nor its tracker runs
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.trackers = [TRACKERS[name](run_dir, config or {}, resume_step)
                         for name in report_to if name != "none"]

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        target = self.run_dir / METRICS_FILE
        try:
            self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
            self.file.flush()
            scalars = scalars_of(kind, values)
            for tracker in self.trackers:
                target = tracker.path
                tracker.log(step, scalars)
        except OSError as e:  # a full disk: write() and TensorBoard name no file
            self._failed = True
            raise OSError(e.errno, e.strerror, str(target)) from None

    def close(self, outcome: str = FINISHED) -> None:
        """The file and the trackers closed; ``outcome``: how the attempt ended (FINISHED,
        FAILED: an error, KILLED: a stop it can resume from), as the trackers record it."""
        if self.file is not None:
            file, trackers, self.file, self.trackers = self.file, self.trackers, None, []
            # after a failed write, quietly: its error is already on its way out
            with contextlib.suppress(OSError) if self._failed else contextlib.nullcontext():
                try:
                    file.close()
                finally:
                    for tracker in trackers:
                        tracker.close(outcome)
