"""Training for codelm: one loop (``train``) for from-scratch, fine-tuning and LoRA runs.

Training and validation share one loss; accumulation weights every micro-batch by its tokens, so
it equals one big batch (and DDP one process); a non-finite loss stops the run naming the last
good checkpoint; checkpoints (checkpoint.py) continue bit-exactly; ``--overfit`` is the debugging
ritual as a command."""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    import process

    process.quiet_start_up_stops()

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import traceback
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as td
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import checkpoint
import lora
import plan
import pretrained
import process
import rundir
import settings
from architecture import IGNORE_INDEX, Transformer, cuda_half_dtype, lacks_native_bf16
from batches import Batches, Where
from build import build_model, check_lora_export, load_or_train_tokenizer
from checkpoint import (
    PATH_KEYS,
    RunState,
    load_model_tensors,
    model_tensors,
    rng_state,
    seed_everything,
    set_rng_state,
    with_absolute_paths,
    write_dir_atomically,
)
from dataset import SamplePrompt
from generation import FUNCTION_STOPS, GenerationConfig, generate, truncate_at_stops
from optim import build_optimizer
from plan import BUDGET_LADDER, MAX_EPOCHS, BudgetClock, Probe, parse_config
from process import progress_bar
from rundir import RunLog, best_step, list_checkpoints
from settings import setting
from trainconfig import (
    TrainConfig,
    build_parser,
    data_config,
    default_block_size,
    has_final_eval,
    model_config,
    overfit_settings,
)

if typing.TYPE_CHECKING:  # annotations only: dataset and tokenizer load where a run needs them
    from torch.utils.data import Dataset

    from dataset import DataConfig
    from tokenizer import BPETokenizer, CodeTokenizer

# Read as trainingmanager.X by eval.py, recipes.py and hyperparam_tune.py.
from checkpoint import RESUME_DATA_OPTIONS_MAY_CHANGE  # noqa: E402,F401,I001
from checkpoint import CorruptCheckpointError, read_state  # noqa: E402,F401
from rundir import checkpoint_step, is_run_dir, lock_holder, lock_is_held  # noqa: E402,F401
from rundir import what_next  # noqa: E402,F401
from plan import validate_config  # noqa: E402,F401
from trainconfig import check_run_name, config_from_dict, load_config_file  # noqa: E402,F401

OVERFIT_CORPUS = settings.bundled("data", "overfit")


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient; ``diagnosis``: the message without its advice on going on."""

    def __init__(self, message: str, step: int | None = None, diagnosis: str | None = None):
        super().__init__(message)
        self.step, self.diagnosis = step, diagnosis or message


# ---- Devices, precision, distributed ----

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
            raise ValueError(f"torchrun started {local_world} processes on {gpus} CUDA device(s): "
                             f"use --nproc_per_node {gpus}, or --device cpu")
        torch.cuda.set_device(dist.local_rank)
    td.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist, True


def resolve_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    """The device a run trains on ("auto": this rank's GPU where there is one, else the CPU)."""
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank)
        if torch.backends.mps.is_available():  # a Mac: say so, a 1B model in fp32 takes days
            print("note: training on the CPU (codelm trains on cpu or cuda, not mps)",
                  file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {cfg.device}: not a device (auto | cpu | cuda | cuda:N)"
                         ) from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, ...: kernels this trainer never ran on
        raise ValueError(f"--device {cfg.device}: training runs on cpu or cuda")
    gpus = torch.cuda.device_count()  # under torchrun each rank takes its own (local_rank)
    if device.type == "cuda" and (0 if dist.enabled else device.index or 0) >= gpus:
        raise ValueError(f"--device {cfg.device}: this machine has {gpus} CUDA device(s)")
    if device.type == "cuda" and dist.enabled:
        return torch.device("cuda", dist.local_rank)
    return device


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_half_dtype(device) == torch.bfloat16 else "fp16"
    return "fp32"


def checked_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.precision`` resolved for ``device``; bf16 on a GPU without it is refused."""
    precision = _resolve_precision(cfg.precision, device)
    if precision == "bf16" and lacks_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{setting(cfg, 'precision')}: this GPU (compute capability "
                         f"{major}.{minor}) has no native bf16: set precision fp16 or fp32")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, torch.bfloat16 if precision == "bf16" else torch.float16)


def _all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


@contextlib.contextmanager
def _main_first(dist: Dist) -> Iterator[None]:
    """Rank 0 does what only it does (caches, checkpoints); if it fails, the others stop too."""
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
    """Raised on the other ranks when rank 0 fails in ``_main_first`` (rank 0 reports it)."""


# ---- Optimisation: AdamW, warmup + decay to a floor, token-weighted accumulation, AMP ----

def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float,
              decay_steps: int | None = None) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then a
    cosine to the end, or (``decay_steps``) the peak held until the last ``decay_steps`` steps
    decay it as 1 - sqrt (warmup-stable-decay: the run's length is free until its decay starts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    if decay_steps is not None:
        progress = max(0.0, (step - (max_steps - decay_steps)) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - math.sqrt(progress))
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def perplexity(loss: float) -> float:
    """exp(loss), capped: a diverged run's finite loss (say 23000) must not overflow math.exp."""
    return math.exp(min(loss, 700.0))


class StepAbandoned(Exception):
    """A stop signal came mid-step: the step was dropped before its update, nothing applied."""


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
                 token_bytes: torch.Tensor | None = None):
        self.cfg, self.device, self.dist = cfg, device, dist or Dist()

        self.precision = checked_precision(cfg, device)
        self.raw_model = model.to(device)
        # each id's UTF-8 bytes: the loss per byte
        self.token_bytes = None if token_bytes is None else token_bytes.to(device)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        assert self.params, "the model has no trainable parameters"
        self.optimizer = build_optimizer(self.raw_model, self.params, cfg)
        # the schedule's length: a budgeted run sets both anew when its decay starts (_retime)
        self.max_steps = max_steps if max_steps is not None else cfg.max_steps
        self.decay_steps = cfg.decay_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, cfg.warmup_steps, self.max_steps, cfg.min_lr_ratio, self.decay_steps))
        # Loss scaling wherever the backward runs in fp16: fp16 autocast, or a frozen fp16 base
        # under LoRA whatever the precision (its small per-token gradients would underflow).
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.precision == "fp16" or cfg.base_dtype == "fp16")
        self.model = self.eval_model = (torch.compile(self.raw_model) if cfg.compile
                                        else self.raw_model)
        # One process alone may drop a step mid-way: a stop is checked before each block's
        # attention and MLP, and once their backward is done.
        self.stop_pending: Callable[[], bool] | None = None  # set during a droppable step
        self.droppable = not self.dist.enabled and not cfg.compile
        if self.droppable:
            for block in getattr(self.raw_model, "blocks", ()):
                block.attn.register_forward_pre_hook(self._check_stop)
                block.mlp.register_forward_pre_hook(self._check_stop)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # Buffers (rotary tables, a quantized base) are alike on every rank and never trained:
            # re-broadcasting them before each forward would send the whole QLoRA base each time.
            self.model = DistributedDataParallel(self.model, device_ids=ids,
                                                 forward_sync_buffers=False)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _check_stop(self, module: nn.Module, args: tuple) -> None:
        """Before a module's forward, and once its backward is done: a pending stop drops the
        step."""
        if self.stop_pending is None:
            return
        self._stop_if_pending()
        hidden = args[0]
        if hidden.requires_grad:  # its gradient is ready once the module's backward is done
            hidden.register_hook(self._stop_if_pending)

    def _stop_if_pending(self, *unused) -> None:
        if self.stop_pending is not None and self.stop_pending():
            raise StepAbandoned

    @contextlib.contextmanager
    def _droppable_step(self, stop_pending: Callable[[], bool] | None) -> Iterator[None]:
        """Within: a stop ``stop_pending`` reports raises StepAbandoned at the next block, and
        the step's gradients are dropped."""
        self.stop_pending = stop_pending if self.droppable else None
        try:
            yield
        except StepAbandoned:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            self.stop_pending = None

    def train_step(self, micro_batches: Sequence[dict], inject_nan: bool = False,
                   stop_pending: Callable[[], bool] | None = None) -> StepStats:
        """One optimizer step over ``micro_batches`` (this rank's share of the global batch). Each
        summed loss is divided by the whole global step's token count, so accumulation (and DDP's
        average, undone by the world-size factor) gives exactly one big batch's gradient. A stop
        that ``stop_pending`` reports mid-step raises StepAbandoned (one process alone)."""
        self.model.train()
        count = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        positions = sum(b["input_ids"].numel() for b in micro_batches)
        n_tokens, n_positions = _all_reduce_sum(
            torch.tensor([float(count), float(positions)], device=self.device), self.dist)
        weight = self.dist.world / n_tokens.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        with self._droppable_step(stop_pending):
            for i, batch in enumerate(micro_batches):
                batch = self._to_device(batch)
                last = i == len(micro_batches) - 1
                # Gradients are averaged across processes once, on the step's last micro-batch.
                sync = (contextlib.nullcontext() if last or not self.dist.enabled
                        else self.model.no_sync())
                with sync:
                    with _autocast(self.device, self.precision):
                        # Right-padded batches need no mask: causal attention never sees padding.
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
        lr = self.optimizer.param_groups[0]["lr"]
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
        """Validation loss, perplexity and token accuracy over all tokens, unsmoothed; with
        ``token_bytes``, bits per byte too (comparable across tokenizers)."""
        batches = progress_bar(batches, total=total, desc="eval", unit="batch", leave=False,
                               enabled=self.dist.main and self.cfg.progress, dynamic_ncols=True)
        model = self.eval_model
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
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
            if self.token_bytes is not None:
                totals[3] += self.token_bytes[labels[labels != IGNORE_INDEX]].sum()
        model.train(was_training)
        loss_sum, n, correct, n_bytes = _all_reduce_sum(totals, self.dist).tolist()
        assert n > 0, "check_next_token_labels found labelled validation tokens"
        loss = loss_sum / n
        metrics = {"val_loss": loss, "val_ppl": perplexity(loss), "val_accuracy": correct / n,
                   "val_tokens": int(n)}
        if n_bytes:
            metrics["val_bpb"] = loss_sum / n_bytes / math.log(2)
        return metrics

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: RunState) -> None:
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        # The saved lr is the saved schedule's; a resume may change its length (max_steps, epochs).
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)


def check_next_token_labels(examples: Dataset, split: str, n: int = 8) -> None:
    """On a split's first examples: every counted label is the next input token, and some count."""
    for i in range(min(n, len(examples))):
        ids, labels = examples[i]["input_ids"], examples[i]["labels"]
        counted = labels[:-1] != IGNORE_INDEX
        if not bool((labels != IGNORE_INDEX).any()) or not torch.equal(
                labels[:-1][counted], ids[1:][counted]):
            raise ValueError(f"{split} example {i}: its labels are not the next input tokens "
                             "(labels[t] must equal input_ids[t + 1]): a data bug")


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


STOP_SIGNALS = tuple(sig.name for sig in process.STOP_SIGNALS)  # SIGINT, SIGTERM, SIGHUP


class RunInterrupted(KeyboardInterrupt):
    """A stop signal raised out of ``train``; ``resume``: how to continue the run, if it can."""

    def __init__(self, stop: KeyboardInterrupt, resume: str | None):
        super().__init__(*stop.args)  # the signal's name, for process.interrupted_exit_code
        self.resume = resume


class _StopSignals:
    """SIGINT/SIGTERM/SIGHUP ask the loop to checkpoint and end; a second Ctrl-C interrupts at
    once, a second SIGTERM or SIGHUP (a scheduler's, sent twice) does not."""

    def __init__(self, mid_step: bool = False) -> None:
        self.reason: str | None = None
        self.mid_step = mid_step  # a stop is acted on inside a step (Trainer.droppable)
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in process.STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # `cmd &` in a script, nohup
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        process.leave_terminal_on_hangup(signum)
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            process.note_stop(self.reason)
            where = ("the next layer's attention or MLP (or the end of an evaluation under "
                     "way)" if self.mid_step else "the end of this step or evaluation")
            message = f"\n{self.reason}: stopping at {where}, then saving a checkpoint\n"
            with contextlib.suppress(OSError):  # to fd 2: a print could land inside another's
                os.write(2, message.encode())
        elif signum == signal.SIGINT:  # stop now: exit code 130, whatever the first one was
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def pending(self) -> bool:
        return self.reason is not None

    def restore(self, taken: bool = True) -> None:
        """Put the previous handlers back; pass them a stop the loop did not act on."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.reason is not None and not taken:
            process.forget_stop()
            signal.raise_signal(signal.Signals[self.reason])


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _broadcast(value, dist: Dist):
    box = [value]
    if dist.enabled:
        td.broadcast_object_list(box, src=0)
    return box[0]


# ---- The run: set up, then the step loop in ``train``, then the end ----

@dataclass
class Run:
    """What setting up ``train`` builds; rank 0 holds the directory's lock until ``train`` ends."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    claimed: rundir.ClaimedDir
    hint: str  # how the caller continues the run ("--resume DIR"), for messages
    restarts: bool  # the caller never continues the run: it starts it again
    tok: CodeTokenizer | BPETokenizer | None = None
    dcfg: DataConfig | None = None
    batches: Batches | None = None
    sample_prompt: SamplePrompt | None = None  # the held-out one data preparation picked
    data_id: dict | None = None  # what the checkpoints record of the data
    trainer: Trainer | None = None
    trainable_only: bool = False  # checkpoints hold only the adapter (LoRA on a pretrained base)
    state: RunState = field(default_factory=RunState)
    last_saved_step: int = -1
    lines: bool = False  # a console line per logged step (no progress bar on a terminal)
    clock: tuple[float, int] = (0.0, 0)  # when, and at which step, this process began training
    created: float = field(default_factory=time.perf_counter)  # a time budget counts from here
    budget_clock: BudgetClock | None = None  # a new budgeted run's, until its decay starts
    tok_s: float = 0.0  # the last logged throughput

    @property
    def run_dir(self) -> Path:
        return self.claimed.path

    @property
    def main(self) -> bool:
        return self.dist.main

    @property
    def max_steps(self) -> int:
        """The run's length as planned (a budgeted run's is fixed when its decay starts)."""
        return self.cfg.max_steps if self.budget_clock else self.trainer.max_steps

    @property
    def config_dict(self) -> dict:
        """The run's config.json."""
        return {**dataclasses.asdict(self.cfg), "name": self.run_dir.name, "resume": None}


def _interrupted(stop: KeyboardInterrupt, run_dir: Path | None, hint: str | None,
                 restarts: bool) -> RunInterrupted:
    """``stop``, saying how to continue the run if it has a checkpoint (and is continued)."""
    saved = run_dir is not None and bool(list_checkpoints(run_dir)) and not restarts
    return RunInterrupted(stop, (hint or f"--resume {run_dir}") if saved else None)


def setup_run(cfg: TrainConfig, dist: Dist, hint: str | None, restarts: bool) -> Run:
    """Claim the run directory, prepare data, model and trainer, restore a resumed checkpoint."""
    created = time.perf_counter()  # a time budget counts from here
    device = resolve_device(cfg, dist)
    probe = partial(_probe, device=device, dist=dist)
    cfg = plan.plan_run(cfg, device.type, dist.enabled, dist.main, probe)
    claimed, has_weights = _claim_run_dir(cfg, dist, hint)
    run = Run(cfg, dist, device, claimed, hint or f"--resume {claimed.path}", restarts,
              created=created)
    try:
        _build(run, has_weights)
    except BaseException as e:
        claimed.drop_if_unused()
        claimed.release()
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, RunInterrupted):
            raise _interrupted(e, claimed.path, hint, restarts) from None
        raise
    return run


def _claim_run_dir(cfg: TrainConfig, dist: Dist, hint: str | None
                   ) -> tuple[rundir.ClaimedDir, bool]:
    """Rank 0 claims the run directory; every rank learns it and whether it holds weights."""
    claimed, answer = None, ("", False, None)
    if dist.main:
        stem = f"{Path(cfg.init_from).name if cfg.init_from else cfg.preset}-{cfg.task}"
        try:
            claimed = rundir.claim(cfg.resume, cfg.out_dir, cfg.name, stem, hint)
            answer = (str(claimed.path), rundir.holds_weights(claimed.path), None)
        except ValueError as e:
            answer = ("", False, str(e))
    path, has_weights, error = _broadcast(answer, dist)
    if error is not None:
        raise ValueError(error)
    return claimed or rundir.ClaimedDir(Path(path)), has_weights


def _build(run: Run, has_weights: bool) -> None:
    cfg = run.cfg
    if cfg.resume and has_weights and not list_checkpoints(run.run_dir):
        raise ValueError(f"--resume {run.run_dir}: it {rundir.holds_no_checkpoint(run.run_dir)}")
    # A run with weights continues in its own settings (and paths); new runs save paths absolute.
    saved = checkpoint.check_resume_config(cfg, run.run_dir, run.hint) if (
        cfg.resume and has_weights) else None
    run.cfg = cfg = with_absolute_paths(cfg) if saved is None else dataclasses.replace(
        cfg, **{k: v for k, v in saved.items()
                if k in PATH_KEYS or checkpoint.unset(k, getattr(cfg, k, None))})
    checkpoints = list_checkpoints(run.run_dir) if cfg.resume else []
    if cfg.resume and not checkpoints and run.main:
        print(f"{run.run_dir}: no checkpoint yet; starting the run from the beginning")
    if not checkpoints:  # a new run: what it leaves unset is chosen here, once
        run.cfg = cfg = plan.with_fallbacks(cfg)
    _prepare_data(run, own_tok=bool(cfg.resume) and has_weights)

    seed_everything(cfg.seed)
    # Continued from a checkpoint, an init_adapter run reads its LoRA layout from its own copy.
    rebuilt = run.run_dir if checkpoints else None
    model = build_model(cfg, run.tok, rebuilt)
    files = {}  # atomic, the adapter's config first: a kill mid-write leaves a run that continues
    if cfg.init_adapter is not None and run.main and not (rebuilt and rundir.adapter_copy(rebuilt)):
        files[run.run_dir / rundir.INIT_ADAPTER_COPY] = (
            Path(cfg.init_adapter) / lora.ADAPTER_CONFIG).read_bytes()
    check_lora_export(cfg, model)
    if run.dist.enabled:  # same init everywhere, but each rank its own dropout stream
        seed_everything(cfg.seed + run.dist.rank)
    run.trainable_only = cfg.lora_r > 0 and cfg.init_from is not None
    _check_step_cost(run, model)
    if cfg.max_steps is None and cfg.epochs is None:  # a new run on a budget: sized here, once
        cfg = run.cfg = _sized_to_budget(run, model)
    max_steps = cfg.max_steps if cfg.epochs is None else run.batches.steps_for(cfg.epochs)
    if run.budget_clock is not None:  # the stable phase lasts until the clock starts the decay
        max_steps = run.budget_clock.last_step
    run.trainer = Trainer(model, cfg, run.device, run.dist, max_steps,
                          torch.tensor(run.tok.token_byte_lengths()))
    run.state = RunState(precision=run.trainer.precision, max_steps=max_steps, data=run.data_id)
    if checkpoints:
        broken = checkpoint.restore_latest(checkpoints, partial(_restore, run), run.main)
        if run.dist.enabled:  # every rank has read its checkpoint before the broken are moved
            td.barrier()
        if run.main:
            checkpoint.set_aside(broken)
    with _main_first(run.dist):
        if run.main:
            if cfg.resume:  # first: a damaged log refuses the resume before any rewrite
                rundir.trim_metrics(run.run_dir / rundir.METRICS_FILE, run.state.step)
            process.write_atomic_files({**files, run.run_dir / rundir.CONFIG_FILE:
                                        json.dumps(run.config_dict, indent=1)})


def _probe(cfg: TrainConfig, device: torch.device, dist: Dist) -> Probe:
    """``cfg``'s model size and training speed here, on random tokens (rank 0's, for all)."""
    vocab = (cfg.tokenizer_max_vocab or 8000) + 262  # a trained CodeTokenizer's, about
    model = Transformer(model_config(cfg, vocab, None, None))
    trainer = Trainer(model, dataclasses.replace(cfg, warmup_steps=0, compile=False), device,
                      max_steps=10**9)
    ids = torch.randint(vocab, (cfg.batch_size, cfg.block_size + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    step_s = plan.seconds_a_step(lambda: trainer.train_step([batch] * cfg.grad_accum), 2.0)
    tokens = cfg.batch_size * cfg.grad_accum * cfg.block_size * dist.world
    params = sum(p.numel() for p in model.parameters())
    return _broadcast(Probe(params, tokens / step_s), dist)


def _check_step_cost(run: Run, model: nn.Module) -> None:
    """Before the first step: refuse one that cannot fit the memory free or the time budget,
    and name one that takes long (rank 0's measure, for all)."""
    cfg, block_size = run.cfg, run.dcfg.block_size
    autocast = partial(_autocast, run.device, checked_precision(cfg, run.device))
    model = model.to(run.device)
    cost = plan.step_cost(model, block_size, cfg.batch_size, cfg.grad_accum, run.device, autocast)
    cost = _broadcast(cost, run.dist)
    budgeted = cfg.max_steps is None and cfg.epochs is None
    seconds_left = _seconds_left(run) if budgeted else None
    warning = plan.check_step_cost(cfg, cost, block_size, plan.free_memory(run.device),
                                   seconds_left)
    if warning and run.main:
        print(warning, file=sys.stderr)


def _sized_to_budget(run: Run, model: nn.Module) -> TrainConfig:
    """``run.cfg`` with max_steps, eval_every and warmup_steps filling what is left of its time
    budget on this machine (plan.fit_budget), in place of the budget: config.json then
    reproduces the run. The decay's start is kept by the clock (run.budget_clock)."""
    cfg = run.cfg
    step_s, eval_s = _broadcast(_time_a_step(run, model), run.dist)
    left = _seconds_left(run)
    data_steps = run.batches.steps_for(MAX_EPOCHS)
    sized, run.budget_clock, _ = plan.fit_budget(cfg, time.perf_counter(), left, step_s, eval_s,
                                                 data_steps)
    if run.main:
        end = ("the decay starts by the clock and is timed then" if run.budget_clock else
               f"{MAX_EPOCHS} epochs of the training data end the run before its budget: more "
               "data, --data, would use the rest")
        print(f"time budget {cfg.time_budget_min:g} min, {left:.0f} s left after setup: "
              f"{step_s:.3f} s a step, {eval_s:.1f} s an evaluation on {run.device.type} -> "
              f"max_steps {sized.max_steps}, eval_every {sized.eval_every}, warmup_steps "
              f"{sized.warmup_steps}, decay_steps {sized.decay_steps} (recorded in config.json; "
              f"{end})")
    return sized


def _retime(run: Run) -> None:
    """A budgeted run at its decay's start (by the clock): the decay takes the steps that fit
    in the time left at the rate measured so far (evaluations included), and config.json
    records the length, which reproduces the run (the lr is the peak's until the decay starts,
    whatever the length)."""
    (since, first_step), s, trainer = run.clock, run.state, run.trainer
    now = time.perf_counter()
    step_s = (now - since) / max(1, s.step - first_step)
    decay = _broadcast(run.budget_clock.decay_steps(s.step, now, step_s), run.dist)
    planned = run.max_steps
    trainer.max_steps, trainer.decay_steps = s.step + decay, decay
    run.cfg = dataclasses.replace(run.cfg, max_steps=trainer.max_steps, decay_steps=decay)
    run.budget_clock = None
    if run.main:
        process.write_atomic_files({run.run_dir / rundir.CONFIG_FILE:
                                    json.dumps(run.config_dict, indent=1)})
        print(f"the decay starts at step {s.step}: {step_s:.3f} s a step so far -> decay_steps "
              f"{decay}, max_steps {trainer.max_steps} (planned {planned}; recorded in "
              "config.json)")


def _decay_due(run: Run) -> bool:
    """Whether a budgeted run's decay starts at this step, by its clock (rank 0's, for all)."""
    clock, s = run.budget_clock, run.state
    if clock is None or s.step == run.clock[1]:  # a decay from the first step keeps its plan
        return False
    return _broadcast(clock.decay_due(s.step, time.perf_counter()), run.dist)


def _seconds_left(run: Run) -> float:
    return run.cfg.time_budget_min * 60 - (time.perf_counter() - run.created)


def _time_a_step(run: Run, model: nn.Module) -> tuple[float, float]:
    """Seconds a step and a whole evaluation take, timed on a copy of the model after three
    warm-up steps; the RNG state is restored, so the run draws what it would have drawn."""
    saved = rng_state(run.device)
    cfg = run.cfg
    probe = Trainer(copy.deepcopy(model), dataclasses.replace(cfg, warmup_steps=0), run.device,
                    run.dist, max_steps=10**9)
    batches = copy.copy(run.batches)  # an order of its own: the run's starts at its beginning
    batches.order = copy.deepcopy(run.batches.order)

    def step() -> None:
        micro_batches, _ = batches.next_step()
        probe.train_step(micro_batches)

    step_s = plan.seconds_a_step(step, min(10.0, cfg.time_budget_min))
    val, n = batches.validation()
    start = time.perf_counter()
    probe.evaluate([next(val)], total=1)
    eval_s = (time.perf_counter() - start) * n
    set_rng_state(saved, run.device)
    return step_s, eval_s


def _prepare_data(run: Run, own_tok: bool) -> None:
    """Tokenizer and data splits: rank 0 fills the caches, the others read them."""
    from dataset import make_cache_dir, prepare
    from tokenizer import load_tokenizer

    cfg = run.cfg
    run.dcfg = data_config(cfg, cfg.block_size or default_block_size(cfg))
    if run.dcfg.use_cache:
        make_cache_dir(run.dcfg.cache_dir, "data_options.cache_dir"
                       if "cache_dir" in cfg.data_options else None)
    saved_tok = run.run_dir / "tokenizer.json"
    own_tok = own_tok and saved_tok.is_file()
    with _main_first(run.dist):
        if run.main and not own_tok:
            run.tok = load_or_train_tokenizer(cfg, run.dcfg)
        else:  # the run's own, or rank 0's just written
            run.tok = load_tokenizer(saved_tok)
        data = prepare(run.dcfg, run.tok)
        if run.main and not own_tok:  # once the data is known good
            run.claimed.wrote_tokenizer = True
            run.tok.save(run.run_dir)
    run.sample_prompt = data.sample_prompt
    run.data_id = {"entry": data.cache_path.name if data.cache_path else None,
                   "train_examples": len(data.train)}
    if len(data.val) == 0:
        raise ValueError(f"the validation split of {run.dcfg.sources} is empty: add data or "
                         "raise val_frac of data_options (--data-options)")
    for split, examples in (("train", data.train), ("val", data.val)):
        check_next_token_labels(examples, split)
    if run.main and cfg.val_data and not cfg.test_data and len(data.test):
        whole = round(run.dcfg.train_frac + run.dcfg.test_frac, 6)
        print(f"note: --data still holds out test_frac {run.dcfg.test_frac:g} as the test split; "
              f"--data-options '{{\"train_frac\": {whole:g}, \"test_frac\": 0}}' trains on all "
              "of it", file=sys.stderr)
    train_set, val_set = data.train, data.val
    if cfg.overfit_batches:  # K fixed global batches; validation is the same examples
        from torch.utils.data import Subset

        generator = torch.Generator().manual_seed(cfg.seed)
        n = cfg.overfit_batches * cfg.batch_size * cfg.grad_accum * run.dist.world
        chosen = torch.randperm(len(train_set), generator=generator)[:n].tolist()
        train_set = val_set = Subset(train_set, chosen)
    run.batches = Batches(train_set, val_set, run.tok.pad_id, cfg.batch_size, cfg.grad_accum,
                          cfg.seed, cfg.eval_examples, run.dist.rank, run.dist.world)


def _restore(run: Run, path: Path) -> None:
    """Continue from checkpoint ``path``: weights, optimizer, RNG, data position, progress."""
    cfg, trainer = run.cfg, run.trainer
    state = checkpoint.load(path, trainer.raw_model, run.trainable_only)
    checkpoint.check_writers(path, len(state.rng), run.dist.world,
                             cfg.batch_size * cfg.grad_accum)
    checkpoint.check_precision(path, state.precision, trainer.precision, cfg.precision, run.device)
    trainer.load_state_dict(state)
    run.batches.order.load_state_dict(state.order)
    set_rng_state(state.rng[run.dist.rank], run.device)
    planned, trained_on = state.max_steps, state.data
    run.state = dataclasses.replace(state, max_steps=run.max_steps, data=run.data_id,
                                    optimizer={}, scheduler={}, scaler={}, rng=[], weights={})
    run.last_saved_step = state.step
    if state.step > run.max_steps:  # validate_config checks max_steps; epochs needs the data
        raise ValueError(f"{setting(cfg, 'epochs')}: {run.max_steps} step(s), below the step of "
                         f"the checkpoint it resumes from ({state.step}): set a larger epochs")
    if run.main:
        print(f"resumed {run.run_dir} from {path.name} (step {state.step})")
        if planned != run.max_steps:
            print(f"note: the run planned {planned} steps and now runs {run.max_steps}: "
                  f"its learning-rate schedule is planned anew over {run.max_steps} steps "
                  f"from step {state.step} on")
        checkpoint.note_other_data(run.run_dir.name, trained_on, run.data_id)


def save_checkpoint(run: Run) -> None:
    """Checkpoint this step (collective: every rank contributes its RNG state)."""
    rng = [rng_state(run.device)] * run.dist.world
    if run.dist.enabled:
        td.all_gather_object(rng, rng[0])
    with _main_first(run.dist):  # the others wait for the write, and stop if it fails
        if run.main:
            state = dataclasses.replace(
                run.state, rng=rng, order=run.batches.order.state_dict(), max_steps=run.max_steps,
                **run.trainer.state_dict(),
                weights=model_tensors(run.trainer.raw_model, run.trainable_only))
            path = run.run_dir / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}{state.step}"
            if bad := checkpoint.first_nonfinite(state):  # never a "last good" checkpoint
                print(f"warning: step {state.step}: {bad} holds inf or NaN: no checkpoint "
                      "written", file=sys.stderr)
            else:
                checkpoint.save(path, state, run.config_dict, run.trainable_only)
                checkpoint.drop_old(run.run_dir, run.cfg.keep_last)
    run.last_saved_step = run.state.step


def _save_best(run: Run, metrics: dict) -> None:
    with _main_first(run.dist):
        if run.main:
            step = run.state.step
            tensors = model_tensors(run.trainer.raw_model, run.trainable_only)
            if bad := checkpoint.nonfinite_tensor(tensors):  # best/ holds finite weights only
                print(f"warning: step {step}: {bad} holds inf or NaN: best/ not written",
                      file=sys.stderr)
                return

            def write(tmp: Path) -> None:
                save_file(tensors, tmp / checkpoint.weights_file(run.trainable_only),
                          metadata={"step": str(step)})
                (tmp / rundir.BEST_METRICS).write_text(json.dumps({"step": step, **metrics}))
                (tmp / rundir.CONFIG_FILE).write_text(json.dumps(run.config_dict, indent=1))

            write_dir_atomically(run.run_dir / rundir.BEST_DIR, write)


def _announce(run: Run) -> None:
    """The run's first line, and the warnings about its settings."""
    cfg, trainer = run.cfg, run.trainer
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    n_train = sum(p.numel() for p in trainer.params)
    batches = run.batches
    n = batches.examples_per_epoch
    if batches.windows_at_every_token:
        size = f"{batches.train.n_tokens} training tokens"
        epoch = f"{n} windows of {run.dcfg.block_size} tokens"
    else:
        size = f"{len(batches.train)} training examples"
        epoch = f"{n} examples"
    print(f"run {run.run_dir}: {plan.millions(n_params)} parameters ({plan.millions(n_train)} "
          f"trainable), {size}, {run.max_steps} steps ({batches.epoch(run.max_steps):.3g} epochs "
          f"of {epoch}), {trainer.precision} on {run.device}"
          + (f" x {run.dist.world} processes" if run.dist.enabled else ""))
    if cfg.warmup_steps >= run.max_steps:
        length = setting(cfg, "max_steps" if cfg.epochs is None else "epochs")
        print(f"warning: {setting(cfg, 'warmup_steps')} >= the run's {run.max_steps} steps "
              f"({length}): the learning rate never reaches lr {cfg.lr:g} (nor decays); lower "
              "warmup_steps", file=sys.stderr)
    if cfg.compile:
        print("compiling the model: the first steps take a while", file=sys.stderr)
    if trainer.precision == "fp16" and run.device.type == "cpu":
        print("warning: precision fp16 on cpu computes many times slower than fp32 (precision "
              "auto)", file=sys.stderr)
    if _out_of_patience(run):  # a resume of a run that had stopped early ends there
        print(f"the run stopped early at step {run.state.step}: not trained on; a larger "
              "--early-stop-patience trains on")


def _log_step(run: Run, log: RunLog, bar, stats: StepStats, tok_s: float) -> None:
    """The train line of this step (metrics.jsonl, TensorBoard) and the progress bar's."""
    epoch = run.batches.epoch(run.state.step)
    values = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
              "tokens_per_s": tok_s, "tokens_seen": run.state.tokens_seen,
              "memory_mb": _memory_mb(run.device), "epoch": epoch}
    if run.trainer.scaler.is_enabled():
        values["loss_scale"] = run.trainer.scaler.get_scale()
    log.write(run.state.step, "train", values)
    bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}",
                    tok_s=f"{tok_s:.0f}", refresh=False)
    run.tok_s = tok_s
    if run.lines:
        print(f"step {run.state.step}/{run.max_steps} | loss {stats.loss:.4f} | lr "
              f"{stats.lr:.2e} | {tok_s:,.0f} tok/s | epoch {epoch:.2f}", flush=True)


def _eval_line(run: Run, metrics: dict) -> str:
    """The console's line of an evaluation: where the run is, how it does, how long it takes."""
    s, (started, first_step) = run.state, run.clock
    elapsed = time.perf_counter() - started
    eta = elapsed / max(s.step - first_step, 1) * (run.max_steps - s.step)
    train = "" if s.train_loss is None else f"train loss {s.train_loss:.4f} | "
    bpb = f" ({metrics['val_bpb']:.3f} bits/byte)" if "val_bpb" in metrics else ""
    return (f"eval step {s.step}/{run.max_steps} | {train}val loss {metrics['val_loss']:.4f}{bpb} | "
            f"ppl {metrics['val_ppl']:.2f} | acc {metrics['val_accuracy']:.3f} | "
            f"{run.tok_s:,.0f} tok/s | elapsed {_duration(elapsed)} | ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _evaluate(run: Run, log: RunLog, on_eval) -> dict:
    """Evaluate, count towards early stopping, keep best/, call ``on_eval``."""
    s = run.state
    metrics = run.trainer.evaluate(*run.batches.validation())
    s.last_eval_step = s.step
    loss = metrics["val_loss"]
    if not math.isfinite(loss):  # the last update made the weights inf or NaN
        _diverged(run, f"non-finite validation loss ({loss}) at step {s.step}: the weights "
                  "diverged", s.step, run.cfg.lr, log)
    # Patience counts from the last fall larger than min_delta (as Keras does); best/ follows
    # every new minimum.
    if s.stop_ref is None or loss < s.stop_ref - run.cfg.early_stop_min_delta:
        s.stop_ref, s.evals_since_best = loss, 0
    else:
        s.evals_since_best += 1
    improved = s.best_val_loss is None or loss < s.best_val_loss
    if improved:
        s.best_val_loss, s.best_step = loss, s.step
    log.write(s.step, "val", {**metrics, "best_val_loss": s.best_val_loss,
                              "epoch": run.batches.epoch(s.step)})
    if run.main:
        tqdm.write(_eval_line(run, metrics), file=sys.stdout)
    if improved:
        # Never best/ without a checkpoint: a kill between them would leave nothing to resume.
        if run.last_saved_step < 0:
            save_checkpoint(run)
        _save_best(run, metrics)
    if on_eval is not None:
        on_eval(s.step, dict(metrics))
    return metrics


def _out_of_patience(run: Run) -> bool:
    patience = run.cfg.early_stop_patience
    return bool(patience) and run.state.evals_since_best >= patience


def _stops_early(run: Run) -> bool:
    if not _out_of_patience(run):
        return False
    if run.main:
        cfg = run.cfg
        tqdm.write(f"stopped early at step {run.state.step} of {run.max_steps}: "
                   f"{cfg.early_stop_patience} evaluation(s) without a fall of more than "
                   f"{cfg.early_stop_min_delta:g} (--early-stop-patience, --early-stop-min-delta)")
    return True


def _stop_requested(run: Run, signals: _StopSignals, started: float | None = None) -> str | None:
    """Why every rank stops now (collective): a signal any rank received, or the time budget."""
    budget = run.cfg.max_time_s
    over_time = None not in (started, budget) and time.perf_counter() - started > budget
    signalled, over_time = _all_reduce_sum(torch.tensor(
        [signals.reason is not None, over_time], dtype=torch.float32, device=run.device),
        run.dist).tolist()
    if signalled:
        return signals.reason or "SIGTERM"
    return "time budget" if over_time else None


class StepStart(typing.NamedTuple):
    """What a step changes before its update: the data order and the RNG streams."""

    order: dict
    rng: dict


def _drop_step(run: Run, at_start: StepStart, signals: _StopSignals) -> str:
    """A step dropped for a stop: the order and RNG back at its start, and a checkpoint there,
    so a resume runs it exactly as it would have run; the stop's name."""
    run.batches.order.load_state_dict(at_start.order)
    set_rng_state(at_start.rng, run.device)
    if run.last_saved_step != run.state.step:
        save_checkpoint(run)
    if run.main:
        tqdm.write(f"{signals.reason}: step {run.state.step + 1} dropped mid-way, not applied")
    return signals.reason


def _nonfinite(run: Run, stats: StepStats, where: Where, log: RunLog) -> None:
    """Stop the run on a non-finite loss or gradient: where in the data, causes, how to go on."""
    step = run.state.step + 1
    value = stats.loss if stats.nonfinite == "loss" else stats.grad_norm
    first = where.position
    last = first + run.batches.examples_per_step - 1
    place = (f"epoch {run.batches.epoch(step):.3g}, training examples {first}..{last} of "
             f"shuffled pass {where.shuffle} of the data; the update was not applied")
    _diverged(run, f"non-finite {stats.nonfinite} ({value}) at step {step}: {place}", step,
              stats.lr, log)


def _diverged(run: Run, what: str, step: int, lr: float, log: RunLog) -> None:
    """Stop the run, saying ``what`` went non-finite, its likely causes and the last checkpoint
    that holds finite weights (none is written from others, and a resume sets them aside)."""
    causes = [f"the learning rate is too high ({lr:.3g}): lower lr or lengthen warmup_steps",
              "fp16 overflow: use precision bf16 or fp32" if run.trainer.precision == "fp16"
              else "exploding gradients: keep grad_clip > 0",
              "inf/NaN weights in a loaded checkpoint", "a model bug (mask, dtype casts)"]
    if run.cfg.inject_nan_at_step == step:
        causes.insert(0, "injected on purpose: inject_nan_at_step is set")
    good = checkpoint.finite_checkpoint(list_checkpoints(run.run_dir), run.trainable_only)
    if good is not None:  # a resume replays the same steps, lr and precision
        kept = (f"the last good checkpoint is {good}: --resume {run.run_dir} replays the same "
                "steps from there; a change of --lr or --precision needs a new run (another "
                "--name)")
    else:
        kept = ("no checkpoint with finite weights had been written yet: run the command again "
                "with the changes (the same --name starts the run anew)")
    diagnosis = f"{what}. Likely causes: " + "; ".join(causes) + "."
    message = f"{diagnosis} {kept}."
    log.write(step, "error", {"message": message})
    raise NonFiniteLossError(message, step, diagnosis)


def _end(run: Run, result: TrainResult, log: RunLog, signals: _StopSignals, stop: str | None,
         on_eval) -> None:
    """After the loop: the last evaluation and checkpoint, the export, and what is left."""
    cfg, s = run.cfg, run.state
    # The time budget ends the run as it would end, but says that it is not finished.
    result.stopped_by_budget = stop == "time budget" and s.step < run.max_steps
    if stop not in STOP_SIGNALS:
        evaluate = s.last_eval_step != s.step
        if evaluate:
            result.val_metrics = _evaluate(run, log, on_eval)
        # A checkpoint written before this evaluation is written again, holding its result.
        if evaluate or run.last_saved_step != s.step:
            save_checkpoint(run)
        stop = _stop_requested(run, signals)  # one during that evaluation: skip the export
        if cfg.export and stop is None:
            result.export_dir, result.sample = _export(run)
            stop = _stop_requested(run, signals)
    if stop in STOP_SIGNALS:
        result.interrupted = stop
        if run.main and result.export_dir is not None:
            print(f"\n{stop}: the run had finished (checkpoint and export at step {s.step}); "
                  "stopping with the signal's exit code")
        elif run.main:
            saved = "stopped" if run.restarts else "checkpoint saved"
            print(f"\n{stop}: {saved} at step {s.step}; {what_next(run.hint, run.restarts)}")
    elif result.stopped_by_budget and run.main:
        saved = "" if run.restarts else "; checkpoint saved"
        exported = ("" if result.export_dir is None else
                    f"; export/ holds its best weights so far (step {s.best_step})")
        print(f"time budget (--max-time-s {cfg.max_time_s:g}) reached at step "
              f"{s.step}/{run.max_steps}: the run is not finished{saved}{exported}; "
              f"{what_next(run.hint, run.restarts)}")
    result.step, result.best_val_loss, result.best_step, result.train_loss = (
        s.step, s.best_val_loss, s.best_step, s.train_loss)


def final_quality(result: TrainResult, device: str) -> dict | None:
    """A finished run scored as ``python eval.py --tasks line method`` scores it (the test split),
    printed with its last validation loss; an evaluation that cannot run is only noted."""
    import eval as evaluation

    out, last = result.run_dir / rundir.FINAL_EVAL_DIR, result.val_metrics
    cfg = evaluation.EvalConfig(models=[str(result.run_dir)], tasks=["line", "method"],
                                out_dir=str(out), progress=False, device=device)
    try:
        metrics = evaluation.evaluate(cfg)["rows"][0]["metrics"]
    except ValueError as e:
        print(f"note: no final evaluation: {e}")
        return None
    val = "" if last is None else (f"val loss {last['val_loss']:.4f} ({last['val_bpb']:.3f} "
                                   "bits/byte), ")
    print(f"final evaluation ({out}): {val}line completion exact match {metrics['line/EM']:.1f}%, "
          f"edit similarity {metrics['line/edit_sim']:.1f}; function completions that parse "
          f"{metrics['method/parses']:.0f}%")
    return metrics


def _export(run: Run) -> tuple[Path | None, str | None]:
    """Best weights back in the model, a sample completion, the HF export (rank 0)."""
    cfg, model, tok = run.cfg, run.trainer.raw_model, run.tok
    best = run.run_dir / rundir.BEST_DIR / checkpoint.weights_file(run.trainable_only)
    exported_step = None
    if best.is_file():
        load_model_tensors(model, load_file(best), str(best), run.trainable_only)
        exported_step = best_step(run.run_dir)
    if not run.main:
        return None, None
    if bad := checkpoint.nonfinite_tensor(model.state_dict()):  # export/ holds finite weights
        raise NonFiniteLossError(f"{bad} holds inf or NaN: not exported", run.state.step)
    prompt = run.sample_prompt  # --sample-prompt, else the held-out one in the task's format
    if cfg.sample_prompt is not None:
        prompt = SamplePrompt(cfg.sample_prompt, cfg.task in ("lm", "fim", "completion", "method"))
    sample = None
    if prompt is not None and prompt.text:
        stops = FUNCTION_STOPS if prompt.ends_function else ()
        sample = sample_completion(model, tok, prompt.text, cfg.sample_tokens, cfg.task,
                                   run.dcfg.pair_special_tokens, stops)
        print(f"sample completion (greedy, best checkpoint at step {run.state.best_step}):\n"
              f"{prompt.text}{sample}")
    export = run.run_dir / rundir.EXPORT_DIR

    def write(tmp: Path) -> None:
        if cfg.lora_r == 0:
            pretrained.save(model, tmp)
        else:  # on init_from (validate_config): the adapter, naming that base
            base = str(Path(cfg.init_from).resolve())  # as PEFT records it: loadable alone
            lora.save_adapter(model, tmp, base_model_name_or_path=base)
            if cfg.export_merged:  # as `python lora.py` merges: into the base on disk, in the
                # checkpoint's own dtype (a bf16 base: bf16, not the fp32 training copy)
                merged = pretrained.load(cfg.init_from, dtype="auto", device="cpu")
                lora.load_adapter(merged, tmp)
                lora.merge_and_export(merged, tmp / rundir.MERGED_DIR)
                tok.save(tmp / rundir.MERGED_DIR)
                pretrained.copy_hf_companions(cfg.tokenizer, cfg.init_from, tok,
                                               tmp / rundir.MERGED_DIR, weights=True)
        tok.save(tmp)
        pretrained.copy_hf_companions(cfg.tokenizer, cfg.init_from, tok, tmp,
                                      weights=cfg.lora_r == 0)
        # Which best/ it holds: eval.py scores best/ instead once a resume trains past it.
        (tmp / rundir.EXPORT_RECORD).write_text(json.dumps({"best_step": exported_step}))

    write_dir_atomically(export, write)
    best_loss = run.state.best_val_loss
    print(f"exported to {export} (best validation loss {best_loss:.4f}, perplexity "
          f"{perplexity(best_loss):.2f})")
    return export, sample


def train(cfg: TrainConfig, on_eval: Callable[[int, dict], None] | None = None,
          resume_hint: str | None = None, restarts: bool = False) -> TrainResult:
    """Run (or continue, with ``cfg.resume``) one training run of a valid ``cfg``. ``on_eval(step,
    metrics)`` follows each evaluation (what it raises, e.g. optuna.TrialPruned, propagates once
    the run directory is consistent); ``resume_hint`` says "continue it with ..." in the caller's
    terms; ``restarts``: the caller runs it again from the start instead."""
    dist, owns_group = _init_distributed(cfg.device)
    run = trainer = None
    try:
        run = setup_run(cfg, dist, resume_hint, restarts)
        cfg, s, trainer = run.cfg, run.state, run.trainer
        log = RunLog(run.run_dir, run.main, s.step if cfg.resume else None, run.config_dict,
                     cfg.report_to)
        signals = _StopSignals(trainer.droppable)
        # a progress bar on a terminal only; else (a log file, --no-progress) a line per log step
        bar = progress_bar(total=run.max_steps, initial=s.step, desc="train", unit="step",
                           enabled=run.main and cfg.progress, dynamic_ncols=True)
        run.lines, run.clock = run.main and bar.disable, (time.perf_counter(), s.step)
        result = TrainResult(run.run_dir, s.best_val_loss, s.step)
        save_every = cfg.save_every or cfg.eval_every
        started = window_start = time.perf_counter()
        window_tokens, skipped_in_a_row, stop = 0, 0, None
        try:
            if run.main:
                _announce(run)
            result.early_stopped = _out_of_patience(run)
            while s.step < trainer.max_steps and not result.early_stopped:
                at_start = None  # where a step a stop may drop begins (trainer.droppable)
                if trainer.droppable:
                    at_start = StepStart(run.batches.order.state_dict(), rng_state(run.device))
                micro, where = run.batches.next_step()
                if _decay_due(run):
                    _retime(run)
                    bar.total = run.max_steps
                try:
                    stats = trainer.train_step(micro, cfg.inject_nan_at_step == s.step + 1,
                                               signals.pending)
                except StepAbandoned:  # a stop mid-step: the checkpoint is of the step's start
                    stop = _drop_step(run, at_start, signals)
                    break
                skipped_in_a_row = skipped_in_a_row + 1 if stats.skipped else 0
                if skipped_in_a_row > MAX_SKIPPED_STEPS:  # fp16 overflow every step: diverged
                    stats.nonfinite = "gradient"
                if stats.nonfinite:
                    _nonfinite(run, stats, where, log)
                s.step += 1
                s.tokens_seen += stats.tokens
                s.train_loss = stats.loss
                window_tokens += stats.tokens
                bar.update(1)
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                logged = s.step % cfg.log_every == 0 or s.step in (1, run.max_steps)
                if logged:
                    _log_step(run, log, bar, stats, tok_s)
                    window_start, window_tokens = now, 0
                memorised = cfg.overfit_batches > 0 and stats.loss < OVERFIT_LOSS
                paused = time.perf_counter()  # evaluation and saving are not training time
                if memorised or (s.step % cfg.eval_every == 0 and s.step >= cfg.warmup_steps):
                    result.val_metrics = _evaluate(run, log, on_eval)
                    result.early_stopped = _stops_early(run)
                stop = _stop_requested(run, signals, started)
                ends = bool(stop or result.early_stopped or memorised)
                if ends and not logged:  # the run's last step is always logged
                    _log_step(run, log, bar, stats, tok_s)
                if (s.step % save_every == 0 or ends) and run.last_saved_step != s.step:
                    save_checkpoint(run)
                if ends:
                    break
                window_start += time.perf_counter() - paused
            _end(run, result, log, signals, stop, on_eval)
        finally:
            bar.close()
            log.close()
            # (a KeyboardInterrupt on its way out is a second Ctrl-C's: that stop is under way)
            signals.restore(taken=result.interrupted is not None
                            or isinstance(sys.exc_info()[1], KeyboardInterrupt))
        return result
    except KeyboardInterrupt as stop:  # a second Ctrl-C: the step loop's checkpoint is skipped
        if isinstance(stop, RunInterrupted) or run is None:
            raise
        raise _interrupted(stop, run.run_dir, resume_hint, restarts) from None
    finally:
        if run is not None:
            run.claimed.release()
        del run, trainer  # the DDP model goes before the group (_leave_group)
        if owns_group:
            _leave_group()


def sample_completion(model: nn.Module, tok: CodeTokenizer | BPETokenizer, prompt: str,
                      max_new_tokens: int, task: str, pair_special_tokens: bool = False,
                      stops: Sequence[str] = ()) -> str:
    """Greedy continuation of ``prompt``, formatted and encoded as the run's ``task`` data, cut
    at the first of ``stops`` (eval's decoding)."""
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
                   GenerationConfig(max_new_tokens, eos_id=eos or None, stop=list(stops) or None,
                                    decode=partial(decode_generated, tok)))
    model.train(was_training)
    new = out[0, len(ids):].tolist()
    text = decode_generated(tok, new[: next((i for i, t in enumerate(new) if t in eos), len(new))])
    return truncate_at_stops(text, stops)


def _leave_group() -> None:
    """Free the DDP model (held by an error's traceback frames) before leaving the group: freed
    at interpreter exit instead, gloo aborts now and then."""
    error, seen = sys.exc_info()[1], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    td.destroy_process_group()


# ---- --overfit: the debugging ritual as a command ----

@torch.no_grad()
def structure_diagnosis(model: nn.Module, vocab_size: int, length: int) -> str | None:
    """Check on random ids that the samples of a batch stay apart and later tokens do not change
    earlier logits: a model breaking either still drives the loss down, yet learns nothing."""
    device = next(model.parameters()).device
    model.eval()  # run_overfit's train_step turns training back on
    g, t = torch.Generator().manual_seed(0), max(4, min(length, 16))
    x = torch.randint(0, vocab_size, (3, t), generator=g)
    other, later = x.clone(), x.clone()
    other[0] = torch.randint(0, vocab_size, (t,), generator=g)
    later[:, t // 2:] = torch.randint(0, vocab_size, (3, t - t // 2), generator=g)
    base = model(x.to(device))
    if not torch.allclose(model(other.to(device))[1:], base[1:], atol=1e-5):
        return ("changing one sample of a batch changed the logits of the others: the "
                "transposed-batch bug (a (time, batch) tensor read as (batch, time)); check "
                "every reshape/transpose before the attention.")
    if not torch.allclose(model(later.to(device))[:, :t // 2], base[:, :t // 2], atol=1e-5):
        return ("changing later tokens changed earlier logits: the model sees the future "
                "(a missing or wrong causal mask).")
    return None


def run_overfit(cfg: TrainConfig, max_steps: int = 400, lr: float = 3e-3) -> tuple[bool, str]:
    """Memorise ``data/overfit``, then reproduce each file from its first line: (passed, report)."""
    from dataset import collate
    from tokenizer import CodeTokenizer, decode_generated

    started = time.perf_counter()
    files = sorted(OVERFIT_CORPUS.glob("*.py"))
    assert files, f"{OVERFIT_CORPUS}: the bundled overfit corpus is missing"
    texts = [f.read_text("utf-8") for f in files]
    tok = CodeTokenizer.train(texts, min_freq=1)
    seqs = [[tok.eos_id, *tok.encode(t), tok.eos_id] for t in texts]
    batch = collate([{"input_ids": torch.tensor(s[:-1]), "labels": torch.tensor(s[1:])}
                     for s in seqs], tok.pad_id)
    block = max(map(len, seqs))  # generation re-creates the whole sequence, final EOS included
    ocfg = dataclasses.replace(
        cfg, preset=BUDGET_LADDER[0]["preset"] if cfg.preset == "auto" else cfg.preset,
        n_layer=cfg.n_layer or 2, n_head=cfg.n_head or 4, n_embd=cfg.n_embd or 128,
        mlp_hidden=cfg.mlp_hidden or 256, block_size=block, dropout=0.0, lr=lr,
        warmup_steps=min(20, max_steps // 10), max_steps=max_steps, weight_decay=0.0, grad_accum=1,
        label_smoothing=0.0, lora_r=0, quantize_bits=0, init_from=None, compile=False,
    )
    seed_everything(ocfg.seed)
    model = Transformer(model_config(ocfg, tok.vocab_size, tok.bos_id, tok.eos_id))
    device = resolve_device(ocfg, Dist())
    trainer = Trainer(model, ocfg, device)
    if problem := structure_diagnosis(trainer.raw_model, tok.vocab_size, block):
        return False, f"FAIL before training: diagnosis: {problem}"

    losses: list[float] = []
    with progress_bar(total=max_steps, desc="overfit", unit="step", enabled=cfg.progress) as bar:
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
            why = ("the loss barely moved: gradients do not reach the weights (frozen or detached "
                   "parameters, lr 0)")
        elif last < 0.98 * losses[-1 - min(steps - 1, max(2, steps // 4))]:
            # falling over the last quarter: too few steps (max_steps), not a stalled loss
            why = (f"the loss was still falling when its {steps} steps ran out: raise "
                   "--max-steps (--overfit's own is 400)")
        else:
            why = ("the loss fell but stalled above the target: inputs and targets disagree "
                   "(labels shifted twice or not at all, masking) or the optimisation is broken")
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
            at = len(os.path.commonprefix([completion, text]))
            lines.append(f"  {f.name}: differs at character {at}: expected "
                         f"{text[at:at + 30]!r}, generated {completion[at:at + 30]!r}")
    if lines:
        return False, (
            f"FAIL: {head}; memorised, but greedy completion does not reproduce the files:\n"
            + "\n".join(lines) + "\nDiagnosis: training and generation disagree (positions, "
            "KV cache, batch layout) or the tokenizer decodes differently than it encodes.")
    return True, (f"PASS: {head}; greedy completion of each file's first line reproduces all "
                  f"{len(files)} files exactly.")


# ---- Command line ----

RUN_ERRORS = (NonFiniteLossError, ValueError, OSError)  # reported as one line, no traceback


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def report_run_error(e: Exception) -> int:
    """Print one of RUN_ERRORS (rank 0 only); exit code 1 for a diverged run, else 2."""
    if _is_rank_zero():
        print(f"error: {process.os_error_message(e) if isinstance(e, OSError) else e}",
              file=sys.stderr)
    return 1 if isinstance(e, NonFiniteLossError) else 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with process.interrupt_on_sigterm():  # outside the step loop: data, tokenizer, export
            cfg = parse_config(argv)
            if settings.printed_config(build_parser(), argv, cfg):
                return 0
            if cfg.overfit:
                passed, report = run_overfit(cfg, **overfit_settings(cfg))
                print(report)
                return 0 if passed else 1
            result = train(cfg)
    except RankZeroFailed:
        return 2
    except RUN_ERRORS as e:
        return report_run_error(e)
    except KeyboardInterrupt as stop:
        if _is_rank_zero() and getattr(stop, "resume", None) is not None:
            print(f"interrupted; the checkpoints written are kept: continue with {stop.resume}",
                  file=sys.stderr)
        elif _is_rank_zero():
            print("interrupted before the first checkpoint: nothing to resume; run the same "
                  "command again", file=sys.stderr)
        return process.interrupted_exit_code(stop)
    if result.interrupted:
        return process.interrupted_exit_code(result.interrupted)
    if not _is_rank_zero():  # under torchrun rank 0 reports for all
        return 0
    if cfg.overfit_batches:
        ok = result.train_loss is not None and result.train_loss < OVERFIT_LOSS
        loss = "no loss" if result.train_loss is None else f"loss {result.train_loss:.4f}"
        print(f"{'PASS' if ok else 'FAIL'}: {cfg.overfit_batches} batch(es) of the training data, "
              f"{loss} after {result.step} steps (target {OVERFIT_LOSS})"
              + ("" if ok else ": not memorised; raise --max-steps or --lr, or run --overfit"))
        return 0 if ok else 1
    if has_final_eval(cfg) and result.export_dir is not None:
        final_quality(result, cfg.device)
    if result.best_val_loss is not None:
        print(f"best validation loss {result.best_val_loss:.4f} (perplexity "
              f"{perplexity(result.best_val_loss):.2f}) at step {result.best_step}; run dir "
              f"{result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(process.run_main(main))
