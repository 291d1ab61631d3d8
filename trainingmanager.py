"""Training manager for codelm: one loop for from-scratch, fine-tuning and LoRA runs.

The training loop users should never have to debug (seed 001 lost weeks to one): training and
validation share one loss (the model's own: ``model(ids, labels)``; validation adds the accuracy
count); gradient accumulation weights every micro-batch by its token count,
so accumulation equals one big batch (and DDP equals one process); a non-finite loss stops the
run loudly with the last good checkpoint intact; checkpoints hold everything needed to continue
bit-exactly (weights, optimizer, scheduler, scaler, every RNG, the data position) and are written
atomically; ``--overfit`` turns the debugging ritual into a command.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    import cliconfig

    cliconfig.quiet_start_up_stops()

import argparse
import contextlib
import dataclasses
import fcntl
import gc
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import typing
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cliconfig
from architecture import (
    IGNORE_INDEX,
    SHORT_DTYPES,
    cuda_half_dtype,
    lacks_native_bf16,
)
from cliconfig import setting
from rundir import (  # the run directory's layout
    ADAPTER_FILE,
    BEST_DIR,
    BEST_METRICS,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EXPORT_DIR,
    EXPORT_RECORD,
    HF_CONFIG,
    INIT_ADAPTER_COPY,
    LOCK_FILE,
    MERGED_DIR,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    TB_DIR,
    WRITTEN_BEFORE_CONFIG,
)

if typing.TYPE_CHECKING:  # annotations only: dataset and tokenizer load where a run needs them
    from torch.utils.data import Dataset

    from architecture import ModelConfig
    from dataset import DataConfig
    from tokenizer import BPETokenizer, CodeTokenizer

ROOT = Path(__file__).resolve().parent
OVERFIT_CORPUS = ROOT / "data" / "overfit"


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient the fp16 loss scaler could not absorb. ``diagnosis`` is the
    message without its advice on how to go on, for callers (a sweep) that go on their own way."""

    def __init__(self, message: str, step: int | None = None, diagnosis: str | None = None):
        super().__init__(message)
        self.step, self.diagnosis = step, diagnosis or message


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the default run (stdlib corpus, ~18 min on 2
    CPUs, as README.md times it)."""

    # run directory
    name: str | None = None  # <out_dir>/<name>; default: <preset, or the --init-from
    #   directory's name>-<timestamp>[-2, -3, ... if taken]
    out_dir: str = "runs"  # the parent of run directories
    resume: str | None = None  # a run directory to continue from its latest checkpoint
    seed: int = 1337  # model init, data order, dropout (a resumed run restores its RNG)
    device: str = "auto"  # auto (a GPU where there is one, else the CPU; not mps) | cpu | cuda | cuda:N
    # model: from scratch (preset + overrides) or from a local HF checkpoint
    preset: str = "llama-14m"  # architecture.PRESETS name (vocab_size follows the tokenizer)
    init_from: str | None = None  # a local HF checkpoint directory: a run's export/ too, or
    #   for a LoRA run on --init-from (whose export/ is the adapter) its export/merged/
    n_layer: int | None = None  # overrides the preset (from-scratch models only)
    n_head: int | None = None  # n_kv_head follows it unless model_options sets it
    n_embd: int | None = None  # model width
    mlp_hidden: int | None = None  # MLP width
    block_size: int | None = None  # length of training sequences; from scratch also the
    #   model's context (None: the preset's); with --init-from at most the checkpoint's context
    #   (None: the smaller of that context and 1024)
    dropout: float | None = None  # dropout of the embeddings and residual branches (default:
    #   the model's own, e.g. embd_pdrop, resid_pdrop); attention dropout is the model's own,
    #   or model_options {"attn_dropout": p} (with --init-from only the dropouts can be set)
    model_options: dict = field(default_factory=dict)  # any other ModelConfig field, e.g. init
    # tokenizer: a file/dir, else the model dir's, else a CodeTokenizer trained on the train split
    tokenizer: str | None = None  # a tokenizer.json / codelm tokenizer file or directory
    tokenizer_min_freq: int = 10  # a trained tokenizer keeps pieces seen this often
    tokenizer_max_vocab: int | None = 8000  # a trained tokenizer's cap on learned pieces; its
    #   256 byte tokens and its special tokens come on top (the default run: 8,262 tokens)
    # LoRA (r = 0: full training) and a quantized frozen base (QLoRA)
    lora_r: int = 0  # adapter rank; needs init_from (a random base is not worth freezing)
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] | None = None  # module names, HF (q_proj) or codelm (qkv);
    #   default: the attention projections (qkv, attn.proj)
    init_adapter: str | None = None  # a LoRA adapter directory in PEFT's layout (PEFT's own,
    #   or a LoRA run's export/) to train on as an adapter, on --init-from (default: the base
    #   its adapter_config.json names); lora_r, lora_alpha, lora_dropout and lora_targets come
    #   from that file (a --lora-* flag that differs from it is an error; targets, HF or codelm
    #   names, differ when they select other modules). The run keeps a copy of that file: the
    #   directory is needed only at the start (not to resume or evaluate the run)
    quantize_bits: int = 0  # 0, 8 (int8) or 4 (NF4); needs lora_r > 0
    base_dtype: str = "fp32"  # fp32 | bf16 | fp16: dtype of the frozen base under LoRA (the
    #   adapters stay fp32); bf16 halves the base's memory, fp16 is for GPUs without bf16 (and
    #   turns on loss scaling, as --precision fp16 does)
    # data (dataset.py): task and sources (None: the Python standard library)
    task: str = "lm"  # lm | completion | method | docstring | refactor | fim (dataset.TASKS)
    data: list[str] | None = None  # "stdlib", directories, scraper JSONL or pairs JSONL
    val_data: list[str] | None = None  # predefined validation files (None: split from data)
    test_data: list[str] | None = None  # predefined test files (None: split from data)
    data_options: dict = field(default_factory=dict)  # further DataConfig fields for the task
    # optimisation
    batch_size: int = 4  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step, weighted by their tokens
    max_steps: int = 700  # optimizer steps
    epochs: float | None = None  # if set, the run's length instead of max_steps (not both)
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup, then cosine decay
    weight_decay: float = 0.1  # decoupled; matrices only (not norms, biases)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    adam_eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)
    label_smoothing: float = 0.0  # training only; validation reports the true NLL
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs with native bf16, fp16
    #   on older ones such as the T4, fp32 on CPU)
    eval_precision: str = "fp32"  # fp32 | same (as training); seed 000 needed fp32. fp32 means
    #   no autocast: a bf16/fp16 or quantized frozen base (base_dtype) computes in its own dtype
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory
    # evaluation, logging, checkpoints
    eval_every: int = 175  # steps between evaluations (and best/ checkpoints); none before
    #   warmup_steps (a loss not yet comparable), and always one at the end
    eval_examples: int | None = 80  # validation examples (windows or pairs) scored at each
    #   evaluation: the split's first ones, whatever the batch size, accumulation or processes,
    #   so runs that differ in those compare on the same examples; None: the whole split
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0: never
    early_stop_min_delta: float = 0.0  # a smaller fall of the validation loss is no improvement
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard lines
    save_every: int | None = None  # default: eval_every
    keep_last: int = 2  # step checkpoints kept (best/ is kept apart)
    max_time_s: float | None = None  # wall-clock budget; the run checkpoints and ends cleanly
    progress: bool = True  # a progress bar
    # end of run
    export: bool = True  # write export/: HF model + tokenizer, or the PEFT adapter
    export_merged: bool = False  # under LoRA: also write the merged full model
    sample_prompt: str = "def fibonacci(n):\n"  # completed greedily at the end of the run
    #   (with --export); a special token's text in it is read as the run's pair records were
    sample_tokens: int = 48  # tokens of that sample
    # debugging
    overfit: bool = False  # train on the bundled tiny corpus until it is memorised
    overfit_batches: int = 0  # overfit K batches of the real training data
    inject_nan_at_step: int | None = None  # fault injection: make this step's loss NaN


_CHOICES = {
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "eval_precision": ("fp32", "same"),
    "quantize_bits": (0, 4, 8),
    "base_dtype": tuple(SHORT_DTYPES),
}


def config_from_dict(values: dict, source: str = "<dict>") -> TrainConfig:
    """Build a TrainConfig from a dict, with errors that name the source and the key."""
    return cliconfig.config_from_dict(TrainConfig, upgraded(values), source, _CHOICES)


def upgraded(values: dict) -> dict:
    """Values written before validation was counted in examples (a run's config.json, a sweep's
    best.json): ``eval_batches`` micro-batches of ``batch_size`` became ``eval_examples``, so
    such runs still resume on the same validation examples (one process assumed)."""
    if "eval_batches" not in values or "eval_examples" in values:
        return values
    values = dict(values)
    batches = values.pop("eval_batches")
    per_batch = values.get("batch_size", TrainConfig.batch_size)
    ok = all(cliconfig.is_number(v, int) for v in (batches, per_batch))
    values["eval_examples"] = batches * per_batch if ok else batches
    return values


def load_config_file(path: str | os.PathLike) -> dict:
    """The checked TrainConfig values of a JSON file (a recipe's ``train`` section when the file
    is a recipe); errors name the file and the key."""
    values, source = cliconfig.read_config_file(path, "train")
    if (new := upgraded(values)) is not values:
        print(f"note: {source}: eval_batches={values['eval_batches']} (an earlier codelm's) read "
              f"as eval_examples={new['eval_examples']}", file=sys.stderr)
    config_from_dict(new, source)
    check_options(new, source)
    return new


def build_parser() -> argparse.ArgumentParser:
    """argparse flags mirroring TrainConfig (``--lora-r``), plus ``--config FILE.json``."""
    parser = argparse.ArgumentParser(
        prog="trainingmanager.py",
        description="Train a codelm model: from scratch, fine-tuning or LoRA. Flags override "
        "--config; with no flags, trains the from-scratch code model on the stdlib corpus.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="JSON file of TrainConfig keys, or a recipe "
                        "(configs/*.json) whose 'train' section is read; flags override it")
    return cliconfig.add_config_flags(parser, TrainConfig, _CHOICES)


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults < ``--resume`` run's config.json < ``--config`` file < command-line flags."""
    args = vars(build_parser().parse_args(argv))
    if "data_options" in args:  # a JSON object, as the flag's type reads it
        _check_data_options(args["data_options"], "--data-options")
    if "model_options" in args:
        _check_model_options(args["model_options"], "--model-options")
    given: dict = {}
    config = args.pop("config", None)
    if config is not None:  # read here, so that an earlier codelm's is upgraded
        given = load_config_file(config)
    resumed: dict = {}
    if args.get("resume"):
        check_resume_location(args, given, config)
        saved = Path(args["resume"]) / CONFIG_FILE
        if (Path(args["resume"]) / LOCK_FILE).is_file() and not saved.is_file():
            raise ValueError(f"--resume {args['resume']}: " + (
                f"its run is still starting (it has not written {CONFIG_FILE}): wait for it"
                if lock_is_held(Path(args["resume"]) / LOCK_FILE) else
                f"its run was stopped before it wrote {CONFIG_FILE}: nothing to resume; run the "
                "command that started it again (the same --name reuses the directory)"))
        if not Path(args["resume"]).is_dir():
            raise ValueError(f"--resume {args['resume']}: no such run directory")
        if not saved.is_file():
            raise ValueError(f"--resume {args['resume']}: no {CONFIG_FILE} there (not a run dir)")
        resumed = load_config_file(saved)
    if resumed:  # the paths it gives the run (its own tokenizer.json replaces the tokenizer's,
        #   its copy of the adapter's config the adapter directory: run_adapter_copy)
        owned = ("init_adapter",) if run_adapter_copy(args["resume"]) else ()
        check_run_paths(resumed, [k for k in ("init_from", "init_adapter", "data", "val_data",
                                              "test_data")
                                  if k not in args and k not in given and k not in owned],
                        str(saved))
    cfg = cliconfig.resolve_config(TrainConfig, args, "train", base={**resumed, **given},
                                   choices=_CHOICES)
    if cfg.init_adapter is not None:  # a --lora-* flag typed at its default value differs too
        with_init_adapter(cfg, typed={*args, *given},
                          where_set=_where_set_in_run(args, config, given, args.get("resume")))
    return cfg


def _where_set_in_run(typed: Collection[str], config: str | None, in_file: Collection[str],
                      resume: str | None) -> Callable[[str], str]:
    """Where a trainingmanager.py user set TrainConfig ``key`` (``train``'s ``where_set``):
    ``cliconfig.where_set_by``, the keys of a ``--resume`` run read from its config.json."""
    return cliconfig.where_set_by(typed, config, in_file,
                                  resume and f"{Path(resume) / CONFIG_FILE} (--resume)")


def check_resume_location(args: dict, given: dict | None = None, config: str | None = None
                          ) -> None:
    """A ``--name`` / ``--out-dir`` typed, or set by the ``--config`` file, must name the
    ``--resume`` directory: the resume continues that run, so one naming another run (a new
    branch, meant) would go unheeded."""
    given = given or {}
    resume = Path(args["resume"]).expanduser()
    values = {k: args[k] if args.get(k) is not None else given.get(k) for k in ("name", "out_dir")}
    named = (Path(values["out_dir"] or resume.parent).expanduser()
             / (values["name"] or resume.name))
    set_by = [k for k in ("name", "out_dir") if values[k] is not None]
    if not set_by or named.resolve() == resume.resolve():
        return
    said = " ".join(f"--{k.replace('_', '-')} {args[k]}" if args.get(k) is not None
                    else f"{k} {given[k]!r} in --config {config}" for k in set_by)
    raise ValueError(f"--resume {args['resume']} continues that run, but {said} names another "
                     f"run ({named}): drop {said} to continue {args['resume']}, or drop "
                     "--resume to start a new run there")


# --------------------------------------------------------------------------------------------
# Devices, precision, distributed
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Where this process sits in a torchrun job (world 1: a plain process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_hint: str) -> tuple[Dist, bool]:
    """Join the torchrun job if there is one; returns (dist, whether we initialised it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    import torch.distributed as td

    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if td.is_initialized():
        return dist, False
    use_cuda = torch.cuda.is_available() and device_hint != "cpu"
    if use_cuda:
        # Every rank checks, before joining: a rank without a GPU of its own would crash in
        # set_device while the others waited for it in init_process_group.
        gpus = torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.local_rank + 1))
        if local_world > gpus:
            raise ValueError(
                f"torchrun started {local_world} processes on this machine, which has {gpus} "
                f"CUDA device(s): start one per GPU (--nproc_per_node {gpus}), or train every "
                "process on the CPU with --device cpu")
        torch.cuda.set_device(dist.local_rank)
    td.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist, True


def resolve_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    """The device a run trains on ("auto": this rank's GPU where there is one, else the CPU);
    a device this machine lacks is a ValueError naming --device."""
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank)
        if torch.backends.mps.is_available():  # a Mac: say so, a 1B model in fp32 takes days
            print("note: training on the CPU: codelm trains on cpu or cuda, not on this Mac's mps "
                  "device (eval.py --device mps runs on it)", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {cfg.device}: not a device (auto | cpu | cuda | cuda:N)"
                         ) from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, ...: kernels this trainer never ran on
        raise ValueError(f"--device {cfg.device}: training runs on cpu or cuda (auto | cpu | "
                         "cuda | cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
    if (device.type == "cuda" and device.index is not None and not dist.enabled
            and device.index >= torch.cuda.device_count()):
        raise ValueError(f"--device {cfg.device}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    return device


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_half_dtype(device) == torch.bfloat16 else "fp16"
    return "fp32"


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        import torch.distributed as td

        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


@contextlib.contextmanager
def _main_first(dist: Dist) -> Iterator[None]:
    """Rank 0 does what only it does (building shared caches before the others read them,
    writing checkpoints); if it fails (a bad --tokenizer or data path, a full disk), the others
    stop too, quietly, not on a lost connection."""
    if not dist.main:
        if _broadcast(None, dist) is not None:
            raise RankZeroFailed("rank 0 failed (its error says why)")
        yield
        return
    try:
        yield
    except BaseException:
        _broadcast("failed", dist)
        raise
    _broadcast(None, dist)


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0 fails in what only it does (``_main_first``): rank 0
    reports the error, the others exit with code 2 and nothing more."""


# --------------------------------------------------------------------------------------------
# RNG state (all of it, so a resumed run draws the same numbers)
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG state; on a CUDA ``device``, that GPU's generator only (the one its
    dropout draws from): the state of every visible GPU would not restore where fewer are."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore ``rng_state``; the CUDA generator only on a CUDA ``device``. An older
    checkpoint's list (one state per GPU the saving process saw) gives the device's entry."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _python_state_to_tuple(state: dict) -> dict:
    """``weights_only`` loading turns tuples into lists; random.setstate wants tuples."""
    version, internal, gauss = state["python"]
    return {**state, "python": (version, tuple(internal), gauss)}


# --------------------------------------------------------------------------------------------
# Data order: a deterministic shuffle per epoch, the position is part of the checkpoint
# --------------------------------------------------------------------------------------------


class BatchOrder:
    """Global micro-batches of example indices; rank r takes its contiguous slice of each.

    The order of epoch e is a permutation seeded by (seed, e), so (epoch, position) is all a
    checkpoint needs to continue with the very same batches.
    """

    def __init__(self, n_examples: int, micro_batch: int, dist: Dist, seed: int,
                 batch_size_set: str = "batch_size"):
        """``batch_size_set`` names the setting ``micro_batch`` comes from, for the error."""
        self.global_batch = micro_batch * dist.world
        if n_examples < self.global_batch:
            raise ValueError(
                f"the training split has {n_examples} examples, fewer than one global batch "
                f"({micro_batch} x {dist.world} processes); lower {batch_size_set} or add data"
            )
        self.n, self.micro_batch, self.dist, self.seed = n_examples, micro_batch, dist, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)

    def next(self) -> tuple[list[int], tuple[int, int]]:
        """This rank's indices for the next micro-batch and its (epoch, position) for messages."""
        if self.pos + self.global_batch > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        where = (self.epoch, self.pos)
        start = self.pos + self.dist.rank * self.micro_batch
        self.pos += self.global_batch
        return self._perm[start:start + self.micro_batch].tolist(), where


# --------------------------------------------------------------------------------------------
# Optimisation: AdamW, warmup + cosine to a floor, token-weighted accumulation, AMP
# --------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def perplexity(loss: float) -> float:
    """exp(loss), capped: a diverged run's finite loss (say 23000) must not overflow math.exp."""
    return math.exp(min(loss, 700.0))


@dataclass
class StepStats:
    loss: float  # token-weighted mean over the whole (global) step, as validation computes it
    grad_norm: float
    tokens: int  # input positions processed by all ranks (padding included: it is computed)
    lr: float  # the learning rate this step used (the scheduler has moved on by the time it logs)
    skipped: bool = False  # the fp16 scaler skipped the update (inf/NaN gradients)
    nonfinite: str | None = None  # "loss" or "gradient": the step was not applied


class Trainer:
    """Model, optimizer, schedule and loss scaler: one training step, one evaluation."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device,
                 dist: Dist | None = None, max_steps: int | None = None,
                 where_set: Callable[[str], str] = cliconfig.flag_of):
        """``where_set`` names where the user set a key, for the errors (as ``train``)."""
        self.cfg, self.device, self.dist = cfg, device, dist or Dist()
        self.precision = _resolve_precision(cfg.precision, device)
        if self.precision == "bf16" and lacks_native_bf16(device):
            major, minor = torch.cuda.get_device_capability(device)
            raise ValueError(f"{setting(cfg, 'precision', where_set)}: this GPU (compute "
                             f"capability {major}.{minor}) has no native bf16 (torch would "
                             "emulate it, slowly): set precision fp16 or fp32")
        self.raw_model = model.to(device)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        # Decay matrices only: norms, biases and other vectors keep their scale.
        groups = [
            {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
            fused=True,  # one kernel over all tensors: 5.7x faster than the loop on CPU too
        )
        total = max_steps if max_steps is not None else cfg.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.min_lr_ratio),
        )
        # Loss scaling wherever the backward runs in fp16: fp16 autocast, or a frozen fp16 base
        # under LoRA whatever the precision (its small per-token gradients would underflow).
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.precision == "fp16" or cfg.base_dtype == "fp16")
        model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.eval_model = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # Every buffer (rotary frequencies, LoRA row maps, a quantized base) is computed from
            # the config and the weights, alike on every rank and never trained: re-broadcasting
            # them before each forward (DDP's default) would send the whole QLoRA base each time
            # (they are still synced once, at the start).
            model = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        self.model = model

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches: Sequence[dict], inject_nan: bool = False) -> StepStats:
        """One optimizer step over ``micro_batches`` (this rank's share of the global batch).

        Each micro-batch's summed loss is divided by the token count of the whole global step, so
        accumulation (and DDP's gradient average, undone by the world-size factor) gives exactly
        the gradient of one big batch, whatever the padding of each micro-batch.
        """
        self.model.train()
        count = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        positions = sum(b["input_ids"].numel() for b in micro_batches)
        n_tokens, n_positions = _all_reduce_sum(
            torch.tensor([float(count), float(positions)], device=self.device), self.dist)
        weight = self.dist.world / n_tokens.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            last = i == len(micro_batches) - 1
            # Gradients are averaged across processes once, on the step's last micro-batch.
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                with _autocast(self.device, self.precision):
                    # Right-padded batches need no mask: causal attention never sees the padding.
                    loss = self.model(batch["input_ids"], batch["labels"], reduction="sum",
                                      label_smoothing=self.cfg.label_smoothing,
                                      grad_scale=self.scaler.scale(weight))
                if inject_nan:
                    loss = loss * float("nan")
                self.scaler.scale(loss * weight).backward()
            loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        loss_sum = _all_reduce_sum(loss_sum, self.dist)
        loss, norm, positions = torch.stack(
            [loss_sum / n_tokens.clamp(min=1.0), grad_norm.float(), n_positions]).tolist()
        positions = int(positions)
        lr = self.lr
        if not math.isfinite(loss) or (not math.isfinite(norm) and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            return StepStats(loss, norm, positions, lr, nonfinite="loss" if not math.isfinite(loss)
                             else "gradient")
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepStats(loss, norm, positions, lr, skipped=skipped)

    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict] | Sequence[dict], total: int | None = None) -> dict:
        """Validation loss, perplexity and token accuracy with the training loss function.

        Totals are summed over tokens (and processes) before dividing, so the result does not
        depend on how the split is batched. Label smoothing is left out: perplexity is a true NLL.
        A whole validation split can take minutes: it gets its own (transient) progress bar of
        ``total`` batches.
        """
        from tqdm import tqdm

        batches = tqdm(batches, total=total, desc="eval", unit="batch", leave=False,
                       disable=not (self.dist.main and self.cfg.progress), dynamic_ncols=True)
        model = self.eval_model
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        precision = "fp32" if self.cfg.eval_precision == "fp32" else self.precision
        for batch in batches:
            batch = self._to_device(batch)
            labels = batch["labels"]
            with _autocast(self.device, precision):
                loss, correct = model(batch["input_ids"], labels, reduction="sum",
                                      count_correct=True)
            totals[0] += loss.double()
            totals[1] += (labels != IGNORE_INDEX).sum()
            totals[2] += correct
        model.train(was_training)
        loss_sum, n, correct = _all_reduce_sum(totals, self.dist).tolist()
        if n == 0:
            raise ValueError("the validation split has no labelled tokens; add validation data")
        loss = loss_sum / n
        return {
            "val_loss": loss,
            "val_ppl": perplexity(loss),
            "val_accuracy": correct / n,
            "val_tokens": int(n),
        }

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved lr is the saved schedule's; a resume may change its length (max_steps, epochs).
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


# --------------------------------------------------------------------------------------------
# Checkpoints: one directory each, written to a temporary name and renamed into place
# --------------------------------------------------------------------------------------------



def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied embeddings): safetensors stores each storage once."""
    seen: set[tuple[int, tuple, tuple]] = set()
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().contiguous().cpu()
    return out


def model_tensors(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    if trainable_only:
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return _unique_tensors(model.state_dict())


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str,
                       trainable_only: bool) -> None:
    """Load tensors saved by ``model_tensors``; every expected name must be there, no other."""
    expected = set(model_tensors(model, trainable_only))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model (missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}); was it written by a run with another config, or by "
            "an earlier codelm (its export/ still loads)?"
        )
    own = model.state_dict()
    for name, t in tensors.items():  # before load_state_dict, whose error names no source
        if t.shape != own[name].shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the model's "
                             f"{tuple(own[name].shape)}; was it written by a run with another "
                             "config, or by an earlier codelm (its export/ still loads)?")
    model.load_state_dict(tensors, strict=False)


# Free space (MiB) below which a failed write is put down to a full disk.
DISK_FULL_MIB = 1.0


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``cliconfig.write_dir_atomically`` replacing ``target`` (a checkpoint, best/, export/), with
    any failure of ``write`` reported as one OSError naming ``target``: on a full disk torch and
    safetensors raise their own types, which would end a run with a traceback, and Python's own
    write() names no file. The free space is measured as ``write`` fails, while its partial copy
    still fills the disk: with none left the message says first that the disk is full (torch's
    text, at the end, does not). What a killed write leaves in a run directory is settled at the
    run's start (``clean_partial_writes``)."""
    free_mib: list[float] = []

    def build(tmp: Path) -> None:
        try:
            write(tmp)
        except Exception:
            free_mib.append(shutil.disk_usage(tmp).free / 2**20)
            raise

    try:
        cliconfig.write_dir_atomically(target, build, replace=True)
    except Exception as err:
        if isinstance(err, OSError) and err.filename is not None:
            raise
        free = free_mib[0] if free_mib else shutil.disk_usage(Path(target).parent).free / 2**20
        cause = f"{type(err).__name__}: {err}"
        if free < DISK_FULL_MIB or cliconfig.is_disk_full(err):
            raise OSError(f"{target}: could not write it: the disk is full ({free:.0f} MiB free); "
                          f"free some space before going on; what was written before is intact "
                          f"({cause})") from None
        raise OSError(f"{target}: could not write it ({cause}; {free:.0f} MiB free); what was "
                      "written before is intact") from None


# Partial writes as earlier versions named them (now cliconfig.partial_path's names):
# ``.tmp-<name>-...`` and ``.old-<name>-`` with an owner tag, or ``-<pid>`` before owner tags.
_EARLIER_OLD = re.compile(r"\.old-(?P<name>.+)-(?:" + cliconfig.OWNER_PATTERN + r"|\d+)")


def clean_partial_writes(directory: Path) -> None:
    """Remove interrupted writes; restore a ``target`` whose replacement never landed. Run under
    the run's lock, so every owner of these names is gone: no owner tags need judging."""
    if not directory.is_dir():
        return
    cliconfig.recover_partial_writes(directory, every_owner_gone=True)
    for p in directory.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif match := _EARLIER_OLD.fullmatch(p.name):
            original = directory / match["name"]
            if original.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, original)


def best_step(run_dir: Path) -> int | None:
    """The step whose weights a run's best/ holds (None: no best/ yet)."""
    path = Path(run_dir) / BEST_DIR / BEST_METRICS
    return cliconfig.read_json_object(path, "best metrics").get("step") if path.is_file() else None


def stale_export(run_dir: Path) -> str | None:
    """Why a run's export/ does not hold its best/ weights (a resume trained on without
    exporting), or None. An export without EXPORT_RECORD (an older codelm's) counts as current."""
    record = Path(run_dir) / EXPORT_DIR / EXPORT_RECORD
    if not record.is_file():
        return None
    exported = cliconfig.read_json_object(record, "export record").get("best_step")
    best = best_step(run_dir)
    if best is None or exported == best:
        return None
    held = f"the best weights of step {exported}" if exported is not None else "no best/ weights"
    return f"it holds {held}, best/ those of step {best} (the run trained on after its export)"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory ``step-N`` holds (None: not a checkpoint's name)."""
    number = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(number) if path.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def save_checkpoint(path: Path, model: nn.Module, trainer_state: dict, rng: list[dict],
                    progress: dict, config: dict, trainable_only: bool) -> None:
    tensors = model_tensors(model, trainable_only)

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / (ADAPTER_FILE if trainable_only else MODEL_FILE),
                  metadata={"step": str(progress["step"])})
        torch.save({**trainer_state, "rng": rng, "progress": progress}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))

    write_dir_atomically(path, write)


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back (a disk that filled up, a file edited or lost)."""


_STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng", "progress")
_PROGRESS_KEYS = ("step", "order", "tokens_seen", "best_val_loss", "best_step",
                  "evals_since_best", "last_eval_step")


def load_checkpoint(path: Path, model: nn.Module, trainable_only: bool) -> dict:
    """Load the weights into ``model``; return the rest (trainer state, rng, progress).

    Both files are read and checked before the model is touched, so a broken checkpoint
    (CorruptCheckpointError) leaves the model as it was and an earlier one can be tried.
    """
    path = Path(path)
    weights = path / (ADAPTER_FILE if trainable_only else MODEL_FILE)

    def broken(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: corrupt or incomplete checkpoint ({why})")

    if not weights.is_file():
        raise broken(f"no {weights.name}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise broken(f"{weights.name}: {e}") from None
    state = read_state(path)
    load_model_tensors(model, tensors, str(weights), trainable_only)
    return state


def read_state(path: Path, mmap: bool = False) -> dict:
    """A checkpoint's state.pt (trainer state, rng, progress), checked; ``mmap``: its tensors are
    mapped, not read (for a look at ``progress`` alone). CorruptCheckpointError if it is not."""
    def broken(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: corrupt or incomplete checkpoint ({why})")

    if not (path / STATE_FILE).is_file():
        raise broken(f"no {STATE_FILE}")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        # torch's own message suggests an unsafe reload; a torn file is all there is to say
        raise broken(f"{STATE_FILE} is not a readable torch file ({type(e).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS) or not isinstance(
            state["progress"], dict) or any(k not in state["progress"] for k in _PROGRESS_KEYS):
        raise broken(f"{STATE_FILE} lacks some of {', '.join(_STATE_KEYS)}")
    return state


# --------------------------------------------------------------------------------------------
# Building a run: tokenizer, data, model
# --------------------------------------------------------------------------------------------


def check_next_token_labels(examples: Dataset, split: str, n: int = 8) -> None:
    """The contract the loss relies on, checked on a split's first examples: every counted label
    is the next input token, and some label counts. A data bug that breaks it (labels not
    shifted) makes the task trivially easy: the loss falls and even --overfit-batches passes."""
    for i in range(min(n, len(examples))):
        ids, labels = examples[i]["input_ids"], examples[i]["labels"]
        counted = labels[:-1] != IGNORE_INDEX
        if not bool((labels != IGNORE_INDEX).any()) or not torch.equal(
                labels[:-1][counted], ids[1:][counted]):
            raise ValueError(f"{split} example {i}: its labels are not the next input tokens "
                             "(each counted labels[t] must equal input_ids[t + 1], and some "
                             "label must count): a data bug; the training would be meaningless")


# Keys that mean something only under LoRA (lora_r > 0): set without it, they are refused.
LORA_ONLY_KEYS = ("lora_alpha", "lora_dropout", "lora_targets", "export_merged")
# init_adapter's adapter_config.json -> the TrainConfig keys it sets (LoRAConfig's names).
ADAPTER_KEYS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "target_modules": "lora_targets"}


def run_adapter_copy(run_dir: str | Path) -> Path | None:
    """A run's INIT_ADAPTER_COPY when the run continues from its weights (it holds some): the
    LoRA layout of an init_adapter run that a resume or eval.py rebuilds. None: a run with no
    weights yet (it starts again from the adapter directory), or one of an earlier codelm, which
    wrote no copy (it reads the adapter directory)."""
    copy = Path(run_dir).expanduser() / INIT_ADAPTER_COPY
    return copy if copy.is_file() and _holds_weights(copy.parent) else None


def with_init_adapter(cfg: TrainConfig, typed: Collection[str] = (),
                      where_set: Callable[[str], str] = cliconfig.flag_of) -> TrainConfig:
    """``cfg`` with the LoRA settings of its ``init_adapter`` (``ADAPTER_KEYS``) and, without
    ``init_from``, the base the adapter's config names. The adapter's weights fix its rank and
    targets, so a setting given (other than the default, or named in ``typed``: a flag typed at
    its default value) that differs from the file's is an
    error, not overridden: targets agree when they select the same modules of the base (HF or
    codelm names, as lora.targeted_modules resolves them; the given spelling is kept). What
    codelm's LoRA cannot honour is refused as ``load_adapter`` refuses it. A resume of a run
    with weights reads the run's copy of the file (``run_adapter_copy``): the adapter directory
    may be gone. Idempotent: a run's config.json holds the settings it filled in. Errors name
    where each setting was set (``where_set``, as ``train`` takes it)."""
    if cfg.init_adapter is None:
        return cfg
    import lora

    copy = run_adapter_copy(cfg.resume) if cfg.resume else None
    path, config_name = (copy.parent, copy.name) if copy else (
        Path(cfg.init_adapter).expanduser(), lora.ADAPTER_CONFIG)
    if not path.is_dir():
        raise ValueError(f"{setting(cfg, 'init_adapter', where_set)}: not a directory")
    adapter = lora.read_adapter_config(path, config_name)
    theirs = {key: getattr(adapter, name) for name, key in ADAPTER_KEYS.items()}
    base = cfg.init_from or str(lora.adapter_base(path, "name the base with --init-from",
                                                  config_name))

    def agrees(key: str, mine) -> bool:
        if key != "lora_targets":
            return mine == theirs[key]
        if mine is None:  # 'none', a config file's null (every run's config.json holds one):
            return True   # no choice of targets, so the adapter's
        if isinstance(theirs[key], list) and set(mine) == set(theirs[key]):
            return True  # the same names, in any order: no need to look at the base
        return _select_the_same(base, mine, theirs[key], path / config_name)

    if differ := [f"{setting(cfg, key, where_set)} (the adapter's: {theirs[key]!r})"
                  for key in theirs if (getattr(cfg, key) != getattr(TrainConfig, key)
                                        or key in typed) and not agrees(key, getattr(cfg, key))]:
        raise ValueError(f"{'; '.join(differ)}: {setting(cfg, 'init_adapter', where_set)} "
                         f"fixes these ({path / config_name}): drop those settings to train the "
                         "adapter on as it is")
    targets = theirs["lora_targets"]  # one regular expression: the file keeps it (lora_targets
    #   lists names), and build_model's load_adapter reads it there
    return dataclasses.replace(
        cfg, lora_r=theirs["lora_r"], lora_alpha=float(theirs["lora_alpha"]),
        lora_dropout=float(theirs["lora_dropout"]),
        lora_targets=cfg.lora_targets or (targets if isinstance(targets, list) else None),
        init_from=base)


def _select_the_same(base: str, mine: list[str], theirs: list[str] | str, file: Path) -> bool:
    """Whether the targets ``mine`` (lora_targets: apply_lora's rules) select the modules the
    adapter file's ``theirs`` selects (load_adapter's rules) on the model at ``base``, built from
    its config.json on the meta device (no weights are read). Targets of ``mine`` that select
    nothing select differently; a file whose targets select nothing is load_adapter's error."""
    import lora
    import pretrained
    from architecture import Transformer

    with torch.device("meta"):
        model = Transformer(pretrained.read_config(base)[0])
    try:
        wanted = lora.targeted_modules(model, theirs, peft_rules=True)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    try:
        return lora.targeted_modules(model, mine) == wanted
    except ValueError:
        return False


def check_not_an_adapter(init_from: str, where_set: Callable[[str], str] = cliconfig.flag_of
                         ) -> None:
    """Refuse a LoRA adapter directory (a LoRA run's export/) as ``init_from``, naming what to
    load instead: it holds no model, and "config.json not found" would not say why. The error
    names where init_from was set (``where_set``, as ``train`` takes it)."""
    import lora

    path = Path(init_from)
    if not (path / lora.ADAPTER_CONFIG).is_file() or (path / HF_CONFIG).is_file():
        return
    if (path / MERGED_DIR / HF_CONFIG).is_file():
        instead = f"use {path / MERGED_DIR}, the merged model beside it"
    else:
        base = cliconfig.read_json_object(path / lora.ADAPTER_CONFIG, "adapter config").get(
            "base_model_name_or_path")
        instead = (f"use the base it names, {base}" if base else "use the base it was trained on")
        instead += " (a run with --export-merged also writes the merged model to export/merged)"
    raise ValueError(f"init_from ({init_from!r}, {where_set('init_from')}): a LoRA adapter "
                     f"({lora.ADAPTER_CONFIG}), not a model: {instead}; to train that adapter "
                     f"on, set init_adapter ({where_set('init_adapter')}) to {init_from}")


def check_run_name(name: str | None, what: str) -> None:
    """A run's name is one directory name in out_dir: a path put the run elsewhere (outside it
    with '..', or nested where eval.py's ``latest_run`` never looks). ``what`` names the setting."""
    if name and (Path(name).name != name or name in (".", "..")):
        raise ValueError(f"{what}: a run name, not a path (no path separator, and not '.' or "
                         "'..'); --out-dir sets the directory the run goes in")


def validate_config(cfg: TrainConfig, where_set: Callable[[str], str] = cliconfig.flag_of
                    ) -> None:
    """Reject impossible settings before any work, naming each key, its value and where it was
    set (``where_set``, as ``train`` takes it; an ``init_adapter``'s settings as
    ``with_init_adapter`` fills them in)."""
    cfg = with_init_adapter(cfg, where_set=where_set)

    def named(key: str) -> str:
        return setting(cfg, key, where_set)

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{named(key)}: {why}")

    for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "keep_last",
                "tokenizer_min_freq"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    for key in ("warmup_steps", "early_stop_patience", "sample_tokens"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0")
    # "inf" and "nan" parse as floats: every float must be finite (nan fails every comparison).
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f.name, "must be finite")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    for key in ("beta1", "beta2"):
        need(0.0 <= getattr(cfg, key) < 1.0, key, "must be in [0, 1)")
    need(cfg.adam_eps > 0, "adam_eps", "must be > 0")
    need(0.0 <= cfg.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
    need(cfg.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
    need(cfg.early_stop_min_delta >= 0, "early_stop_min_delta", "must be >= 0")
    need(cfg.epochs is None or cfg.epochs > 0, "epochs", "must be > 0")
    need(cfg.max_time_s is None or cfg.max_time_s > 0, "max_time_s", "must be > 0")
    need(cfg.dropout is None or 0.0 <= cfg.dropout < 1.0, "dropout", "must be in [0, 1)")
    need(0.0 <= cfg.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
    need(cfg.lora_alpha != 0, "lora_alpha", "must not be 0: it scales the adapters' update and "
         "their gradients to zero, so they would never train")
    need(cfg.tokenizer_max_vocab is None or cfg.tokenizer_max_vocab >= 1, "tokenizer_max_vocab",
         "must be >= 1")
    need(cfg.inject_nan_at_step is None or cfg.inject_nan_at_step >= 1, "inject_nan_at_step",
         "must be >= 1 (steps count from 1)")
    need(cfg.save_every is None or cfg.save_every >= 1, "save_every", "must be >= 1")
    need(cfg.eval_examples is None or cfg.eval_examples >= 1, "eval_examples", "must be >= 1")
    need(cfg.lora_r >= 0, "lora_r", "must be >= 0 (0: no LoRA)")
    need(cfg.lora_r == 0 or cfg.init_from is not None, "lora_r",
         f"LoRA needs a pretrained base (init_from, {where_set('init_from')}): a from-scratch "
         "model has nothing frozen worth keeping, so only the adapters of a random model would "
         "train; set init_from, or lora_r 0 to train every weight")
    need(cfg.quantize_bits == 0 or cfg.lora_r > 0, "quantize_bits",
         f"a quantized base is frozen: it needs LoRA, but {named('lora_r')} trains every "
         "weight: set lora_r > 0")
    need(cfg.base_dtype == "fp32" or cfg.lora_r > 0, "base_dtype",
         f"only a frozen base can be held in 16 bits, and {named('lora_r')} trains every "
         f"weight (in fp32): set lora_r > 0 for LoRA, or precision bf16 "
         f"({where_set('precision')}) for 16-bit compute")
    lora_only = [named(k) for k in LORA_ONLY_KEYS if getattr(cfg, k) != getattr(TrainConfig, k)]
    if lora_only and cfg.lora_r == 0:  # else a full fine-tune would run, ignoring them
        raise ValueError(f"{', '.join(lora_only)}: LoRA settings, but {named('lora_r')} trains "
                         "every weight: set lora_r > 0, or drop them")
    need(cfg.overfit_batches >= 0, "overfit_batches", "must be >= 0")
    need(0 <= cfg.seed < 2**63, "seed", "must be in [0, 2**63)")
    check_run_name(cfg.name, named("name"))
    if cfg.init_from is not None:
        for key in ("preset", "n_layer", "n_head", "n_embd", "mlp_hidden"):
            if key != "preset" and getattr(cfg, key) is not None:
                raise ValueError(f"{named(key)}: the shape of a model loaded from "
                                 f"{named('init_from')} cannot be changed")
        if fixed := sorted(set(cfg.model_options) - set(LOADED_MODEL_OPTIONS)):
            raise ValueError(f"model_options ({where_set('model_options')}): "
                             f"{', '.join(fixed)}: the checkpoint of {named('init_from')} fixes "
                             f"these; a loaded model takes only {', '.join(LOADED_MODEL_OPTIONS)}")
        for key, value in cfg.model_options.items():
            need(cliconfig.is_number(value) and 0 <= value < 1, "model_options",
                 f"{key} must be a probability in [0, 1), got {value!r}")
        if not Path(cfg.init_from).is_dir():
            raise ValueError(f"{named('init_from')}: not a directory")
        check_not_an_adapter(cfg.init_from, where_set)
        if cfg.block_size is not None:  # else the first forward pass finds it, after the data
            from pretrained import read_config

            context = read_config(cfg.init_from)[0].block_size
            need(cfg.block_size <= context, "block_size",
                 f"longer than the context of {named('init_from')}, {context} positions")
    else:  # the preset, the shape and model_options, checked before the data is prepared
        try:
            shape = model_config(cfg, 1, None, None)
            if cfg.export:  # else it trains to the end and fails writing export/
                from pretrained import hf_config

                try:
                    hf_config(shape, torch.float32)
                except ValueError as e:
                    raise ValueError(f"{e}; to train it without an HF export: "
                                     f"{cliconfig.off_switch('export', where_set)}") from None
        except ValueError as e:  # name the settings the model was made of, and where
            made_of = [named(k) for k in ("preset", *MODEL_SHAPE_KEYS, "model_options")
                       if k == "preset" or getattr(cfg, k) not in (None, {})]
            raise ValueError(f"{', '.join(made_of)}: {e}") from None
    if cfg.resume is not None and not Path(cfg.resume).is_dir():
        raise ValueError(f"--resume {cfg.resume}: no such run directory")
    if cfg.resume is not None and any((Path(cfg.resume) / f).is_file()
                                      for f in (MODEL_FILE, ADAPTER_FILE)):
        # a checkpoint's, best/'s or export/'s config.json made it look like a run with no
        # checkpoint yet: a whole new run started inside it
        weights = Path(cfg.resume)
        run = weights.parent.parent if weights.parent.name == CHECKPOINTS_DIR else weights.parent
        raise ValueError(f"--resume {cfg.resume}: weights (a checkpoint, best/ or export/), not "
                         f"a run directory: --resume {run} continues that run from its newest "
                         "checkpoint")


# What a resumed run may change (besides name, out_dir and resume, which only locate it): how it
# computes (the same maths; bit-exact only with the same device and settings), how far it goes,
# what it reports and keeps, and how it ends. Every other key shapes the model, the data or its
# order, the optimizer state or the steps already taken: with another value the checkpoint would
# not load, or would load and silently override it (AdamW's lr, betas and decay come back from
# the checkpoint), or the run would go on as another run than the one on disk. Those are refused.
RESUME_MAY_CHANGE = (
    "device", "compile", "gradient_checkpointing",  # how the same maths is computed
    "max_steps", "epochs", "max_time_s",  # how far it goes (the cosine follows the new length)
    "early_stop_patience", "early_stop_min_delta",  # when it may stop early
    "eval_every", "log_every", "save_every", "keep_last", "progress",  # reporting and keeping
    "export", "export_merged", "sample_prompt", "sample_tokens",  # the end of the run
    "inject_nan_at_step",  # fault injection (tests)
)
# data_options that change where and how fast the data is prepared, not what it is.
RESUME_DATA_OPTIONS_MAY_CHANGE = ("cache_dir", "use_cache", "num_workers", "progress")


# TrainConfig keys that hold paths. A new run's config.json holds them absolute, so that eval.py
# and --resume find them from any directory; an older run's, as typed (relative to the directory
# it was started in). "stdlib" is a data source's name, not a path.
PATH_KEYS = ("init_from", "init_adapter", "tokenizer", "data", "val_data", "test_data")


def _is_path(key: str, item) -> bool:
    """Whether an item of a PATH_KEYS value names a file ("stdlib" as a data source does not)."""
    return isinstance(item, str) and not (key.endswith("data") and item == "stdlib")


def _map_paths(key: str, value, fn: Callable[[Path], Path]):
    """``fn`` applied to each path of a PATH_KEYS value (a path, a list of them, or None)."""
    def one(path):
        return str(fn(Path(path))) if _is_path(key, path) else path

    if isinstance(value, str):
        return one(value)
    return [one(v) for v in value] if isinstance(value, list) else value


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its PATH_KEYS absolute (as read from the current directory). Not resolved:
    a symlink keeps its name, which a data source's document ids start with."""
    return dataclasses.replace(cfg, **{
        k: _map_paths(k, getattr(cfg, k), lambda p: p.expanduser().absolute()) for k in PATH_KEYS})


def check_run_paths(values: dict, keys: Sequence[str], source: str) -> None:
    """Each path that ``values`` (a run's config.json, read from ``source``) holds under ``keys``
    must exist: a missing one is an error naming the file and the key, and saying where an
    older run's relative path was relative to."""
    for key in keys:
        value = values.get(key)
        for path in [value] if isinstance(value, str) else value or []:
            if not _is_path(key, path) or Path(path).expanduser().exists():
                continue
            where = "" if Path(path).expanduser().is_absolute() else (
                f" from {Path.cwd()} (the run holds it relative to the directory it was started "
                "in: run from there)")
            raise ValueError(f"{source}: {key} {path!r} not found{where}")


def check_resume_config(cfg: TrainConfig, run_dir: Path, resume_hint: str) -> dict | None:
    """Refuse a resumed run whose settings differ from those its newest checkpoint was trained
    with (else the run's config.json) in a key outside RESUME_MAY_CHANGE, naming each key with
    both values; return the saved values (None: no config.json). The checkpoint's copy, not the
    run's config.json, which a resume reads its settings from and a hand can edit. PATH_KEYS
    compare as the files they name, typed relative or absolute."""
    saved_path = next((c / CONFIG_FILE for c in reversed(list_checkpoints(run_dir))
                       if (c / CONFIG_FILE).is_file()), Path(run_dir) / CONFIG_FILE)
    if not saved_path.is_file():
        return None  # nothing was written yet: the run starts from the beginning anyway
    saved, source = cliconfig.read_config_file(saved_path, "train")
    saved = upgraded(saved)
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # JSON's view, as config.json holds it
    compared = []
    for values in (saved, now):
        values = dict(values)
        if isinstance(values.get("data_options"), dict):
            values["data_options"] = {k: v for k, v in values["data_options"].items()
                                      if k not in RESUME_DATA_OPTIONS_MAY_CHANGE}
        for key in PATH_KEYS:
            values[key] = _map_paths(key, values.get(key), lambda p: p.expanduser().resolve())
        compared.append(values)
    fixed = [k for k in now if k not in ("name", "out_dir", "resume", *RESUME_MAY_CHANGE)]
    # precision "auto" names a precision only with a device: what it computes in is checked
    # against the checkpoint's record instead (_Run._check_precision), so that --precision X
    # may pin the precision an "auto" run trained in.
    changed = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in fixed
               if k in saved and compared[0][k] != compared[1][k]
               and not (k == "precision" and "auto" in (saved[k], now[k]))]
    if changed:
        raise ValueError(
            f"{source}: the run was trained with other settings: {'; '.join(changed)}. A "
            "resumed run keeps every setting of its model, data, optimizer and schedule: drop "
            f"those changes ({resume_hint} alone continues it, once {Path(run_dir) / 'config.json'}"
            " holds them as trained), or start a new run with another --name. A resume may "
            f"change only: {', '.join(RESUME_MAY_CHANGE)}")
    return saved


# DataConfig keys that TrainConfig keys set (DataConfig -> TrainConfig): data_options may not.
_DATA_KEYS_OF_TRAIN = {"task": "task", "sources": "data", "val_sources": "val_data",
                       "test_sources": "test_data", "block_size": "block_size"}


def _check_data_option_keys(options: dict, where: str) -> None:
    """Each key a DataConfig key that no TrainConfig key sets."""
    from dataset import DataConfig

    known = {f.name for f in dataclasses.fields(DataConfig)}
    for key in options:
        if key in _DATA_KEYS_OF_TRAIN:
            raise ValueError(f"{where}: set {key!r} with the TrainConfig key "
                             f"{_DATA_KEYS_OF_TRAIN[key]!r} instead")
        if key not in known:
            raise ValueError(f"{where}: unknown DataConfig key {key!r}; "
                             + cliconfig.key_hint(key, known - set(_DATA_KEYS_OF_TRAIN),
                                                  "DataConfig"))


def check_options(values: dict, source: str) -> None:
    """The data_options and model_options of ``values`` (TrainConfig values from one source: a
    --config file, the --data-options / --model-options flags) checked on their own, so that
    errors name ``source``, as ``config_from_dict``'s name it for the top-level keys: each key,
    each value's type, and the data options' ranges (the split fractions' sum). What depends on
    the other keys (the task, init_from) is checked where the run is set up."""
    for key, check in (("data_options", _check_data_options),
                       ("model_options", _check_model_options)):
        if isinstance(values.get(key), dict):  # else config_from_dict names the type
            check(values[key], f"{source}: {key}")


def _check_data_options(options: dict, where: str) -> None:
    """The keys, and the values as a DataConfig of the other keys' defaults validates them."""
    from dataset import DataConfig

    _check_data_option_keys(options, where)
    try:
        DataConfig(**options).validate()  # its task and sources at their defaults
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def data_config(cfg: TrainConfig, block_size: int) -> DataConfig:
    """The dataset.DataConfig of this run: task, sources and sequence length come from cfg."""
    from dataset import DataConfig

    _check_data_option_keys(cfg.data_options, "data_options")
    options = {"progress": cfg.progress, **cfg.data_options}
    dcfg = DataConfig(task=cfg.task, sources=list(cfg.data or ["stdlib"]),
                      val_sources=list(cfg.val_data or []), test_sources=list(cfg.test_data or []),
                      block_size=block_size, **options)
    dcfg.validate()
    return dcfg


def load_or_train_tokenizer(cfg: TrainConfig, dcfg: DataConfig) -> CodeTokenizer | BPETokenizer:
    """The given tokenizer, the pretrained model's, or a CodeTokenizer trained on the train split
    (cached by corpus, tokenizer options and encoding version: ``dataset.tokenizer_cache_dir``,
    so a second run reuses it)."""
    from dataset import prepare, publish_cache_entry, tokenizer_cache_dir
    from tokenizer import (
        TOKENIZER_FILE,
        CodeTokenizer,
        check_model_tokenizer,
        load_tokenizer,
        tokenizer_path,
        where_tokenizer_is,
    )

    own = Path(cfg.init_from) / TOKENIZER_FILE if cfg.init_from is not None else None
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
        if own is not None and own.is_file() and not same_vocabulary(tok, load_tokenizer(own)):
            print(f"warning: --tokenizer {cfg.tokenizer} differs from {own}, the tokenizer "
                  f"--init-from {cfg.init_from} was trained with: its ids name other tokens than "
                  "the ones the pretrained embeddings learned", file=sys.stderr)
        if cfg.init_from is not None:
            check_model_tokenizer(tok, tokenizer_path(cfg.tokenizer), cfg.init_from)
        return tok
    if own is not None:
        if not own.is_file():
            raise ValueError(f"--init-from {cfg.init_from}: no {TOKENIZER_FILE} in it"
                             f"{where_tokenizer_is(cfg.init_from)}; pass --tokenizer with the "
                             "tokenizer the checkpoint was trained with")
        tok = load_tokenizer(own)
        check_model_tokenizer(tok, own, cfg.init_from)
        return tok
    cached = tokenizer_cache_dir(dcfg, cfg.tokenizer_min_freq, cfg.tokenizer_max_vocab)
    if dcfg.use_cache and (cached / "tokenizer.json").is_file():
        return load_tokenizer(cached)
    from tqdm import tqdm

    texts = prepare(dcfg, None).train
    tok = CodeTokenizer.train(tqdm(texts, desc="train tokenizer", unit="text",
                                   disable=not dcfg.progress),
                              min_freq=cfg.tokenizer_min_freq, max_vocab=cfg.tokenizer_max_vocab)
    if dcfg.use_cache:  # the first complete entry stays: another run may be loading it
        with contextlib.suppress(OSError):  # a read-only cache: the tokenizer is used uncached
            publish_cache_entry(cached, tok.save)
    return tok


def same_vocabulary(a: CodeTokenizer | BPETokenizer, b: CodeTokenizer | BPETokenizer) -> bool:
    """Whether every id of ``a`` and ``b`` names the same token."""
    return a.vocab_size == b.vocab_size and all(
        a.id_to_token(i) == b.id_to_token(i) for i in range(a.vocab_size))


# The model_options a model loaded with --init-from takes (its config.json fixes the others).
LOADED_MODEL_OPTIONS = ("attn_dropout", "dropout", "embd_dropout")

# ModelConfig keys the tokenizer sets: model_options may not.
TOKENIZER_MODEL_KEYS = ("vocab_size", "bos_id", "eos_id")


def _check_model_options(options: dict, where: str) -> None:
    """Each key a ModelConfig key the tokenizer does not set, each value of its type."""
    from architecture import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    for key, value in options.items():
        if key not in hints:
            raise ValueError(f"{where}: unknown ModelConfig key {key!r}; "
                             + cliconfig.key_hint(key, hints, "ModelConfig"))
        if key in TOKENIZER_MODEL_KEYS:
            raise ValueError(f"{where}: {key!r} comes from the tokenizer (its vocabulary "
                             "and special tokens); choose the tokenizer instead (--tokenizer, "
                             "--tokenizer-max-vocab)")
        if problem := cliconfig.type_error(hints[key], value):
            raise ValueError(f"{where}: key {key!r} {problem}")


# TrainConfig keys that override a preset's ModelConfig (from-scratch models).
MODEL_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "mlp_hidden", "block_size", "dropout")


def model_config(cfg: TrainConfig, vocab_size: int, bos_id: int | None,
                 eos_id: int | None) -> ModelConfig:
    """Preset + overrides for a from-scratch model (derived sizes re-derived from the new ones)."""
    from architecture import PRESETS, ModelConfig

    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    values = dataclasses.asdict(PRESETS[cfg.preset])
    shape = {k: getattr(cfg, k) for k in MODEL_SHAPE_KEYS if getattr(cfg, k) is not None}
    if "n_head" in shape or "n_embd" in shape:
        values.update(head_dim=None, rotary_dim=None)
    if "n_head" in shape:
        values["n_kv_head"] = None
    _check_model_options(cfg.model_options, "model_options")
    values.update(shape)
    values.update(cfg.model_options)
    values.update(vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id)
    try:
        return ModelConfig(**values)
    except (TypeError, AttributeError, KeyError) as e:  # a malformed value the types let through
        raise ValueError(f"model_options {json.dumps(cfg.model_options)}: {e}") from None


def build_model(cfg: TrainConfig, tok: CodeTokenizer | BPETokenizer,
                run_dir: Path | None = None) -> nn.Module:
    """From scratch or from ``init_from``; then the quantized base and LoRA if asked for (new
    adapters, or ``init_adapter``'s: ``cfg`` as ``with_init_adapter`` fills it in). ``run_dir``:
    the run whose own weights will be loaded into the model (a resume from its checkpoint,
    eval.py's best/): an init_adapter run's LoRA layout then comes from the run's copy of the
    adapter's config (``run_adapter_copy``), with no weights read from the adapter directory."""
    import pretrained
    from architecture import Transformer

    base_dtype = SHORT_DTYPES[cfg.base_dtype]
    if cfg.init_from is not None:
        model = pretrained.load(cfg.init_from, dtype=base_dtype, device="cpu")
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model at "
                             f"{cfg.init_from} only {model.cfg.vocab_size} embeddings")
        if cfg.dropout is not None:  # embeddings and residual branches, as from scratch
            model.cfg.dropout = model.cfg.embd_dropout = cfg.dropout
        for key, value in cfg.model_options.items():  # LOADED_MODEL_OPTIONS: read live
            setattr(model.cfg, key, value)
    else:
        model = Transformer(model_config(cfg, tok.vocab_size, tok.bos_id, tok.eos_id))
        model.to(base_dtype)
    if cfg.lora_r > 0:
        import lora

        if cfg.quantize_bits:
            lora.quantize_base(model, bits=cfg.quantize_bits)
        copy = run_adapter_copy(run_dir) if run_dir is not None else None
        if cfg.init_adapter is not None and copy is not None:  # the weights: the run's own
            lora.apply_adapter_layout(model, copy.parent, copy.name)
        elif cfg.init_adapter is not None:  # its own config (with_init_adapter: cfg agrees)
            if not (Path(cfg.init_adapter) / lora.ADAPTER_CONFIG).is_file():
                where = ("a run starts from the adapter's weights" if run_dir is None else
                         f"{run_dir} holds no copy of it ({INIT_ADAPTER_COPY}: a run of an "
                         "earlier codelm reads the adapter it started from)")
                raise ValueError(
                    f"TrainConfig.init_adapter {cfg.init_adapter}: no {lora.ADAPTER_CONFIG} there; "
                    f"the run's LoRA layout (targets, rank, scaling) is read from there ({where}): "
                    "put that adapter back at this path")
            if changed := lora.changed_base_tensors(model, cfg.init_adapter):
                raise ValueError(
                    f"TrainConfig.init_adapter {cfg.init_adapter}: its {changed[0]} (of "
                    f"{len(changed)} base tensor(s)) differs from the base's, {cfg.init_from}; "
                    "a run keeps only the adapters, so a resume and the export would lose it: "
                    "save the base as the adapter holds it (PEFT: PeftModel.from_pretrained("
                    "base, adapter).unload().save_pretrained(NEW)) and name it with --init-from")
            lora.load_adapter(model, cfg.init_adapter)
        else:
            options = {"target_modules": cfg.lora_targets} if cfg.lora_targets else {}
            lora.apply_lora(model, lora.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha,
                                                   dropout=cfg.lora_dropout, **options))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

OVERFIT_LOSS = 0.05  # "memorised": the --overfit and --overfit-batches target
MAX_SKIPPED_STEPS = 25  # consecutive fp16 overflow skips before the run is declared diverged


@dataclass
class TrainResult:
    run_dir: Path
    best_val_loss: float | None
    step: int
    best_step: int | None = None
    train_loss: float | None = None  # of the last step
    val_metrics: dict | None = None  # of the last evaluation
    interrupted: str | None = None  # the signal that stopped the run (it can be resumed)
    early_stopped: bool = False
    stopped_by_budget: bool = False  # max_time_s ended it before its last step (it can be resumed)
    export_dir: Path | None = None
    sample: str | None = None


STOP_SIGNALS = tuple(sig.name for sig in cliconfig.STOP_SIGNALS)  # SIGINT, SIGTERM, SIGHUP


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP raised out of ``train`` (a signal outside the step loop, or a
    second one), saying what is left: ``resume`` is how to continue the run from its checkpoint, or
    None when it had written none (nothing to resume: the same command starts it again)."""

    def __init__(self, stop: KeyboardInterrupt, resume: str | None):
        super().__init__(*stop.args)  # the signal's name, for cliconfig.interrupted_exit_code
        self.resume = resume


class _StopSignals:
    """SIGINT/SIGTERM/SIGHUP (``cliconfig.STOP_SIGNALS``) ask the loop to checkpoint and end; a
    Ctrl-C after any of them interrupts at once. A SIGTERM or SIGHUP never does: a scheduler's
    stop (Slurm's scancel, ``pkill -f``) reaches a sweep's worker (or a torchrun rank) directly
    and again forwarded by its parent, and its SIGKILL follows anyway; the second one skipped
    the checkpoint the first asked for. A hangup too comes more than once (the kernel's to the
    terminal's foreground processes, the shell's to its jobs), and leaves a terminal that fails
    every write: stdout and stderr leave it first (``cliconfig.leave_terminal_on_hangup``), so
    that no print (an evaluation's line, the stop's message) ends the run before its checkpoint."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in cliconfig.STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # `cmd &` in a script, nohup
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        cliconfig.leave_terminal_on_hangup(signum)
        if self.reason is None:
            self.reason = signal.Signals(signum).name
        elif signum == signal.SIGINT:  # stop now: exit code 130, whatever the first one was
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def restore(self, taken: bool = True) -> None:
        """Put the previous handlers back. A stop the loop did not act on (``taken`` False: it
        came after the loop's last look, or an error left the loop, a sweep's pruned trial) is
        passed on to them, as they would have taken it: else the caller went on (a sweep to its
        next trial, recipes.py to its evaluation) as if it had never come."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.reason is not None and not taken:
            signal.raise_signal(signal.Signals[self.reason])


def _millions(n: int) -> str:
    """0.46M, but 3,072 rather than "0.00M" (a LoRA's trainable count on a small model)."""
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"


def _trim_metrics(path: Path, step: int) -> None:
    """Drop what an interrupted run logged past the step its resume continues from. Atomic: a
    kill mid-write would drop the history up to the checkpoint for good."""
    if path.exists():
        cliconfig.write_atomic(path, "".join(line + "\n" for line in _metrics_up_to(path, step)))


def _metrics_up_to(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to ``step``. A torn last line (a crash or a full disk
    mid-write) is dropped with a warning; any other unreadable line is an error naming it."""
    lines = path.read_bytes().split(b"\n")
    kept = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines):  # no newline after it: the write never finished
                print(f"warning: {path}:{number}: dropping a torn last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a metrics line ({e}); fix or remove it "
                             "to resume") from None
        if record.get("step", 0) <= step:
            kept.append(raw.decode("utf-8"))
    return kept


class _RunLog:
    """metrics.jsonl (one line per log step and per evaluation) and TensorBoard; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        """``resume_step``: the step a resumed run continues from (0 when it had no checkpoint
        yet; None: a new run). What the interrupted run logged past it is dropped."""
        self.enabled, self.run_dir = enabled, run_dir
        self.file = self.tb = None
        self._failed = False  # a write failed (a full disk): its error said so, close stays quiet
        if not enabled:
            return
        path = run_dir / METRICS_FILE  # a resumed run's is trimmed (_trim_metrics)
        if resume_step is None:  # a new run: nothing of an attempt it replaces (_lock_dir)
            path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / TB_DIR),
                                purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        target = self.run_dir / METRICS_FILE
        try:
            self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
            self.file.flush()
            target = self.run_dir / TB_DIR
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        except OSError as e:  # a full disk: write() and TensorBoard name no file
            self._failed = True
            raise OSError(e.errno, e.strerror, str(target)) from None

    def close(self) -> None:
        if self.file is not None:
            file, tb, self.file, self.tb = self.file, self.tb, None, None
            # both; after a failed write, without raising its error again (it would replace
            # the one on its way out, and skip what the caller does after closing)
            quiet = contextlib.suppress(OSError) if self._failed else contextlib.nullcontext()
            try:
                with quiet:
                    file.close()
            finally:
                with quiet:
                    tb.close()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _broadcast(value, dist: Dist):
    if not dist.enabled:
        return value
    import torch.distributed as td

    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value, dist: Dist) -> list:
    if not dist.enabled:
        return [value]
    import torch.distributed as td

    out = [None] * dist.world
    td.all_gather_object(out, value)
    return out


class _RunDirTaken(ValueError):
    """The run directory belongs to another run (running now, or holding weights)."""


def what_next(hint: str, restarts: bool = False) -> str:
    """What a stopped run's user does next: continue it, or run it again (``restarts``)."""
    return f"{'start it again' if restarts else 'continue'} with {hint}"


def lock_holder(lock: Path) -> str | None:
    """Who holds ``lock``, as its run wrote it (``cliconfig.owner_tag``): "process PID on HOST";
    None when unknown or ended (the file keeps the last holder's tag)."""
    try:
        match = re.fullmatch(cliconfig.OWNER_PATTERN, lock.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    if match is None or cliconfig.owner_is_dead(match):
        return None
    return f"process {match['pid']} on {match['host']}"


def lock_is_held(lock: Path) -> bool:
    """Whether a live run holds ``lock`` (a run directory's LOCK_FILE)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without locks: nothing to tell
        return False
    finally:
        os.close(fd)


def _failed_before_weights(run_dir: Path) -> bool:
    """Whether a directory holds only a codelm run that stopped before writing any weights: its
    config.json reads as a TrainConfig, and there is no weights file anywhere in it."""
    try:
        config_from_dict(cliconfig.read_json_object(run_dir / CONFIG_FILE, "run config"))
    except (ValueError, OSError):
        return False
    weights = (p for p in run_dir.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    return not _holds_weights(run_dir) and next(weights, None) is None


def _holds_weights(run_dir: Path) -> bool:
    """Whether a run directory holds trained weights (a checkpoint, best/ or export/): a new
    run may replace one without them, and a resumed one without them starts from scratch (one
    with weights but no checkpoint is refused: ``no_checkpoint_to_resume``)."""
    return bool(list_checkpoints(run_dir)) or any((run_dir / d).is_dir()
                                                  for d in (BEST_DIR, EXPORT_DIR))


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a codelm run directory that got as far as weights (its CONFIG_FILE,
    and a checkpoint, best/ or export/): eval loads such a directory as a run, and training
    reads the same weights rule (``_holds_weights``) to decide what a new run may replace."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and _holds_weights(path)


def no_checkpoint_to_resume(run_dir: Path) -> str:
    """Why ``--resume`` refuses a run that holds weights (best/, export/) but no checkpoint
    (e.g. checkpoints/ deleted to free disk): starting it again would overwrite them."""
    return f"--resume {run_dir}: it {_holds_no_checkpoint(run_dir)}"


def no_weights_yet(run_dir: Path) -> str | None:
    """Why a run directory holding no weights (no checkpoint, best/ or export/) has no model to
    load: its run is still training towards its first checkpoint, or stopped before one (eval
    read its config.json as an HF checkpoint's); None for any other directory."""
    if not (run_dir / CONFIG_FILE).is_file() or not _failed_before_weights(run_dir):
        return None
    lock = run_dir / LOCK_FILE
    if lock_is_held(lock):
        return (f"{run_dir}: a run still training ({lock_holder(lock) or 'another process'}) "
                "that has saved no checkpoint yet: nothing to score before its first one")
    return (f"{run_dir}: a run that stopped before its first checkpoint: no weights to score; "
            f"--resume {run_dir} starts it again")


def _holds_no_checkpoint(run_dir: Path) -> str:
    """What such a run holds, and a way on from those weights, or a new run."""
    held = []
    if (run_dir / BEST_DIR).is_dir():
        step = None
        with contextlib.suppress(ValueError, OSError):
            step = best_step(run_dir)
        held.append("best/" + (f" (step {step})" if step is not None else ""))
    if (run_dir / EXPORT_DIR).is_dir():
        held.append("export/")
    loadable = next((d for d in (run_dir / EXPORT_DIR, run_dir / EXPORT_DIR / MERGED_DIR)
                     if (d / HF_CONFIG).is_file()), None)
    how = (f"train on from them in a new run (another --name, with --init-from {loadable}), or "
           "start over under another --name" if loadable else "start over under another --name")
    return f"holds {' and '.join(held)} but no checkpoint to continue from; {how}"


def check_lora_export(cfg: TrainConfig, model: nn.Module,
                      where_set: Callable[[str], str] = cliconfig.flag_of) -> None:
    """Refuse, before training, an export that would merge a LoRA into a tied weight (the
    merge would change the head too, so it fails at the end of the run and loses the export);
    the error names where each setting was set (``where_set``, as ``train`` takes it)."""
    merges = cfg.export and cfg.lora_r > 0 and cfg.export_merged
    import lora

    tied = lora.tied_targets(model) if merges else {}
    if not tied:
        return
    path, names = next(iter(tied.items()))
    raise ValueError(
        f"{setting(cfg, 'export_merged', where_set)} writes the merged model, but the LoRA "
        f"target {path} ({setting(cfg, 'lora_targets', where_set)}) cannot be merged: its "
        f"weight is tied to {names}, so merging would change both. Drop it from lora_targets, "
        f"or train with {cliconfig.off_switch('export_merged', where_set)}.")


class _Run:
    """Everything one call of ``train`` builds and owns. Rank 0 holds a lock on the run directory
    from the start until ``release`` (``train`` calls it), so two runs never share one."""

    def __init__(self, cfg: TrainConfig, dist: Dist, resume_hint: str | None = None,
                 restarts: bool = False, where_set: Callable[[str], str] = cliconfig.flag_of):
        cfg = with_init_adapter(cfg, where_set=where_set)
        validate_config(cfg, where_set)
        self.cfg, self.dist = cfg, dist
        self.main = dist.main
        self._resume_hint, self._restarts = resume_hint, restarts
        self._where_set = where_set
        self._lock: int | None = None
        self._wrote_tokenizer = False  # WRITTEN_BEFORE_CONFIG are this run's (_drop_unused_dir)
        try:
            self._build()
        except BaseException as e:
            self._drop_unused_dir()
            self.release()
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, RunInterrupted):
                raise self.interrupted(e) from None
            raise

    def interrupted(self, stop: KeyboardInterrupt) -> RunInterrupted:
        """``stop`` saying whether a checkpoint of this run is there to continue from (never for
        a run that ``restarts``)."""
        run_dir = getattr(self, "run_dir", None)
        saved = run_dir is not None and bool(list_checkpoints(run_dir))
        return RunInterrupted(stop, self.resume_hint(run_dir) if saved and not self._restarts
                              else None)

    def _drop_unused_dir(self) -> None:
        """A run that failed or was stopped before its config.json (a bad path or setting, a
        Ctrl-C while the data is prepared) leaves no directory behind: only its lock file and
        tokenizer are there, removed while the lock is still held."""
        run_dir = getattr(self, "run_dir", None)
        if self._lock is None or run_dir is None:
            return
        ours = {LOCK_FILE, *(WRITTEN_BEFORE_CONFIG if self._wrote_tokenizer else ())}
        with contextlib.suppress(OSError):
            names = {p.name for p in run_dir.iterdir()}
            if LOCK_FILE in names and names <= ours:  # never a user's own files
                for name in sorted(names - {LOCK_FILE}) + [LOCK_FILE]:
                    (run_dir / name).unlink()
                run_dir.rmdir()

    def _build(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.device = resolve_device(cfg, dist)
        self.run_dir, self.has_weights = self._claim_run_dir()
        if cfg.resume and self.has_weights and not list_checkpoints(self.run_dir):
            raise ValueError(no_checkpoint_to_resume(self.run_dir))
        # A run with weights continues them in its own settings (its paths as it saved them, the
        # same files); one without (it stopped before its first checkpoint) starts from the
        # beginning anyway, so it may change any of them. A new run saves its paths absolute.
        saved = None
        if cfg.resume and self.has_weights:
            saved = check_resume_config(cfg, self.run_dir, self.resume_hint(self.run_dir))
        self._trained_precision = saved.get("precision") if saved else None  # the setting
        if saved is None:
            cfg = with_absolute_paths(cfg)
        else:
            cfg = dataclasses.replace(cfg, **{k: saved[k] for k in PATH_KEYS if k in saved})
        self.cfg = cfg
        checkpoints = list_checkpoints(self.run_dir) if cfg.resume else []
        if cfg.resume and not checkpoints and self.main:
            print(f"{self.run_dir}: no checkpoint yet; starting the run from the beginning")

        # Tokenizer and data: rank 0 fills the caches, the others read them.
        from dataset import prepare
        from tokenizer import load_tokenizer

        block = cfg.block_size or self._default_block_size()
        self.dcfg = data_config(cfg, block)
        if self.dcfg.use_cache:
            from dataset import make_cache_dir

            make_cache_dir(self.dcfg.cache_dir, "data_options.cache_dir"
                           if "cache_dir" in cfg.data_options else None)
        saved_tok = self.run_dir / "tokenizer.json"
        # Only a run continued from its weights reads the run's tokenizer.json: a new run (or one
        # with no weights yet) uses the tokenizer its config asks for, never a failed attempt's.
        own_tok = bool(cfg.resume) and self.has_weights and saved_tok.is_file()
        with _main_first(dist):
            if self.main and not own_tok:
                self.tok = load_or_train_tokenizer(cfg, self.dcfg)
            else:  # the run's own, or rank 0's just written
                self.tok = load_tokenizer(saved_tok)
            data = prepare(self.dcfg, self.tok)
            if self.main and not own_tok:  # once the data is known good
                self._wrote_tokenizer = True
                self.tok.save(self.run_dir)
        self.train_set, self.val_set = data.train, data.val
        # What the checkpoints record of the data, so that a resume can say it changed.
        self.data_id = {"entry": data.cache_path.name if data.cache_path else None,
                        "train_examples": len(self.train_set)}
        if len(self.val_set) == 0:
            raise ValueError(f"the validation split of {self.dcfg.sources} is empty: add data or "
                             f"raise val_frac of data_options ({self._where_set('data_options')})")
        for split, examples in (("train", self.train_set), ("val", self.val_set)):
            check_next_token_labels(examples, split)
        if self.main and cfg.val_data and not cfg.test_data and len(data.test):
            whole = round(self.dcfg.train_frac + self.dcfg.test_frac, 6)
            print(f"note: --val-data validates, and --data still holds out test_frac "
                  f"{self.dcfg.test_frac:g} of itself as the test split (eval.py's default), "
                  f"untrained; --data-options '{{\"train_frac\": {whole:g}, \"test_frac\": 0}}' "
                  "trains on all of it", file=sys.stderr)
        if cfg.overfit_batches:
            self._restrict_to_overfit_batches()

        seed_everything(cfg.seed)
        # Continued from a checkpoint, an init_adapter run rebuilds its LoRA layout from its own
        # copy of the adapter's config (when it has one); else from the adapter directory, whose
        # config the run then keeps beside its config.json.
        rebuilt = self.run_dir if checkpoints else None
        model = build_model(cfg, self.tok, rebuilt)
        adapter_config = None
        if cfg.init_adapter is not None and self.main and not (
                rebuilt and run_adapter_copy(rebuilt)):
            import lora

            adapter_config = (Path(cfg.init_adapter) / lora.ADAPTER_CONFIG).read_bytes()
        check_lora_export(cfg, model, self._where_set)
        if dist.enabled:  # same init everywhere, but each rank its own dropout stream
            seed_everything(cfg.seed + dist.rank)
        # Under LoRA on a pretrained base, checkpoints hold only the adapter (the base is on disk).
        self.trainable_only = cfg.lora_r > 0 and cfg.init_from is not None
        self.max_steps = self._max_steps()
        self.trainer = Trainer(model, cfg, self.device, dist, self.max_steps,
                               self._where_set)
        self.order = BatchOrder(len(self.train_set), cfg.batch_size, dist, cfg.seed,
                                setting(cfg, "batch_size", self._where_set))
        self.step = 0
        self.tokens_seen = 0
        self.train_loss: float | None = None  # of the last step
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.stop_ref: float | None = None  # early stopping's reference: the last counted fall
        self.evals_since_best = 0  # evaluations since stop_ref was set
        self.last_eval_step = -1
        self.last_saved_step = -1
        if checkpoints:
            self._restore_latest(checkpoints)
        self.config_dict = {**dataclasses.asdict(cfg), "name": self.run_dir.name, "resume": None}
        with _main_first(self.dist):
            if self.main:
                if cfg.resume:  # first: a damaged log refuses the resume before any rewrite
                    _trim_metrics(self.run_dir / METRICS_FILE, self.step)
                # Atomic: a kill mid-write must not leave a run that no command can continue;
                # the adapter's config first, so that a config.json naming it finds it there.
                files = {} if adapter_config is None else {
                    self.run_dir / INIT_ADAPTER_COPY: adapter_config}
                cliconfig.write_atomic_files({**files, self.run_dir / CONFIG_FILE:
                                              json.dumps(self.config_dict, indent=1)})

    def release(self) -> None:
        """Give up the run directory's lock (the process's end does too)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- set-up helpers ---------------------------------------------------------------------

    def resume_hint(self, run_dir: Path) -> str:
        """How the caller's command line continues this run ("continue it with ...")."""
        return self._resume_hint or f"--resume {run_dir}"

    def _what_next(self) -> str:
        return what_next(self.resume_hint(self.run_dir), self._restarts)

    def _claim_run_dir(self) -> tuple[Path, bool]:
        """Rank 0 claims the run directory; every rank learns it and whether it holds weights."""
        claimed: tuple[str, bool, str | None] = ("", False, None)
        if self.main:
            try:
                run_dir = self._claim()
                claimed = (str(run_dir), _holds_weights(run_dir), None)
            except ValueError as e:
                claimed = ("", False, str(e))
        path, has_weights, error = _broadcast(claimed, self.dist)
        if error is not None:
            raise ValueError(error)
        return Path(path), has_weights

    def _claim(self) -> Path:
        """The locked run directory: ``--resume``'s, ``--name``'s, or a new default name (a
        suffix -2, -3, ... when runs started in the same second took the first ones)."""
        cfg = self.cfg
        if cfg.resume:
            return self._lock_dir(Path(cfg.resume), new=False)
        if cfg.name:
            return self._lock_dir(Path(cfg.out_dir) / cfg.name, new=True)
        stem = (f"{Path(cfg.init_from).name if cfg.init_from else cfg.preset}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}")
        for n in range(1, 1000):
            try:
                return self._lock_dir(Path(cfg.out_dir) / (f"{stem}-{n}" if n > 1 else stem),
                                      new=True)
            except _RunDirTaken:
                continue
        raise ValueError(f"{cfg.out_dir}: no free run name {stem}-N; choose one with --name")

    def _lock_dir(self, run_dir: Path, new: bool) -> Path:
        """Create ``run_dir`` and take its exclusive lock (on a file: flock on a directory fails
        on NFS). A new run refuses a directory that holds anything but a codelm run that stopped
        before its first weights (a setting that failed at the start): that one it replaces, so
        the corrected command may reuse the name, and only while it holds the lock (the run
        may be live where there is none)."""
        def taken() -> _RunDirTaken:
            if _holds_weights(run_dir) and not list_checkpoints(run_dir):
                return _RunDirTaken(f"{run_dir} already {_holds_no_checkpoint(run_dir)}")
            return _RunDirTaken(f"{run_dir} already holds a run: continue it with "
                                f"{self.resume_hint(run_dir)}, or choose another --name")

        if (new and (run_dir / CONFIG_FILE).exists() and not (run_dir / LOCK_FILE).exists()
                and not _failed_before_weights(run_dir)):
            raise taken()  # not a codelm run's directory (or an old one): nothing is added to it
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
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock = fd
        except BlockingIOError:
            os.close(fd)
            who = "; ".join(filter(None, [lock_holder(run_dir / LOCK_FILE), "one started in the "
                                          "same second, or with the same --name or --resume"]))
            raise _RunDirTaken(f"{run_dir} is in use by another run ({who}): wait for it to "
                               "end, or choose another --name") from None
        except OSError:  # a filesystem without locks: unguarded, so nothing is replaced
            os.close(fd)
            print(f"warning: {run_dir}: this filesystem cannot lock the run directory; nothing "
                  "stops a second run under this name", file=sys.stderr)
        if self._lock is not None:  # who holds it, for whoever waits for it (lock_holder)
            with contextlib.suppress(OSError):  # a full disk: the lock holds all the same
                os.ftruncate(self._lock, 0)
                os.write(self._lock, f"{cliconfig.owner_tag()}\n".encode())
        clean_partial_writes(run_dir)
        clean_partial_writes(run_dir / CHECKPOINTS_DIR)
        if new and (run_dir / CONFIG_FILE).exists():
            if self._lock is None or not _failed_before_weights(run_dir):
                self.release()
                raise taken()
            print(f"{run_dir}: its run stopped before its first checkpoint; this run replaces it")
        return run_dir

    def _default_block_size(self) -> int:
        if self.cfg.init_from is None:
            from architecture import PRESETS

            preset = PRESETS.get(self.cfg.preset)
            return preset.block_size if preset is not None else 256
        config = cliconfig.read_json_object(Path(self.cfg.init_from) / HF_CONFIG, "model config")
        context = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx")
                        if k in config), 1024)
        return min(int(context), 1024)

    def _restrict_to_overfit_batches(self) -> None:
        """K fixed global batches of the real training data; validation is the same examples."""
        from torch.utils.data import Subset

        cfg = self.cfg
        n = cfg.overfit_batches * self._examples_per_step()
        g = torch.Generator().manual_seed(cfg.seed)
        chosen = torch.randperm(len(self.train_set), generator=g)[:n].tolist()
        self.train_set = Subset(self.train_set, chosen)
        self.val_set = self.train_set

    def _window_at_every_token(self) -> bool:
        """lm windows at every start position (stride 1): its items are not examples."""
        return getattr(self.train_set, "stride", None) == 1

    def _train_size(self) -> str:
        if self._window_at_every_token():
            return f"{self.train_set.n_tokens} training tokens"
        return f"{len(self.train_set)} training examples"

    def _epoch_size(self) -> str:
        """One epoch in words (_examples_per_epoch), for the run's first line."""
        n = self._examples_per_epoch()
        if self._window_at_every_token():
            return f"{n} windows of {self.dcfg.block_size} tokens"
        return f"{n} examples"

    def _examples_per_step(self) -> int:
        """Training examples one optimizer step takes, all processes together."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world

    def _examples_per_epoch(self) -> int:
        """What one epoch counts, the one home of that count: ``epochs`` sizes the run by it and
        the logged ``epoch`` divides the examples seen by it. Each training example once; lm
        windows at every start position (stride 1) count n // block_size windows, as many tokens
        as the split holds, not one per start position."""
        n = len(self.train_set)
        if self._window_at_every_token():  # every start position: n / T windows
            n = max(1, n // self.dcfg.block_size)
        return n

    def _epoch(self, step: int) -> float:
        """Epochs trained by the end of optimizer step ``step`` (examples seen over
        _examples_per_epoch), whatever sized the run: a resume continues the same values."""
        return step * self._examples_per_step() / self._examples_per_epoch()

    def _max_steps(self) -> int:
        cfg = self.cfg
        if cfg.epochs is None:
            return cfg.max_steps
        return max(1, math.ceil(cfg.epochs * self._examples_per_epoch()
                                / self._examples_per_step()))

    def _restore_latest(self, checkpoints: list[Path]) -> None:
        """Continue from the newest checkpoint that reads back. A broken one (a full disk, a lost
        file) is renamed broken-step-N, kept for inspection, with a warning; none: an error."""
        errors: list[CorruptCheckpointError] = []
        for path in reversed(checkpoints):
            try:
                self._restore(path)
                break
            except CorruptCheckpointError as e:
                errors.append(e)
                if self.main and path != checkpoints[0]:
                    print(f"warning: {e}; trying the checkpoint before it", file=sys.stderr)
        else:
            raise CorruptCheckpointError("; ".join(map(str, errors)) + ": no intact checkpoint "
                                         "to resume from")
        _barrier(self.dist)  # every rank has read its checkpoint before the broken are moved
        if self.main:
            for path in checkpoints[len(checkpoints) - len(errors):]:
                aside = path.with_name(f"broken-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(path, aside)
                print(f"warning: {path} set aside as {aside.name}", file=sys.stderr)

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.trainer.raw_model, self.trainable_only)
        writers, cfg = len(state["rng"]), self.cfg
        if writers != self.dist.world:  # one RNG state per process
            per_process = cfg.batch_size * cfg.grad_accum
            raise ValueError(
                f"{path} was written by {writers} process(es), this run has {self.dist.world}: "
                f"its global batch (batch_size x grad_accum x processes) would change from "
                f"{per_process * writers} to {per_process * self.dist.world} examples a step, "
                f"and its random streams could not continue; resume it on {writers} "
                "process(es)")
        self._check_precision(path, state["progress"])
        self.trainer.load_state_dict(state)
        progress = state["progress"]
        self.order.load_state_dict(progress["order"])
        self.step = progress["step"]
        self.tokens_seen = progress["tokens_seen"]
        self.best_val_loss = progress["best_val_loss"]
        self.best_step = progress["best_step"]
        self.evals_since_best = progress["evals_since_best"]
        self.last_eval_step = progress["last_eval_step"]
        self.train_loss = progress.get("train_loss")  # absent from older checkpoints
        self.stop_ref = progress.get("stop_ref", self.best_val_loss)  # likewise
        self.last_saved_step = self.step
        set_rng_state(_python_state_to_tuple(state["rng"][self.dist.rank]), self.device)
        self._check_length()
        if self.main:
            print(f"resumed {self.run_dir} from {path.name} (step {self.step})")
            planned = progress.get("max_steps")  # absent from older checkpoints
            if planned is not None and planned != self.max_steps:
                print(f"note: the run planned {planned} steps and now runs {self.max_steps}: "
                      f"its learning-rate schedule is planned anew over {self.max_steps} steps "
                      f"from step {self.step} on")
            self._note_other_data(progress.get("data"))  # absent from older checkpoints

    def _note_other_data(self, trained: dict | None) -> None:
        """Say so when the data was built anew, other than the checkpoint's: the sources' files
        changed, or codelm's encoding did (``tokenizer.ENCODING_VERSION``, a task's cut rule),
        which the run's settings cannot show. It continues on the new data, not bit-exactly."""
        if trained is None:
            return
        now = self.data_id
        differ = [f"{key} {trained.get(key)} -> {now[key]}" for key in now
                  if None not in (trained.get(key), now[key]) and trained.get(key) != now[key]]
        if differ:
            print(f"warning: the training data is not the one {self.run_dir.name} trained on "
                  f"({'; '.join(differ)}): its files, or codelm's encoding of them, changed since. "
                  "The run continues on the new data, so this resume is not bit-exact; start a "
                  "new run to compare runs exactly", file=sys.stderr)

    def _check_precision(self, path: Path, progress: dict) -> None:
        """A resume computes in the precision its run trained in (precision is not one of
        RESUME_MAY_CHANGE): "auto" resolved on another device (a bf16 run resumed on a T4 or on
        the CPU) would switch it silently. --precision X may pin the precision "auto" gave."""
        cfg, now = self.cfg, self.trainer.precision
        trained = progress.get("precision")
        if trained is None:  # an earlier codelm's checkpoint: only its setting is known
            if self._trained_precision in (None, cfg.precision):
                return
            raise ValueError(f"{path}: the run was trained with precision="
                             f"{self._trained_precision!r} (now {cfg.precision!r}) and its "
                             "checkpoint does not record what that computed in: a resume keeps "
                             f"the run's precision; drop --precision {cfg.precision}")
        if trained == now:
            return
        keep = f"Pass --precision {trained} to keep it on {self.device}"
        if trained == "bf16" and lacks_native_bf16(self.device):
            keep = ("This GPU has no native bf16: resume on one that has, or on the CPU with "
                    "--precision bf16")
        raise ValueError(
            f"{path}: the run trained in {trained}, but --precision {cfg.precision} computes in "
            f"{now} on {self.device}: a resume keeps the precision its run trained in. {keep}, "
            f"or resume where --precision auto gives {trained} (bf16 on GPUs with native bf16, "
            "fp16 on older ones, fp32 on the CPU); a change of precision needs a new run "
            "(another --name)")

    def _check_length(self) -> None:
        """A resume can only extend its run: a length below the checkpoint's step trained
        nothing, yet config.json recorded it as the run's (refused before any write)."""
        cfg = self.cfg
        if self.step <= self.max_steps:
            return
        if cfg.epochs is None:
            raise ValueError(f"{setting(cfg, 'max_steps', self._where_set)}: below the step of "
                             f"the checkpoint it resumes from ({self.step}); a resume can only "
                             f"extend its run: set max_steps to {self.step} or more")
        raise ValueError(f"{setting(cfg, 'epochs', self._where_set)}: {self.max_steps} step(s), "
                         f"below the step of the checkpoint it resumes from ({self.step}); a "
                         "resume can only extend its run: set a larger epochs")

    # -- data --------------------------------------------------------------------------------

    def _collate(self, examples: list[dict]) -> dict:
        from dataset import collate

        return collate(examples, self.tok.pad_id)

    def _next_micro_batches(self) -> tuple[list[dict], tuple[int, int]]:
        micro, where = [], None
        for _ in range(self.cfg.grad_accum):
            indices, position = self.order.next()
            where = where or position
            micro.append(self._collate([self.train_set[i] for i in indices]))
        return micro, where

    def _val_batches(self) -> tuple[Iterator[dict], int]:
        """This rank's share of the validation batches (the same examples at every evaluation),
        and how many there are."""
        cfg, world = self.cfg, self.dist.world
        n = len(self.val_set)
        if cfg.eval_examples is not None:
            n = min(n, cfg.eval_examples)
        step = cfg.batch_size
        starts = range(0, n, step)[self.dist.rank::world]
        batches = (self._collate([self.val_set[i] for i in range(start, min(start + step, n))])
                   for start in starts)
        return batches, len(starts)

    # -- checkpoints -------------------------------------------------------------------------

    def _progress(self) -> dict:
        return {
            "step": self.step,
            "order": self.order.state_dict(),
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "last_eval_step": self.last_eval_step,
            "train_loss": self.train_loss,
            "stop_ref": self.stop_ref,
            "precision": self.trainer.precision,  # what "auto" resolved to (_check_precision)
            "max_steps": self.max_steps,  # the schedule's length, for a resume that changes it
            "data": self.data_id,  # the data it trained on, for a resume on other data
        }

    def save(self) -> None:
        """Checkpoint this step (collective: every rank contributes its RNG state)."""
        rng = _gather(rng_state(self.device), self.dist)
        with _main_first(self.dist):  # the others wait for the write, and stop if it fails
            if self.main:
                root = self.run_dir / CHECKPOINTS_DIR
                root.mkdir(exist_ok=True)
                save_checkpoint(root / f"{CHECKPOINT_PREFIX}{self.step}", self.trainer.raw_model,
                                self.trainer.state_dict(), rng, self._progress(),
                                self.config_dict, self.trainable_only)
                for old in list_checkpoints(self.run_dir)[:-self.cfg.keep_last]:
                    # renamed first: a kill mid-removal leaves a partial write, which the next
                    # start removes, not a step-N without its weights
                    doomed = cliconfig.partial_path(old, "tmp")
                    old.rename(doomed)
                    shutil.rmtree(doomed)
        self.last_saved_step = self.step

    def _save_best(self, metrics: dict) -> None:
        with _main_first(self.dist):
            if self.main:
                self._write_best(metrics)

    def _write_best(self, metrics: dict) -> None:
        tensors = model_tensors(self.trainer.raw_model, self.trainable_only)
        name = ADAPTER_FILE if self.trainable_only else MODEL_FILE

        def write(tmp: Path) -> None:
            save_file(tensors, tmp / name, metadata={"step": str(self.step)})
            (tmp / BEST_METRICS).write_text(json.dumps({"step": self.step, **metrics}))
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config_dict, indent=1))

        write_dir_atomically(self.run_dir / BEST_DIR, write)

    # -- the loop ----------------------------------------------------------------------------

    def _nonfinite(self, stats: StepStats, where: tuple[int, int], log: _RunLog) -> None:
        cfg = self.cfg
        step = self.step + 1
        shuffle, pos = where  # BatchOrder's pass: for lm windows at every token, not the epoch
        value = stats.loss if stats.nonfinite == "loss" else stats.grad_norm
        span = self._examples_per_step()
        causes = [
            f"the learning rate is too high (lr at this step {stats.lr:.3g}, peak "
            f"{cfg.lr:.3g}): lower lr or lengthen warmup_steps",
            "fp16 overflow: train with precision bf16 or fp32"
            if self.trainer.precision == "fp16" else
            "exploding activations or gradients: keep grad_clip > 0, check the init",
            "non-finite weights: a checkpoint (init_from, resume) holding inf/NaN",
            "a model bug producing inf/NaN (attention mask, dtype casts, division by zero)",
        ]
        if cfg.inject_nan_at_step == step:
            causes.insert(0, "injected on purpose: inject_nan_at_step is set")
        last = list_checkpoints(self.run_dir)
        # A resume replays the same steps bit-exactly and keeps lr, warmup and precision: say so.
        # (--resume, not a caller's resume hint: a sweep continues interrupted trials only.)
        if last:
            kept = (f"the last good checkpoint is {last[-1]}: --resume {self.run_dir} "
                    "replays the same steps from there, so it helps only once the cause is gone "
                    "(bad data fixed, a NaN injected on purpose); a change of --lr, "
                    "--warmup-steps or --precision needs a new run (another --name)")
        elif _holds_weights(self.run_dir):
            kept = ("no checkpoint had been written yet: start a new run with the changes "
                    "(another --name)")
        else:
            kept = ("no checkpoint had been written yet: run the command again with the changes "
                    "(the same --name starts the run anew)")
        diagnosis = (
            f"non-finite {stats.nonfinite} ({value}) at step {step}: epoch "
            f"{self._epoch(step):.3g}, training examples {pos}..{pos + span - 1} of shuffled "
            f"pass {shuffle} of the training data ({cfg.grad_accum} "
            f"micro-batch(es) of {cfg.batch_size} x {self.dist.world} process(es)); the update was "
            f"not applied and the run stopped. Likely causes: " + "; ".join(causes) + "."
        )
        message = f"{diagnosis} {kept}."
        log.write(step, "error", {"message": message})
        raise NonFiniteLossError(message, step, diagnosis)

    def _evaluate(self, log: _RunLog, on_eval) -> dict:
        metrics = self.trainer.evaluate(*self._val_batches())
        self.last_eval_step = self.step
        loss = metrics["val_loss"]
        # Early stopping counts from the last fall larger than min_delta (as Keras and Lightning
        # do), so falls each smaller than min_delta still add up; best/ follows every new minimum.
        if self.stop_ref is None or loss < self.stop_ref - self.cfg.early_stop_min_delta:
            self.stop_ref, self.evals_since_best = loss, 0
        else:
            self.evals_since_best += 1
        improved = self.best_val_loss is None or loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = loss, self.step
        log.write(self.step, "val", {**metrics, "best_val_loss": self.best_val_loss,
                                     "epoch": self._epoch(self.step)})
        if improved:
            # Never best/ without a checkpoint: a kill between them would leave a run that
            # holds weights but nothing to resume from, which no command continues.
            if self.last_saved_step < 0:
                self.save()
            self._save_best(metrics)
        if on_eval is not None:
            on_eval(self.step, dict(metrics))
        return metrics

    def _stop_requested(self, signals: _StopSignals, started: float | None = None) -> str | None:
        """Why every rank stops now (a collective call): a signal any rank received, or the
        time budget counted from ``started`` (None: signals only), else None."""
        cfg = self.cfg
        over_time = (started is not None and cfg.max_time_s is not None
                     and time.perf_counter() - started > cfg.max_time_s)
        flags = torch.tensor([signals.reason is not None, over_time], dtype=torch.float32,
                             device=self.device)
        flags = _all_reduce_sum(flags, self.dist).tolist()
        if flags[0]:
            return signals.reason or "SIGTERM"
        return "time budget" if flags[1] else None

    def _log_step(self, log: _RunLog, bar, stats: StepStats, tok_s: float) -> None:
        """The train line of this step (metrics.jsonl, TensorBoard) and the progress bar's."""
        epoch = self._epoch(self.step)
        values = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": tok_s, "tokens_seen": self.tokens_seen,
                  "memory_mb": _memory_mb(self.device), "epoch": epoch}
        if self.trainer.scaler.is_enabled():
            values["loss_scale"] = self.trainer.scaler.get_scale()
        log.write(self.step, "train", values)
        bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}",
                        tok_s=f"{tok_s:.0f}", refresh=False)

    def _out_of_patience(self) -> bool:
        """Whether early stopping ends the run: patience evaluations without a counted fall."""
        patience = self.cfg.early_stop_patience
        return bool(patience) and self.evals_since_best >= patience

    def execute(self, on_eval) -> TrainResult:
        cfg, trainer = self.cfg, self.trainer
        log = _RunLog(self.run_dir, self.main, self.step if cfg.resume else None)
        signals = _StopSignals()
        result = TrainResult(self.run_dir, self.best_val_loss, self.step)
        from tqdm import tqdm

        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.main and cfg.progress), dynamic_ncols=True)
        save_every = cfg.save_every or cfg.eval_every
        started = window_start = time.perf_counter()
        window_tokens, skipped_in_a_row, stop = 0, 0, None
        metrics: dict | None = None
        try:
            if self.main:
                n_params = sum(p.numel() for p in trainer.raw_model.parameters())
                n_train = sum(p.numel() for p in trainer.params)
                print(f"run {self.run_dir}: {_millions(n_params)} parameters "
                      f"({_millions(n_train)} trainable), {self._train_size()}, "
                      f"{self.max_steps} steps ({self._epoch(self.max_steps):.3g} epochs of "
                      f"{self._epoch_size()}), "
                      f"{trainer.precision} on {self.device}"
                      + (f" x {self.dist.world} processes" if self.dist.enabled else ""))
                if cfg.warmup_steps >= self.max_steps:
                    length = setting(cfg, "max_steps" if cfg.epochs is None else "epochs",
                                     self._where_set)
                    print(f"warning: {setting(cfg, 'warmup_steps', self._where_set)} >= the "
                          f"run's {self.max_steps} steps ({length}): the learning rate never "
                          f"reaches lr {cfg.lr:g} (nor decays); lower warmup_steps",
                          file=sys.stderr)
                if cfg.compile:
                    print("compiling the model: the first steps (and evaluations) take a while",
                          file=sys.stderr)
                if trainer.precision == "fp16" and self.device.type == "cpu":
                    print("warning: precision fp16 on cpu: most CPUs have no fast fp16 kernels, "
                          "so torch computes it many times slower than fp32; precision auto "
                          "trains in fp32 on cpu (and in fp16 or bf16 on a GPU)", file=sys.stderr)
            # A resume of a run that had stopped early (then was stopped, or killed, before its
            # export) ends there as the run did, not training on until its next evaluation.
            result.early_stopped = self._out_of_patience()
            if result.early_stopped and self.main:
                print(f"the run stopped early at step {self.step} ({self.evals_since_best} "
                      "evaluation(s) without a fall): not trained on; a larger "
                      "--early-stop-patience trains on")
            while self.step < self.max_steps and not result.early_stopped:
                micro, where = self._next_micro_batches()
                stats = trainer.train_step(micro, inject_nan=cfg.inject_nan_at_step == self.step + 1)
                if stats.nonfinite:
                    self._nonfinite(stats, where, log)
                skipped_in_a_row = skipped_in_a_row + 1 if stats.skipped else 0
                if skipped_in_a_row > MAX_SKIPPED_STEPS:
                    stats.nonfinite = "gradient"
                    self._nonfinite(stats, where, log)
                self.step += 1
                self.tokens_seen += stats.tokens
                window_tokens += stats.tokens
                self.train_loss = stats.loss
                bar.update(1)
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                # The run's last step is always logged, as its last point: the final one here,
                # one that stops the run early below.
                logged = self.step % cfg.log_every == 0 or self.step in (1, self.max_steps)
                if logged:
                    self._log_step(log, bar, stats, tok_s)
                    window_start, window_tokens = now, 0
                memorised = cfg.overfit_batches > 0 and stats.loss < OVERFIT_LOSS
                paused = time.perf_counter()  # evaluation and saving are not training time
                if (self.step % cfg.eval_every == 0 and self.step >= cfg.warmup_steps) or (
                        memorised):
                    metrics = self._evaluate(log, on_eval)
                    if self._out_of_patience():
                        result.early_stopped = True
                        if self.main:
                            tqdm.write(f"stopped early at step {self.step} of {self.max_steps}: "
                                       f"{cfg.early_stop_patience} evaluation(s) without a fall "
                                       f"of more than {cfg.early_stop_min_delta:g} "
                                       "(--early-stop-patience, --early-stop-min-delta)")
                stop = self._stop_requested(signals, started)
                ends = bool(stop or result.early_stopped or memorised)
                if ends and not logged:  # after its evaluation's line, if it had one
                    self._log_step(log, bar, stats, tok_s)
                if (self.step % save_every == 0 or ends) and self.last_saved_step != self.step:
                    self.save()
                if ends:
                    break
                window_start += time.perf_counter() - paused
            # The budget ends the run as it would end (evaluation, checkpoint, export of the best
            # weights so far, which eval.py can score now), but says that it is not finished.
            result.stopped_by_budget = stop == "time budget" and self.step < self.max_steps
            if stop not in STOP_SIGNALS:
                evaluated = self.last_eval_step != self.step
                if evaluated:
                    metrics = self._evaluate(log, on_eval)
                # A checkpoint of this step written before its evaluation is written again,
                # holding it (its best, its patience): a resume would evaluate again and forget it.
                if evaluated or self.last_saved_step != self.step:
                    self.save()
                # A stop signal during that evaluation: the checkpoint is saved, skip the export.
                stop = self._stop_requested(signals)
                if cfg.export and stop is None:
                    result.export_dir, result.sample = self._finish()
                    stop = self._stop_requested(signals)
            if stop in STOP_SIGNALS:
                result.interrupted = stop
                if self.main and result.export_dir is not None:
                    print(f"\n{stop}: the run had finished (checkpoint and export at step "
                          f"{self.step}); stopping with the signal's exit code")
                elif self.main and self._restarts:
                    print(f"\n{stop}: stopped at step {self.step}; {self._what_next()}")
                elif self.main:
                    print(f"\n{stop}: checkpoint saved at step {self.step}; {self._what_next()}")
            elif result.stopped_by_budget and self.main:
                saved = "" if self._restarts else "; checkpoint saved"
                exported = ("" if result.export_dir is None else
                            f"; export/ holds its best weights so far (step {self.best_step})")
                print(f"time budget (--max-time-s {cfg.max_time_s:g}) reached at step "
                      f"{self.step}/{self.max_steps}: the run is not finished{saved}{exported}; "
                      f"{self._what_next()}")
        finally:
            bar.close()
            log.close()
            # (a KeyboardInterrupt on its way out is a second Ctrl-C's: that stop is under way)
            signals.restore(taken=result.interrupted is not None
                            or isinstance(sys.exc_info()[1], KeyboardInterrupt))
        result.step, result.best_val_loss, result.best_step, result.train_loss = (
            self.step, self.best_val_loss, self.best_step, self.train_loss)
        result.val_metrics = metrics
        return result

    # -- end of run --------------------------------------------------------------------------

    def _finish(self) -> tuple[Path | None, str | None]:
        """Best weights back in the model, a sample completion, the HF export (rank 0)."""
        model = self.trainer.raw_model
        best = self.run_dir / BEST_DIR / (ADAPTER_FILE if self.trainable_only else MODEL_FILE)
        exported_step = None
        if best.is_file():
            load_model_tensors(model, load_file(best), str(best), self.trainable_only)
            exported_step = best_step(self.run_dir)
        if not self.main:
            return None, None
        sample = sample_completion(model, self.tok, self.cfg.sample_prompt, self.cfg.sample_tokens,
                                   self.cfg.task, self.dcfg.pair_special_tokens)
        print(f"sample completion (greedy, best checkpoint at step {self.best_step}):\n"
              f"{self.cfg.sample_prompt}{sample}")
        export = self.run_dir / EXPORT_DIR

        def write(tmp: Path) -> None:
            import lora
            import pretrained

            cfg = self.cfg
            if cfg.lora_r == 0:
                pretrained.save(model, tmp)
            else:  # on init_from (validate_config): the adapter, naming that base
                base = str(Path(cfg.init_from).resolve())  # as PEFT records it: loadable alone
                lora.save_adapter(model, tmp, base_model_name_or_path=base)
                if cfg.export_merged:  # as `python lora.py` merges: into the base on disk,
                    # in the checkpoint's own dtype (a bf16 base: bf16, not the fp32 training
                    # copy at twice the size; a quantized one: its full precision)
                    merged = pretrained.load(cfg.init_from, dtype="auto", device="cpu")
                    lora.load_adapter(merged, tmp)
                    lora.merge_and_export(merged, tmp / MERGED_DIR)
                    self.tok.save(tmp / MERGED_DIR)
                    copy_hf_companions(cfg, self.tok, tmp / MERGED_DIR, weights=True)
            self.tok.save(tmp)
            copy_hf_companions(cfg, self.tok, tmp, weights=cfg.lora_r == 0)
            # Which best/ it holds: eval.py scores best/ instead once a resume trains past it.
            (tmp / EXPORT_RECORD).write_text(json.dumps({"best_step": exported_step}))

        write_dir_atomically(export, write)
        print(f"exported to {export} (best validation loss {self.best_val_loss:.4f}, "
              f"perplexity {perplexity(self.best_val_loss):.2f})")
        return export, sample


def _holds_runs_tokenizer(directory: str | None, tok: object) -> bool:
    """Whether ``directory``'s tokenizer.json is the run's tokenizer (a BPETokenizer)."""
    from tokenizer import BPETokenizer, tokenizer_path

    if directory is None or not isinstance(tok, BPETokenizer):
        return False
    try:
        return json.loads(tokenizer_path(directory).read_text("utf-8")) == tok.spec
    except (OSError, ValueError):
        return False


def copy_hf_companions(cfg: TrainConfig, tok: object, out: Path, weights: bool) -> None:
    """Give an export what transformers finds beside the checkpoint it came from: the HF
    tokenizer files of the directory the run's tokenizer was read from (``--tokenizer``, else
    ``--init-from``) in place of the roles-only tokenizer_config.json that ``tok.save`` writes,
    when that directory's tokenizer.json is the run's; and, beside full weights (``weights``),
    ``--init-from``'s generation_config.json, when the run kept that checkpoint's tokenizer
    (the file's bos/eos/pad ids are its). The tokenizer_class stays ``tok.save``'s
    PreTrainedTokenizerFast: in a directory without config.json (an adapter) transformers
    builds the class named there, and StarCoder's GPT2Tokenizer then splits digits otherwise
    than its tokenizer.json; a bos/eos/pad role the file leaves out, and codelm guessed, is
    added, as ``tok.save`` writes it."""
    from pretrained import GENERATION_CONFIG, HF_TOKENIZER_FILES
    from tokenizer import tokenizer_path

    source = cfg.tokenizer if cfg.tokenizer is not None else cfg.init_from
    if _holds_runs_tokenizer(source, tok):
        where = tokenizer_path(source).parent
        for name in HF_TOKENIZER_FILES:
            if (where / name).is_file():
                shutil.copyfile(where / name, out / name)
        config = out / HF_TOKENIZER_FILES[0]
        if (where / config.name).is_file():
            written = json.loads(config.read_text("utf-8"))
            written["tokenizer_class"] = "PreTrainedTokenizerFast"  # tok.save's
            for role in ("bos", "eos", "pad"):  # a role codelm guessed (the run trained with it)
                i = getattr(tok, f"{role}_id")
                if f"{role}_token" not in written and i is not None:
                    written[f"{role}_token"] = tok.id_to_token(i)
            config.write_text(json.dumps(written, ensure_ascii=False, indent=2), "utf-8")
    generation = Path(cfg.init_from) / GENERATION_CONFIG if cfg.init_from is not None else None
    if (weights and generation is not None and generation.is_file()
            and (cfg.tokenizer is None or _holds_runs_tokenizer(cfg.init_from, tok))):
        shutil.copyfile(generation, out / GENERATION_CONFIG)


@torch.no_grad()
def sample_completion(model: nn.Module, tok: CodeTokenizer | BPETokenizer, prompt: str,
                      max_new_tokens: int, task: str, pair_special_tokens: bool = False) -> str:
    """Greedy continuation of ``prompt``, formatted as the run's ``task`` trained on it, its
    special-token text read as the run's pair records read it (``dataset.encode_prompts``; the
    data option ``pair_special_tokens``, which the lm task ignores)."""
    from dataset import encode_prompts, prompt_prefix, reads_special_tokens
    from generation import GenerationConfig, generate
    from tokenizer import decode_generated, generation_eos_ids

    eos = generation_eos_ids(tok, model.cfg.eos_id, model.name_or_path)
    (prompt_ids,) = encode_prompts(tok, [prompt], reads_special_tokens(task, pair_special_tokens))
    ids = prompt_prefix(tok, task) + prompt_ids
    max_new_tokens = min(max_new_tokens, model.cfg.block_size - len(ids))
    if max_new_tokens <= 0:
        return ""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = generate(model, torch.tensor([ids], device=device),
                   GenerationConfig(max_new_tokens, eos_id=eos or None))
    model.train(was_training)
    return decode_generated(tok, [i for i in out[0, len(ids):].tolist() if i not in eos])


def train(cfg: TrainConfig, on_eval: Callable[[int, dict], None] | None = None,
          resume_hint: str | None = None, restarts: bool = False,
          where_set: Callable[[str], str] = cliconfig.flag_of) -> TrainResult:
    """Run (or continue, with ``cfg.resume``) one training run; see the module docstring.

    ``on_eval(step, metrics)`` is called after every evaluation; an exception it raises (e.g.
    ``optuna.TrialPruned``) propagates once the run directory is consistent. Under torchrun this
    joins the process group (gloo on CPU, NCCL on GPU). ``resume_hint`` completes the messages'
    "continue it with ..." in the caller's own terms (default: ``--resume <run dir>``);
    ``restarts``: the caller never continues the run (recipes.py --smoke runs it again from the
    start), so a stop does not point to its checkpoint and ``resume_hint`` says how to start it
    again. ``where_set(key)`` names where the caller's user sets TrainConfig ``key``, for the
    run's advice (default: its flag; a sweep trial's comes from the search space).
    """
    dist, owns_group = _init_distributed(cfg.device)
    try:
        run = _Run(cfg, dist, resume_hint, restarts, where_set)
        try:
            return run.execute(on_eval)
        except KeyboardInterrupt as stop:  # a second Ctrl-C: the step loop's checkpoint is skipped
            raise run.interrupted(stop) from None
        finally:
            run.release()
            del run
    finally:
        if owns_group:
            _leave_group()


def _leave_group() -> None:
    """The run's DDP model sits in reference cycles and holds the group: freed by a late garbage
    collection (at interpreter exit), gloo's threads die with the process half torn down and it
    aborts now and then (SIGABRT, "terminate called without an active exception"). A run that
    failed is held by its error's traceback too (the frames of execute keep the trainer): their
    locals are dropped first, the error itself kept."""
    import torch.distributed as td

    error, seen = sys.exc_info()[1], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    td.destroy_process_group()


# --------------------------------------------------------------------------------------------
# --overfit: the debugging ritual as a command
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def structure_diagnosis(model: nn.Module, vocab_size: int, length: int) -> str | None:
    """Two properties every causal LM has, checked on random ids before any training.

    A model that mixes the samples of a batch (seed 001's transposed batch: (T, B) read as
    (B, T)) or lets later tokens change earlier logits can still drive the training loss down,
    yet it learns nothing usable; both are caught here in milliseconds.
    """
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        t = max(4, min(length, 16))
        x = torch.randint(0, vocab_size, (3, t), generator=g).to(device)
        base = model(x)
        other = x.clone()
        other[0] = torch.randint(0, vocab_size, (t,), generator=g).to(device)
        if not torch.allclose(model(other)[1:], base[1:], atol=1e-5):
            return ("changing one sample of a batch changed the logits of the other samples: the "
                    "model mixes the batch dimension. This is the transposed-batch bug of seed "
                    "001: a (time, batch) tensor read as (batch, time), or attention/normalisation "
                    "over the wrong axis. Check every reshape/transpose between the data and the "
                    "attention.")
        later = x.clone()
        later[:, t // 2:] = torch.randint(0, vocab_size, (3, t - t // 2), generator=g).to(device)
        if not torch.allclose(model(later)[:, :t // 2], base[:, :t // 2], atol=1e-5):
            return ("changing later tokens changed the logits of earlier positions: the model sees "
                    "the future (a missing or wrong causal mask), so the training loss measures "
                    "copying, not prediction.")
        return None
    finally:
        model.train(was_training)


# What --overfit (a small from-scratch model memorising the bundled corpus) makes of each key:
# these it honours (max_steps and lr only when given: its own are 400 and 3e-3), these mean
# nothing without a run directory or validation; any other setting is refused, not dropped.
OVERFIT_HONOURS = ("overfit", "max_steps", "lr", "preset", "n_layer", "n_head", "n_embd",
                   "mlp_hidden", "model_options", "seed", "device", "precision", "progress",
                   "min_lr_ratio", "beta1", "beta2", "adam_eps", "grad_clip")
OVERFIT_IGNORES = ("name", "out_dir", "eval_every", "eval_examples", "eval_precision",
                   "early_stop_patience", "early_stop_min_delta", "log_every", "save_every",
                   "keep_last", "max_time_s", "export", "export_merged", "sample_prompt",
                   "sample_tokens")


def overfit_settings(cfg: TrainConfig, given: set[str]) -> dict:
    """``run_overfit``'s max_steps and lr (the given ones, else its own); a ValueError naming
    every other setting it cannot honour."""
    defaults = TrainConfig()
    refused = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if f.name not in OVERFIT_HONOURS + OVERFIT_IGNORES
               and getattr(cfg, f.name) != getattr(defaults, f.name)]
    if refused:
        raise ValueError(f"--overfit trains a small model from scratch on the bundled corpus, so "
                         f"it cannot honour {', '.join(refused)}. To check that setup, memorise a "
                         "few batches of its own data with --overfit-batches K (without "
                         "--overfit)")
    return {"max_steps": cfg.max_steps if "max_steps" in given else 400,
            "lr": cfg.lr if "lr" in given else 3e-3}


def run_overfit(cfg: TrainConfig, max_steps: int = 400, lr: float = 3e-3) -> tuple[bool, str]:
    """Memorise ``data/overfit`` with the real model, loss and training step; then greedy
    completion of each file's first line must reproduce the file. Returns (passed, report)."""
    from architecture import Transformer
    from dataset import collate
    from generation import GenerationConfig, generate
    from tokenizer import CodeTokenizer, decode_generated

    started = time.perf_counter()
    files = sorted(OVERFIT_CORPUS.glob("*.py"))
    if not files:
        raise ValueError(f"{OVERFIT_CORPUS}: the bundled overfit corpus is missing")
    texts = [f.read_text("utf-8") for f in files]
    tok = CodeTokenizer.train(texts, min_freq=1)
    for f, text in zip(files, texts):
        if tok.decode(tok.encode(text)) != text:
            return False, (f"FAIL: diagnosis: the tokenizer does not round-trip {f.name}; no "
                           "model can reproduce text its tokenizer loses.")
    seqs = [[tok.eos_id, *tok.encode(t), tok.eos_id] for t in texts]
    batch = collate([{"input_ids": torch.tensor(s[:-1]), "labels": torch.tensor(s[1:])}
                     for s in seqs], tok.pad_id)
    block = max(map(len, seqs))  # generation re-creates the whole sequence, final EOS included
    ocfg = dataclasses.replace(
        cfg, n_layer=cfg.n_layer or 2, n_head=cfg.n_head or 4, n_embd=cfg.n_embd or 128,
        mlp_hidden=cfg.mlp_hidden or 256, block_size=block, dropout=0.0, lr=lr,
        warmup_steps=min(20, max_steps // 10), max_steps=max_steps, weight_decay=0.0, grad_accum=1,
        label_smoothing=0.0, lora_r=0, quantize_bits=0, init_from=None, compile=False,
    )
    seed_everything(ocfg.seed)
    model = Transformer(model_config(ocfg, tok.vocab_size, tok.bos_id, tok.eos_id))
    device = resolve_device(ocfg, Dist())
    trainer = Trainer(model, ocfg, device)
    problem = structure_diagnosis(trainer.raw_model, tok.vocab_size, block)
    if problem:
        return False, f"FAIL before training: diagnosis: {problem}"

    from tqdm import tqdm

    losses: list[float] = []
    with tqdm(total=max_steps, desc="overfit", unit="step", disable=not cfg.progress) as bar:
        for _ in range(max_steps):
            stats = trainer.train_step([batch])
            if stats.nonfinite:
                return False, (f"FAIL: diagnosis: non-finite {stats.nonfinite} at step "
                               f"{len(losses) + 1} on a tiny clean corpus: a numerical bug in the "
                               "model or the loss (dtype casts, masking, division by zero).")
            losses.append(stats.loss)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
            if stats.loss < OVERFIT_LOSS:
                break
    steps, first, last = len(losses), losses[0], losses[-1]
    head = (f"{len(files)} files, {tok.vocab_size} tokens vocabulary, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; loss "
            f"{first:.3f} -> {last:.4f} in {steps} steps, {time.perf_counter() - started:.0f} s")
    if last >= OVERFIT_LOSS:
        if last > 0.9 * first:
            why = ("the loss barely moved: gradients do not reach the weights (frozen parameters, "
                   "a detached graph, an optimizer over the wrong parameters, lr 0)")
        elif last < 0.98 * losses[-1 - min(steps - 1, max(2, steps // 4))]:
            # falling over the last quarter: too few steps (max_steps), not a stalled loss
            why = (f"the loss was still falling when its {steps} steps ran out: raise "
                   "--max-steps (--overfit's own is 400)")
        else:
            why = ("the loss fell but stalled above the target: inputs and targets disagree "
                   "(labels shifted twice or not at all, a batch transposed before the loss, "
                   "masking that hides the targets) or the optimisation is broken (lr schedule, "
                   "clipping, accumulation scaling)")
        return False, f"FAIL: {head}; not memorised (target {OVERFIT_LOSS}). Diagnosis: {why}."

    lines = []
    model = trainer.raw_model.eval()
    for f, text, seq in zip(files, texts, seqs):
        first_line = text.split("\n", 1)[0] + "\n"
        prompt = [tok.eos_id, *tok.encode(first_line)]
        out = generate(model, torch.tensor([prompt], device=device),
                       GenerationConfig(len(seq) - len(prompt), eos_id=tok.eos_id))
        generated = [i for i in out[0, len(prompt):].tolist() if i != tok.eos_id]
        completion = first_line + decode_generated(tok, generated)
        if completion != text:
            at = next((i for i, (a, b) in enumerate(zip(completion, text)) if a != b),
                      min(len(completion), len(text)))
            lines.append(f"  {f.name}: differs at character {at}: expected "
                         f"{text[at:at + 30]!r}, generated {completion[at:at + 30]!r}")
    if lines:
        return False, (
            f"FAIL: {head}; the training loss says memorised but greedy completion does not "
            "reproduce the files:\n" + "\n".join(lines) + "\nDiagnosis: training and generation "
            "disagree: the positions or KV cache used by generate differ from the training "
            "forward, the batch layout differs between them (seed 001's transposed batch), or "
            "the tokenizer decodes differently than it encodes.")
    return True, (f"PASS: {head}; greedy completion of each file's first line reproduces all "
                  f"{len(files)} files exactly.")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


# What a user's mistake or a failing run raises: reported as one line, never a traceback.
RUN_ERRORS = (NonFiniteLossError, ValueError, OSError)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def report_run_error(e: Exception) -> int:
    """Print one of RUN_ERRORS as ``error: ...`` (under torchrun every rank meets it: rank 0
    says it for all) and return the exit code: 1 for a diverged run, 2 for a bad setting or an
    unwritable path."""
    if _is_rank_zero():
        print(f"error: {cliconfig.os_error_message(e) if isinstance(e, OSError) else e}",
              file=sys.stderr)
    return 1 if isinstance(e, NonFiniteLossError) else 2


def command_line_sources(argv: Sequence[str] | None
                         ) -> tuple[set[str], set[str], Callable[[str], str]]:
    """The TrainConfig keys typed on the command line, those its ``--config`` file sets (as
    read by parse_config, which checked it), and ``train``'s ``where_set`` of that command line
    (``_where_set_in_run``)."""
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    in_file = set(upgraded(cliconfig.read_config_file(config, "train")[0])) if config else set()
    return set(args), in_file, _where_set_in_run(args, config, in_file, args.get("resume"))


def check_max_steps_flag(cfg: TrainConfig, typed: set[str], source: str,
                         set_prefix: str | None = None) -> None:
    """A typed --max-steps that ``epochs`` overrides would end the run silently elsewhere (a
    resumed epochs run would train nothing and exit 0): refuse it, saying what to do. ``source``
    names where ``epochs`` came from when it was not typed; ``set_prefix`` ("train."): the
    values were typed as recipes.py's ``--set``."""
    if "max_steps" not in typed or cfg.epochs is None:
        return
    if set_prefix is None:
        max_steps, epochs, clear = "--max-steps ", "--epochs", "--epochs none"
    else:
        max_steps = f"--set {set_prefix}max_steps="
        epochs, clear = f"--set {set_prefix}epochs=N", f"--set {set_prefix}epochs=null"
    where = "" if "epochs" in typed else f" (from {source})"
    raise ValueError(f"{max_steps}{cfg.max_steps} has no effect: epochs={cfg.epochs:g}{where} "
                     f"sets the run's length. Change it with {epochs} instead (a resume may "
                     f"change it), or drop it with {clear} to count max_steps")


def interrupted_message(stop: KeyboardInterrupt) -> str:
    """What an interrupt outside the step loop leaves: a checkpoint to resume (the run's own
    directory named), or nothing (before the first checkpoint, or --overfit, which saves none)."""
    if isinstance(stop, RunInterrupted) and stop.resume is not None:
        return f"interrupted; the checkpoints written are kept: continue with {stop.resume}"
    return "interrupted before the first checkpoint: nothing to resume; run the same command again"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with cliconfig.interrupt_on_sigterm():  # outside the step loop: data, tokenizer, export
            cfg = parse_config(argv)
            typed, in_file, where_set = command_line_sources(argv)
            if cfg.overfit:
                passed, report = run_overfit(cfg, **overfit_settings(cfg, typed | in_file))
                print(report)
                return 0 if passed else 1
            check_max_steps_flag(cfg, typed, "the --config file" if "epochs" in in_file
                                 else "the resumed run's config")
            result = train(cfg, where_set=where_set)
    except RankZeroFailed:
        return 2
    except RUN_ERRORS as e:
        return report_run_error(e)
    except KeyboardInterrupt as stop:
        if _is_rank_zero():
            print(interrupted_message(stop), file=sys.stderr)
        return cliconfig.interrupted_exit_code(stop)
    if result.interrupted:
        return cliconfig.interrupted_exit_code(result.interrupted)
    if not _is_rank_zero():  # under torchrun rank 0 reports for all
        return 0
    if cfg.overfit_batches:
        ok = result.train_loss is not None and result.train_loss < OVERFIT_LOSS
        loss = "no loss" if result.train_loss is None else f"loss {result.train_loss:.4f}"
        print(f"{'PASS' if ok else 'FAIL'}: {cfg.overfit_batches} batch(es) of the training data, "
              f"{loss} after {result.step} steps (target {OVERFIT_LOSS})"
              + ("" if ok else ". Diagnosis: not memorised; raise --max-steps or --lr, check the "
                 "data (labels vs inputs) and run --overfit to test the model and training step"))
        return 0 if ok else 1
    if result.best_val_loss is not None:
        print(f"best validation loss {result.best_val_loss:.4f} (perplexity "
              f"{perplexity(result.best_val_loss):.2f}) at step {result.best_step}; run dir "
              f"{result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cliconfig.run_main(main))
