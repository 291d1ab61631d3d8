"""codelm.training.plan: preset auto's measures of the machine and the time budget's clock."""

import json
import subprocess
import sys

import pytest

from codelm import trainconfig
from codelm.training import budget, plan


def test_the_budget_clock_starts_the_decay_by_the_clock_or_at_the_data_s_end():
    """The stable phase ends at decay_at whatever the step, or at last_step minus the planned
    decay whatever the clock; the decay fits the time left at the measured speed, never past
    last_step."""
    clock = budget.BudgetClock(decay_at=80.0, train_until=100.0, planned_decay=10, last_step=1000)
    assert not clock.decay_due(step=500, now=79.9)
    assert clock.decay_due(step=500, now=80.0)
    assert clock.decay_due(step=990, now=0.0)
    # 20 s left, 5% kept for drift, 0.5 s a step: 38 steps
    assert clock.decay_steps(step=500, now=80.0, step_s=0.5) == 38
    assert clock.decay_steps(step=990, now=80.0, step_s=0.5) == 10
    assert clock.decay_steps(step=500, now=100.0, step_s=0.5) == 1
    # 5 s an evaluation, every 10 steps, and the last's 5 s kept: 14.25 s for the steps of the
    # decay and the evaluations due among them: 18 steps (steps 510 evaluates), not 28
    evaluating = budget.BudgetClock(decay_at=80.0, train_until=100.0, planned_decay=10,
                                    last_step=1000, eval_s=5.0, eval_every=10)
    assert evaluating.steps_until == 95.0
    assert evaluating.decay_steps(step=500, now=80.0, step_s=0.5) == 18


def test_fit_budget_plans_the_steps_and_a_clock_that_keeps_the_budget():
    """A budget the data outlasts gets a clock for its decay; one that would train past
    MAX_EPOCHS ends on its plan, its decay at its planned step unless the clock comes first (a
    machine slower than measured still ends within the budget)."""
    from codelm.trainconfig import TrainConfig

    cfg = TrainConfig(preset="tiny", max_steps=None, export=False)
    sized, clock, train_s, _, _ = budget.fit_budget(cfg, now=1000.0, seconds_left=100.0, step_s=1.0,
                                               eval_s=1.0, data_steps=10**6)
    assert train_s == pytest.approx(100.0 * (1 - budget.END_SHARE))
    assert sized.max_steps % budget.EVALS_IN_BUDGET == 0 and sized.time_budget_min is None
    # the steps' time (the last evaluation's kept out) decays in its last fifth
    assert clock.decay_at == pytest.approx(1000.0 + (train_s - 1.0) * (1 - budget.DECAY_SHARE))
    assert clock.train_until == pytest.approx(1000.0 + train_s)
    assert clock.steps_until == pytest.approx(1000.0 + train_s - 1.0)
    sized, clock, train_s, data_bound, _ = budget.fit_budget(cfg, now=0.0, seconds_left=100.0,
                                                        step_s=1.0, eval_s=1.0, data_steps=40)
    assert (sized.max_steps, clock.last_step, data_bound) == (40, 40, True)
    decay_from = 40 - sized.decay_steps
    assert not clock.decay_due(step=decay_from - 1, now=0.0)
    assert clock.decay_due(step=decay_from, now=0.0)  # on its plan
    assert clock.decay_due(step=1, now=train_s * (1 - budget.DECAY_SHARE))  # a slowed machine


@pytest.mark.parametrize("step_s", [0.1, 0.5])
@pytest.mark.parametrize(("eval_s", "evaluations"), [(1.0, 4), (10.0, 2), (30.0, 1), (62.0, 1)])
def test_a_slow_evaluation_gets_fewer_evaluations_and_the_steps_keep_the_budget(eval_s,
                                                                              evaluations,
                                                                              step_s):
    """Four evaluations where they fit in EVAL_SHARE of the training time, fewer where one takes
    long, down to the last alone, which no step before the end makes (eval_every beyond the
    run's reach): the steps fill the rest of the budget less its DRIFT_SHARE (kept for a
    machine slower than measured), and the clock keeps the last evaluation's time after the
    steps."""
    from codelm.trainconfig import TrainConfig

    cfg = TrainConfig(preset="tiny", max_steps=None, export=False)
    sized, clock, train_s, _, planned = budget.fit_budget(cfg, now=0.0, seconds_left=100.0,
                                                          step_s=step_s, eval_s=eval_s,
                                                          data_steps=10**6)
    assert planned == evaluations
    assert evaluations * eval_s <= budget.EVAL_SHARE * train_s or evaluations == 1
    steps_s = sized.max_steps * step_s
    kept = train_s * (1 - budget.DRIFT_SHARE) - evaluations * eval_s
    assert kept - step_s * evaluations < steps_s
    assert steps_s + evaluations * eval_s <= train_s * (1 - budget.DRIFT_SHARE)
    if evaluations > 1:
        assert sized.max_steps == sized.eval_every * evaluations
    else:
        assert sized.eval_every > clock.last_step
    assert sized.save_every == sized.max_steps // budget.EVALS_IN_BUDGET  # checkpoints as planned
    assert clock.steps_until == pytest.approx(train_s - eval_s)


def test_a_budget_that_one_evaluation_fills_is_refused():
    """One evaluation and FEWEST_BUDGET_STEPS steps beyond the training time: a one-line
    refusal naming both ways out; within it, none."""
    refusal = budget.eval_refusal(train_s=100.0, eval_s=95.0, step_s=1.0)
    assert "evaluation" in refusal and "--time-budget-min" in refusal
    assert "--eval-examples" in refusal and "\n" not in refusal
    assert budget.eval_refusal(train_s=100.0, eval_s=50.0, step_s=1.0) is None


@pytest.mark.parametrize("data_steps", [1, 2, 3])
def test_a_budget_the_data_ends_within_fewer_steps_than_its_evaluations_adds_none(data_steps):
    """MAX_EPOCHS of a tiny split in 1 to 3 steps: the run takes those steps, each evaluated,
    never more epochs than MAX_EPOCHS."""
    from codelm.trainconfig import TrainConfig

    cfg = TrainConfig(preset="tiny", max_steps=None, export=False)
    sized, clock, _, data_bound, _ = budget.fit_budget(cfg, now=0.0, seconds_left=100.0, step_s=1.0,
                                                  eval_s=1.0, data_steps=data_steps)
    assert (sized.max_steps, sized.eval_every, clock.last_step, data_bound) == (
        data_steps, 1, data_steps, True)


def test_a_step_time_is_the_fastest_window_so_a_passing_load_does_not_count():
    """Five windows of steps, the first two slowed fiftyfold: the measure is a fast one's."""
    import time

    slow = iter([False] * 3 + [True] * 2 + [False] * 1000)  # warm-up, then two slow windows

    def step():
        time.sleep(0.05 if next(slow) else 0.001)

    assert budget.seconds_a_step(step, at_least_s=0.02) < 0.02


def test_a_group_times_as_many_steps_as_rank_zero_decides():
    """Timing steps are collectives in a group: each process steps again when rank 0's clock
    says so (``agreed``), never by its own, so every process runs the same steps."""
    said: list[bool] = []

    def rank_zero(more: bool) -> bool:
        said.append(more)
        return more

    steps_zero = []
    budget.seconds_a_step(lambda: steps_zero.append(1), 0.01, rank_zero)
    answers = iter(said)
    steps_other = []
    budget.seconds_a_step(lambda: steps_other.append(1), 10.0, lambda more: next(answers))
    assert len(steps_other) == len(steps_zero) > budget.WARM_UP_STEPS + budget.TIMING_WINDOWS
    assert next(answers, None) is None


def test_another_busy_process_is_seen_and_a_quiet_wait_is_bounded():
    """A busy loop beside this process is counted; waiting for quiet ends at its bound."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert plan.others_running() >= 1
        assert plan.wait_until_quiet(0.0, announce=False) < 5.0
    finally:
        busy.kill()
        busy.wait()


def _tiny_model():
    import dataclasses

    import torch

    from architecture import PRESETS, Transformer

    torch.manual_seed(0)
    return Transformer(dataclasses.replace(PRESETS["tiny"], block_size=100_000))


def test_the_saved_activations_fitted_on_short_sequences_predict_a_long_one():
    """The bytes autograd saves for one sequence, fitted on 32, 64 and 128 tokens, predict
    what a 1,024-token sequence saves, measured directly, within 5%."""
    import contextlib

    import torch

    model = _tiny_model()
    cpu = torch.device("cpu")
    predicted = budget.step_cost(model, 1024, batch_size=2, grad_accum=1, device=cpu,
                                 autocast=contextlib.nullcontext).activation_bytes
    measured = 2 * budget._saved_bytes(model, 1024, cpu, contextlib.nullcontext)
    assert predicted == pytest.approx(measured, rel=0.05)


def test_a_block_size_whose_steps_cannot_fit_the_budget_or_memory_is_refused():
    """The tiny preset at 100,000 tokens a sequence: its attention alone makes a step longer
    than a 15-minute budget can hold 20 of (refused, naming --block-size); with less memory
    free than its activations, refused naming them; each refusal names --force."""
    import contextlib

    import torch

    from codelm.trainconfig import TrainConfig

    cfg = TrainConfig(preset="tiny", block_size=100_000, batch_size=4, max_steps=None)
    cost = budget.step_cost(_tiny_model(), 100_000, cfg.batch_size, 1, torch.device("cpu"),
                            contextlib.nullcontext)
    with pytest.raises(ValueError, match=r"block_size 100000 x batch_size 4: one step takes "
                                         r"about.*--block-size.*--force"):
        budget.check_step_cost(cfg, cost, 100_000, free_bytes=2**40, seconds_left=900.0)
    with pytest.raises(ValueError, match=r"activations.*free.*--gradient-checkpointing.*--force"):
        budget.check_step_cost(cfg, cost, 100_000, free_bytes=cost.activation_bytes / 2,
                               seconds_left=None)
    assert cost.seconds > budget.LONG_STEP_S


def test_a_step_beyond_the_machine_is_refused_in_every_run_unless_forced():
    """A step estimated longer than MAX_STEP_S is refused in a run of fixed steps too (no
    budget to fit), naming the flags that shorten it and --force; with force the run trains,
    the refusal turned into a warning. A step between LONG_STEP_S and MAX_STEP_S is named
    with its time and memory, and trains."""
    import dataclasses

    from codelm.trainconfig import TrainConfig

    cfg = TrainConfig(preset="tiny", block_size=100_000, batch_size=4, max_steps=12)
    too_long = budget.StepCost(activation_bytes=2**30, seconds=2 * budget.MAX_STEP_S)
    with pytest.raises(ValueError, match=r"block_size 100000 x batch_size 4: one step takes "
                                         r"about \d+\.\d min.*--block-size.*--batch-size.*--force"):
        budget.check_step_cost(cfg, too_long, 100_000, free_bytes=2**40, seconds_left=None)
    forced = dataclasses.replace(cfg, force=True)
    for free in (2**40, 2**29):  # the time's refusal, the memory's
        warning = budget.check_step_cost(forced, too_long, 100_000, free_bytes=free,
                                         seconds_left=None)
        assert warning.startswith("warning: block_size 100000") and "--force" in warning
    long = budget.StepCost(activation_bytes=2**30, seconds=2 * budget.LONG_STEP_S)
    warning = budget.check_step_cost(cfg, long, 100_000, free_bytes=2**40, seconds_left=None)
    assert "one step takes about 2.0 min" in warning and "1.0 GiB of activations" in warning
    with pytest.raises(ValueError, match=r"2.0 min.*time budget has 15.0 min left.*"
                                         r"--time-budget-min.*--force"):
        budget.check_step_cost(cfg, long, 100_000, free_bytes=2**40, seconds_left=900.0)


def test_a_short_block_is_measured_as_it_is_and_passes():
    """A block no longer than the measured lengths is measured at its own length: the cost of
    the tiny preset's own block is far from every limit."""
    import contextlib

    import torch

    from codelm.trainconfig import TrainConfig

    cfg = TrainConfig(preset="tiny", block_size=64, batch_size=4)
    cost = budget.step_cost(_tiny_model(), 64, 4, 1, torch.device("cpu"), contextlib.nullcontext)
    assert cost.activation_bytes == 4 * budget._saved_bytes(_tiny_model(), 64, torch.device("cpu"),
                                                            contextlib.nullcontext)
    assert budget.check_step_cost(cfg, cost, 64, free_bytes=2**34, seconds_left=900.0) is None


def test_the_warmup_of_a_run_shorter_than_500_steps_is_a_tenth_of_them():
    """The warmup a run leaves unset: 50 steps, or a tenth of a run shorter than 500."""
    assert [plan.warmup_for(n) for n in (1, 9, 60, 200, 500, 10_000)] == [0, 0, 6, 20, 50, 50]


def _auto_plan(monkeypatch, first_step_s: float, force: bool = False,
               budget_min: float = 600.0, tokens_per_s: float = 1e9):
    """plan_run's preset auto over a ladder of one model at batches 1, 2 and 4, each rung's
    step faked at ``first_step_s`` a sequence, timed at ``tokens_per_s`` (every rung fits the
    budget), sized for ``budget_min`` (by default long enough to time every rung); returns (its
    choice, the batches measured on short sequences, the batches timed)."""
    from codelm.trainconfig import TrainConfig

    ladder = tuple({"preset": "tiny", "block_size": 32, "batch_size": b, "lr": 1e-3}
                   for b in (1, 2, 4))
    monkeypatch.setattr(trainconfig, "BUDGET_LADDER", ladder)
    measured, timed = [], []

    def measure(cfg):
        measured.append(cfg.batch_size)
        cost = budget.StepCost(activation_bytes=2**20, seconds=first_step_s * cfg.batch_size)
        return budget.StepMeasure(cost, free_bytes=2**40)

    def probe(cfg):
        timed.append(cfg.batch_size)
        return plan.Probe(params=1, tokens_per_s=tokens_per_s)

    cfg = TrainConfig(preset="auto", block_size=None, batch_size=None, lr=None, max_steps=10,
                      force=force, time_budget_min=budget_min)
    chosen = plan.plan_run(cfg, "cpu", False, True, probe, measure)
    return chosen, measured, timed


def test_preset_auto_spends_at_most_a_fifth_of_a_short_budget_timing_rungs(monkeypatch,
                                                                           capsys):
    """Timing a rung takes three warm-up steps and five windows of 0.4 s, each running on to
    its last step's end: at 10 s a step (20 s at batch 2), 1 min affords no rung (the first,
    untimed, in fp32), 7.5 min the first alone, and the second is named untimed; neither times
    the precision (two timings of the largest rung). Once a rung is timed, the next timings
    are predicted from its speed."""
    assert plan.timing_seconds(10.0) == 82.0 and plan.timing_seconds(20.0) == 162.0
    chosen, _, timed = _auto_plan(monkeypatch, first_step_s=10.0, budget_min=1.0)
    assert (chosen.batch_size, chosen.precision, timed) == (1, "fp32", [])
    out = capsys.readouterr().out
    assert "untimed" in out and "20%" in out and "--preset tiny" in out
    chosen, _, timed = _auto_plan(monkeypatch, first_step_s=10.0, budget_min=7.5,  # 90 s
                                  tokens_per_s=32 / 10.0)  # as measured: 32 tokens in 10 s
    assert (chosen.batch_size, chosen.precision, timed) == (1, "fp32", [1])
    choice = capsys.readouterr().out.splitlines()[-1]
    assert choice.startswith("preset auto: tiny") and "and larger untimed" in choice
    # the first rung timed far faster than its short-sequence measure said: the next rungs'
    # timings are predicted from that speed (their windows' 2 s each), which the 8 s left afford
    chosen, _, timed = _auto_plan(monkeypatch, first_step_s=10.0, budget_min=7.5)
    assert (chosen.batch_size, timed) == (4, [1, 2, 4])


def test_preset_auto_sizes_a_rung_by_the_training_time_its_timing_leaves(monkeypatch, capsys):
    """A rung must see TOKENS_PER_PARAM tokens a parameter in TRAIN_SHARE of the budget less
    the timing spent: in 150 s (127.5 s to train), timing the first rung (1 s a step: 10 s)
    and the second (2 s a step: 18 s) leaves 99.5 s, where 100 parameters at 3.2 tokens/s see
    318 tokens, short of 350 (though 127.5 s would see 406): the first rung is chosen; at 4
    tokens/s (398) the second."""
    from codelm.trainconfig import TrainConfig

    ladder = tuple({"preset": "tiny", "block_size": 32, "batch_size": b, "lr": 1e-3}
                   for b in (1, 2, 4))
    monkeypatch.setattr(trainconfig, "BUDGET_LADDER", ladder)
    assert plan.timing_seconds(1.0) == 10.0 and plan.timing_seconds(2.0) == 18.0
    assert plan.TOKENS_PER_PARAM * 100 == 350.0 and plan.TRAIN_SHARE * 150 == 127.5

    def measure(cfg):
        return budget.StepMeasure(budget.StepCost(activation_bytes=2**20, seconds=cfg.batch_size),
                                  free_bytes=2**40)

    def choice(second_rung_tokens_per_s: float) -> tuple[int, list[int]]:
        timed = []

        def probe(cfg):
            timed.append(cfg.batch_size)
            if cfg.batch_size == 1:
                return plan.Probe(params=1, tokens_per_s=32.0)  # 1 s a step
            return plan.Probe(params=100, tokens_per_s=second_rung_tokens_per_s)

        cfg = TrainConfig(preset="auto", block_size=None, batch_size=None, lr=None,
                          max_steps=10, time_budget_min=2.5)
        chosen = plan.plan_run(cfg, "cuda", False, True, probe, measure)
        return chosen.batch_size, timed

    assert choice(3.2) == (1, [1, 2])
    assert choice(4.0) == (2, [1, 2])
    assert "preset auto: tiny" in capsys.readouterr().out


def test_preset_auto_times_no_rung_whose_step_is_beyond_the_machine(monkeypatch, capsys):
    """The first rung's step measured at 100 s predicts the second's at 200 s and the third's
    at 400 s, beyond budget.MAX_STEP_S: its own measure confirms it, and it is never timed, for
    the CPU's precision (fp32 then) nor for the ladder, which takes the second. Each rung
    timed is a line before its timing (minutes on a busy CPU), after one, before any measure,
    saying a --preset skips them, then the choice."""
    chosen, measured, timed = _auto_plan(monkeypatch, first_step_s=100.0)
    assert (chosen.batch_size, chosen.precision) == (2, "fp32")
    assert chosen.time_budget_min is None  # it sized the model: config.json repeats the run
    assert 4 not in timed and timed == [1, 2]
    assert measured[0] == 1 and set(measured[1:]) == {4}
    lines = capsys.readouterr().out.splitlines()
    assert all(w in lines[0] for w in ("preset auto: measuring this cpu", "600-min budget",
                                       "--preset skips")), lines[0]
    assert [line for line in lines if line.startswith("preset auto: timing")] == [
        "preset auto: timing tiny (context 32, batch 1) on cpu",
        "preset auto: timing tiny (context 32, batch 2) on cpu"]
    assert lines[-1].startswith("preset auto: tiny")
    # a run of --max-steps: the choice says the time budget sized its model all the same
    assert "--time-budget-min sizes the model, --max-steps or --epochs only end" in lines[-1]


def test_preset_auto_says_it_times_the_cpus_precision_before_timing_it(monkeypatch, capsys):
    """On a CPU the precision is timed first (bf16 against fp32, on one rung twice): a line
    says so before the seconds it takes."""
    _auto_plan(monkeypatch, first_step_s=0.01)
    lines = capsys.readouterr().out.splitlines()
    timing = [line for line in lines if line.startswith("preset auto: timing")]
    assert timing[0].startswith("preset auto: timing bf16 against fp32 on ")


def test_preset_auto_refuses_a_first_rung_beyond_the_machine_untimed_unless_forced(
        monkeypatch, capsys):
    """A first rung whose step is beyond budget.MAX_STEP_S refuses the run before any rung is
    timed, in check_step_cost's words (--block-size, --batch-size, --force); with force the
    first rung is taken untimed, in fp32 on a CPU, and the choice says so."""
    with pytest.raises(ValueError, match=r"^block_size 32 x batch_size 1: one step takes about "
                                         r"6.7 min.*--block-size.*--batch-size.*--force"):
        _auto_plan(monkeypatch, first_step_s=400.0)
    chosen, measured, timed = _auto_plan(monkeypatch, first_step_s=400.0, force=True)
    assert (chosen.preset, chosen.batch_size, chosen.precision) == ("tiny", 1, "fp32")
    assert (measured, timed) == ([1], [])
    assert "preset auto: tiny" in capsys.readouterr().out


def test_a_larger_rung_s_step_is_predicted_from_the_first_by_its_flops_and_width():
    """The same model and shape predict the measure itself; twice the batch twice its seconds
    and activations; a longer block grows the seconds faster than the tokens (attention)."""
    import dataclasses

    from codelm.trainconfig import TrainConfig

    small = TrainConfig(preset="tiny", block_size=64, batch_size=2, grad_accum=1)
    measured = budget.StepCost(activation_bytes=1000.0, seconds=1.0)
    assert budget.scaled_cost(measured, small, small) == measured
    doubled = budget.scaled_cost(measured, small, dataclasses.replace(small, batch_size=4))
    assert doubled == pytest.approx(budget.StepCost(2000.0, 2.0))
    longer = budget.scaled_cost(measured, small, dataclasses.replace(small, block_size=1024))
    assert longer.activation_bytes == pytest.approx(16_000.0) and longer.seconds > 16.0


def test_a_first_rung_beyond_the_limits_on_a_busy_cpu_is_measured_again_once_it_settles(
        monkeypatch):
    """A budgeted CPU run whose first rung measures beyond the limits while the CPU is busy
    waits for quiet and measures it again: a load that passes does not refuse the run, and the
    rungs are timed after the wait, not before."""
    from codelm.trainconfig import TrainConfig

    ladder = ({"preset": "tiny", "block_size": 32, "batch_size": 1, "lr": 1e-3},)
    monkeypatch.setattr(trainconfig, "BUDGET_LADDER", ladder)
    events = []
    steps_s = iter([400.0, 1.0])  # under the load, then on the settled machine

    def measure(cfg):
        events.append("measured")
        return budget.StepMeasure(budget.StepCost(2**20, next(steps_s)), free_bytes=2**40)

    def probe(cfg):
        events.append("timed")
        return plan.Probe(params=1, tokens_per_s=1e9)

    monkeypatch.setattr(plan, "wait_until_quiet", lambda at_most_s: events.append("waited") or 0.0)
    cfg = TrainConfig(preset="auto", block_size=None, batch_size=None, lr=None, max_steps=None,
                      precision="fp32")
    assert plan.plan_run(cfg, "cpu", False, False, probe, measure).batch_size == 1
    assert events == ["measured", "waited", "measured", "timed"]


def test_a_budget_spent_before_training_says_so_not_to_shorten_the_step():
    """Data preparation that takes the whole budget leaves no time to train: the refusal names
    the budget, not the block size or batch (which change nothing there)."""
    cost = budget.StepCost(activation_bytes=1.0, seconds=0.5)
    spent = budget.step_refusal(cost, free_bytes=1e12, seconds_left=-3.0)
    assert "spent before training" in spent and "3.0 s over it" in spent
    assert "raise --time-budget-min by 0.3 min or more for 20 steps" in spent  # 20 x 0.5 s + 3 s
    assert "spent before training" in budget.step_refusal(budget.StepCost(1.0, 0.0), 1e12, 0.0)
    assert "--block-size" not in spent
    short = budget.step_refusal(cost, free_bytes=1e12, seconds_left=2.0)
    assert "--block-size" in short and "2.0 s left" in short and "by 0.2 min or more" in short
    assert budget.step_refusal(cost, free_bytes=1e12, seconds_left=600.0) is None


def test_a_run_length_typed_replaces_the_other_one_a_config_file_sets(tmp_path, capsys):
    """--max-steps typed over a --config file that sets epochs (a recipe's) trains for the
    steps, as a flag overrides the file, and says what it replaced; --epochs over a file's
    max_steps likewise; both typed are refused."""
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"preset": "tiny", "epochs": 3}))
    cfg = plan.parse_config(["--config", str(config), "--max-steps", "10"])
    assert (cfg.max_steps, cfg.epochs) == (10, None)
    err = capsys.readouterr().err
    assert all(w in err for w in ("--max-steps 10", "in place of epochs 3", f"--config {config}"))
    config.write_text(json.dumps({"preset": "tiny", "max_steps": 40}))
    cfg = plan.parse_config(["--config", str(config), "--epochs", "2"])
    assert (cfg.max_steps, cfg.epochs) == (None, 2.0)
    with pytest.raises(ValueError, match="both set the run's length"):
        plan.parse_config(["--preset", "tiny", "--max-steps", "10", "--epochs", "2"])


def test_a_time_budget_beside_a_fixed_length_is_refused_where_it_sizes_no_model(tmp_path):
    """--time-budget-min with --max-steps sizes preset auto's model (the run's length is the
    steps); with a preset named, or on a resumed run, it would do nothing: one line naming
    both, where each was set, and the way out."""
    with pytest.raises(ValueError, match=r"time_budget_min.*--time-budget-min.*max_steps.*"
                                         r"--max-steps none trains for the budget"):
        plan.parse_config(["--preset", "tiny", "--max-steps", "10", "--time-budget-min", "1"])
    with pytest.raises(ValueError, match=r"time_budget_min.*epochs.*--epochs none"):
        plan.parse_config(["--preset", "tiny", "--epochs", "2", "--time-budget-min", "1"])
    sized = plan.parse_config(["--max-steps", "10", "--time-budget-min", "1"])  # preset auto
    assert (sized.max_steps, sized.time_budget_min) == (10, 1.0)
    assert plan.parse_config(["--preset", "tiny", "--max-steps", "10"]).max_steps == 10
    saved = tmp_path / "config.json"  # a run's config.json: every key, a budget's none
    for recorded in (15.0, None):  # a fixed-length run's (the default), a budgeted run's
        saved.write_text(json.dumps({"preset": "tiny", "max_steps": 10,
                                     "time_budget_min": recorded}))
        assert plan.parse_config(["--config", str(saved)]).max_steps == 10
    assert plan.parse_config(["--preset", "tiny", "--epochs", "1", "--time-budget-min",
                              "none"]).epochs == 1
    cfg = trainconfig.TrainConfig(preset="tiny", max_steps=3000, resume=str(tmp_path),
                                  time_budget_min=1.0)
    with pytest.raises(ValueError, match=r"drop --time-budget-min.*resumed run.*--max-steps"):
        plan.check_length(cfg, {"time_budget_min"}, lambda key: "--" + key)


def test_a_resumed_runs_own_value_typed_again_changes_nothing(tmp_path):
    """On --resume, a flag (or --config key) given the value the run's config.json holds is no
    change of setting: the resume passes as the run alone does, and as check_resume_config,
    which compares values, passes it; another value of it is refused."""
    import dataclasses

    from codelm.runs import checkpoint, rundir

    run = tmp_path / "run"
    run.mkdir()
    saved = trainconfig.TrainConfig(preset="tiny", max_steps=1000, time_budget_min=30.0)
    (run / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(saved)))
    file = tmp_path / "again.json"
    file.write_text(json.dumps({"time_budget_min": 30}))
    for again in (["--time-budget-min", "30"], ["--config", str(file), "--max-steps", "1000"]):
        cfg = plan.parse_config(["--resume", str(run), *again])
        assert (cfg.time_budget_min, cfg.max_steps) == (30.0, 1000)
        assert checkpoint.check_resume_config(cfg, run, [], "--resume run") is not None
    typed = trainconfig.read_config(["--resume", str(run), "--time-budget-min", "30",
                                     "--lr", "0.01"]).typed
    assert typed == {"resume", "lr"}
    with pytest.raises(ValueError, match=r"time_budget_min \(20\.0, --time-budget-min\).*"
                                         r"drop --time-budget-min"):
        plan.parse_config(["--resume", str(run), "--time-budget-min", "20"])


@pytest.mark.parametrize("bf16_speedup, precision", [(1.1, "fp32"), (1.2, "bf16"), (1.3, "bf16")])
def test_a_cpu_trains_in_bf16_only_where_it_measures_well_ahead_of_fp32(bf16_speedup, precision):
    """Preset auto times fp32 and bf16 on the ladder's code-4x192 rung and takes bf16 where it
    reaches CPU_BF16_SPEEDUP (1.2) times fp32's tokens a second: a smaller lead is within the
    timing's noise, and bf16's rounding is then bought for nothing."""
    from codelm.trainconfig import TrainConfig

    timed = []

    def probe(cfg):
        timed.append((cfg.preset, cfg.block_size, cfg.batch_size, cfg.precision))
        tokens_per_s = 1000.0 * (bf16_speedup if cfg.precision == "bf16" else 1.0)
        return plan.Probe(params=1, tokens_per_s=tokens_per_s)

    cfg = TrainConfig(preset="auto", block_size=None, batch_size=None, lr=None)
    assert plan.cpu_precision(cfg, probe) == precision
    assert timed == [("code-4x192", 256, 16, "fp32"), ("code-4x192", 256, 16, "bf16")]
