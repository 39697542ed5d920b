"""The whole run's configuration as plain dataclasses (Hydra validates overrides against them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .data import DataConfig
from .errors import CharlmError
from .model import ModelConfig
from .train import TrainConfig


def _check_model(m: ModelConfig) -> None:
    if m.d_model < 1:
        raise CharlmError(f"model.d_model must be at least 1, got {m.d_model}")
    if m.n_layers < 1:
        raise CharlmError(f"model.n_layers must be at least 1, got {m.n_layers}")
    if not 0 <= m.dropout < 1:
        raise CharlmError(f"model.dropout must be in [0, 1), got {m.dropout}")


@dataclass
class Config:
    """What `python train.py` runs: data, model, trainer, seed and where to write."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out_dir: str = "runs/run"

    def __post_init__(self) -> None:
        _check_model(self.model)


@dataclass
class EvaluateConfig:
    """What `python evaluate.py` runs."""

    checkpoint: Optional[str] = None  # run dir or .pt; default: the newest run under runs/
    data: DataConfig = field(default_factory=DataConfig)
    split: Optional[str] = None  # train | val | test | all; default: test, or all for data=text
    format: str = "text"  # text | json
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.split not in (None, "train", "val", "test", "all"):
            raise CharlmError(f"split must be train, val, test or all, got {self.split!r}")
        if self.format not in ("text", "json"):
            raise CharlmError(f"format must be text or json, got {self.format!r}")


@dataclass
class SampleConfig:
    """What `python sample.py` runs."""

    checkpoint: Optional[str] = None  # run dir or .pt; default: the newest run under runs/
    prompt: str = ""
    prompt_file: Optional[str] = None
    length: int = 200  # new bytes to write after the prompt
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None  # nucleus sampling: keep the most likely bytes up to this mass
    stop: str = ""  # end a sample at the first occurrence of this text (included)
    seed: Optional[int] = None  # same seed, same text; default: a fresh one, printed
    num_samples: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.length < 0:
            raise CharlmError(f"length must be 0 or more, got {self.length}")
        if self.temperature < 0:
            raise CharlmError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k <= 256:
            raise CharlmError(f"top_k must be between 1 and 256, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise CharlmError(f"top_p must be above 0 and at most 1, got {self.top_p}")
        if self.num_samples < 1:
            raise CharlmError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.prompt and self.prompt_file:
            raise CharlmError("give prompt= or prompt_file=, not both")
