"""Training for codelm: one loop (``train``) for from-scratch, fine-tuning and LoRA runs.

``train`` reads top to bottom (codelm.training's modules): the plan (plan: preset auto, hub
ids, an init_adapter's settings), the build (build: run directory, data, model, trainer, a
resumed checkpoint), the step loop (Trainer.train_step: forward, loss, backward, clip, optimizer
step), evaluation and checkpoints at their intervals (record), and the end (finish: the
export). A non-finite loss stops the run naming the last good checkpoint; checkpoints continue
bit-exactly; ``--overfit`` is the debugging ritual as a command."""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()
    process.exit_with_torchrun()  # a torchrun killed outright leaves no rank training on

import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

import eval as evaluation
from architecture import Transformer
from codelm.data.config import NO_CORPUS_TASKS, TASKS
from codelm.data.datasets import collate
from codelm.data.examples import check_sources
from codelm.models.generation import GenerationConfig, generate
from codelm.runs import rundir, trackers
from codelm.runs.checkpoint import StepStart
from codelm.runs.rundir import RunInterrupted
from codelm.runtime import distributed, process, settings
from codelm.runtime.console import progress_bar
from codelm.runtime.distributed import Dist, RankZeroFailed, resolve_device
from codelm.runtime.rng import rng_state, seed_everything
from codelm.runtime.settings import fields_of
from codelm.trainconfig import (
    BUDGET_LADDER,
    OVERFIT_STEPS,
    StepSettings,
    TrainConfig,
    build_parser,
    data_config,
    has_final_eval,
    model_config,
    read_config,
    where_set_of,
)
from codelm.training import build, finish, plan
from codelm.training.batches import Where
from codelm.training.budget import BudgetClock
from codelm.training.build import Run, UnreadStep
from codelm.training.plan import overfit_ignored, overfit_settings, parse_config
from codelm.training.record import NonFiniteLossError, Progress, divergence_causes
from codelm.training.trainer import (
    STOP_SIGNALS,
    StepAbandoned,
    StepStats,
    StopSignals,
    Trainer,
    best_quality,
    read_steps,
)

OVERFIT_CORPUS = settings.bundled("data", "overfit")
OVERFIT_LOSS = 0.05  # "memorised": the --overfit and --overfit-batches target
OVERFIT_LINE_S = 30.0  # --overfit says how it goes at least this often (a log file has no bar)
OVERFIT_SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 128, "mlp_hidden": 256}  # --overfit's model


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
    claimed: rundir.ClaimedDir | None = None  # the run directory's lock, train(keep_claim=True)
    #   hands it to its caller, which releases it (after the final evaluation)



def train(cfg: TrainConfig, on_eval: Callable[[int, dict], None] | None = None,
          resume_hint: str | None = None, restarts: bool = False,
          ends_process: bool = False, keep_claim: bool = False,
          where_set: Callable[[str], str] = settings.flag_of, checked: bool = False
          ) -> TrainResult:
    """Run (or continue, with ``cfg.resume``) one training run of ``cfg``, checked first as the
    command line's is (plan.validate_config: a Python caller's too; ``checked``: the caller
    checked it, as a command line, recipe or sweep trial does). ``on_eval(step,
    metrics)`` follows each evaluation (what it raises, e.g. optuna.TrialPruned, propagates once
    the run directory is consistent); ``resume_hint`` says "continue it with ..." in the caller's
    terms, ``where_set`` where a setting is set (the run's warnings name it so: --warmup-steps
    by default); ``restarts``: the caller runs it again from the start instead. ``ends_process``: a
    command's main ends the process when the run returns, so a stop one long operation of a step
    holds back may end it from another thread (``_stop_at_once``). ``keep_claim``: the directory
    stays locked for the caller's work on it (``result.claimed``: the final evaluation)."""
    if not checked:
        plan.validate_config(cfg, where_set)
    dist = distributed.this_process()
    device = resolve_device(cfg.device, dist)
    owns_group = distributed.join(dist, device)
    created = time.perf_counter()  # a time budget counts from here
    run = trainer = result = None
    try:
        with distributed.main_first(dist):
            if dist.main:
                trackers.check_ready(cfg.report_to)
                check_data(cfg)
        cfg = _planned(cfg, device, dist)
        claimed = rundir.claim_run_dir(cfg.resume, cfg.out_dir, cfg.name, cfg.run_stem,
                                       resume_hint, dist)
        run = Run(cfg, claimed, dist, device, created, resume_hint, restarts, where_set)
        loop = run.loop
        state = run.state  # the step loop's own: step, max_steps, best_val_loss, ...
        trainer = run.trainer
        batches = run.data.batches
        record = run.record
        progress = Progress(state, loop.progress, dist.main)
        signals = StopSignals(trainer.droppable, ends_process)
        result = TrainResult(record.run_dir, state.best_val_loss, state.step)
        clock, stop = run.clock, None
        # A budget's steps end: past it the run stops, a decay the machine slowed down cut
        # short, and its last evaluation still ends within the budget.
        deadline = None if clock is None else clock.steps_until
        raised: BaseException | None = None  # what ends the loop, if anything does
        try:
            result.early_stopped = state.out_of_patience(loop.early_stop_patience)
            while state.step < state.max_steps and not result.early_stopped:
                at_start = None  # where a step that a stop may drop begins
                if trainer.droppable:
                    at_start = StepStart(batches.order.state_dict(), rng_state(device))
                micro_batches, where = batches.next_step()
                if clock is not None:
                    clock = _follow_clock(run, clock, progress)
                # Only a stop watcher keeps the take-over: a local holding the run would keep a DDP
                # model alive past the group's end (below).
                stop_in_step = signals.for_step(
                    partial(_stop_at_once, run, at_start, result, signals, progress))
                try:
                    injected = loop.inject_nan_at_step == state.step + 1
                    figures = trainer.train_step(micro_batches, injected, stop_in_step)
                except StepAbandoned:  # a stop mid-step: the checkpoint is of the step's start
                    stop = signals.reason
                    _drop_step(run, at_start, stop, progress)
                    break
                state.step += 1
                run.unread.append(UnreadStep(state.step, where, figures))
                progress.step_done()
                stop, ends = _after_step(run, result, signals, progress, on_eval, deadline)
                if ends:
                    break
            _end(run, result, signals, stop, progress, on_eval)
        except BaseException as error:
            raised = error
            raise
        finally:
            progress.close()
            # (a KeyboardInterrupt on its way out is a second Ctrl-C's: that stop is under way)
            stopped = result.interrupted is not None or isinstance(raised, KeyboardInterrupt)
            record.close(_outcome(stopped, failed=raised is not None))
            signals.restore(taken=stopped)
        result.claimed = record.claimed if keep_claim else None  # else released below
        return result
    except KeyboardInterrupt as stop:  # a second Ctrl-C: the step loop's checkpoint is skipped
        if isinstance(stop, RunInterrupted) or run is None:
            raise
        raise rundir.interrupted(stop, run.record.run_dir, resume_hint, restarts) from None
    finally:
        if run is not None and (result is None or result.claimed is None):
            run.record.claimed.release()
        run_dir = None if run is None else run.record.run_dir
        del run, trainer  # the DDP or FSDP model goes before the group
        if owns_group:
            _leave_group(run_dir, resume_hint, restarts)


def check_data(cfg: TrainConfig) -> None:
    """Data a new run could not read, refused before the plan times models (seconds under
    preset auto); a resumed run's sources are its config.json's."""
    if cfg.resume is None and cfg.task in TASKS:
        check_sources(data_config(cfg))


def _planned(cfg: TrainConfig, device: torch.device, dist: Dist) -> TrainConfig:
    """``cfg`` planned for this machine (plan.plan_run), measuring its speed where it asks."""
    probe = partial(build.measure_speed, device=device, dist=dist)
    measure = partial(build.measure_step_cost, device=device, dist=dist)
    return plan.plan_run(cfg, device.type, dist.enabled, dist.main, probe, measure)


def _leave_group(run_dir: Path | None, resume_hint: str | None, restarts: bool) -> None:
    """Leave the job's process group. torchrun stops the other ranks when one dies: a stop
    that lands while leaving says how to continue the run, as one in the loop does."""
    try:
        distributed.leave()
    except KeyboardInterrupt as stop:
        if isinstance(stop, RunInterrupted):
            raise
        raise rundir.interrupted(stop, run_dir, resume_hint, restarts) from None


def _after_step(run: Run, result: TrainResult, signals: StopSignals, progress: Progress,
                on_eval: Callable[[int, dict], None] | None, deadline: float | None
                ) -> tuple[str | None, bool]:
    """What follows a step: its train line, the evaluation, the stop check and the checkpoint
    where they are due; the steps' figures read back only there (and each step under
    --overfit-batches, whose loss ends the run). The stop asked for, and whether the run ends."""
    loop, state, record = run.loop, run.state, run.record
    logged = state.step % loop.log_every == 0 or state.step in (1, state.max_steps)
    evaluates = state.step % loop.eval_every == 0 and state.step >= loop.warmup_steps
    saves = state.step % (loop.save_every or loop.eval_every) == 0
    stats = None
    if logged or evaluates or saves or loop.overfit_batches > 0:
        stats = _settle(run, progress)
    if logged:
        _log_step(run, stats, progress)
    memorised = loop.overfit_batches > 0 and stats.loss < OVERFIT_LOSS
    with progress.paused():  # evaluation and saving are not training time
        if memorised or evaluates:
            result.val_metrics = _evaluate(run, progress, on_eval, memorised)
            result.early_stopped = _stops_early(run, progress)
        now = time.perf_counter()
        past_max_time = loop.max_time_s is not None and now - progress.started > loop.max_time_s
        past_deadline = deadline is not None and now > deadline  # the budget's clock
        stop = signals.stop_requested(record.dist, run.device, past_max_time or past_deadline,
                                      lagged=True)
    ends = bool(stop or result.early_stopped or memorised)
    if ends and not logged:  # the run's last step is always logged
        if stats is None:  # the wait for the steps still queued is training time
            stats = _settle(run, progress)
        _log_step(run, stats, progress)
    if (saves or ends) and not record.saved(state.step):
        with progress.paused():
            record.checkpoint(state, run.trainer, run.data.batches.order.state_dict())
    return stop, ends


def _settle(run: Run, progress: Progress) -> StepStats | None:
    """The figures of the steps not read yet, read back at one wait for the device into the
    run's state (its tokens seen, the last loss) in their order; a non-finite one stops the run.
    The last one's StepStats; None where every step was read."""
    unread, run.unread = run.unread, []
    if not unread:
        return None
    state = run.state
    stats = read_steps([step.figures for step in unread])
    for step, step_stats in zip(unread, stats):
        if step_stats.nonfinite:
            _nonfinite(run, step_stats, step.step, step.where)
        state.tokens_seen += step_stats.tokens
        state.train_loss = step_stats.loss
        progress.tokens_done(step_stats.tokens)
    return stats[-1]


def _log_step(run: Run, stats: StepStats, progress: Progress) -> None:
    """The train line of this step: metrics.jsonl and the trackers, the bar or the console."""
    epoch = run.data.batches.epoch(run.state.step)
    tok_s = progress.step_line(run.state.step, stats, epoch)
    run.record.log_step(run.state, stats, tok_s, epoch, run.trainer)


def _evaluate(run: Run, progress: Progress, on_eval: Callable[[int, dict], None] | None,
              last: bool = False) -> dict:
    """Evaluate; count it toward early stopping; keep best/; call ``on_eval``. ``last``: the
    run ends after this evaluation (its console line shows no time left)."""
    state, record = run.state, run.record
    metrics = run.trainer.evaluate(*run.data.batches.validation())
    loss = metrics["val_loss"]
    if not math.isfinite(loss):  # the last update made the weights inf or NaN
        causes = divergence_causes(run.loop.lr, run.trainer.precision,
                                   run.loop.inject_nan_at_step == state.step)
        record.diverged(f"non-finite validation loss ({loss}) at step {state.step}: the weights "
                        "diverged", state.step, causes)
    improved = state.note_evaluation(loss, run.loop.early_stop_min_delta)
    record.log_evaluation(state, metrics, run.data.batches.epoch(state.step))
    progress.eval_line(metrics, last)
    if improved:
        # Never best/ without a checkpoint: a kill between them would leave nothing to resume.
        if record.last_saved_step < 0:
            record.checkpoint(state, run.trainer, run.data.batches.order.state_dict())
        record.best(state.step, metrics, run.trainer.raw_model)
    if on_eval is not None:
        on_eval(state.step, dict(metrics))
    return metrics


def _stops_early(run: Run, progress: Progress) -> bool:
    loop, state = run.loop, run.state
    if not state.out_of_patience(loop.early_stop_patience):
        return False
    progress.say(f"stopped early at step {state.step} of {state.max_steps}: "
                 f"{loop.early_stop_patience} evaluation(s) without a fall of more than "
                 f"{loop.early_stop_min_delta:g} "
                 "(--early-stop-patience, --early-stop-min-delta)")
    return True


def _decay_due(clock: BudgetClock, step: int, progress: Progress, dist: Dist) -> bool:
    """Whether a budgeted run's decay starts at this step, by its clock (rank 0's, for all); a
    decay from this process's first step keeps its plan."""
    if step == progress.first_step:
        return False
    return distributed.broadcast(clock.decay_due(step, time.perf_counter()), dist)


def _follow_clock(run: Run, clock: BudgetClock, progress: Progress) -> BudgetClock | None:
    """A budgeted run's length before the step: in its stable phase the clock's
    (``BudgetClock.stable_length``), fixed when the clock starts the decay; the clock while the
    stable phase lasts, else None."""
    state = run.state
    if _decay_due(clock, state.step, progress, run.trainer.dist):
        _start_decay(run, clock, progress)
        return None
    state.max_steps = clock.stable_length(state.step, state.max_steps)
    return clock


def _start_decay(run: Run, clock: BudgetClock, progress: Progress) -> None:
    """A budgeted run at its decay's start: the decay takes the steps that fit in the time left
    at the rate its steps ran so far (evaluating and saving left out; the clock counts the
    evaluations due), which fixes the run's length, and config.json records it, which
    reproduces the run (the lr is the peak's until the decay starts, whatever the length)."""
    state, trainer = run.state, run.trainer
    now = time.perf_counter()
    step_s = progress.training_s() / max(1, state.step - progress.first_step)
    decay = distributed.broadcast(clock.decay_steps(state.step, now, step_s), trainer.dist)
    state.max_steps = state.step + decay
    trainer.decay_steps = decay
    run.record.follow_decay(state.max_steps, decay)
    if trainer.dist.main:
        print(f"the decay starts at step {state.step}: {step_s:.3f} s a step so far -> decay_steps "
              f"{decay}, max_steps {state.max_steps} (planned {run.loop.max_steps}; recorded in "
              "config.json)")


def _drop_step(run: Run, at_start: StepStart, stop: str, progress: Progress) -> None:
    """A step dropped for a stop: a checkpoint of the step before it with the data order and
    RNG of the dropped step's start, so a resume runs it exactly as it would have run."""
    state = run.state
    _settle(run, progress)
    if not run.record.saved(state.step):
        run.record.checkpoint(state, run.trainer, at_start.order, at_start.rng)
    progress.say(f"{stop}: step {state.step + 1} dropped mid-way, not applied")


def _stop_at_once(run: Run, at_start: StepStart, result: TrainResult, signals: StopSignals,
                  progress: Progress, stop: str) -> int:
    """A stop that the step under way has not acted on in time (one of its operations runs on):
    what the loop and ``train`` do for a stop mid-step, done from the watcher's thread while the
    main thread is held before the step's update: the step dropped, its checkpoint, the log
    closed and the run directory released. The exit code: the stop's, or an error's."""
    progress.say(f"\n{stop}: step {run.state.step + 1} is inside one long operation: not "
                 "waiting for it")
    try:
        _drop_step(run, at_start, stop, progress)
        _end(run, result, signals, stop, progress, None)
    except RUN_ERRORS as e:
        return report_run_error(e)
    finally:
        progress.close()
        run.record.close(trackers.KILLED)
        run.record.claimed.release()
    return process.interrupted_exit_code(stop)


def _outcome(stopped: bool, failed: bool) -> str:
    """How a run's attempt ended, as its trackers record it: stopped (resumable), failed or
    finished."""
    if stopped:
        return trackers.KILLED
    return trackers.FAILED if failed else trackers.FINISHED


def _nonfinite(run: Run, stats: StepStats, step: int, where: Where) -> None:
    """Stop the run on a non-finite loss or gradient at ``step``: where in the data, causes, how
    to go on."""
    batches = run.data.batches
    value = stats.loss if stats.nonfinite == "loss" else stats.grad_norm
    last = where.position + batches.examples_per_step - 1
    place = (f"epoch {batches.epoch(step):.3g}, training {batches.unit} {where.position}..{last} "
             f"of shuffled pass {where.shuffle} of the data; the update was not applied")
    causes = divergence_causes(stats.lr, run.trainer.precision,
                               run.loop.inject_nan_at_step == step)
    run.record.diverged(f"non-finite {stats.nonfinite} ({value}) at step {step}: {place}", step,
                        causes)


def _end(run: Run, result: TrainResult, signals: StopSignals, stop: str | None,
         progress: Progress, on_eval: Callable[[int, dict], None] | None) -> None:
    """After the loop: the last evaluation and checkpoint, the export, and what is left."""
    loop, state, record = run.loop, run.state, run.record
    _settle(run, progress)
    # The time budget ends the run as it would end, but says that it is not finished.
    result.stopped_by_budget = stop == "time budget" and state.step < state.max_steps
    if stop not in STOP_SIGNALS:  # the loop ended, or the time budget did
        needs_eval = state.last_eval_step != state.step
        if needs_eval:
            with progress.paused():  # no training time: its line's tok/s leaves it out
                result.val_metrics = _evaluate(run, progress, on_eval)
        # A checkpoint written before this evaluation is written again, holding its result.
        if needs_eval or not record.saved(state.step):
            record.checkpoint(state, run.trainer, run.data.batches.order.state_dict())
        # From here ``stop`` is a signal that came during the evaluation or the export, or
        # None (the time budget is result.stopped_by_budget).
        stop = signals.stop_requested(record.dist, run.device)
        progress.close()  # the steps are done: the export's lines go below the bar's last frame
        if loop.export and stop is None:
            result.export_dir, result.sample = finish.export_run(run)
            stop = signals.stop_requested(record.dist, run.device)
    if stop in STOP_SIGNALS:
        result.interrupted = stop
        if record.dist.main and result.export_dir is not None:
            exported = rundir.exported_step(record.run_dir)
            held = "the last weights" if exported is None else f"best/ of step {exported}"
            print(f"\n{stop}: the run had finished (checkpoint at step {state.step}, export of "
                  f"{held}); stopping with the signal's exit code")
        elif record.dist.main:
            saved = "stopped" if record.restarts else "checkpoint saved"
            print(f"\n{stop}: {saved} at step {state.step}; {record.what_next()}")
    elif result.stopped_by_budget and record.dist.main:
        saved = "" if record.restarts else "; checkpoint saved"
        exported = ("" if result.export_dir is None else
                    f"; export/ holds its best weights so far (step {state.best_step})")
        limit = (f"--max-time-s {loop.max_time_s:g}" if loop.max_time_s is not None else
                 "--time-budget-min, the machine slower than measured")
        print(f"time budget ({limit}) reached at step {state.step}/{state.max_steps}: the run is "
              f"not finished{saved}{exported}; {record.what_next()}")
    result.step = state.step
    result.best_val_loss = state.best_val_loss
    result.best_step = state.best_step
    result.train_loss = state.train_loss


# ---- --overfit: the debugging ritual as a command ----

@torch.no_grad()
def structure_diagnosis(model: nn.Module, vocab_size: int, length: int) -> str | None:
    """Check on random ids that the samples of a batch stay apart and later tokens do not change
    earlier logits: a model breaking either still drives the loss down, yet learns nothing."""
    device = next(model.parameters()).device
    model.eval()  # run_overfit's train_step turns training back on
    generator = torch.Generator().manual_seed(0)
    t = max(4, min(length, 16))  # the probe's length
    x = torch.randint(0, vocab_size, (3, t), generator=generator)
    other = x.clone()  # its first sample changed
    other[0] = torch.randint(0, vocab_size, (t,), generator=generator)
    later = x.clone()  # its second half changed
    later[:, t // 2:] = torch.randint(0, vocab_size, (3, t - t // 2), generator=generator)
    base = model(x.to(device))
    if not torch.allclose(model(other.to(device))[1:], base[1:], atol=1e-5):
        return ("changing one sample of a batch changed the logits of the others: the "
                "transposed-batch bug (a (time, batch) tensor read as (batch, time)); check "
                "every reshape/transpose before the attention.")
    if not torch.allclose(model(later.to(device))[:, :t // 2], base[:, :t // 2], atol=1e-5):
        return ("changing later tokens changed earlier logits: the model sees the future "
                "(a missing or wrong causal mask).")
    return None


def run_overfit(cfg: TrainConfig, max_steps: int = OVERFIT_STEPS, lr: float = 3e-3,
                clock: Callable[[], float] = time.monotonic) -> tuple[bool, str]:
    """Memorise ``data/overfit``, then reproduce each file from its first line: (passed, report).
    A line on stdout at least every OVERFIT_LINE_S seconds of ``clock`` says how it goes."""
    from tokenizer import CodeTokenizer, decode_generated

    started = time.perf_counter()
    files = sorted(OVERFIT_CORPUS.glob("*.py"))
    assert files, f"{OVERFIT_CORPUS}: the bundled overfit corpus is missing"
    texts = [f.read_text("utf-8") for f in files]
    tok = CodeTokenizer.train(texts, min_freq=1)
    seqs = [[tok.eos_id, *tok.encode(t), tok.eos_id] for t in texts]
    batch = collate([{"input_ids": torch.tensor(seq[:-1]), "labels": torch.tensor(seq[1:])}
                     for seq in seqs], tok.pad_id)
    block = max(map(len, seqs))  # generation re-creates the whole sequence, final EOS included
    small = cfg.preset == "auto"  # by default OVERFIT_SHAPE; a named preset is its own shape
    preset = BUDGET_LADDER[0]["preset"] if small else cfg.preset
    shape = {}
    for key, small_value in OVERFIT_SHAPE.items():  # a shape flag given wins
        shape[key] = getattr(cfg, key) or (small_value if small else None)
    ocfg = dataclasses.replace(
        cfg, preset=preset, **shape, block_size=block, dropout=0.0, lr=lr,
        warmup_steps=min(20, max_steps // 10), max_steps=max_steps, weight_decay=0.0,
        grad_accum=1, label_smoothing=0.0, lora_r=0, quantize_bits=0, init_from=None,
        compile=False)
    seed_everything(ocfg.seed)
    model = Transformer(model_config(ocfg, tok.vocab_size, tok.bos_id, tok.eos_id))
    device = resolve_device(ocfg.device, Dist())
    trainer = Trainer(model, StepSettings(**fields_of(StepSettings, ocfg)), device)
    if problem := structure_diagnosis(trainer.raw_model, tok.vocab_size, block):
        return False, f"FAIL before training: diagnosis: {problem}"

    losses: list[float] = []
    began = said = clock()
    with progress_bar(total=max_steps, desc="overfit", unit="step", enabled=cfg.progress,
                      lines=False) as bar:  # its own lines say the loss
        for _ in range(max_steps):
            stats = trainer.train_step([batch]).read()
            if stats.nonfinite:
                return False, (f"FAIL: diagnosis: non-finite {stats.nonfinite} at step "
                               f"{len(losses) + 1} on a tiny clean corpus: a numerical bug in the "
                               "model or the loss (dtype casts, masking, division by zero).")
            losses.append(stats.loss)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
            if stats.loss < OVERFIT_LOSS:
                break
            if clock() - said >= OVERFIT_LINE_S:  # a log file gets no bar
                said = clock()
                bar.write(f"overfit: step {len(losses)}/{max_steps} | loss {stats.loss:.4f} "
                          f"(target {OVERFIT_LOSS}) | {said - began:.0f} s", file=sys.stdout)
                sys.stdout.flush()
    steps, first, last = len(losses), losses[0], losses[-1]
    head = (f"{len(files)} files, {tok.vocab_size} tokens vocabulary, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; loss "
            f"{first:.3f} -> {last:.4f} in {steps} steps, {time.perf_counter() - started:.0f} s")
    if last >= OVERFIT_LOSS:
        by_step = [StepLoss(step, loss) for step, loss in enumerate(losses, 1)]
        trend = loss_trend(by_step)
        if trend == "flat":
            why = (f"the loss barely moved: raise --lr ({lr:g}), or check that gradients reach "
                   "the weights (frozen or detached parameters)")
        elif trend == "falling":  # too few steps (max_steps), not a stalled loss
            why = (f"the loss was still falling when its {steps} steps ran out: raise "
                   f"--max-steps to about {steps_to_memorise(by_step)} (--overfit's own is "
                   f"{OVERFIT_STEPS})")
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


class StepLoss(NamedTuple):
    step: int
    loss: float


def loss_trend(losses: Sequence[StepLoss]) -> str:
    """How a loss that should have reached OVERFIT_LOSS ended: "flat" (it barely moved),
    "falling" (still falling over its last quarter of steps: too few steps) or "stalled".
    ``losses``: oldest first."""
    first = losses[0].loss
    last = losses[-1].loss
    if last > 0.9 * first:
        return "flat"
    if last < 0.98 * _quarter_back(losses).loss:
        return "falling"
    return "stalled"


def steps_to_memorise(losses: Sequence[StepLoss]) -> int:
    """The step a falling loss reaches OVERFIT_LOSS at the pace of its last quarter (a
    geometric fall), rounded up to two significant digits."""
    last = losses[-1]
    back = _quarter_back(losses)
    pace = math.log(last.loss / back.loss) / (last.step - back.step)  # < 0
    step = last.step + math.ceil(math.log(OVERFIT_LOSS / last.loss) / pace)
    unit = 10 ** max(0, len(str(step)) - 2)
    return math.ceil(step / unit) * unit


def _quarter_back(losses: Sequence[StepLoss]) -> StepLoss:
    """The loss a quarter of the steps (at least 2) before the last one."""
    last_step = losses[-1].step
    back_to = last_step - max(2, last_step // 4)
    for entry in reversed(losses):
        if entry.step <= back_to:
            return entry
    return losses[0]


def overfit_batches_report(cfg: TrainConfig, result: TrainResult) -> tuple[bool, str]:
    """--overfit-batches' verdict: PASS, or FAIL saying what to change, from the loss's trend
    (the steps metrics.jsonl logged) and the settings config.json recorded."""
    ok = result.train_loss is not None and result.train_loss < OVERFIT_LOSS
    loss = "no loss" if result.train_loss is None else f"loss {result.train_loss:.4f}"
    head = (f"{'PASS' if ok else 'FAIL'}: {cfg.overfit_batches} batch(es) of the training data, "
            f"{loss} after {result.step} steps (target {OVERFIT_LOSS})")
    if ok:
        return True, head
    losses = _logged_losses(result.run_dir)
    if len(losses) < 2:
        return False, f"{head}: not memorised; raise --max-steps or --lr"
    ran = settings.read_json_object(result.run_dir / rundir.CONFIG_FILE, "run config")
    trend = loss_trend(losses)
    if trend == "flat":
        why = (f"the loss barely moved: raise --lr ({ran['lr']:g}), or check that gradients "
               "reach the weights (--overfit checks the model and the loss alone)")
    elif trend == "falling":
        why = (f"the loss was still falling when its {result.step} steps ran out: raise "
               f"--max-steps to about {steps_to_memorise(losses)}")
    else:
        held = [f"--{key.replace('_', '-')} 0 (it is {ran[key]:g})"
                for key in ("dropout", "label_smoothing", "weight_decay") if ran.get(key)]
        also = f", or {', '.join(held)}: they hold a training loss up" if held else ""
        frozen = (", or add lm_head to --lora-targets (a frozen head's logits can hold the loss "
                  "above the target once every token is right)" if ran.get("lora_r") else "")
        why = (f"the loss fell but stalled above the target: try a lower --lr ({ran['lr']:g})"
               f"{also}{frozen}; --overfit checks the model and the loss alone")
    return False, f"{head}: not memorised: {why}"


def _logged_losses(run_dir: Path) -> list[StepLoss]:
    """The loss of each train line of the run's metrics.jsonl, oldest first."""
    losses = []
    with contextlib.suppress(OSError):
        for line in (run_dir / rundir.METRICS_FILE).read_text("utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                if entry["kind"] == "train":
                    losses.append(StepLoss(int(entry["step"]), float(entry["loss"])))
    return losses


# ---- Command line ----

RUN_ERRORS = (NonFiniteLossError, ValueError, OSError)  # reported as one line, no traceback


def report_run_error(e: Exception) -> int:
    """Print one of RUN_ERRORS (rank 0 only); exit code 1 for a diverged run, else 2."""
    if process.is_rank_zero():
        print(f"error: {process.os_error_message(e) if isinstance(e, OSError) else e}",
              file=sys.stderr)
    return 1 if isinstance(e, NonFiniteLossError) else 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with process.interrupt_on_sigterm():  # outside the step loop: data, tokenizer, export
            # --print-config: the merged config, checked for its keys and types only (no
            # checkpoint is looked for, no hub id fetched)
            if settings.printed_config(build_parser(), argv, read_config(argv).cfg,
                                       "train"):
                return 0
            cfg = parse_config(argv)
            if cfg.overfit:
                overfit = overfit_settings(cfg)
                if ignored := overfit_ignored(cfg):
                    named = (f"setting {ignored[0]} means" if len(ignored) == 1
                             else f"settings {', '.join(ignored)} mean")
                    print(f"note: --overfit writes no run, so the run {named} nothing to it; "
                          "--overfit-batches K trains a run on your data", file=sys.stderr)
                passed, report = run_overfit(cfg, **overfit)
                print(report)
                return 0 if passed else 1
            result = train(cfg, ends_process=True, keep_claim=True,
                           where_set=where_set_of(argv), checked=True)  # by parse_config
    except RankZeroFailed:
        return 2
    except RUN_ERRORS as e:
        return report_run_error(e)
    except KeyboardInterrupt as stop:
        if process.is_rank_zero() and getattr(stop, "resume", None) is not None:
            print(f"interrupted; the checkpoints written are kept: continue with {stop.resume}",
                  file=sys.stderr)
        elif process.is_rank_zero():
            print("interrupted before the first checkpoint: nothing to resume; run the same "
                  "command again", file=sys.stderr)
        return process.interrupted_exit_code(stop)
    try:
        return _after_training(cfg, result)
    finally:
        result.claimed.release()


def _after_training(cfg: TrainConfig, result: TrainResult) -> int:
    """The end of a command's run, its directory still locked: the final evaluation and the
    last lines; the exit code."""
    if result.interrupted:
        if has_final_eval(cfg) and result.export_dir is not None and process.is_rank_zero():
            print(f"final evaluation not run: --resume {result.run_dir} runs it",
                  file=sys.stderr)
        return process.interrupted_exit_code(result.interrupted)
    if not process.is_rank_zero():  # under torchrun rank 0 reports for all
        return 0
    if cfg.overfit_batches:
        ok, report = overfit_batches_report(cfg, result)
        print(report)
        return 0 if ok else 1
    if has_final_eval(cfg) and result.export_dir is not None:
        try:
            with process.interrupt_on_sigterm():
                budgeted = cfg.max_steps is None and cfg.epochs is None and not cfg.resume
                limit = finish.final_eval_limit(cfg.time_budget_min if budgeted else None)
                finish.final_quality(result.run_dir, result.val_metrics, cfg.device, limit)
        except KeyboardInterrupt as stop:
            print(f"interrupted during the final evaluation; the run is trained and exported: "
                  f"--resume {result.run_dir} evaluates it again", file=sys.stderr)
            return process.interrupted_exit_code(stop)
    if result.best_val_loss is not None:
        print(f"{best_quality(cfg.task, result.best_val_loss)} at step {result.best_step}; run "
              f"dir {result.run_dir}")
    if not has_final_eval(cfg):
        command, note = eval_command(cfg, result.run_dir)
        print(f"score it: {command}")
        if note:
            print(f"  ({note})")
    return 0


def eval_command(cfg: TrainConfig, run_dir: Path) -> evaluation.ScoredBy:
    """The eval.py command that scores a run making no final evaluation on the tasks of what
    it trained for (a run on no corpus: the tasks that score it), beside the model it started
    from (an --init-adapter run's adapter, else the base it fine-tuned), the same on a resume,
    which reads the adapter's base into init_from; and a note on it ("" for none)."""
    label, start = ("start", cfg.init_adapter) if cfg.init_adapter else ("base", cfg.init_from)
    base = f"{label}={shlex.quote(start)} " if start else ""
    command = f"python eval.py --models {base}{shlex.quote(str(run_dir))}"
    if cfg.task not in NO_CORPUS_TASKS:
        return evaluation.ScoredBy(command, "")
    flags, note = evaluation.scored_by(dataclasses.asdict(cfg))
    return evaluation.ScoredBy(f"{command} {flags}", note)


if __name__ == "__main__":
    sys.exit(process.run_main(main))
