"""A run's checkpoint: one ``RunState`` saved to ``checkpoints/step-N/`` and read back, so that a
resumed run continues bit-exactly; and whether the resumed run's settings may continue it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from codelm.runs.rundir import (
    ADAPTER_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    checkpoint_step,
    list_checkpoints,
)
from codelm.runtime import hub, process, settings
from codelm.runtime.distributed import Dist, RankZeroFailed, all_gather, broadcast

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

# A checkpoint's layout, named by its state.pt's format_version; another version is refused.
FORMAT_VERSION = 1  # state.pt (the optimizer's state in it) beside the model's .safetensors
SHARDED_FORMAT_VERSION = 2  # state.pt (no optimizer) beside SHARDED_DIR (--strategy fsdp)
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint's files: the model's and optimizer's
#   shards, one file a writing process, and their .metadata
SHARD_SCAN_BYTES = 2**28  # a sharded checkpoint's tensors are checked this many bytes at a time


@dataclass
class RunState:
    """The checkpoint payload: where a run stands and all it needs to continue bit-exactly."""

    step: int = 0
    tokens_seen: int = 0
    order: dict = field(default_factory=lambda: {"epoch": 0, "pos": 0})  # BatchOrder's place
    train_loss: float | None = None  # of the last step
    best_val_loss: float | None = None
    best_step: int | None = None
    stop_ref: float | None = None  # early stopping's reference: the last counted fall
    evals_since_best: int = 0  # evaluations since stop_ref was set
    last_eval_step: int = -1
    precision: str | None = None  # what precision "auto" resolved to (check_precision)
    max_steps: int | None = None  # the schedule's length, for a resume that changes it
    data: dict | None = None  # the data it trained on, for a resume on other data
    optimizer: dict = field(default_factory=dict, repr=False)
    scheduler: dict = field(default_factory=dict, repr=False)
    scaler: dict = field(default_factory=dict, repr=False)
    rng: list = field(default_factory=list, repr=False)  # rng_state() of every rank
    weights: dict = field(default_factory=dict, repr=False)  # model_tensors(): the .safetensors

    def note_evaluation(self, loss: float, min_delta: float) -> bool:
        """Count an evaluation at this step toward early stopping and the best so far; whether
        it is a new best. Patience counts from the last fall larger than ``min_delta`` (as Keras
        does); best/ follows every new minimum."""
        self.last_eval_step = self.step
        if self.stop_ref is None or loss < self.stop_ref - min_delta:
            self.stop_ref = loss
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        improved = self.best_val_loss is None or loss < self.best_val_loss
        if improved:
            self.best_val_loss = loss
            self.best_step = self.step
        return improved

    def out_of_patience(self, patience: int | None) -> bool:
        return bool(patience) and self.evals_since_best >= patience


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back (a disk that filled up, a file edited or lost)."""


class StepStart(NamedTuple):
    """What a step changes before its update: the data order and the RNG streams."""

    order: dict
    rng: dict


def model_tensors(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``model``: every tensor, or only the trainable ones."""
    if trainable_only:
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    seen, out = set(), {}  # aliases (tied embeddings) once: safetensors stores each storage once
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous().cpu()
    return out


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str,
                       trainable_only: bool) -> None:
    """Load tensors saved by ``model_tensors``; every expected name must be there, no other."""
    expected = set(model_tensors(model, trainable_only))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the model (missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]})")
    own = model.state_dict()
    for name, t in tensors.items():  # before load_state_dict, whose error names no source
        if t.shape != own[name].shape:
            vocabulary = ""
            if name in ("wte.weight", "lm_head.weight") and t.shape[1:] == own[name].shape[1:]:
                vocabulary = (" (its rows: the vocabulary; the model built for the tokenizer "
                              f"read has {own[name].shape[0]}: not the tokenizer these weights "
                              "trained with?)")
            raise ValueError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the model's "
                             f"{tuple(own[name].shape)}{vocabulary}")
    model.load_state_dict(tensors, strict=False)


def weights_file(trainable_only: bool) -> str:
    return ADAPTER_FILE if trainable_only else MODEL_FILE


# Free space (MiB) below which a failed write is put down to a full disk.
DISK_FULL_MIB = 1.0


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Replace ``target`` (a checkpoint, best/, export/) atomically with what ``write`` writes and
    its manifest; any failure is one OSError naming ``target`` (and a full disk)."""
    free_mib: list[float] = []

    def build(tmp: Path) -> None:
        try:
            write(tmp)
            process.write_manifest(tmp)
        except Exception:
            free_mib.append(shutil.disk_usage(tmp).free / 2**20)
            raise

    try:
        process.write_dir_atomically(target, build, replace=True)
    except Exception as err:
        if isinstance(err, OSError) and err.filename is not None:
            raise
        free = free_mib[0] if free_mib else shutil.disk_usage(Path(target).parent).free / 2**20
        full = free < DISK_FULL_MIB or process.is_disk_full(err)
        raise OSError(f"{target}: could not write it{': the disk is full' if full else ''} "
                      f"({free:.0f} MiB free); {'free some space; ' if full else ''}what was "
                      f"written before is intact ({type(err).__name__}: {err})") from None


def save(path: Path, state: RunState, config: dict, trainable_only: bool) -> None:
    """Write ``state`` and the run's config to checkpoint directory ``path``, atomically."""
    rest = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "weights"}

    def write(tmp: Path) -> None:
        save_file(state.weights, tmp / weights_file(trainable_only),
                  metadata={"step": str(state.step)})
        torch.save({"format_version": FORMAT_VERSION, **rest}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))

    write_dir_atomically(path, write)


def _broken(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: corrupt or incomplete checkpoint ({why})")


def read_state(path: Path, mmap: bool = False) -> RunState:
    """A checkpoint's state.pt as a RunState without its weights; ``mmap``: its tensors are
    mapped, not read (for a look at its progress alone)."""
    if not (path / STATE_FILE).is_file():
        raise _broken(path, f"no {STATE_FILE}")
    try:
        raw = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        # torch's own message suggests an unsafe reload; a torn file is all there is to say
        raise _broken(path, f"{STATE_FILE} is not a readable torch file ({type(e).__name__})"
                      ) from None
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise _broken(path, f"{STATE_FILE} holds no format_version")
    version = raw.pop("format_version")
    if version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
        raise ValueError(f"{path / STATE_FILE}: checkpoint format_version {version!r}, not "
                         f"{FORMAT_VERSION} (one file) or {SHARDED_FORMAT_VERSION} (sharded): "
                         "start a new run")
    if (version == SHARDED_FORMAT_VERSION) != is_sharded(path):
        raise _broken(path, f"{STATE_FILE}'s format_version {version} and {SHARDED_DIR}/ "
                      "disagree")
    if set(raw) != {f.name for f in dataclasses.fields(RunState)} - {"weights"}:
        raise _broken(path, f"{STATE_FILE} does not hold every RunState field")
    return RunState(**raw)


class Weights(NamedTuple):
    """A checkpoint's weights file as read: its tensors and the step its metadata records."""

    tensors: dict[str, torch.Tensor]
    step: str | None


def _read_weights(path: Path, trainable_only: bool) -> Weights:
    """Checkpoint ``path``'s weights file, read whole; a missing or unreadable one is a
    CorruptCheckpointError naming it."""
    weights = path / weights_file(trainable_only)
    if not weights.is_file():
        raise _broken(path, f"no {weights.name}")
    try:
        with safe_open(weights, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _broken(path, f"{weights.name}: {e}") from None
    return Weights(tensors, metadata.get("step"))


def _check_step(path: Path, step: int) -> None:
    """A checkpoint's state.pt holds the step its directory's name ``step-N`` says: another is a
    CorruptCheckpointError naming both (a resume would skip or repeat steps)."""
    named = checkpoint_step(path)
    if named is not None and step != named:
        raise _broken(path, f"{STATE_FILE} holds step {step}, its directory's name says "
                      f"step {named}")


def verified(path: Path, trainable_only: bool) -> RunState:
    """One-file checkpoint ``path`` read whole and checked: its manifest, its weights and
    optimizer state finite, its step the one its name and its weights record. What is wrong is a
    CorruptCheckpointError naming it (a resume then tries the checkpoint before)."""
    path = Path(path)
    if problem := process.manifest_problem(path):
        raise _broken(path, problem)
    weights = _read_weights(path, trainable_only)
    name = weights_file(trainable_only)
    if bad := nonfinite_tensor(weights.tensors):
        raise _broken(path, f"{name}: {bad} holds inf or NaN")
    state = read_state(path)
    if bad := nonfinite_tensor(_optimizer_tensors(state.optimizer)):
        raise _broken(path, f"{STATE_FILE}: {bad} holds inf or NaN")
    _check_step(path, state.step)
    if weights.step is not None and weights.step != str(state.step):
        raise _broken(path, f"{name} records step {weights.step}, {STATE_FILE} step {state.step}")
    state.weights = weights.tensors
    return state


def load(path: Path, model: nn.Module, trainable_only: bool) -> RunState:
    """Load a checkpoint into ``model`` and return its RunState; all is checked and read first
    (``verified``), so a broken checkpoint leaves the model as it was and an earlier one can be
    tried."""
    state = verified(path, trainable_only)
    weights = Path(path) / weights_file(trainable_only)
    load_model_tensors(model, state.weights, str(weights), trainable_only)
    return state


# ---- Sharded checkpoints (--strategy fsdp): each process writes and reads its shards ----
# torch.distributed.checkpoint and DTensor are imported where a sharded checkpoint is handled:
# importing them takes about a second, which no other run or script pays.

def is_sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` holds shards (SHARDED_FORMAT_VERSION)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def _model_shards(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's tensors as DCP saves and loads them: keyed by parameter names, so that any
    number of processes, sharded or not, reads what any number wrote."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    weights = get_model_state_dict(model, options=options)
    if trainable_only:  # (a frozen tied weight comes through under its second name)
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False)
                     if p.requires_grad}
        weights = {name: t for name, t in weights.items() if name in trainable}
    return weights


def _load_options(trainable_only: bool) -> StateDictOptions:
    """How ``_shards`` is loaded back: only the trainable tensors when ``trainable_only`` (the
    frozen base is the model's own, built from init_from; DCP has checked every key it reads)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _shards(model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool) -> dict:
    """The model's and optimizer's state as DCP saves and loads it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    return {"model": _model_shards(model, trainable_only),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def _nonfinite_shard(shards: dict, dist: Dist) -> str | None:
    """The name of a tensor holding inf or NaN in any rank's shards (collective), or None."""
    from torch.distributed.tensor import DTensor

    local = {name: t.to_local() if isinstance(t, DTensor) else t
             for name, t in shards["model"].items()}
    for name, slots in shards["optimizer"]["state"].items():
        for key, t in slots.items():
            local[f"optimizer state {name} {key}"] = t.to_local() if isinstance(t, DTensor) else t
    return next((bad for bad in all_gather(nonfinite_tensor(local), dist) if bad), None)


def save_sharded(path: Path, state: RunState, config: dict, model: nn.Module,
                 optimizer: torch.optim.Optimizer, trainable_only: bool, dist: Dist) -> str | None:
    """Checkpoint ``path`` in the sharded layout (collective): every rank writes its shards into
    rank 0's temporary directory, rank 0 adds state.pt (``state``: no weights, no optimizer),
    the config and the manifest, and publishes it atomically. Returns the name of a tensor
    holding inf or NaN instead, writing nothing."""
    shards = _shards(model, optimizer, trainable_only)
    if bad := _nonfinite_shard(shards, dist):
        return bad
    if not dist.main:
        tmp = broadcast(None, dist)
        if tmp is None:
            raise RankZeroFailed("rank 0 failed (its error says why)")
        try:  # a failed write fails on every rank (DCP's collective): rank 0 reports it
            _save_shards(shards, Path(tmp) / SHARDED_DIR)
        except Exception:
            broadcast(None, dist)  # rank 0's word that its save failed
            raise RankZeroFailed("rank 0 failed (its error says why)") from None
        if broadcast(None, dist) is not None:
            raise RankZeroFailed("rank 0 failed (its error says why)")
        return None
    rest = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name != "weights"}
    shared = []

    def write(tmp: Path) -> None:
        broadcast(str(tmp), dist)
        shared.append(tmp)
        _save_shards(shards, tmp / SHARDED_DIR)
        torch.save({"format_version": SHARDED_FORMAT_VERSION, **rest}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))

    try:
        write_dir_atomically(path, write)
    except BaseException:
        with contextlib.suppress(Exception):  # a rank that has ended hears nothing: its own
            broadcast("failed" if shared else None, dist)  # end stops the others' save
        raise
    broadcast(None, dist)
    return None


def _save_shards(shards: dict, directory: Path) -> None:
    """``dcp.save`` of ``shards`` into ``directory`` (collective). A write that fails on any
    rank fails on every rank with the first failed rank's own exception (a full disk's OSError):
    DCP raises its CheckpointException, a BaseException that ``except Exception`` lets by."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(shards, checkpoint_id=directory)
    except dcp.CheckpointException as e:
        cause = e.failures[min(e.failures)][0] if e.failures else None
        if isinstance(cause, Exception):
            raise cause from None
        raise RuntimeError(str(e).splitlines()[0]) from None


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 trainable_only: bool, dist: Dist) -> RunState:
    """Load sharded checkpoint ``path`` into ``model`` and ``optimizer`` (sharded or not, on any
    number of processes: DCP reshards) and return its RunState. The manifest and the step (its
    state.pt's, its name's) are checked first; shards holding inf or NaN are refused after
    loading (an earlier checkpoint then overwrites them)."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    if problem := process.manifest_problem(path):
        raise _broken(path, problem)
    state = read_state(path)
    _check_step(path, state.step)
    shards = _shards(model, optimizer, trainable_only)
    _read_shards(path, shards, dist)
    options = _load_options(trainable_only)
    set_model_state_dict(model, shards["model"], options=options)
    set_optimizer_state_dict(model, optimizer, shards["optimizer"], options=options)
    if bad := _nonfinite_shard(shards, dist):
        raise _broken(path, f"{SHARDED_DIR}: {bad} holds inf or NaN")
    return state


def _read_shards(path: Path, shards: dict, dist: Dist) -> None:
    """Fill ``shards`` (tensors keyed as written) in place from sharded checkpoint ``path``; an
    unreadable one is a CorruptCheckpointError naming it."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process reading shards: that is the intent
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(shards, checkpoint_id=path / SHARDED_DIR, no_dist=not dist.enabled)
    except (dcp.CheckpointException, RuntimeError, ValueError, OSError) as e:
        raise _broken(path, f"{SHARDED_DIR}: {str(e).splitlines()[0]}") from None


def load_sharded_weights(path: Path, model: nn.Module, trainable_only: bool) -> None:
    """Load the model's tensors of sharded checkpoint ``path`` into ``model`` (not sharded) in
    this one process, which reads every rank's shards (eval.py scores a run's checkpoint so)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    path = Path(path)
    if problem := process.manifest_problem(path):
        raise _broken(path, problem)
    weights = _model_shards(model, trainable_only)
    _read_shards(path, {"model": weights}, Dist())
    set_model_state_dict(model, weights, options=_load_options(trainable_only))


def _nonfinite_in_shards(path: Path) -> str | None:
    """The name of a tensor holding inf or NaN among sharded checkpoint ``path``'s (the model's
    and the optimizer's), read in this one process without a model, SHARD_SCAN_BYTES at a time
    (their names and shapes from DCP's metadata); or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(Path(path) / SHARDED_DIR)
    group: dict[str, torch.Tensor] = {}
    size = 0
    items = reader.read_metadata().state_dict_metadata.items()
    tensors = [(key, meta) for key, meta in items if isinstance(meta, TensorStorageMetadata)]
    for i, (key, meta) in enumerate(tensors):
        group[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        size += group[key].nbytes
        if size >= SHARD_SCAN_BYTES or i == len(tensors) - 1:
            _read_shards(Path(path), group, Dist())
            if bad := nonfinite_tensor(group):
                return bad
            group, size = {}, 0
    return None


def verified_sharded(path: Path) -> RunState:
    """Sharded checkpoint ``path`` checked in this one process: its manifest, its step the one
    its name says, every shard finite; its RunState (no weights, no optimizer). What is wrong is
    a CorruptCheckpointError naming it."""
    path = Path(path)
    if problem := process.manifest_problem(path):
        raise _broken(path, problem)
    state = read_state(path)
    _check_step(path, state.step)
    if bad := _nonfinite_in_shards(path):
        raise _broken(path, f"{SHARDED_DIR}: {bad} holds inf or NaN")
    return state


def gathered_tensors(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """``model_tensors`` of a sharded model, gathered whole into rank 0's memory (collective;
    the other ranks get {}): best/ and the export are written from it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                               ignore_frozen_params=trainable_only)
    full = get_model_state_dict(model, options=options)
    # A tied weight once, under its first name, as model_tensors keeps it.
    aliases = (set(dict(model.named_parameters(remove_duplicate=False)))
               - set(dict(model.named_parameters())))
    return {name: t for name, t in full.items() if name not in aliases}


def nonfinite_tensor(tensors: Mapping[str, object]) -> str | None:
    """The name of the first floating-point tensor holding inf or NaN, or None."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                return name
    return None


def _optimizer_tensors(optimizer: dict) -> dict[str, object]:
    """An optimizer's state_dict's per-parameter state (its moments), named for messages."""
    return {f"optimizer state {i} {key}": tensor
            for i, slots in optimizer.get("state", {}).items() for key, tensor in slots.items()}


def first_nonfinite(state: RunState) -> str | None:
    """The name of a weight or optimizer tensor holding inf or NaN, or None when all are finite."""
    return nonfinite_tensor({**state.weights, **_optimizer_tensors(state.optimizer)})


def finite_checkpoint(checkpoints: Sequence[Path], trainable_only: bool) -> Path | None:
    """The last good of ``checkpoints``, or None: the newest that reads back intact, finite
    (weights and optimizer state) and at the step its name says (``verified``)."""
    for path in reversed(checkpoints):
        try:
            if is_sharded(path):
                verified_sharded(path)
            else:
                verified(path, trainable_only)
        except (ValueError, OSError):  # CorruptCheckpointError, another format_version
            continue
        return path
    return None


def restore_latest(checkpoints: list[Path], restore: Callable[[Path], None], say: bool
                   ) -> list[Path]:
    """Call ``restore`` on the newest checkpoint that reads back; return the broken ones."""
    errors: list[CorruptCheckpointError] = []
    for i in reversed(range(len(checkpoints))):
        try:
            restore(checkpoints[i])
            return checkpoints[len(checkpoints) - len(errors):]
        except CorruptCheckpointError as e:
            errors.append(e)
            if say and i > 0:
                print(f"warning: {e}; trying the checkpoint before it, {checkpoints[i - 1].name}",
                      file=sys.stderr)
    raise CorruptCheckpointError("; ".join(map(str, errors)) + ": no intact checkpoint to "
                                 "resume from; start the run anew under another --name")


def set_aside(broken: list[Path]) -> None:
    """Rename broken checkpoints broken-step-N-<time>, kept for inspection."""
    for path in broken:
        aside = path.with_name(f"broken-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        print(f"warning: {path} set aside as {aside.name}", file=sys.stderr)


def drop_old(run_dir: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (renamed first: a kill mid-removal
    leaves a partial write, not a step-N without its weights)."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        doomed = process.partial_path(old, "tmp")
        old.rename(doomed)
        shutil.rmtree(doomed)


# What a resumed run may change (besides name, out_dir and resume, which locate it): how it
# computes, how far it goes, what it reports and keeps, how it ends. Every other key shapes the
# model, the data, the optimizer state or the steps taken: the checkpoint would not load, or would
# silently override it (AdamW's lr and betas come back from it).
RESUME_MAY_CHANGE = (
    "device", "compile", "gradient_checkpointing", "strategy",  # how the same maths is computed
    "offload_activations",  # where it keeps what it saves
    "force",  # whether the step-cost check may refuse it
    "max_steps", "epochs", "max_time_s", "decay_steps",  # how far it goes (the schedule follows)
    "early_stop_patience", "early_stop_min_delta",  # when it may stop early
    "eval_every", "log_every", "save_every", "keep_last", "progress", "report_to",  # reporting
    "export", "export_merged", "export_gguf", "final_eval", "sample_prompt",  # the end of the
    "sample_tokens",  # run
    "inject_nan_at_step",  # fault injection (tests)
)
# data_options that change where and how fast the data is prepared, not what it is.
RESUME_DATA_OPTIONS_MAY_CHANGE = ("cache_dir", "use_cache", "num_workers", "progress")

# Config keys that hold paths: a run's config.json holds them absolute, so that eval.py and
# --resume find them from any directory. "stdlib" is a data source's name, not a path.
PATH_KEYS = ("init_from", "init_adapter", "tokenizer", "data", "val_data", "test_data",
             "problems", "val_problems")


def _is_path(key: str, item) -> bool:
    """Whether an item of a PATH_KEYS value names a file (a data source "stdlib", a Hugging
    Face model or dataset id or a URL does not)."""
    if not isinstance(item, str):
        return False
    if key in ("init_from", "init_adapter"):  # a model id: the run records its snapshot
        return not hub.is_hub_id(item)
    return not (key.endswith("data") and (item == "stdlib" or hub.is_hub_id(item)
                                          or "://" in item))


def _map_paths(key: str, value, fn: Callable[[Path], Path]):
    """``fn`` applied to each path of a PATH_KEYS value (a path, a list of them, or None)."""
    if isinstance(value, list):
        return [_map_paths(key, v, fn) for v in value]
    return str(fn(Path(value))) if _is_path(key, value) else value


def with_absolute_paths(cfg):
    """``cfg`` (a TrainConfig) with its PATH_KEYS absolute; not resolved: a symlink keeps its
    name, which a data source's document ids start with."""
    return dataclasses.replace(cfg, **{
        k: _map_paths(k, getattr(cfg, k), lambda p: p.expanduser().absolute()) for k in PATH_KEYS})


def check_run_paths(values: dict, keys: Sequence[str], source: str) -> None:
    """Each path that ``values`` (a run's config.json) holds under ``keys`` must exist."""
    for key in keys:
        value = values.get(key)
        for path in [value] if isinstance(value, str) else value or []:
            if _is_path(key, path) and not Path(path).expanduser().exists():
                raise ValueError(f"{source}: {key} {path!r} not found")


# TrainConfig keys whose None (and auto) leave the choice to a new run: a resume keeps
# the choice its run made.
CHOSEN_BY_THE_RUN = ("preset", "block_size", "batch_size", "lr", "warmup_steps", "precision",
                     "optimizer")


def unset(key: str, value: object) -> bool:
    return key in CHOSEN_BY_THE_RUN and value in (None, "auto")


def _as_config_json(cfg) -> dict:
    """A TrainConfig's values as a run's config.json holds them (JSON's view)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def check_resume_config(cfg, run_dir: Path, checkpoints: list[Path], resume_hint: str
                        ) -> dict | None:
    """Refuse a resumed run whose settings (a TrainConfig) differ from those of its newest
    checkpoint (of ``checkpoints``, oldest first) outside RESUME_MAY_CHANGE; return the saved
    values (None: nothing saved yet)."""
    saved_path = next((c / CONFIG_FILE for c in reversed(checkpoints)
                       if not process.manifest_problem(c, [CONFIG_FILE])),
                      Path(run_dir) / CONFIG_FILE)
    if not saved_path.is_file():
        return None
    saved, source = settings.read_config_file(saved_path, "train")
    now = _as_config_json(cfg)
    saved = {**_as_config_json(type(cfg)()), **saved}  # a key its file lacks: its default

    def comparable(values: dict, key: str):  # paths as the files they name
        if key == "data_options":
            return {k: v for k, v in values[key].items() if k not in RESUME_DATA_OPTIONS_MAY_CHANGE}
        if key in PATH_KEYS:
            return _map_paths(key, values[key], lambda p: p.expanduser().resolve())
        return values[key]

    # A sharded checkpoint continues on any number of processes that keeps its global batch
    # (check_writers): the batch may be regrouped.
    sharded = bool(checkpoints) and is_sharded(checkpoints[-1])
    regrouped = ("batch_size", "grad_accum") if sharded else ()
    free = ("name", "out_dir", "resume", *RESUME_MAY_CHANGE, *regrouped)
    changed = []
    for k in now:
        if k in free or unset(k, now[k]):
            continue
        if k == "precision" and "auto" in (saved[k], now[k]):
            continue  # "auto" names a precision only with a device: check_precision compares it
        if comparable(saved, k) != comparable(now, k):
            changed.append(f"{k}={saved[k]!r} (now {now[k]!r})")
    if changed:
        raise ValueError(f"{source}: the run was trained with other settings: "
                         f"{'; '.join(changed)} (now: the flags given, else "
                         f"{Path(run_dir) / CONFIG_FILE}): drop them, or set them back there "
                         f"({resume_hint} alone continues it), or start a new run with another "
                         "--name")
    return saved


def check_precision(path: Path, trained: str, now: str, setting: str, device: torch.device
                    ) -> None:
    """A resume computes in the precision its run trained in ("auto" may resolve otherwise on
    another device); ``setting``: the precision setting now, which computes in ``now``."""
    if trained != now:
        raise ValueError(f"{path}: the run trained in {trained}, but --precision {setting} "
                         f"computes in {now} on {device}. Pass --precision {trained} to keep it "
                         f"on {device} (bf16 needs a CPU or a GPU with native bf16); a change of "
                         "precision needs a new run")


# The largest process count a refusal lists among those a checkpoint could continue on.
MOST_PROCESSES = 64


def check_writers(path: Path, writers: int, world: int, per_process: int) -> bool:
    """A checkpoint continues on as many processes as wrote it (one RNG state each); a sharded
    one on any number whose global batch (``per_process`` examples a step each) is the one it
    trained with. Whether each process's RNG state continues (a bit-exact resume)."""
    if is_sharded(path):
        saved = json.loads((path / CONFIG_FILE).read_text())
        then = saved["batch_size"] * saved["grad_accum"] * writers
        if then % world:
            counts = [str(n) for n in range(1, min(then, MOST_PROCESSES) + 1) if then % n == 0]
            listed = "" if then <= MOST_PROCESSES else f" up to {MOST_PROCESSES}"
            raise ValueError(f"{path} trained with a global batch of {then} examples a step "
                             f"({writers} process(es)), which {world} processes cannot share "
                             f"evenly: resume it on N of {', '.join(counts)} (the counts{listed} "
                             f"that divide {then}), with batch_size x grad_accum = {then} / N")
        if then != per_process * world:
            raise ValueError(f"{path} trained with a global batch of {then} examples a step "
                             f"({writers} process(es)); this run's is {per_process * world} "
                             f"({world} x batch_size x grad_accum): set batch_size and "
                             f"grad_accum to give {then} on {world}")
        return writers == world
    if writers != world:
        raise ValueError(f"{path} was written by {writers} process(es), this run has {world}: "
                         f"its global batch would change from {per_process * writers} to "
                         f"{per_process * world} examples a step, and each process's random "
                         f"state is its own: resume it on {writers} (only a --strategy fsdp "
                         "checkpoint moves to another count)")
    return True


def note_other_data(run_name: str, trained: dict | None, now: dict) -> None:
    """Warn when the data was built anew, other than the checkpoint's: not bit-exact."""
    differ = [f"{key} {trained.get(key)} -> {now[key]}" for key in now
              if trained and None not in (trained.get(key), now[key])
              and trained.get(key) != now[key]]
    if differ:
        print(f"warning: the training data is not the one {run_name} trained on "
              f"({'; '.join(differ)}): this resume is not bit-exact", file=sys.stderr)
