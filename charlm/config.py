"""Every setting as plain dataclasses: Hydra checks overrides against them, the code reads them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .corpora import CORPORA
from .errors import CharlmError

# This module imports neither torch nor hydra, so a mistyped setting fails in a fraction of a
# second; each dataclass below is the schema of one config group in configs/.


@dataclass
class DataConfig:
    """Which text to train on and how to split it (fractions by position)."""

    name: str = "timemachine"  # a key of CORPORA, or "text" for data.path
    path: Optional[str] = None  # the file for name=text
    cache_dir: str = "data"  # where named corpora are downloaded to
    train_frac: float = 0.9
    val_frac: float = 0.05  # test gets the rest

    def __post_init__(self) -> None:
        if self.name not in CORPORA and self.name != "text":
            known = ", ".join([*CORPORA, "text"])
            raise CharlmError(f"unknown corpus data.name={self.name!r}; choose one of: {known}")
        if self.name == "text" and not self.path:
            raise CharlmError("data=text needs a file: add data.path=<your text file>")
        if not (0 < self.train_frac < 1 and 0 < self.val_frac < 1):
            raise CharlmError("data.train_frac and data.val_frac must each be between 0 and 1")
        if self.train_frac + self.val_frac > 1 + 1e-9:
            raise CharlmError(
                f"data.train_frac + data.val_frac = {self.train_frac + self.val_frac:g} is over 1;"
                " they and the test split must share the text"
            )


@dataclass
class ModelConfig:
    """Architecture of a CharLM; stored in every checkpoint as a plain dict. The defaults are the
    size `python train.py` trains (model=small); model=reference is the original 512x2."""

    d_model: int = 256
    n_layers: int = 2
    dropout: float = 0.2
    cell: str = "reset_after"  # reset_after: nn.GRU (cuDNN on CUDA); reset_before: the Trax/d2l cell


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and device settings. The defaults are The Time Machine's
    recipe, what `python train.py` runs; configs/train/<data>.yaml holds what another corpus changes."""

    batch_size: int = 64
    seq_len: int = 100
    batching: str = "stream"  # stream: lanes with the state carried; random: fresh windows
    max_steps: int = 1100
    # a wall-clock budget from the first step, evaluations included, in place of max_steps; 0 = none
    max_seconds: float = 0
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr: float = 1e-4  # reached at max_steps by cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    eval_every: int = 100  # steps between val evaluations, checkpoints and samples
    eval_bytes: int = 262144  # each evaluation scores the first eval_bytes of val (256 KiB: seconds); 0 = all of it
    sample_length: int = 200  # bytes of the sample written at each evaluation
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 where the hardware does it natively
    resume: Optional[str] = None  # run dir or .pt to continue from
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop (keep checkpoints) or skip the step

    def __post_init__(self) -> None:
        positive = ("batch_size", "seq_len", "max_steps", "eval_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise CharlmError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise CharlmError(f"train.lr must be above 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise CharlmError(f"train.min_lr must be between 0 and train.lr, got {self.min_lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise CharlmError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not self.max_seconds >= 0:
            raise CharlmError(f"train.max_seconds must be 0 (no budget) or more, got {self.max_seconds}")
        for name in ("warmup_steps", "eval_bytes", "sample_length", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise CharlmError(f"train.{name} must be 0 or more, got {getattr(self, name)}")
        if self.batching not in ("stream", "random"):
            raise CharlmError(f"train.batching must be stream or random, got {self.batching!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise CharlmError(f"train.on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        check_device(self.device, "train.device")


def check_device(name: str, key: str) -> None:
    """auto, cpu, cuda or cuda:N (whether that GPU exists is checked where torch is loaded)."""
    index = name.removeprefix("cuda:")
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise CharlmError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")


def _check_model(m: ModelConfig) -> None:
    if m.d_model < 1:
        raise CharlmError(f"model.d_model must be at least 1, got {m.d_model}")
    if m.n_layers < 1:
        raise CharlmError(f"model.n_layers must be at least 1, got {m.n_layers}")
    if not 0 <= m.dropout < 1:
        raise CharlmError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.cell not in ("reset_after", "reset_before"):
        raise CharlmError(f"model.cell must be reset_after or reset_before, got {m.cell!r}")


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
        check_device(self.device, "device")


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
    explain: bool = False  # per byte: the top 5 candidates and every layer's gates
    explain_format: str = "text"  # text | json (one object per step)

    def __post_init__(self) -> None:
        if self.explain_format not in ("text", "json"):
            raise CharlmError(f"explain_format must be text or json, got {self.explain_format!r}")
        if self.explain and self.num_samples != 1:
            raise CharlmError("explain=true explains one sample; leave num_samples at 1")
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
        check_device(self.device, "device")
