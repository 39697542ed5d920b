"""train.max_seconds: the schedule stretches over the budget, the run stops in time with its
final evaluation, and start-up and the first step do not count against it."""
import time

import numpy as np
import pytest

from charlm.checkpoint import load_checkpoint
from charlm.training.schedule import budget_lr_factor
from helpers import TINY, run_cli


def test_budget_schedule_warms_up_then_decays_over_the_budget():
    f = lambda step, frac: budget_lr_factor(step, frac, warmup=100, min_ratio=0.1)  # noqa: E731
    assert f(0, 0.0) < 0.05 and f(0, 0.05) == pytest.approx(1.0, abs=0.01)  # warmup ends at 5% of the budget
    assert f(99, 0.01) == pytest.approx(1.0, abs=0.01)  # ... or after warmup steps
    assert f(500, 0.5) == pytest.approx(0.55)
    assert f(900, 1.0) == pytest.approx(0.1)


def test_max_seconds_stops_in_time_and_evaluates_at_the_end(tmp_path, text_file):
    budget = 4
    t = time.perf_counter()
    proc = run_cli("train.py", "data=text", f"data.path={text_file}", *TINY, "train.eval_every=100000",
                   f"train.max_seconds={budget}", "out_dir=timed", cwd=tmp_path)
    wall = time.perf_counter() - t
    state = load_checkpoint(tmp_path / "timed" / "last.pt")
    assert state["step"] > 10  # it trained for the budget, not for train.max_steps
    assert budget * 0.6 < state["seconds"] < budget + 1.0  # evaluation included
    assert wall < budget + 15  # plus start-up
    assert f"step {state['step']}: val loss" in proc.stdout
    assert "precision: fp32" in proc.stdout or "precision: bf16" in proc.stdout


def test_a_slow_first_step_is_not_counted_against_the_budget():
    from charlm.training.schedule import Clock

    clock = Clock(budget=0.5, spent=0.0, start_step=0, val_bytes=1000)
    clock.start()
    time.sleep(0.6)  # a first step slower than the whole budget (first-call costs, a rendezvous)
    assert clock.read(1, tokens=256) == (0.0, 0.0)
    time.sleep(0.01)
    frac, out_of_time = clock.read(2, tokens=256)
    assert out_of_time == 0.0 and frac < 0.5
    assert np.isfinite(clock.steps_left())
