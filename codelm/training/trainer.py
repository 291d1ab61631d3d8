"""One training step and one evaluation: ``Trainer`` holds the model, optimizer, schedule and
loss scaler. Training and validation share one loss; accumulation weights every micro-batch by
its tokens, so it equals one big batch (and DDP one process)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from architecture import IGNORE_INDEX, cuda_half_dtype, lacks_native_bf16
from codelm.data.config import PREFERENCE_TASKS
from codelm.runs.checkpoint import RunState
from codelm.runtime import console, distributed, process
from codelm.runtime.console import progress_bar
from codelm.runtime.distributed import Dist, all_gather, all_reduce_sum, all_reduce_sum_later
from codelm.runtime.settings import setting
from codelm.trainconfig import GRPO_TASK, StepSettings, TrainConfig
from codelm.training.optim import build_optimizer

MAX_SKIPPED_STEPS = 25  # consecutive fp16 overflow skips before the run is declared diverged
SKIPPED_KEY = "skipped_in_a_row"  # the count so far, kept beside the loss scaler's state
# A stop that a step has not acted on this long after it came (one of its operations runs on) is
# carried out without the step, where the caller lets the stop end the process (StopSignals).
STOP_GRACE_S = 2.0


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_half_dtype(device) == torch.bfloat16 else "fp16"
    return "fp32"


def checked_precision(cfg: TrainConfig | StepSettings, device: torch.device) -> str:
    """``cfg.precision`` resolved for ``device``; bf16 on a GPU without it is refused."""
    precision = resolve_precision(cfg.precision, device)
    if precision == "fp16" and cfg.strategy == "fsdp":  # auto's choice on a GPU before Ampere
        raise ValueError(f"{setting(cfg, 'precision')} computes in fp16 here, whose loss scaler "
                         f"{setting(cfg, 'strategy')} does not shard: set precision fp32")
    if precision == "bf16" and lacks_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{setting(cfg, 'precision')}: this GPU (compute capability "
                         f"{major}.{minor}) has no native bf16: set precision fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, torch.bfloat16 if precision == "bf16" else torch.float16)


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


def best_quality(task: str, loss: float) -> str:
    """The best evaluation as the run's last lines say it: its loss and perplexity, task grpo's
    pass@1 (its val_loss is the share of held-out problems failed), or a preference loss."""
    if task == GRPO_TASK:
        return f"best validation pass@1 {1.0 - loss:.3f}"
    if task in PREFERENCE_TASKS:  # a preference loss is no token's NLL: no perplexity
        return f"best validation loss {loss:.4f}"
    return f"best validation loss {loss:.4f} (perplexity {perplexity(loss):.2f})"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, queued behind the work there: to a GPU from pinned memory (from
    pageable memory the driver may wait for the work queued before the copy)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class StepAbandoned(Exception):
    """A stop signal came mid-step: the step was dropped before its update, nothing applied."""


class StepStop(NamedTuple):
    """How a stop reaches a step that may be dropped (StopSignals.for_step)."""

    pending: Callable[[], bool]  # asked before each block and once its backward is done
    window: contextlib.AbstractContextManager  # around the forward and backward, left before
    #   the update


@dataclass
class StepStats:
    loss: float  # token-weighted mean over the whole (global) step, as validation computes it
    #   (with label_smoothing, the smoothed loss: validation's is not)
    grad_norm: float
    tokens: int  # input positions processed by all ranks (padding included: it is computed)
    lr: float  # the learning rate this step used (the scheduler has moved on by the time it logs)
    skipped: bool = False  # the fp16 scaler skipped the update (inf/NaN gradients)
    nonfinite: str | None = None  # "loss" or "gradient": the step was not applied
    metrics: dict = field(default_factory=dict)  # a task's own of the step (GRPO's rewards and
    #   timings, the preference rewards): logged


@dataclass
class StepFigures:
    """A step's figures as the device holds them once its update is queued. Read back when they
    are needed (``read``, or ``read_steps`` for many at one wait), so the host queues the next
    step while the device still runs this one."""

    values: torch.Tensor  # the loss, gradient norm and input positions (fp32, on the device)
    lr: float
    loss_scaled: bool = False  # an fp16 loss scaler's: an infinite norm is its to skip
    skipped: bool = False  # the scaler skipped the update
    diverged: bool = False  # the scaler skipped more than MAX_SKIPPED_STEPS in a row
    metrics: dict = field(default_factory=dict)  # as StepStats.metrics

    def read(self) -> StepStats:
        return read_steps([self])[0]


def read_steps(steps: Sequence[StepFigures]) -> list[StepStats]:
    """Each step's StepStats, the figures of all read back from the device at once."""
    rows = torch.stack([step.values for step in steps]).tolist()
    return [_stats(step, *row) for step, row in zip(steps, rows)]


def _stats(step: StepFigures, loss: float, norm: float, positions: float) -> StepStats:
    nonfinite = None
    if not math.isfinite(loss):
        nonfinite = "loss"
    elif (not math.isfinite(norm) and not step.loss_scaled) or step.diverged:
        nonfinite = "gradient"
    return StepStats(loss, norm, int(positions), step.lr, step.skipped, nonfinite, step.metrics)


def _remove_hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


# A batch's labelled text's UTF-8 bytes, from its input ids and labels (datasets.LabelBytes).
LabelBytes = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Trainer:
    """Model, optimizer, schedule and loss scaler: one training step, one evaluation."""

    def __init__(self, model: nn.Module, settings: StepSettings, device: torch.device,
                 dist: Dist | None = None, label_bytes: LabelBytes | None = None,
                 state: RunState | None = None):
        self.settings = settings
        self.device = device
        self.dist = dist or Dist()

        self.precision = checked_precision(settings, device)
        self.raw_model = model.to(device)
        self.label_bytes = label_bytes  # the bytes of a batch's labelled text: the loss per byte
        self.eval_model = torch.compile(self.raw_model) if settings.compile else self.raw_model
        # The strategy's one decision (replicated or sharded), before the optimizer: sharding
        # replaces the parameters.
        self.model = distributed.wrap(self.eval_model, settings.strategy, self.dist, device,
                                      self.precision)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        assert self.params, "the model has no trainable parameters"
        self.optimizer = build_optimizer(self.raw_model, self.params, settings)
        # The schedule's length is the run's: its state's max_steps, which a budgeted run's
        # clock moves (and decay_steps, set when the decay starts); a trainer outside a run
        # schedules over settings.max_steps.
        self.run_state = state if state is not None else RunState(max_steps=settings.max_steps)
        self.decay_steps = settings.decay_steps
        def lr_at(step: int) -> float:  # read live: a budgeted run moves max_steps, decay_steps
            return lr_factor(step, settings.warmup_steps, self.run_state.max_steps,
                             settings.min_lr_ratio, self.decay_steps)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at)
        # Loss scaling wherever the backward runs in fp16: fp16 autocast, or a frozen fp16 base
        # under LoRA whatever the precision (its small per-token gradients would underflow).
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.precision == "fp16" or settings.base_dtype == "fp16")
        self.skipped_in_a_row = 0  # fp16 overflow on every step is a diverged run
        # One process alone may drop a step mid-way: a stop is checked before each block's
        # attention and MLP, and once their backward is done.
        self.stop_pending: Callable[[], bool] | None = None  # set during a droppable step
        self.droppable = not self.dist.enabled and not settings.compile
        if self.droppable:
            self._hook_blocks()
        self.sharded = distributed.is_sharded(self.raw_model)
        # The optimizer takes torch's found_inf (fused AdamW): it skips a step on the device.
        self.skips_on_device = getattr(self.optimizer, "_step_supports_amp_scaling", False)
        self.eval_forwards = 1  # the model's forwards a validation batch takes (idle ones too)

    def _to_device(self, batch: dict) -> dict:
        return {k: to_device(v, self.device) for k, v in batch.items()}

    def _step_counts(self, *counts: int) -> torch.Tensor:
        """This step's ``counts`` (fp32, on the device, queued behind its work) summed over the
        processes."""
        values = to_device(torch.tensor([float(count) for count in counts]), self.device)
        return all_reduce_sum(values, self.dist)

    def _hook_blocks(self) -> None:
        """``_check_stop`` before each block's attention and MLP. The hooks hold the trainer
        weakly and go with it: a model outlives its trainers (a notebook's second Trainer on
        one model), and a hook must not keep a dropped trainer's optimizer state alive."""
        check_stop = weakref.WeakMethod(self._check_stop)

        def hook(module: nn.Module, args: tuple) -> None:
            method = check_stop()
            if method is not None:
                method(module, args)

        handles = []
        for block in getattr(self.raw_model, "blocks", ()):
            handles.append(block.attn.register_forward_pre_hook(hook))
            handles.append(block.mlp.register_forward_pre_hook(hook))
        weakref.finalize(self, _remove_hooks, handles)

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
    def _droppable_step(self, stop: StepStop | None) -> Iterator[None]:
        """Within, inside ``stop.window``: a stop ``stop.pending`` reports raises StepAbandoned
        at the next block, and the step's gradients are dropped."""
        if stop is None or not self.droppable:
            yield
            return
        self.stop_pending = stop.pending
        try:
            with stop.window:
                yield
        except StepAbandoned:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            self.stop_pending = None

    def train_step(self, micro_batches: Sequence[dict], inject_nan: bool = False,
                   stop: StepStop | None = None) -> StepFigures:
        """One optimizer step over ``micro_batches`` (this rank's share of the global batch). Each
        summed loss is divided by the whole global step's token count, so accumulation (and the
        average of DDP or FSDP, undone by the world-size factor) gives exactly one big batch's
        gradient. Its figures stay on the device until read (``StepFigures.read``). A stop that
        ``stop`` reports mid-step raises StepAbandoned (one process alone)."""
        self.model.train()
        count = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        positions = sum(b["input_ids"].numel() for b in micro_batches)
        n_tokens, n_positions = self._step_counts(count, positions)
        weight = self.dist.world / n_tokens.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        with self._droppable_step(stop):
            for i, batch in enumerate(micro_batches):
                batch = self._to_device(batch)
                last = i == len(micro_batches) - 1
                # DDP averages gradients across processes once, on the step's last micro-batch.
                sync = contextlib.nullcontext() if last else distributed.accumulating(self.model)
                with sync:
                    with autocast(self.device, self.precision):
                        # Right-padded batches need no mask: causal attention never sees padding;
                        # packed rows keep each example to itself (document_ids).
                        loss = self.model(batch["input_ids"], batch["labels"], reduction="sum",
                                          label_smoothing=self.settings.label_smoothing,
                                          grad_scale=self.scaler.scale(weight),
                                          document_ids=batch.get("document_ids"))
                    if inject_nan:
                        loss = loss * float("nan")
                    self.scaler.scale(loss * weight).backward()
                loss_sum += loss.detach().float()
        loss_sum = all_reduce_sum(loss_sum, self.dist)
        return self.update(loss_sum / n_tokens.clamp(min=1.0), n_positions)

    def update(self, loss: torch.Tensor, n_positions: torch.Tensor) -> StepFigures:
        """The optimizer step on the gradients the step's backward left: unscaled, clipped,
        applied unless the ``loss`` (the step's, detached) or their norm is not finite. Fused
        AdamW skips a non-finite step on the device (torch's ``found_inf``, as loss scaling
        uses it), so nothing waits for the device; a loss scaler or Muon reads the figures
        back to decide."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        values = torch.stack([loss.float(), grad_norm.float(), n_positions.float()]).detach()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler.is_enabled() or not self.skips_on_device:
            return self._update_read(values, lr)
        self.optimizer.found_inf = (~values[:2].isfinite().all()).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepFigures(values, lr)

    def _update_read(self, values: torch.Tensor, lr: float) -> StepFigures:
        """``update`` where the figures are read back first: a non-finite step is not taken,
        and the fp16 scaler's skips are counted."""
        figures = StepFigures(values, lr, loss_scaled=self.scaler.is_enabled())
        loss, norm, _ = values.tolist()
        if not math.isfinite(loss) or (not math.isfinite(norm) and not figures.loss_scaled):
            self.optimizer.zero_grad(set_to_none=True)
            if figures.loss_scaled:  # the scaler's unscale_ is closed, so a next step may unscale
                self.scaler.update()
            return figures
        scale_before = self.scaler.get_scale() if figures.loss_scaled else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        figures.skipped = figures.loss_scaled and self.scaler.get_scale() < scale_before
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if figures.skipped:
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0
        figures.diverged = self.skipped_in_a_row > MAX_SKIPPED_STEPS
        return figures

    def _eval_precision(self) -> str:
        """The precision validation runs in: fp32 where eval_precision asks, else training's."""
        return "fp32" if self.settings.eval_precision == "fp32" else self.precision

    def _eval_batches(self, batches: Iterator[dict] | Sequence[dict], total: int | None
                      ) -> Iterator[dict]:
        """The validation batches on the device, under a progress bar, with the eval model in
        eval mode until the last is done; where the ranks go in lockstep (``_eval_in_lockstep``)
        this rank then runs idle batches (``_idle_eval_batch``) until it has run as many as the
        rank with the most batches (agreed before the first forward, a collective of its own,
        from ``total``, which must be this rank's exact count of ``batches``), and the model
        goes back to its mode."""
        most = 0
        if self._eval_in_lockstep():
            if total is None:
                batches = list(batches)
                total = len(batches)
            most = max(all_gather(total, self.dist))
        batches = progress_bar(batches, total=total, desc="eval", unit="batch", leave=False,
                               enabled=self.dist.main and self.settings.progress,
                               dynamic_ncols=True)
        model = self.eval_model
        was_training = model.training
        model.eval()
        forwards = 0
        for batch in batches:
            forwards += 1
            yield self._to_device(batch)
        for _ in range(most - forwards):
            self._idle_eval_batch()
        model.train(was_training)

    def _eval_in_lockstep(self) -> bool:
        """Whether every rank takes part in each validation batch (its collectives), so that a
        rank with fewer batches runs idle ones: a sharded model's forwards gather every block's
        shards."""
        return self.sharded

    def _idle_eval_batch(self) -> None:
        """A validation batch's collectives, run by a rank with no batch left: a sharded
        model's ``eval_forwards`` forwards of one token."""
        if not self.sharded:
            return
        idle = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        for _ in range(self.eval_forwards):
            self.eval_model(idle)

    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict] | Sequence[dict], total: int | None = None) -> dict:
        """Validation loss, perplexity and token accuracy over all tokens, unsmoothed; with
        ``label_bytes``, bits per byte too (comparable across tokenizers)."""
        model = self.eval_model
        sum_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        sum_tokens = torch.zeros_like(sum_loss)
        sum_correct = torch.zeros_like(sum_loss)
        sum_bytes = torch.zeros_like(sum_loss)
        for batch in self._eval_batches(batches, total):
            labels = batch["labels"]
            with autocast(self.device, self._eval_precision()):
                loss, correct = model(batch["input_ids"], labels, reduction="sum",
                                      count_correct=True, document_ids=batch.get("document_ids"))
            counted = labels != IGNORE_INDEX
            sum_loss += loss.double()
            sum_tokens += counted.sum()
            sum_correct += correct
            if self.label_bytes is not None:
                sum_bytes += self.label_bytes(batch["input_ids"], labels)
        totals = torch.stack([sum_loss, sum_tokens, sum_correct, sum_bytes])  # one all-reduce
        loss_sum, n, correct, n_bytes = all_reduce_sum(totals, self.dist).tolist()
        assert n > 0, "check_next_token_labels found labelled validation tokens"
        loss = loss_sum / n
        metrics = {"val_loss": loss, "val_ppl": perplexity(loss), "val_accuracy": correct / n,
                   "val_tokens": int(n)}
        if n_bytes:
            metrics["val_bpb"] = loss_sum / n_bytes / math.log(2)
        return metrics

    def state_dict(self) -> dict:
        """What a checkpoint's state.pt keeps of the trainer; a sharded optimizer's moments are
        saved with the model's shards (checkpoint.save_sharded)."""
        optimizer = {} if self.sharded else self.optimizer.state_dict()
        scaler = self.scaler.state_dict()  # {} where no loss scaling runs
        if scaler:  # the overflow skips in a row so far count toward MAX_SKIPPED_STEPS
            scaler[SKIPPED_KEY] = self.skipped_in_a_row
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": scaler}

    def load_state_dict(self, state: RunState) -> None:
        if state.optimizer:  # else a sharded checkpoint's, loaded with the model
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
            self.skipped_in_a_row = state.scaler.get(SKIPPED_KEY, 0)


STOP_SIGNALS = tuple(sig.name for sig in process.STOP_SIGNALS)  # SIGINT, SIGTERM, SIGHUP


class StopSignals:
    """SIGINT/SIGTERM/SIGHUP ask the loop to checkpoint and end; a second Ctrl-C interrupts at
    once, a second SIGTERM or SIGHUP (a scheduler's, sent twice) does not. With ``ends_process``
    (the caller ends the process after the run) a stop that a step has not acted on within
    STOP_GRACE_S is carried out from a watcher thread (process.StopWatcher, ``for_step``)."""

    def __init__(self, mid_step: bool = False, ends_process: bool = False) -> None:
        self.reason: str | None = None
        self.mid_step = mid_step  # a stop is acted on inside a step (Trainer.droppable)
        self._previous: dict = {}
        self._in_flight: distributed.PendingSum | None = None  # a lagged check's sum
        if threading.current_thread() is threading.main_thread():
            for sig in process.STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # `cmd &` in a script, nohup
                    self._previous[sig] = signal.signal(sig, self._handle)
        self._watcher = None
        if mid_step and ends_process and self._previous:
            self._watcher = process.StopWatcher(STOP_GRACE_S)

    def _handle(self, signum, frame) -> None:
        process.leave_terminal_on_hangup(signum)
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            process.note_stop(self.reason)
            where = "the end of this step or evaluation"
            if self.mid_step:
                where = "the next layer's attention or MLP (or the end of an evaluation under way)"
            elif distributed.this_process().enabled:  # the ranks agree on it a step later
                where = "the end of the next step or evaluation"
            message = (f"\n{console.line_label()}{self.reason}: stopping at {where}, then saving "
                       "a checkpoint\n")
            if process.is_rank_zero():  # under torchrun rank 0 reports for all
                with contextlib.suppress(OSError):  # to fd 2: a print could land in another's
                    os.write(2, message.encode())
        elif signum == signal.SIGINT:  # stop now: exit code 130, whatever the first one was
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def pending(self) -> bool:
        return self.reason is not None

    def for_step(self, take_over: Callable[[str], int]) -> StepStop:
        """How a stop reaches the next step: ``take_over(signal name)`` carries out one that the
        step does not act on in time and returns the exit code (with ``ends_process``)."""
        if self._watcher is None:
            return StepStop(self.pending, contextlib.nullcontext())
        return StepStop(self.pending, self._watcher.window(take_over))

    def restore(self, taken: bool = True) -> None:
        """Put the previous handlers back; pass them a stop the loop did not act on."""
        if self._watcher is not None:
            self._watcher.close()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.reason is not None and not taken:
            process.forget_stop()
            signal.raise_signal(signal.Signals[self.reason])

    def stop_requested(self, dist: Dist, device: torch.device, over_time: bool = False,
                       lagged: bool = False) -> str | None:
        """Why every rank stops now (collective): a signal any rank received, or the time
        budget (``over_time``). Under torchrun the ranks' flags (one a stop signal, then the
        budget's) are summed: read back at once, the host waits for the device's work queued
        before them; ``lagged`` (the check after each step) reads back the sum started by the
        call before and starts this call's, so no step waits for the device and every rank
        stops one step later, at the same step. Every rank names the same signal, the first of
        STOP_SIGNALS received."""
        reason = self.reason
        if dist.enabled:  # one process reads its own flags: no tensor, no wait on the device
            flags = [float(reason == name) for name in STOP_SIGNALS] + [float(over_time)]
            summed = self._summed_flags(flags, dist, device, lagged)
            reason = next((name for name, n in zip(STOP_SIGNALS, summed) if n), None)
            over_time = bool(summed[-1])
        if reason is not None:
            # Under way on every rank: this rank's own SIGTERM, coming later (a scheduler's to
            # each process, the watch of a killed torchrun), is a repeat and changes nothing.
            process.note_stop(reason)
            return reason
        return "time budget" if over_time else None

    def _summed_flags(self, flags: list[float], dist: Dist, device: torch.device, lagged: bool
                      ) -> list[float]:
        """The ranks' summed ``flags``; ``lagged``: those of the previous lagged call (none
        before the first), this call's started. A sum still in flight is read before a sum read
        at once, and once a lagged one stops the run: the run ends with none in flight."""
        earlier, self._in_flight = self._in_flight, None
        summed = earlier.values() if earlier is not None else [0.0] * len(flags)
        if not lagged:
            return all_reduce_sum(torch.tensor(flags, device=device), dist).tolist()
        self._in_flight = all_reduce_sum_later(flags, dist, device)
        if any(summed):
            self._in_flight.values()
            self._in_flight = None
        return summed
