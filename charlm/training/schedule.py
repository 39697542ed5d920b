"""The learning rate over a run: warmup, then cosine decay over train.max_steps or over the time
budget of train.max_seconds, which the Clock measures."""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from charlm.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def budget_lr_factor(step: int, time_frac: float, warmup: int, min_ratio: float) -> float:
    """The schedule under train.max_seconds, where time_frac is the part of the budget used:
    warmup ends after `warmup` steps or 5% of the budget, whichever comes first, and the cosine
    decay runs over the budget."""
    warm = min(1.0, max((step + 1) / max(1, warmup), time_frac / 0.05))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, time_frac))))


class Clock:
    """Steps or seconds. Under train.max_seconds: the part of the budget used (which the schedule
    reads) and whether it has run out, leaving room for the final evaluation.

    The budget counts training only. Start-up (imports, the plan, compiling kernels, reading the
    text, torchrun's rendezvous) comes before start(), and the first step of each run, which pays
    for every lazy first-call cost (allocations, oneDNN's primitives, DDP's buckets), is not
    counted either: the clock starts again as it ends. So a short budget is not eaten by a slow
    start, on any machine."""

    def __init__(self, budget: float, spent: float, start_step: int, val_bytes: int) -> None:
        self.budget, self.spent, self.start_step, self.val_bytes = budget, spent, start_step, val_bytes
        self.frac = 0.0  # rank 0's reading, shared with every rank (Trainer.agree)
        self.t_start = time.perf_counter()  # start() sets it again as the first step begins
        self.eval_seconds, self.eval_cost = 0.0, None  # evaluating in this run; the last evaluation
        self.elapsed = self.per_step = self.finish_at = 0.0
        self.timed_from: Optional[int] = None  # the step the budget's clock started after

    def read(self, steps_done: int, tokens: int) -> tuple[float, float]:
        """(part of the budget used, 1.0 if it has run out) once step number steps_done is done."""
        now = time.perf_counter()
        if self.timed_from is None:  # the run's first step: warm-up, not counted
            self.t_start, self.timed_from, self.eval_seconds = now, steps_done, 0.0
            return 0.0, 0.0
        self.elapsed = self.spent + now - self.t_start
        self.per_step = (now - self.t_start - self.eval_seconds) / (steps_done - self.timed_from)
        # the final evaluation must fit too; before the first one, guess it from the training speed
        final_eval = self.eval_cost if self.eval_cost is not None else self.val_bytes * self.per_step / tokens / 3
        self.finish_at = self.budget - final_eval - self.per_step
        return min(1.0, self.elapsed / max(self.finish_at, 1e-9)), float(self.elapsed >= self.finish_at)

    def start(self) -> None:
        self.t_start = time.perf_counter()

    def steps_left(self) -> int:
        if not self.per_step:  # not timed yet
            return 1
        return int((self.finish_at - self.elapsed) / self.per_step) + 1

    def evaluated(self, seconds: float) -> None:
        self.eval_cost = seconds
        self.eval_seconds += seconds

    def run_seconds(self) -> float:
        """Wall time of this run so far, evaluations included."""
        return time.perf_counter() - self.t_start


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, clock: Clock) -> LambdaLR:
    """Warmup then cosine decay, over train.max_steps or over the time budget (clock.frac)."""
    min_ratio = tc.min_lr / tc.lr
    if tc.max_seconds:
        schedule = partial(budget_lr_factor, warmup=tc.warmup_steps, min_ratio=min_ratio)
        return LambdaLR(optimizer, lambda step: schedule(step, clock.frac))
    return LambdaLR(optimizer, partial(lr_factor, warmup=tc.warmup_steps, total=tc.max_steps, min_ratio=min_ratio))
