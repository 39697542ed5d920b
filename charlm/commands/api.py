"""charlm.train(...): a training run from Python (a notebook, a script), with the settings of
`python train.py`, checked the same way; a problem is the same one line, raised as CharlmError
instead of printed. Progress shows as a bar (a widget in Jupyter); an interrupted kernel (Ctrl-C)
finishes the step in hand and saves last.pt, as on the command line.

    run = charlm.train("data=tinyshakespeare", train={"max_seconds": 60}, out_dir="runs/nb")
    run.best_val_loss, run.out_dir, run.model, run.curve("val/loss")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from charlm.errors import CharlmError


@dataclass
class Run:
    """A finished (or interrupted) training run: where it wrote, how it ended, its model."""

    out_dir: Path
    best_val_loss: float
    steps: int
    stopped: bool  # by Ctrl-C (an interrupted kernel) or SIGTERM; last.pt holds where it stopped
    _model: Any = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        """The trained model (best.pt), on the CPU, in eval mode."""
        if self._model is None:
            from charlm.checkpoint import load_model

            self._model = load_model(self.out_dir)
        return self._model

    def curve(self, tag: str = "val/loss") -> list[tuple[int, float]]:
        """(step, value) of a TensorBoard scalar of the run (train/loss, val/loss, val/bpb, ...)."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        points = []
        for path in sorted(self.out_dir.glob("events.out.tfevents.*")):
            events = EventAccumulator(str(path), size_guidance={"scalars": 0})
            events.Reload()
            if tag in events.Tags()["scalars"]:
                points += [(e.step, e.value) for e in events.Scalars(tag)]
        return sorted(dict(points).items())


def train(*overrides: str, progress: bool = True, **settings: Any) -> Run:
    """Train as `python train.py OVERRIDES` does and return the Run.

    overrides are command-line settings as strings ("data=tinyshakespeare", "train.lr=3e-3");
    settings the same as keywords, a section as a dict (train={"max_steps": 200}, data="text",
    out_dir="runs/mine"). progress=False prints plain lines instead of the bar, as the command line
    does into a log.
    """
    from charlm.commands.entry import RAW, USAGE
    from charlm.commands.settings import compose, pop_raw_args, with_raw
    from charlm.commands.train import config_for_run
    from charlm.commands.train_report import TrainReport
    from charlm.training.loop import train as train_loop

    argv = ["charlm.train", *overrides, *_as_overrides(settings)]
    for arg in argv[1:]:
        if not isinstance(arg, str) or arg.startswith("-") or "=" not in arg:
            raise CharlmError(f"charlm.train takes key=value settings, got {arg!r}")
    raw = pop_raw_args(argv, RAW["train"])
    cfg = compose("train", argv, USAGE["train"])
    config, state, init = config_for_run(with_raw(cfg, raw), argv[1:], raw)
    report = TrainReport(notebook=progress)
    summary = train_loop(config, Path(config.out_dir), report=report, resume_state=state, init_state=init)
    return Run(Path(config.out_dir), summary["best_val_loss"], summary["steps"], "stopped_by" in summary)


def _as_overrides(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """Keyword settings as key=value strings: a dict is a section (train={"lr": 3e-3})."""
    out = []
    for key, value in settings.items():
        if isinstance(value, dict):
            out += _as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_show(value)}")
    return out


def _show(value: Optional[Any]) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
