"""What a training run keeps as it trains: in its directory config.json, metrics.jsonl (and the
trackers), the checkpoints and best/ (``RunRecord``); on the console a progress bar or a line
per logged step, and a line per evaluation (``Progress``). A run whose numbers diverge is
reported with the last good checkpoint to go on from."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from codelm.runs import checkpoint, rundir, trackers
from codelm.runs.checkpoint import RunState, model_tensors, write_dir_atomically
from codelm.runs.rundir import list_checkpoints
from codelm.runs.trackers import RunLog
from codelm.runtime import distributed, process
from codelm.runtime.console import duration, progress_bar
from codelm.runtime.distributed import Dist, all_gather, barrier, main_first
from codelm.runtime.rng import rng_state

if typing.TYPE_CHECKING:
    from codelm.trainconfig import TrainConfig
    from codelm.training.trainer import StepStats, Trainer


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient; ``diagnosis``: the message without its advice on going on."""

    def __init__(self, message: str, step: int | None = None, diagnosis: str | None = None):
        super().__init__(message)
        self.step = step
        self.diagnosis = diagnosis or message


def memory_mb(device: torch.device) -> float:
    """The peak memory of this process so far: the GPU's allocations, or the CPU's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunRecord:
    """A run's directory as it trains (rank 0 writes; every rank takes part in a checkpoint)."""

    def __init__(self, claimed: rundir.ClaimedDir, dist: Dist, trainable_only: bool,
                 keep_last: int, hint: str, restarts: bool) -> None:
        self.claimed = claimed  # its lock is released when the run ends
        self.run_dir = claimed.path
        self.dist = dist
        self.trainable_only = trainable_only  # checkpoints hold only the adapter
        self.keep_last = keep_last
        self.config: dict = {}  # config.json: it reproduces the run
        self.last_saved_step = -1
        self.resumed_from: Path | None = None  # the checkpoint this process continued from
        self.log: RunLog | None = None
        self.hint = hint  # how the caller continues the run ("--resume DIR"), for messages
        self.restarts = restarts  # the caller never continues the run: it starts it again

    def write_config(self, cfg: TrainConfig, first: dict[Path, bytes | str] | None = None
                     ) -> None:
        """config.json from ``cfg`` (after the files ``first``, all written atomically)."""
        self.config = {**dataclasses.asdict(cfg), "name": self.run_dir.name, "resume": None}
        self._write_config(first)

    def _write_config(self, first: dict[Path, bytes | str] | None = None) -> None:
        if self.dist.main:
            files = {**(first or {}), self.run_dir / rundir.CONFIG_FILE:
                     json.dumps(self.config, indent=1)}
            process.write_atomic_files(files)

    def follow_length(self, max_steps: int) -> None:
        """config.json's max_steps follows the run's length, ``max_steps`` (RunState's), where
        it sets the length (an epochs run's holds None): a budgeted run's moves before its
        decay starts, and a resume continues with the length its checkpoint records."""
        if self.config.get("max_steps") in (None, max_steps):
            return
        self.config["max_steps"] = max_steps
        self._write_config()

    def follow_decay(self, max_steps: int, decay_steps: int) -> None:
        """config.json once a budgeted run's decay starts: the length and the decay that start
        fixes, with which it reproduces the run."""
        self.config.update(max_steps=max_steps, decay_steps=decay_steps)
        self._write_config()

    def open_log(self, resume_step: int | None, report_to: typing.Sequence[str]) -> None:
        """metrics.jsonl: a new run's anew; a resumed run's goes on from ``resume_step``."""
        self.log = RunLog(self.run_dir, self.dist.main, resume_step, self.config, report_to)

    def log_step(self, state: RunState, stats: StepStats, tok_s: float, epoch: float,
                 trainer: Trainer) -> None:
        """The train line of this step (metrics.jsonl, the trackers)."""
        values = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": tok_s, "tokens_seen": state.tokens_seen,
                  "memory_mb": memory_mb(trainer.device), "epoch": epoch, **stats.metrics}
        if trainer.scaler.is_enabled():
            values["loss_scale"] = trainer.scaler.get_scale()
        self.log.write(state.step, "train", values)

    def log_evaluation(self, state: RunState, metrics: dict, epoch: float) -> None:
        self.log.write(state.step, "val", {**metrics, "best_val_loss": state.best_val_loss,
                                           "epoch": epoch})

    def saved(self, step: int) -> bool:
        return self.last_saved_step == step

    def checkpoint(self, state: RunState, trainer: Trainer, order: dict, rng: dict | None = None
                   ) -> None:
        """Checkpoint this step (collective: every rank contributes its RNG state, ``rng`` or
        its state now)."""
        rng = all_gather(rng_state(trainer.device) if rng is None else rng, self.dist)
        self.follow_length(state.max_steps)  # the checkpoint's config.json, and the run's
        if trainer.sharded:  # every rank writes its shards
            self._write_sharded(dataclasses.replace(state, rng=rng, order=order,
                                                    **trainer.state_dict()), trainer)
            self.last_saved_step = state.step
            return
        with main_first(self.dist):  # the others wait for the write, and stop if it fails
            if self.dist.main:
                weights = model_tensors(trainer.raw_model, self.trainable_only)
                full = dataclasses.replace(state, rng=rng, order=order, **trainer.state_dict(),
                                           weights=weights)
                self._write_checkpoint(full)
        self.last_saved_step = state.step

    def _write_checkpoint(self, state: RunState) -> None:
        if bad := checkpoint.first_nonfinite(state):  # never a "last good" checkpoint
            print(f"warning: step {state.step}: {bad} holds inf or NaN: no checkpoint written",
                  file=sys.stderr)
            return
        name = f"{rundir.CHECKPOINT_PREFIX}{state.step}"
        checkpoint.save(self.run_dir / rundir.CHECKPOINTS_DIR / name, state, self.config,
                        self.trainable_only)
        checkpoint.drop_old(self.run_dir, self.keep_last)

    def _write_sharded(self, state: RunState, trainer: Trainer) -> None:
        name = f"{rundir.CHECKPOINT_PREFIX}{state.step}"
        bad = checkpoint.save_sharded(self.run_dir / rundir.CHECKPOINTS_DIR / name, state,
                                      self.config, trainer.raw_model, trainer.optimizer,
                                      self.trainable_only, self.dist)
        if bad and self.dist.main:  # never a "last good" checkpoint
            print(f"warning: step {state.step}: {bad} holds inf or NaN: no checkpoint written",
                  file=sys.stderr)
        elif self.dist.main:
            checkpoint.drop_old(self.run_dir, self.keep_last)

    def best(self, step: int, metrics: dict, model: torch.nn.Module) -> None:
        """best/: the weights of the best evaluation so far, with its metrics and config (a
        sharded model's gathered to rank 0)."""
        gathered = None
        if distributed.is_sharded(model):
            gathered = checkpoint.gathered_tensors(model, self.trainable_only)
        with main_first(self.dist):
            if self.dist.main:
                tensors = gathered if gathered is not None else model_tensors(
                    model, self.trainable_only)
                self._write_best(step, metrics, tensors)

    def best_as_checkpointed(self, state: RunState, model: torch.nn.Module) -> None:
        """best/ as the resumed checkpoint (``state``, ``model`` its weights) knows it
        (collective). One that an evaluation after the checkpoint wrote (the interrupted run's,
        whose log lines are trimmed) is set aside as best-step-N-<time>, and best/ written again
        from the checkpoint's weights where they are its best: best/ never holds weights the
        resumed run has not reached, and no weights are deleted. Where the checkpoint's best is
        its own step and best/ lacks it (a kill between the checkpoint and best/), best/ is
        written from the checkpoint's weights."""
        written, metrics = None, None
        if self.dist.main:  # read once: every rank acts on what the main one read
            written = rundir.best_step(self.run_dir)
            if state.best_step == state.step:
                metrics = rundir.evaluation_at(self.run_dir / rundir.METRICS_FILE, state.step)
        written, metrics = all_gather((written, metrics), self.dist)[0]
        if written is None or written <= state.step:
            if metrics is not None and written != state.step:
                self.best(state.step, metrics, model)
            return
        aside = f"best-step-{written}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.dist.main:
            n = 1
            while (self.run_dir / aside).exists():  # another stop within the same second
                n += 1
                aside = f"best-step-{written}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            (self.run_dir / rundir.BEST_DIR).rename(self.run_dir / aside)
        barrier(self.dist)  # best/ is gone before any rank writes it again
        if metrics is not None:
            self.best(state.step, metrics, model)
            what = f"best/ holds the checkpoint's weights, its best (step {state.step})"
        elif state.best_step is None:
            what = ("no best/ (no evaluation before the checkpoint): the run exports its last "
                    "weights unless an evaluation writes one")
        else:
            what = (f"no best/ (the checkpoint's best, step {state.best_step}, was not kept): "
                    "the run exports its last weights unless it evaluates better")
        if self.dist.main:
            print(f"note: best/ held step {written}'s weights, past the checkpoint resumed "
                  f"(step {state.step}): set aside as {aside} (delete it when not needed); "
                  f"{what}")

    def _write_best(self, step: int, metrics: dict, tensors: dict) -> None:
        if bad := checkpoint.nonfinite_tensor(tensors):  # best/ holds finite weights only
            print(f"warning: step {step}: {bad} holds inf or NaN: best/ not written",
                  file=sys.stderr)
            return

        def write(tmp: Path) -> None:
            save_file(tensors, tmp / checkpoint.weights_file(self.trainable_only),
                      metadata={"step": str(step)})
            (tmp / rundir.BEST_METRICS).write_text(json.dumps({"step": step, **metrics}))
            (tmp / rundir.CONFIG_FILE).write_text(json.dumps(self.config, indent=1))

        write_dir_atomically(self.run_dir / rundir.BEST_DIR, write)

    def diverged(self, what: str, step: int, causes: list[str]) -> typing.NoReturn:
        """Stop the run, saying ``what`` went non-finite, its likely ``causes`` and the last good
        checkpoint (finite weights and optimizer state at the step its name says: none is
        written from others, and a resume sets them aside); never the one this process resumed
        from, whose resume would replay the same steps to the same stop."""
        checkpoints = list_checkpoints(self.run_dir)
        good = checkpoint.finite_checkpoint(checkpoints, self.trainable_only)
        if good is not None and good == self.resumed_from:
            kept = self._replay_advice(good, step, checkpoints)
        elif good is not None:  # a resume replays the same steps, lr and precision
            kept = (f"the last good checkpoint is {good}: --resume {self.run_dir} replays the "
                    "same steps from there; a change of --lr or --precision needs a new run "
                    "(another --name)")
        else:
            kept = ("no checkpoint with finite weights had been written yet: run the command "
                    "again with the changes (the same --name starts the run anew)")
        diagnosis = f"{what}. Likely causes: " + "; ".join(causes) + "."
        message = f"{diagnosis} {kept}."
        self.log.write(step, "error", {"message": message})
        raise NonFiniteLossError(message, step, diagnosis)

    def _replay_advice(self, resumed: Path, step: int, checkpoints: list[Path]) -> str:
        """How to go on from a stop before any checkpoint after ``resumed``, the one this
        process continued from: a change in a new run, or the good checkpoint before it."""
        advice = (f"the last checkpoint, {resumed}, is the one this run resumed from "
                  f"{step - rundir.checkpoint_step(resumed)} step(s) before: --resume "
                  f"{self.run_dir} would replay the same steps to the same stop; change what "
                  "diverged (the causes above) in a new run (another --name)")
        earlier = checkpoint.finite_checkpoint(checkpoints[:checkpoints.index(resumed)],
                                               self.trainable_only)
        if earlier is not None:
            advice += (f"; if {resumed.name} itself is suspect, rename {resumed} to "
                       f"broken-{resumed.name} and --resume {self.run_dir} continues from "
                       f"{earlier}")
        return advice

    def what_next(self) -> str:
        return rundir.what_next(self.hint, self.restarts)

    def close(self, outcome: str = trackers.FINISHED) -> None:
        """The log and trackers closed, ``outcome`` (trackers.FINISHED, FAILED, KILLED) recorded."""
        if self.log is not None:
            self.log.close(outcome)


def divergence_causes(lr: float, precision: str, injected: bool) -> list[str]:
    """What most often makes a run's loss or weights non-finite, the likeliest first."""
    causes = [f"the learning rate is too high ({lr:.3g}): lower lr or lengthen warmup_steps",
              "fp16 overflow: use precision bf16 or fp32" if precision == "fp16"
              else "exploding gradients: keep grad_clip > 0",
              "inf/NaN weights in a loaded checkpoint", "a model bug (mask, dtype casts)"]
    if injected:
        causes.insert(0, "injected on purpose: inject_nan_at_step is set")
    return causes


# A step's own metrics (StepStats.metrics) the console shows, by the name it shows them under:
# GRPO's rewards, pass and hack rates, KL, length and throughput; the preference tasks'
# implicit-reward accuracy and margin, and the policy's log-probs. All go to metrics.jsonl
# and the trackers.
CONSOLE_METRICS = {"reward_mean": "reward_mean", "pass_rate": "pass_rate",
                   "hack_rate": "hack_rate", "kl": "kl", "completion_length": "completion_length",
                   "samples_per_s": "samples_per_s",
                   "rewards/accuracies": "reward_acc", "rewards/margins": "reward_margin",
                   "logps/chosen": "logp_chosen", "logps/rejected": "logp_rejected"}


class Progress:
    """The console's view of the step loop: a progress bar on a terminal, else (a log file,
    --no-progress) a line per logged step; a line per evaluation with the time left. Tokens a
    second count training time only (``paused`` leaves out evaluation and saving)."""

    def __init__(self, state: RunState, enabled: bool, main: bool) -> None:
        self.main = main
        self.state = state  # the run's: its step, and its length (max_steps), which may move
        self.bar = progress_bar(total=state.max_steps, initial=state.step, desc="train",
                                unit="step", enabled=main and enabled, lines=False,
                                dynamic_ncols=True)
        self.lines = main and self.bar.disable
        self.started = time.perf_counter()
        self.first_step = state.step  # this process's first: the ETA counts from here
        self.window_start = self.started
        self.window_tokens = 0
        self.paused_s = 0.0  # evaluating and saving since ``started``
        self.paused_at: float | None = None  # when the pause under way began
        self.tok_s = 0.0  # the last logged step's throughput (0: none logged yet)
        self.tokens = 0  # tokens of the steps this process trained, as far as read back

    def step_done(self) -> None:
        self.bar.total = self.state.max_steps
        self.bar.update(1)

    def tokens_done(self, tokens: int) -> None:
        """Tokens of steps done, counted once their figures are read (trainingmanager._settle):
        before the logged step that shows their rate."""
        self.window_tokens += tokens
        self.tokens += tokens

    def step_line(self, step: int, stats: StepStats, epoch: float) -> float:
        """The bar's figures (or the console line) of a logged step; its tokens a second since
        the last logged step, which starts the next window."""
        now = time.perf_counter()
        self.tok_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start = now
        self.window_tokens = 0
        shown = {CONSOLE_METRICS[k]: f"{v:.3f}" for k, v in stats.metrics.items()
                 if k in CONSOLE_METRICS}
        self.bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{stats.loss:.4f}", **shown,
                             lr=f"{stats.lr:.2e}", tok_s=f"{self.tok_s:.0f}", refresh=False)
        if self.lines:
            extra = "".join(f" | {name} {value}" for name, value in shown.items())
            print(f"step {step}/{self.state.max_steps} | loss {stats.loss:.4f}{extra} | lr "
                  f"{stats.lr:.2e} | {self.tok_s:,.0f} tok/s | epoch {epoch:.2f}", flush=True)
        return self.tok_s

    def eval_line(self, metrics: dict, last: bool = False) -> None:
        """Where the run is, how it does, how long it takes; no time left to estimate at the
        run's last step, or where ``last`` says the run ends after this evaluation."""
        if not self.main:
            return
        state = self.state
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(state.step - self.first_step, 1) * (state.max_steps - state.step)
        train = "" if state.train_loss is None else f"train loss {state.train_loss:.4f} | "
        bpb = f" ({metrics['val_bpb']:.3f} bits/byte)" if "val_bpb" in metrics else ""
        if "val_pass@1" in metrics:  # task grpo: val_loss is the share failed
            quality = f"val pass@1 {metrics['val_pass@1']:.3f}"
        else:
            ppl = f" | ppl {metrics['val_ppl']:.2f}" if "val_ppl" in metrics else ""
            reward_margin = metrics.get("val_rewards/margins")  # a preference task's: its
            acc_name = "acc" if reward_margin is None else "reward_acc"  # accuracy is the reward's
            acc = f" | {acc_name} {metrics['val_accuracy']:.3f}" if "val_accuracy" in metrics else ""
            margin = "" if reward_margin is None else f" | reward_margin {reward_margin:.3f}"
            quality = f"val loss {metrics['val_loss']:.4f}{bpb}{ppl}{acc}{margin}"
        left = "" if last or state.step >= state.max_steps else f" | ETA {duration(eta)}"
        rate = ""  # none before this process trained a step
        if self.tokens:
            rate = f"{self.tokens / max(self.training_s(), 1e-9):,.0f} tok/s | "
        self.say(f"eval step {state.step}/{state.max_steps} | {train}{quality} | "
                 f"{rate}elapsed {duration(elapsed)}{left}")

    def say(self, line: str) -> None:
        """A line on stdout from rank 0, above the bar."""
        if self.main:
            tqdm.write(line, file=sys.stdout)

    def training_s(self) -> float:
        """Seconds this process trained: since it started, evaluations and saves left out."""
        now = time.perf_counter() if self.paused_at is None else self.paused_at
        return now - self.started - self.paused_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within: evaluation and saving, which are not training time."""
        self.paused_at = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - self.paused_at
            self.paused_at = None
            self.window_start += elapsed
            self.paused_s += elapsed

    def close(self) -> None:
        self.bar.close()
