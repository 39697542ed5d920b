"""What a training run tells its user, as an interface: train() is handed an object with these
methods (the command layer's charlm.commands.train_report.TrainReport prints and writes TensorBoard
events). This one, the default, is silent: the library itself never prints."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


class Report:
    """Silent; train() activates it on rank 0 alone, so that one process speaks for a run."""

    active = False

    def activate(self, main: bool) -> None:
        """Called once by train(): whether this process speaks for the run."""
        self.active = main

    def say(self, message: str) -> None:
        """A line for the user: the device, the precision, the run's header, a warning."""

    def open(self, out_dir: Path, cfg: Any, resumed_at: Optional[int]) -> None:
        """The run is set up and writes to out_dir from now on (resumed_at: the step it continues from)."""

    def start(self, step: int, total: Optional[int]) -> None:
        """Training starts at `step` of `total` (None: a time budget)."""

    def stepped(self, tokens: int, total: Optional[int] = None) -> None:
        """One step done (tokens over all ranks); total re-estimates the end under a time budget."""

    def log(self, step: int, train_loss: float, lr: float, grad_norm: float, skipped: int) -> None:
        """The training figures, every train.log_every steps."""

    def evaluation(self, step: int, m: dict[str, float], best: float, sample: str, improved: bool) -> None:
        """The validation figures and the sample, every train.eval_every steps."""

    def flush(self) -> None:
        """After an evaluation's checkpoint: whatever is buffered goes out."""

    def close(self) -> None:
        """The run stops (finished, stopped by a signal, or by an error)."""

    def summary(self, summary: dict[str, Any]) -> None:
        """The run finished: its summary (steps, seconds, best loss, out_dir); then close()."""
