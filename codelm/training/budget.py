"""What a run can afford on this machine, known before its first step: one step's cost (the
memory its activations hold, the seconds it takes, measured on short sequences and scaled:
``step_cost``, ``scaled_cost``) and its refusal beyond the machine (``check_step_cost``); and
the time budget's steps (``fit_budget``) and clock (``BudgetClock``, which ends the stable
phase of the learning rate by the clock). Measures come from the caller, which times its own
training step (``seconds_a_step``); what is here is the arithmetic on them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch

from architecture import Transformer
from codelm.data.config import BPE_SPECIAL_TOKENS
from codelm.models import quantize
from codelm.runtime.console import byte_size
from codelm.trainconfig import TrainConfig, has_final_eval, model_config

# ---- A step timed, and the vocabulary of the models measured ----

# A step's time is the fastest of this many windows: a load that comes and goes slows some
# windows, never the machine's own speed.
TIMING_WINDOWS = 5
WARM_UP_STEPS = 3  # the steps before the windows: allocations, kernel selection


def seconds_a_step(step: Callable[[], object], at_least_s: float,
                   agreed: Callable[[bool], bool] = bool) -> float:
    """Seconds ``step`` takes on this machine: after WARM_UP_STEPS steps, the fastest of
    TIMING_WINDOWS windows of at least ``at_least_s / TIMING_WINDOWS`` seconds (and one step).
    ``agreed``: whether to step again, as every process of a group takes it (rank 0's answer
    where the steps are collectives)."""
    for _ in range(WARM_UP_STEPS):
        step()
    fastest = math.inf
    for _ in range(TIMING_WINDOWS):
        steps = 0
        start = time.perf_counter()
        while steps < 1 or agreed(time.perf_counter() - start < at_least_s / TIMING_WINDOWS):
            step()
            steps += 1
        fastest = min(fastest, (time.perf_counter() - start) / steps)
    return fastest


BYTE_PIECES = 256  # a trained tokenizer's pieces for single bytes
UNCAPPED_PIECES = 8000  # the learned pieces measured for a tokenizer with no cap on them


def probe_vocab(cfg: TrainConfig) -> int:
    """The vocabulary of the models preset auto measures: the trained tokenizer's, about (its
    learned pieces, 256 bytes and its special tokens: a CodeTokenizer's 6, a bpe's 7)."""
    code_specials = 6  # len(tokenizer.CODE_SPECIAL_TOKENS): plan does not load the tokenizer
    specials = (len(BPE_SPECIAL_TOKENS) if cfg.tokenizer_kind == "bpe"
                else code_specials)
    return (cfg.tokenizer_max_vocab or UNCAPPED_PIECES) + BYTE_PIECES + specials


# ---- One step's cost, known before the first: the memory it holds, the time it takes ----

# The lengths whose saved activations give the fit (a longer block is scaled from them).
MEASURED_LENGTHS = (32, 64, 128)
# A step predicted to take longer than this is named before training.
LONG_STEP_S = 60.0
# A step predicted to take longer than this is refused, whatever sets the run's length (force
# trains it): twelve steps an hour at most, so a day of training makes fewer than 300 updates,
# and evaluations and checkpoints lie hours apart.
MAX_STEP_S = 300.0
# A budgeted run needs at least this many steps in its time left (it times 8 of them first).
FEWEST_BUDGET_STEPS = 20
# The share of the memory free now that one micro-batch's activations may take.
MEMORY_SHARE = 0.9


class StepCost(NamedTuple):
    """One training step of a shape on this machine, scaled from short sequences."""

    activation_bytes: float  # what one micro-batch saves for its backward
    seconds: float  # the whole optimizer step: every micro-batch's forward and backward


class StepMeasure(NamedTuple):
    """A step's cost measured on this machine before it is timed, and the memory free there."""

    cost: StepCost
    free_bytes: float


def step_flops(params: int, width: int, n: int) -> float:
    """A training step's FLOPs for one sequence of ``n`` tokens: 6 a parameter a token, and
    6 ``width`` (n_layer x n_embd) n^2 for causal attention."""
    return 6 * params * n + 6 * width * n * n


def step_cost(model: torch.nn.Module, block_size: int, batch_size: int, grad_accum: int,
              device: torch.device, autocast: Callable[[], AbstractContextManager]) -> StepCost:
    """Measured on single sequences of MEASURED_LENGTHS tokens (of ``block_size`` where it is
    no longer) and scaled to ``batch_size`` x ``block_size``: the bytes autograd saves, fitted
    as c + a n + b n^2 (the square: attention that keeps its scores), and the seconds from the
    step's FLOPs (6 a parameter a token, 6 n_layer n_embd n^2 for causal attention) at the rate
    the longest measured sequence ran (``seconds_a_step``). The RNG streams are left as they were."""
    lengths = MEASURED_LENGTHS if block_size > MEASURED_LENGTHS[-1] else (block_size,)
    forks = [device] if device.type == "cuda" else []
    was_training = model.training
    model.train()  # through the backward: a recomputed block replays the forward's dropout
    with torch.random.fork_rng(devices=forks):
        saved = [_saved_bytes(model, n, device, autocast) for n in lengths]
        longest = lengths[-1]
        measured_s = seconds_a_step(partial(_forward_backward, model, longest, device, autocast),
                                    at_least_s=0.0)
    model.train(was_training)
    if len(lengths) == 1:  # measured at the block size itself
        per_sequence = float(saved[0])
    else:
        powers = torch.tensor([[1.0, n, n * n] for n in lengths], dtype=torch.float64)
        c, a, b = torch.linalg.solve(powers, torch.tensor(saved, dtype=torch.float64)).tolist()
        per_sequence = max(c, 0.0) + max(a, 0.0) * block_size + max(b, 0.0) * block_size**2
    params = quantize.parameter_count(model)  # a quantized base counts its weights, not its codes
    width = model.cfg.n_layer * model.cfg.n_embd
    ratio = step_flops(params, width, block_size) / step_flops(params, width, longest)
    return StepCost(per_sequence * batch_size, measured_s * ratio * batch_size * grad_accum)


class ModelShape(NamedTuple):
    params: int
    width: int  # n_layer x n_embd


def model_shape(cfg: TrainConfig) -> ModelShape:
    """The size of ``cfg``'s model as preset auto measures it, built on the meta device: no
    memory, no init."""
    with torch.device("meta"):
        model = Transformer(model_config(cfg, probe_vocab(cfg), None, None))
    return ModelShape(model.num_parameters(), model.cfg.n_layer * model.cfg.n_embd)


def scaled_cost(measured: StepCost, of: TrainConfig, to: TrainConfig) -> StepCost:
    """The step of ``to``'s model and shape predicted from one ``measured`` of ``of``'s: the
    seconds by the step's FLOPs (``step_flops``), the activations by the width and the tokens of
    a micro-batch (SDPA's kernels save no scores). A larger model computes a FLOP faster than
    the one measured, so its seconds are predicted high rather than low."""
    mine, theirs = model_shape(of), model_shape(to)

    def flops(cfg: TrainConfig, shape: ModelShape) -> float:
        sequences = cfg.batch_size * cfg.grad_accum
        return step_flops(shape.params, shape.width, cfg.block_size) * sequences

    def activations(cfg: TrainConfig, shape: ModelShape) -> float:
        return shape.width * cfg.block_size * cfg.batch_size

    return StepCost(
        measured.activation_bytes * activations(to, theirs) / activations(of, mine),
        measured.seconds * flops(to, theirs) / flops(of, mine))


def _loss(model: torch.nn.Module, n: int, device: torch.device,
          autocast: Callable[[], AbstractContextManager]) -> torch.Tensor:
    """The summed loss of one random sequence of ``n`` tokens."""
    ids = torch.randint(model.cfg.vocab_size, (1, n), device=device)
    with autocast():
        return model(ids, ids, reduction="sum")


def _saved_bytes(model: torch.nn.Module, n: int, device: torch.device,
                 autocast: Callable[[], AbstractContextManager]) -> int:
    """Bytes of the tensors autograd saves for the backward of one sequence of ``n`` tokens
    (the weights themselves, already in memory, not counted)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _loss(model, n, device, autocast)
    del loss
    return sum(storages.values())


def _forward_backward(model: torch.nn.Module, n: int, device: torch.device,
                      autocast: Callable[[], AbstractContextManager]) -> None:
    _loss(model, n, device, autocast).backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # timed: the GPU's work, not its launch
        torch.cuda.synchronize(device)


def step_refusal(cost: StepCost, free_bytes: float, seconds_left: float | None) -> str | None:
    """Why a step is beyond this machine, in every run: its micro-batch's activations exceed
    MEMORY_SHARE of the memory free, it takes longer than MAX_STEP_S, or a budgeted run
    (``seconds_left``) fits fewer than FEWEST_BUDGET_STEPS of it; None where it is not."""
    step = f"one step takes about {_minutes(cost.seconds)} here"
    shorter = "lower --block-size or --batch-size"
    if cost.activation_bytes > MEMORY_SHARE * free_bytes:
        return (f"one micro-batch saves about {byte_size(cost.activation_bytes)} of activations, "
                f"more than the {byte_size(free_bytes)} free: {shorter}, or set "
                "--gradient-checkpointing")
    if cost.seconds > MAX_STEP_S:
        return (f"{step}, more than the {_minutes(MAX_STEP_S)} a run's step may take "
                f"(attention grows with the square of the length): {shorter}")
    if seconds_left is None:
        return None
    missing_min = _minutes_up(cost.seconds * FEWEST_BUDGET_STEPS - seconds_left)
    more = f"raise --time-budget-min by {missing_min:g} min or more"
    if seconds_left <= 0:
        return (f"the time budget was spent before training (preparing the data, loading and "
                f"timing the model), {_minutes(-seconds_left)} over it: {more} for "
                f"{FEWEST_BUDGET_STEPS} steps (data prepared once is read from its cache)")
    if cost.seconds * FEWEST_BUDGET_STEPS > seconds_left:
        return (f"{step}, and the time budget has {_minutes(seconds_left)} left (what preparing "
                f"the data and timing the model left of it), fewer than {FEWEST_BUDGET_STEPS} "
                f"steps: {more}, or {shorter}")
    return None


class StepRefused(ValueError):
    """A step of these settings beyond this machine (``check_step_cost``): its memory, its
    time, or the time budget's."""


def check_step_cost(cfg: TrainConfig, cost: StepCost, block_size: int, free_bytes: float,
                    seconds_left: float | None) -> str | None:
    """Refuse a step beyond this machine (``step_refusal``), in every run. With ``cfg.force``
    the refusal is a warning and the run trains. A step longer than LONG_STEP_S is named in a
    warning; else None."""
    shape = f"block_size {block_size} x batch_size {cfg.batch_size}"
    refusal = step_refusal(cost, free_bytes, seconds_left)
    if refusal is not None and not cfg.force:
        raise StepRefused(f"{shape}: {refusal}; or --force to train it anyway")
    if refusal is not None:
        return f"warning: {shape}: {refusal}; training it anyway (--force)"
    if cost.seconds > LONG_STEP_S:
        return (f"warning: {shape}: one step takes about {_minutes(cost.seconds)} here, with "
                f"about {byte_size(cost.activation_bytes)} of activations a micro-batch (attention "
                "grows with the square of the length)")
    return None


def _minutes_up(seconds: float) -> float:
    """``seconds`` in minutes, rounded up to the tenth: what a budget must grow by."""
    return math.ceil(seconds / 6) / 10


def _minutes(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 10:
        return f"{seconds:.0f} s"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"


# ---- The time budget: steps that fill it, a decay that ends on time ----

EVALS_IN_BUDGET = 4  # evaluations a budgeted run makes (the last at its end)
# The most of a budgeted run's training time its evaluations take: fewer of them where a slow
# evaluation would take more.
EVAL_SHARE = 0.25
# The share of a budget kept for the end: the export and sample; and for the final evaluation,
# where the run makes one (has_final_eval).
END_SHARE = 0.02
FINAL_EVAL_SHARE = 0.04
# The share of a budgeted run's training time that decays its lr (warmup-stable-decay).
DECAY_SHARE = 0.2
WARMUP_SHARE = 0.02  # a budgeted run's warmup, as a share of its steps
# The share of the time left kept for the machine's speed drifting from its measure: at the
# start, and again when the decay is timed.
DRIFT_SHARE = 0.05
# A budgeted run sees its training data at most this often: past it the validation loss rises
# (on a GPU the stdlib runs out long before 15 minutes do; docs/benchmarks.md).
MAX_EPOCHS = 8


@dataclass(frozen=True)
class BudgetClock:
    """A budgeted run's stable phase ends by the clock, whatever the first measure of the
    machine said: at ``decay_at`` (time.perf_counter), or at ``last_step`` minus the planned
    decay, whichever comes first; the decay then takes the steps that fit until
    ``steps_until`` at the speed of its steps so far, with the evaluations due among them, and
    the run's length is fixed from there. The last evaluation ends by ``train_until``."""

    decay_at: float
    train_until: float
    planned_decay: int
    last_step: int  # MAX_EPOCHS of the training data
    eval_s: float = 0.0  # an evaluation, as measured
    eval_every: int = 0  # the evaluations before the last; 0: none

    @property
    def steps_until(self) -> float:
        """When the steps end: the last evaluation's time before ``train_until``."""
        return self.train_until - self.eval_s

    def decay_due(self, step: int, now: float) -> bool:
        return now >= self.decay_at or step >= self.last_step - self.planned_decay

    def stable_length(self, step: int, length: int) -> int:
        """The run's length at ``step`` of its stable phase: ``length`` (its plan at first), or,
        once the next step would fall in that length's decay, the end of a decay of
        ``planned_decay`` steps from the next step: the lr holds its peak until the clock
        starts the decay, and a stop before then resumes (without the clock) to decay from
        where it stopped."""
        return max(length, step + 1 + self.planned_decay)

    def decay_steps(self, step: int, now: float, step_s: float) -> int:
        """The decay's length from ``step``: the most steps that, at ``step_s`` a step and with
        the evaluations due among them, end by ``steps_until``; at most to ``last_step``."""
        left = (self.steps_until - now) * (1 - DRIFT_SHARE)
        fit = int(left / step_s)
        while fit > 1 and fit * step_s + self.evaluations_due(step, fit) * self.eval_s > left:
            fit -= 1
        return max(1, min(fit, self.last_step - step))

    def evaluations_due(self, step: int, steps: int) -> int:
        """The evaluations before the last that the ``steps`` after ``step`` make."""
        if not self.eval_every:
            return 0
        return (step + steps) // self.eval_every - step // self.eval_every


class Budget(NamedTuple):
    cfg: TrainConfig  # with max_steps, eval_every, save_every, warmup_steps and decay_steps
    clock: BudgetClock  # when the decay starts: by the clock, or at its planned step
    train_s: float  # seconds of training the budget gives
    data_bound: bool  # MAX_EPOCHS of the data end the run before the budget would
    evaluations: int  # the last at the end


def evaluations_that_fit(train_s: float, eval_s: float) -> int:
    """A budgeted run's evaluations: EVALS_IN_BUDGET, fewer (at least the last) where they would
    take more than EVAL_SHARE of its ``train_s`` seconds of training at ``eval_s`` each."""
    fit = int(EVAL_SHARE * train_s / eval_s) if eval_s > 0 else EVALS_IN_BUDGET
    return max(1, min(EVALS_IN_BUDGET, fit))


def eval_refusal(train_s: float, eval_s: float, step_s: float) -> str | None:
    """Why a budget cannot train: one evaluation and FEWEST_BUDGET_STEPS steps take more than
    its ``train_s`` seconds of training; None where they fit."""
    needed_s = (eval_s + FEWEST_BUDGET_STEPS * step_s) / (1 - DRIFT_SHARE)
    if needed_s <= train_s:
        return None
    missing_min = _minutes_up(needed_s - train_s)
    return (f"one evaluation takes about {_minutes(eval_s)} here, and the time budget leaves "
            f"{_minutes(train_s)} to train: raise --time-budget-min by {missing_min:g} min or "
            "more, or lower --eval-examples")


def fit_budget(cfg: TrainConfig, now: float, seconds_left: float, step_s: float, eval_s: float,
               data_steps: int) -> Budget:
    """``cfg`` with max_steps, eval_every and warmup_steps filling ``seconds_left`` of its time
    budget at ``step_s`` a step and ``eval_s`` an evaluation, in place of the budget:
    config.json then reproduces the run. ``now``: the clock's time; ``data_steps``: the steps of
    MAX_EPOCHS."""
    train_s = seconds_left * (1 - END_SHARE - (FINAL_EVAL_SHARE if has_final_eval(cfg) else 0))
    evaluations = evaluations_that_fit(train_s, eval_s)
    steps = max(1, int((train_s * (1 - DRIFT_SHARE) - evaluations * eval_s) / step_s))
    data_bound = data_steps < steps and not cfg.overfit_batches
    if data_bound:  # the run ends early, on its plan
        steps = data_steps
    evaluations = min(evaluations, steps)  # fewer steps: each one evaluated, none added
    every = steps // evaluations
    steps = every * evaluations
    last_step = steps if data_bound else data_steps
    # One evaluation of several steps is the run's end's, whatever step the clock ends it at:
    # no step before makes one (eval_every beyond the last step), and the clock counts none.
    final_only = evaluations == 1 and steps > 1
    eval_every = last_step + 1 if final_only else every
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(WARMUP_SHARE * steps)
    decay = cfg.decay_steps or max(1, int(DECAY_SHARE * steps))
    sized = replace(cfg, time_budget_min=None, max_steps=steps, eval_every=eval_every,
                    save_every=max(1, steps // EVALS_IN_BUDGET), warmup_steps=warmup,
                    decay_steps=decay)
    # A run the data ends keeps the clock too: where the machine slows, the decay starts by
    # the clock and the run still ends within its budget. The steps' time, the last
    # evaluation's kept, is what the decay takes its share of.
    clock = BudgetClock(decay_at=now + (train_s - eval_s) * (1 - DECAY_SHARE),
                        train_until=now + train_s, planned_decay=decay, last_step=last_step,
                        eval_s=eval_s, eval_every=0 if final_only else eval_every)
    return Budget(sized, clock, train_s, data_bound, evaluations)
