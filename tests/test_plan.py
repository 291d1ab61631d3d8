"""plan.py: preset auto's measures of the machine and the time budget's clock."""

import subprocess
import sys

import pytest

import plan


def test_the_budget_clock_starts_the_decay_by_the_clock_or_at_the_data_s_end():
    """The stable phase ends at decay_at whatever the step, or at last_step minus the planned
    decay whatever the clock; the decay fits the time left at the measured speed, never past
    last_step."""
    clock = plan.BudgetClock(decay_at=80.0, train_until=100.0, planned_decay=10, last_step=1000)
    assert not clock.decay_due(step=500, now=79.9)
    assert clock.decay_due(step=500, now=80.0)
    assert clock.decay_due(step=990, now=0.0)
    # 20 s left, 5% kept for drift, 0.5 s a step: 38 steps
    assert clock.decay_steps(step=500, now=80.0, step_s=0.5) == 38
    assert clock.decay_steps(step=990, now=80.0, step_s=0.5) == 10
    assert clock.decay_steps(step=500, now=100.0, step_s=0.5) == 1


def test_fit_budget_plans_the_steps_and_a_clock_unless_the_data_ends_first():
    """A budget the data outlasts gets a clock for its decay; one that would train past
    MAX_EPOCHS ends on its plan, with no clock."""
    from trainconfig import TrainConfig

    cfg = TrainConfig(preset="tiny", max_steps=None, export=False)
    sized, clock, train_s = plan.fit_budget(cfg, now=1000.0, seconds_left=100.0, step_s=1.0,
                                            eval_s=1.0, data_steps=10**6)
    assert train_s == pytest.approx(100.0 * (1 - plan.END_SHARE))
    assert sized.max_steps % plan.EVALS_IN_BUDGET == 0 and sized.time_budget_min is None
    assert clock.decay_at == pytest.approx(1000.0 + train_s * (1 - plan.DECAY_SHARE))
    assert clock.train_until == pytest.approx(1000.0 + train_s)
    sized, clock, _ = plan.fit_budget(cfg, now=0.0, seconds_left=100.0, step_s=1.0, eval_s=1.0,
                                      data_steps=40)
    assert (sized.max_steps, clock) == (40, None)


def test_a_step_time_is_the_fastest_window_so_a_passing_load_does_not_count():
    """Five windows of steps, the first two slowed fiftyfold: the measure is a fast one's."""
    import time

    slow = iter([False] * 3 + [True] * 2 + [False] * 1000)  # warm-up, then two slow windows

    def step():
        time.sleep(0.05 if next(slow) else 0.001)

    assert plan.seconds_a_step(step, at_least_s=0.02) < 0.02


def test_another_busy_process_is_seen_and_a_quiet_wait_is_bounded():
    """A busy loop beside this process is counted; waiting for quiet ends at its bound."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert plan.others_running() >= 1
        assert plan.wait_until_quiet(0.0, announce=False) < 5.0
    finally:
        busy.kill()
        busy.wait()
