"""The run directory: its layout (the one home of its names), claiming and locking it (one run
per directory), telling it from any other directory, and trimming its metrics.jsonl for a resume
(trackers.py writes it and the TensorBoard log)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from codelm.runtime import process, settings
from codelm.runtime.distributed import Dist, broadcast

# runs/<name>/ holds CONFIG_FILE, METRICS_FILE, tokenizer.json, LOCK_FILE, TB_DIR/,
# CHECKPOINTS_DIR/<CHECKPOINT_PREFIX>N/, BEST_DIR/, EXPORT_DIR/ and EVAL_DIR/ (and
# INIT_ADAPTER_COPY); is_run_dir tells one from any other directory.
CONFIG_FILE = "config.json"  # the resolved TrainConfig; each checkpoint and best/ hold a copy
# An init_adapter run's copy of the adapter's config: the LoRA layout its weights continue with.
INIT_ADAPTER_COPY = "init_adapter_config.json"
METRICS_FILE = "metrics.jsonl"  # one line per log step and per evaluation (trackers.RunLog)
TB_DIR = "tb"  # TensorBoard events
CHECKPOINTS_DIR = "checkpoints"  # one CHECKPOINT_PREFIX<step> directory per checkpoint
BEST_DIR = "best"  # the best-by-validation weights, their BEST_METRICS and CONFIG_FILE
BEST_METRICS = "metrics.json"  # in best/: {"step": the step of its weights, **val metrics}
EXPORT_DIR = "export"  # HF model + tokenizer, or a LoRA run's adapter (PEFT layout)
MERGED_DIR = "merged"  # in export/: a LoRA run's merged model (export_merged)
GGUF_FILE = "model.gguf"  # in export/: the model as GGUF (export_gguf), its Ollama Modelfile beside
EVAL_DIR = "eval"  # codelm.recipes' evaluation of the run
FINAL_EVAL_DIR = "final_eval"  # the final evaluation of a from-scratch code model (eval.py's)
HF_CONFIG = "config.json"  # an HF model directory's config (export/, an init_from)

MODEL_FILE = "model.safetensors"  # the full model's tensors
ADAPTER_FILE = "adapter.safetensors"  # only the trainable tensors (LoRA on a pretrained base)
STATE_FILE = "state.pt"  # a checkpoint's RunState but its weights (checkpoint.py)
CHECKPOINT_PREFIX = "step-"
EXPORT_RECORD = "codelm_export.json"  # in export/: {"best_step": the step of best/ it holds}
LOCK_FILE = ".lock"  # held (flock) by the run that runs in the directory; holds its owner_tag
WRITTEN_BEFORE_CONFIG = ("tokenizer.json", "tokenizer_config.json")  # the run's tokenizer


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory ``step-N`` holds (None: not a checkpoint's name)."""
    number = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(number) if path.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                  key=checkpoint_step)


def evaluation_at(path: Path, step: int) -> dict | None:
    """The metrics of the evaluation metrics.jsonl logs at ``step`` (as best/ keeps them), or
    None where none is logged there."""
    if not path.exists():
        return None
    found = None
    for raw in path.read_text("utf-8").splitlines():
        entry = json.loads(raw)
        if entry.get("kind") == "val" and entry.get("step") == step:
            found = entry
    if found is None:
        return None
    return {k: v for k, v in found.items() if k not in ("step", "kind", "best_val_loss", "epoch")}


def best_step(run_dir: Path) -> int | None:
    """The step whose weights a run's best/ holds (None: no best/ yet)."""
    path = Path(run_dir) / BEST_DIR / BEST_METRICS
    return settings.read_json_object(path, "best metrics").get("step") if path.is_file() else None


def exported_step(run_dir: Path) -> int | None:
    """The step of the best/ weights a run's export/ holds (None: no export, or the last
    weights, the run having no best/ then)."""
    record = Path(run_dir) / EXPORT_DIR / EXPORT_RECORD
    if not record.is_file():
        return None
    return settings.read_json_object(record, "export record").get("best_step")


def stale_export(run_dir: Path) -> str | None:
    """Why a run's export/ does not hold its best/ weights, or None."""
    if not (Path(run_dir) / EXPORT_DIR / EXPORT_RECORD).is_file():
        return None
    exported = exported_step(run_dir)
    best = best_step(run_dir)
    if best is None or exported == best:
        return None
    held = f"the best weights of step {exported}" if exported is not None else "no best/ weights"
    return f"it holds {held}, best/ those of step {best} (the run trained on after its export)"


def adapter_copy(run_dir: str | Path) -> Path | None:
    """A run's INIT_ADAPTER_COPY when the run holds weights to continue from, else None."""
    copy = Path(run_dir).expanduser() / INIT_ADAPTER_COPY
    return copy if copy.is_file() and holds_weights(copy.parent) else None


def holds_weights(run_dir: Path) -> bool:
    """Whether a run directory holds trained weights (a checkpoint, best/ or export/)."""
    return bool(list_checkpoints(run_dir)) or any((run_dir / d).is_dir()
                                                  for d in (BEST_DIR, EXPORT_DIR))


RUN_CONFIG_KEYS = {"preset", "lr", "max_steps"}  # a run's config.json has these (an HF one not)


def is_run_config(config: dict) -> bool:
    """Whether a config.json is a codelm run's TrainConfig (the run's, best/'s, a checkpoint's),
    not an HF model's."""
    return config.get("model_type") is None and RUN_CONFIG_KEYS <= config.keys()


def holds_run_config(directory: Path) -> bool:
    """Whether a directory's config.json is a codelm run's TrainConfig (not where it is
    missing, unreadable or another tool's)."""
    try:
        return is_run_config(settings.read_json_object(directory / CONFIG_FILE, "run config"))
    except (ValueError, OSError):
        return False


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a codelm run directory (its config.json a TrainConfig) that got as
    far as weights."""
    path = Path(path)
    return holds_weights(path) and holds_run_config(path)


def run_or_path(path: str, runs_dir: str | Path) -> str:
    """``path``, or the run it names under ``runs_dir`` (``named_run``), said on stderr: a
    command's model named as eval.py's --models names one."""
    under = named_run(path, runs_dir)
    if under is None:
        return path
    print(f"{path}: {under} (under --runs-dir)", file=sys.stderr)
    return str(under)


def named_run(path: str, runs_dir: str | Path) -> Path | None:
    """``runs_dir/path`` where ``path`` is no file or directory here but a directory under
    ``runs_dir`` (a run's --name given alone); else None."""
    under = Path(runs_dir).expanduser() / path
    if Path(path).expanduser().exists() or not under.is_dir():
        return None
    return under


def run_of_weights(path: str | Path) -> Path | None:
    """The run directory whose export/, best/ or checkpoints/step-N/ ``path`` is; None for any
    other."""
    path = Path(path)
    if path.name in (EXPORT_DIR, BEST_DIR):
        run_dir = path.parent
    elif checkpoint_step(path) is not None and path.parent.name == CHECKPOINTS_DIR:
        run_dir = path.parent.parent
    else:
        return None
    return run_dir if holds_run_config(run_dir) else None


def failed_before_weights(run_dir: Path) -> bool:
    """Whether a directory holds only a codelm run that stopped before writing any weights."""
    if holds_weights(run_dir) or not holds_run_config(run_dir):
        return False
    return not any(p.suffix in (".safetensors", ".bin", ".pt") for p in run_dir.rglob("*"))


def holds_no_checkpoint(run_dir: Path) -> str:
    """What a run holding weights but no checkpoint holds, and a way on from those weights."""
    held = [f"best/ (step {best_step(run_dir)})"] if (run_dir / BEST_DIR).is_dir() else []
    held += ["export/"] if (run_dir / EXPORT_DIR).is_dir() else []
    loadable = next((d for d in (run_dir / EXPORT_DIR, run_dir / EXPORT_DIR / MERGED_DIR)
                     if (d / HF_CONFIG).is_file()), None)
    how = (f"train on from them in a new run (another --name, with --init-from {loadable}), or "
           "start over under another --name" if loadable else "start over under another --name")
    return f"holds {' and '.join(held)} but no checkpoint to continue from; {how}"


def no_weights_yet(run_dir: Path) -> str | None:
    """Why a run directory holding no weights has no model to load; None for any other."""
    if not failed_before_weights(run_dir):  # a config.json and no weights
        return None
    lock = run_dir / LOCK_FILE
    if lock_is_held(lock):
        return (f"{run_dir}: a run still training ({lock_holder(lock) or 'another process'}) "
                "that has saved no checkpoint yet: nothing to score before its first one")
    return (f"{run_dir}: a run that stopped before its first checkpoint: no weights to score; "
            f"--resume {run_dir} starts it again")


def what_next(hint: str, restarts: bool = False) -> str:
    """What a stopped run's user does next: continue it, or run it again (``restarts``)."""
    return f"{'start it again' if restarts else 'continue'} with {hint}"


# ---- Claiming and locking: one run per directory ----

def lock_holder(lock: Path) -> str | None:
    """Who holds ``lock`` ("process PID on HOST"), None when unknown or ended."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        match = re.fullmatch(process.OWNER_PATTERN, lock.read_text().strip())
        if match is not None and not process.owner_is_dead(match):
            return f"process {match['pid']} on {match['host']}"
    return None


# The lock files of the run directories this process holds (ClaimedDir): its own run, which
# it may evaluate once trained (the final evaluation), is no run in progress elsewhere.
_HELD_HERE: set[Path] = set()


def lock_is_held(lock: Path) -> bool:
    """Whether a live run of another claim than this process's holds ``lock`` (a run
    directory's LOCK_FILE)."""
    with contextlib.suppress(OSError):
        if lock.resolve() in _HELD_HERE:
            return False
    with contextlib.suppress(OSError):  # no lock file, or a filesystem without locks
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


class RunInterrupted(KeyboardInterrupt):
    """A stop signal raised out of a run; ``resume``: how to continue the run, if it can."""

    def __init__(self, stop: KeyboardInterrupt, resume: str | None):
        super().__init__(*stop.args)  # the signal's name, for process.interrupted_exit_code
        self.resume = resume


def interrupted(stop: KeyboardInterrupt, run_dir: Path | None, hint: str | None,
                restarts: bool) -> RunInterrupted:
    """``stop``, saying how to continue the run if it has a checkpoint (and is continued)."""
    saved = run_dir is not None and bool(list_checkpoints(run_dir)) and not restarts
    return RunInterrupted(stop, (hint or f"--resume {run_dir}") if saved else None)


class RunDirTaken(ValueError):
    """The run directory belongs to another run (running now, or holding weights)."""


@dataclass
class ClaimedDir:
    """A run directory this process holds the lock of (``lock`` None: a filesystem without
    locks), with what it held when claimed; ``wrote_tokenizer``: WRITTEN_BEFORE_CONFIG are this
    run's."""

    path: Path
    lock: int | None = None
    holds_weights: bool = False  # a checkpoint, best/ or export/
    checkpoints: list[Path] = field(default_factory=list)  # complete ones, oldest first
    wrote_tokenizer: bool = False

    def release(self) -> None:
        if self.lock is not None:
            _HELD_HERE.discard((self.path / LOCK_FILE).resolve())
            os.close(self.lock)
            self.lock = None

    def drop_if_unused(self) -> None:
        """Remove the directory of a run that stopped before its config.json, under the lock."""
        if self.lock is None:
            return
        ours = {LOCK_FILE, *(WRITTEN_BEFORE_CONFIG if self.wrote_tokenizer else ())}
        with contextlib.suppress(OSError):
            names = {p.name for p in self.path.iterdir()}
            if LOCK_FILE in names and names <= ours:  # never a user's own files
                for name in sorted(names - {LOCK_FILE}) + [LOCK_FILE]:
                    (self.path / name).unlink()
                self.path.rmdir()


def claim_run_dir(resume: str | None, out_dir: str, name: str | None, stem: str,
                  hint: str | None, dist: Dist) -> ClaimedDir:
    """Rank 0 claims the run directory (``claim``); every rank learns it and what it holds."""
    claimed = None
    answer = (None, None)
    if dist.main:
        try:
            claimed = claim(resume, out_dir, name, stem, hint)
            answer = (replace(claimed, lock=None), None)
        except ValueError as e:
            answer = (None, str(e))
    held, error = broadcast(answer, dist)
    if error is not None:
        raise ValueError(error)
    return claimed or held


def claim(resume: str | None, out_dir: str, name: str | None, stem: str, hint: str | None
          ) -> ClaimedDir:
    """The locked run directory: ``resume``'s, ``name``'s, or the first free one of
    ``stem``-<timestamp>[-2, -3, ...]."""
    if resume:
        candidates = [Path(resume)]
    elif name:
        candidates = [Path(out_dir) / name]
    else:
        candidates = stamped_names(Path(out_dir), stem)
    for run_dir in candidates:
        try:
            claimed = _lock_dir(run_dir, not resume, hint)
        except RunDirTaken:
            if len(candidates) == 1:  # a directory the user named
                raise
            continue
        if not resume and not name and (earlier := _stopped_short(Path(out_dir), stem, run_dir)):
            print(f"note: {earlier.run} stopped at step {earlier.step} of {earlier.of}: "
                  f"--resume {earlier.run} continues it; this is a new run, {run_dir.name}")
        return claimed
    raise ValueError(f"{out_dir}: no free run name {candidates[0].name}-N; choose one with --name")


def stamped_names(parent: Path, stem: str) -> list[Path]:
    """The names a new directory of ``stem`` under ``parent`` takes, the first free one:
    ``stem``-<timestamp>, then -2, -3, ... (several started in one second)."""
    stamped = parent / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return [stamped] + [stamped.with_name(f"{stamped.name}-{n}") for n in range(2, 1000)]


@dataclass(frozen=True)
class StoppedRun:
    run: Path
    step: int  # its last checkpoint's
    of: int  # its max_steps


def _stopped_short(out_dir: Path, stem: str, new: Path) -> StoppedRun | None:
    """The latest other run named ``stem``-<timestamp> under ``out_dir`` that stopped before its
    end (a run stopped with Ctrl-C, then the same command run again): its last checkpoint short
    of its max_steps, and neither its export nor its final evaluation written (a run that stops
    early writes them); None where the latest such run ended or none holds a checkpoint."""
    named = re.compile(re.escape(stem) + r"-\d{8}-\d{6}(?:-\d+)?")
    runs = sorted(p for p in out_dir.iterdir() if p != new and named.fullmatch(p.name))
    for run in reversed(runs):  # the latest first: the names sort by their time
        checkpoints = list_checkpoints(run)
        if not checkpoints or not (run / CONFIG_FILE).is_file():
            continue
        if (run / EXPORT_DIR).is_dir() or (run / FINAL_EVAL_DIR).is_dir():
            return None
        with contextlib.suppress(ValueError, OSError):
            planned = json.loads((run / CONFIG_FILE).read_text("utf-8")).get("max_steps")
            step = checkpoint_step(checkpoints[-1])
            if settings.is_number(planned, int) and step < planned:
                return StoppedRun(run, step, planned)
        return None
    return None


def _lock_dir(run_dir: Path, new: bool, hint: str | None) -> ClaimedDir:
    """Create ``run_dir`` and take its exclusive lock (on a file: flock on a directory fails on
    NFS). A new run replaces only a codelm run that stopped before its first weights."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if run_dir.is_file():
            raise ValueError(f"{run_dir}: a file, where the run directory goes: choose "
                             "another --name, or move the file") from None
        raise ValueError(f"{run_dir}: cannot create the run directory ({e.strerror}); "
                         "check --out-dir") from None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"{run_dir / LOCK_FILE}: cannot lock the run directory "
                         f"({e.strerror})") from None
    claimed = ClaimedDir(run_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        who = lock_holder(run_dir / LOCK_FILE) or "one started with the same --name or --resume"
        raise RunDirTaken(f"{run_dir} is in use by another run ({who}): wait for it to "
                          "end, or choose another --name") from None
    except OSError:  # a filesystem without locks: unguarded, so nothing is replaced
        os.close(fd)
        print(f"warning: {run_dir}: this filesystem cannot lock the run directory; nothing "
              "stops a second run under this name", file=sys.stderr)
    else:
        claimed.lock = fd
        _HELD_HERE.add((run_dir / LOCK_FILE).resolve())
        with contextlib.suppress(OSError):  # who holds it (lock_holder); a full disk: still held
            os.ftruncate(fd, 0)
            os.write(fd, f"{process.owner_tag()}\n".encode())
    for directory in (run_dir, run_dir / CHECKPOINTS_DIR):  # under the lock: their writers are gone
        if directory.is_dir():
            process.recover_partial_writes(directory, every_owner_gone=True)
    claimed.holds_weights = holds_weights(run_dir)
    claimed.checkpoints = list_checkpoints(run_dir)
    if new and (run_dir / CONFIG_FILE).exists():
        if claimed.lock is None or not failed_before_weights(run_dir):
            claimed.release()
            if claimed.holds_weights and not claimed.checkpoints:
                raise RunDirTaken(f"{run_dir} already {holds_no_checkpoint(run_dir)}")
            raise RunDirTaken(f"{run_dir} already holds a run: continue it with "
                              f"{hint or f'--resume {run_dir}'}, or choose another --name")
        print(f"{run_dir}: its run stopped before its first checkpoint; this run replaces it")
    return claimed


# ---- metrics.jsonl ----

def trim_metrics(path: Path, step: int, evaluated: int | None = None) -> None:
    """Drop what an interrupted run logged past the step its resume continues from, and the
    validation lines past ``evaluated`` (the last evaluation its checkpoint holds: one logged
    at the resumed step whose checkpoint was not rewritten is run and logged again)."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    kept = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:  # JSONDecodeError and UnicodeDecodeError are ValueErrors; a list has no .get
            entry = json.loads(raw)
            at = entry.get("step", 0)
            later = at > step or (evaluated is not None and entry.get("kind") == "val"
                                  and at > evaluated)
        except (ValueError, AttributeError) as e:
            if number == len(lines):  # no newline after it: the write never finished
                print(f"warning: {path}:{number}: dropping a torn last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a metrics line ({e}); fix or remove it "
                             "to resume") from None
        if not later:
            kept.append(raw.decode("utf-8") + "\n")
    process.write_atomic(path, "".join(kept))
