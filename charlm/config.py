"""Every setting as plain dataclasses: Hydra checks overrides against them, the code reads them.

Each setting is declared once, with its default and its help (`setting(...)`): `--help` prints
that help, docs/settings.md is written from it, and a test holds that file to it.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from charlm.data.corpora import CORPORA
from charlm.errors import CharlmError

# This module imports neither torch nor hydra, so a mistyped setting fails in a fraction of a
# second; each dataclass below is the schema of one command or config group.


def setting(default: Any, help: str, shown: Optional[str] = None, path: bool = False) -> Any:
    """A dataclass field with its help; `shown` is how --help and docs/settings.md give a default that
    the code computes (None: "the newest run", a date in a path). A `path` setting names a file or
    directory, or is free text (data.separator): the commands take its value exactly as the shell
    passed it (see path_keys)."""
    metadata = {"help": help, **({"shown": shown} if shown else {}), **({"path": True} if path else {})}
    return field(default=default, metadata=metadata)


def path_keys(schema: type, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys of schema's path settings (data.path, out_dir, ...), sections included.

    >>> path_keys(SampleConfig)
    ('checkpoint', 'prompt_file')
    """
    keys: list[str] = []
    types = typing.get_type_hints(schema)
    for f in fields(schema):
        if is_dataclass(types[f.name]):
            keys += path_keys(types[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            keys.append(prefix + f.name)
    return tuple(keys)


INT64_MAX = 2**63 - 1


def check_numbers(section: Any, prefix: str = "") -> None:
    """Every number of a settings section is finite, and every integer fits in 64 bits: NaN, inf
    and a 30-digit seed are one clear line here, not a silent wrong answer or a traceback from torch.

    >>> check_numbers(SampleConfig(temperature=float("nan")))
    Traceback (most recent call last):
    charlm.errors.CharlmError: temperature must be a finite number, got nan
    """
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, bool) or is_dataclass(value):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CharlmError(f"{prefix}{f.name} must be a finite number, got {value}")
        if isinstance(value, int) and not -INT64_MAX <= value <= INT64_MAX:
            raise CharlmError(f"{prefix}{f.name} must fit in 64 bits (at most {INT64_MAX} either side of 0),"
                              f" got {value}")


@dataclass
class DataConfig:
    """Which text to train on and how to split it (fractions by position)."""

    name: str = setting("timemachine", "the corpus: set by `data=`; a key of `charlm/data/corpora.py`, or `text`")
    path: Optional[str] = setting(
        None, "what `data=text` reads: a file, a folder (its text files, recursively, in sorted order; hidden and"
        " binary files left out) or a glob (`notes/*.txt`, `poems/**/*.md`)", shown="none", path=True)
    separator: str = setting(
        "\\n\\n", "what goes between two files of a folder or a glob (`\\n` is a line break, `\\t` a tab; empty:"
        " nothing)", shown="`\\n\\n` (an empty line)", path=True)
    cache_dir: str = setting("data", "where named corpora are downloaded to", path=True)
    train_frac: float = setting(0.9, "the first part of the text, for training")
    val_frac: float = setting(0.05, "the next part, for validation; the test split gets the rest")

    def __post_init__(self) -> None:
        check_numbers(self, "data.")
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

    d_model: int = setting(256, "embedding and GRU width")
    n_layers: int = setting(2, "stacked GRU layers")
    dropout: float = setting(0.2, "dropout on the embeddings, between GRU layers and before the output layer")
    embed_dropout: bool = setting(
        True, "`false`: no dropout on the embeddings, only between the layers and before the output layer"
        " (as char-rnn); a GRU then trains its first layer's input projection as a 256-row table,"
        " about a fifth less arithmetic a step")
    cell: str = setting(
        "reset_after", "`reset_after` (nn.GRU, cuDNN), `reset_before` (the Trax / d2l GRU cell) or `lstm` (nn.LSTM)")

    def __post_init__(self) -> None:
        check_numbers(self, "model.")


@dataclass
class PlanConfig:
    """Which code computes a step: `auto` chooses by what this CPU can do (never by timing), a value
    forces that path; the run header prints the plan, checkpoints save it and a resume replays it
    (see [the plan](plan.md))."""

    kernels: str = setting(
        "auto", "charlm's C++ kernels: `auto` (the newest build this CPU runs), `off` (PyTorch's operations), or a"
        " build: `portable`, `avx2`, `avx512`, `avx512bf16`, `amx`")
    matmul: str = setting(
        "auto", "the large float32 training matmuls: `torch` (torch.mm) or `onednn`; `auto`: oneDNN on AMD CPUs"
        " with AVX-512, else torch.mm")
    weight_grads: str = setting(
        "auto", "the weight gradients: `charlm` (the AVX-512 builds' own kernels) or `library` (the matmul above)")
    lstm: str = setting("auto", "model.cell=lstm on the CPU: `onednn` (its fused kernel) or `pytorch` (PyTorch's loop)")
    table: str = setting(
        "auto", "`on`: a GRU's first layer reads its input projection from a 256-row table of the bytes where nothing"
        " drops the embeddings; `off`: from the embeddings, as the other layers do")
    threads: int = setting(0, "CPU threads a step runs on (0: PyTorch's default, one per core)")

    def __post_init__(self) -> None:
        check_numbers(self, "plan.")
        check_choice(self.kernels, "plan.kernels",
                     ("auto", "off", "portable", "avx2", "avx512", "avx512bf16", "amx"))
        check_choice(self.matmul, "plan.matmul", ("auto", "torch", "onednn"))
        check_choice(self.weight_grads, "plan.weight_grads", ("auto", "charlm", "library"))
        check_choice(self.lstm, "plan.lstm", ("auto", "onednn", "pytorch"))
        check_choice(self.table, "plan.table", ("auto", "on", "off"))
        if not 0 <= self.threads <= 4096:
            raise CharlmError(f"plan.threads must be 0 (one per core) or a number of threads, got {self.threads}")


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and device settings. The defaults are The Time Machine's
    recipe, what `python train.py` runs; charlm/configs/recipe/<data>.yaml holds what another corpus changes."""

    batch_size: int = setting(64, "lanes per batch")
    seq_len: int = setting(100, "bytes per window (backpropagation length)")
    batching: str = setting(
        "stream", "`stream`: lanes with the hidden state carried; `random`: random windows, fresh state")
    max_steps: int = setting(1100, "optimizer steps")
    max_seconds: float = setting(
        0, "a wall-clock budget in seconds of training, evaluations included (start-up, compiling, torchrun's"
        " rendezvous and the first step do not count); replaces `train.max_steps`, and the learning-rate"
        " schedule stretches over it (0: no budget)")
    lr: float = setting(3e-3, "peak learning rate (AdamW), reached after the warmup")
    min_lr: float = setting(1e-4, "the learning rate cosine decay reaches at the last step")
    warmup_steps: int = setting(100, "steps of linear warmup")
    weight_decay: float = setting(
        0.1, "AdamW's weight decay, on the weight matrices (the embedding's too), not the biases")
    grad_clip: float = setting(1.0, "largest gradient norm; larger ones are scaled down (0: no clipping)")
    eval_every: int = setting(100, "steps between evaluations, checkpoints and samples")
    eval_bytes: int = setting(
        262144, "each evaluation scores the first N bytes of the validation split (0: all of it);"
        " both named corpora fit whole")
    sample_length: int = setting(200, "bytes of the sample written at each evaluation")
    log_every: int = setting(10, "steps between the training loss's log points")
    device: str = setting(
        "auto", "`auto` (CUDA when present, else Apple's `mps`, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`")
    precision: str = setting(
        "auto", "`fp32`, `bf16` (autocast), or `auto`: bf16 where this CPU or GPU does bf16 matmuls faster than"
        " fp32 (AMX, AVX-512 BF16 on AMD, CUDA compute capability 8.0 and up), else fp32; part of the run's plan"
        " (see [precision](precision.md))")
    resume: Optional[str] = setting(None, "a run directory or `.pt` to continue", shown="none", path=True)
    init_from: Optional[str] = setting(
        None, "a run directory or `.pt` whose weights and model size a new run starts from (fine-tuning, from"
        " step 0 with a fresh optimizer and schedule)", shown="none", path=True)
    on_nonfinite: str = setting("stop", "a NaN/inf loss or gradient: `stop` with a message, or `skip` the step")

    def __post_init__(self) -> None:
        check_numbers(self, "train.")
        positive = ("batch_size", "seq_len", "max_steps", "eval_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise CharlmError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise CharlmError(f"train.lr must be above 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise CharlmError(f"train.min_lr must be between 0 and train.lr, got {self.min_lr}")
        check_choice(self.precision, "train.precision", ("auto", "fp32", "bf16"))
        if not self.max_seconds >= 0:
            raise CharlmError(f"train.max_seconds must be 0 (no budget) or more, got {self.max_seconds}")
        for name in ("warmup_steps", "eval_bytes", "sample_length", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise CharlmError(f"train.{name} must be 0 or more, got {getattr(self, name)}")
        check_choice(self.batching, "train.batching", ("stream", "random"))
        check_choice(self.on_nonfinite, "train.on_nonfinite", ("stop", "skip"))
        check_device(self.device, "train.device")


def check_device(name: str, key: str) -> None:
    """auto, cpu, cuda, cuda:N or mps (whether that GPU exists is checked where torch is loaded)."""
    index = name.removeprefix("cuda:")
    if name not in ("auto", "cpu", "cuda", "mps") and not (name.startswith("cuda:") and index.isdigit()):
        raise CharlmError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def check_choice(value: Any, key: str, choices: tuple[Any, ...]) -> None:
    """value is one of choices (None among them: the setting may be left out)."""
    if value not in choices:
        names = [str(c) for c in choices if c is not None]
        raise CharlmError(f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")


def check_model(m: ModelConfig) -> None:
    if m.d_model < 1:
        raise CharlmError(f"model.d_model must be at least 1, got {m.d_model}")
    if m.n_layers < 1:
        raise CharlmError(f"model.n_layers must be at least 1, got {m.n_layers}")
    if not 0 <= m.dropout < 1:
        raise CharlmError(f"model.dropout must be in [0, 1), got {m.dropout}")
    check_choice(m.cell, "model.cell", ("reset_after", "reset_before", "lstm"))


@dataclass
class RunConfig:
    """What `python train.py` runs: data, model, trainer, seed and where to write."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = setting(0, "seeds initialisation, batching and the in-training samples")
    out_dir: str = setting(
        "runs/run", "where the run is written", shown="runs/<data>/<date>_<time>", path=True)
    overwrite: bool = setting(
        False, "start over in an `out_dir` that already holds a run, deleting its checkpoints, config.yaml and"
        " events first (without it such a directory is refused)")

    def __post_init__(self) -> None:
        check_numbers(self, "")
        check_model(self.model)


NEWEST = "newest run under `runs/`"


@dataclass
class EvaluateConfig:
    """What `python evaluate.py` runs."""

    checkpoint: Optional[str] = setting(
        None, "a run directory (its `best.pt`) or a `.pt` file", shown=NEWEST, path=True)
    data: DataConfig = field(default_factory=DataConfig)
    split: Optional[str] = setting(
        None, "`train`, `val`, `test` or `all`", shown="`test` (`val` where there is none), or `all` for `data=text`")
    format: str = setting("text", "`text` or `json` (one strict JSON object)")
    device: str = setting("cpu", "`cpu`, `cuda`, `cuda:N`, `mps` (Apple Silicon) or `auto`")
    dynamic: bool = setting(
        False, "also score with dynamic evaluation: after scoring each window, one SGD step on it (a copy of"
        " the model; the checkpoint is not changed)")
    dynamic_lr: float = setting(0.03, "dynamic evaluation's SGD learning rate")
    dynamic_window: int = setting(50, "bytes scored between dynamic evaluation's updates")
    html: Optional[str] = setting(
        None, "write a page showing the text through the model: surprisal, top 5, gates, units", shown="none",
        path=True)
    html_bytes: int = setting(4096, "the page shows the first N bytes of the scored text")
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        check_numbers(self, "")
        check_choice(self.split, "split", (None, "train", "val", "test", "all"))
        check_choice(self.format, "format", ("text", "json"))
        check_device(self.device, "device")
        if not self.dynamic_lr > 0:
            raise CharlmError(f"dynamic_lr must be above 0, got {self.dynamic_lr}")
        for name in ("dynamic_window", "html_bytes"):
            if getattr(self, name) < 1:
                raise CharlmError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class SampleConfig:
    """What `python sample.py` runs."""

    checkpoint: Optional[str] = setting(
        None, "a run directory (its `best.pt`) or a `.pt` file", shown=NEWEST, path=True)
    prompt: str = setting("", "text to continue, taken exactly as typed; empty means start of text", shown="empty")
    prompt_file: Optional[str] = setting(
        None, "read the prompt from a file (UTF-8; other bytes are read as they are)", shown="none", path=True)
    length: int = setting(200, "new bytes to write")
    temperature: float = setting(0.8, "0 is greedy (always the most likely byte); higher is more adventurous")
    top_k: Optional[int] = setting(None, "sample only among the k most likely bytes (1–256)", shown="none")
    top_p: Optional[float] = setting(
        None, "nucleus sampling: only the most likely bytes whose probabilities add up to p", shown="none")
    stop: str = setting("", "end each sample just after the first occurrence of this text", shown="none")
    seed: Optional[int] = setting(None, "the same seed gives the same text", shown="random, printed")
    num_samples: int = setting(1, "write several samples at once (a batch)")
    device: str = setting(
        "cpu", "`cpu`, `cuda`, `cuda:N`, `mps` (Apple Silicon) or `auto`; a model trained on a GPU samples on the CPU")
    precision: str = setting(
        "fp32", "each new byte's matmuls in `fp32` or `bf16` (faster, and different samples; see"
        " [sampling](sampling.md#precision))")
    explain: bool = setting(
        False, "per byte: top 5 candidates and every layer's gates (see [the GRU](gru.md#explain-mode))")
    explain_format: str = setting("text", "`text` or `json`")
    interactive: bool = setting(
        False, "write together: each line typed is added to the text and the model continues it for `length`"
        " bytes; an empty line lets it go on; Ctrl-D ends (see [sampling](sampling.md#writing-together))")
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        check_numbers(self, "")
        check_choice(self.explain_format, "explain_format", ("text", "json"))
        check_choice(self.precision, "precision", ("fp32", "bf16"))
        if self.explain and self.num_samples != 1:
            raise CharlmError("explain=true explains one sample; leave num_samples at 1")
        if self.explain and self.precision != "fp32":
            raise CharlmError("explain=true shows the float32 gates; leave precision at fp32")
        if self.interactive and (self.explain or self.num_samples != 1):
            raise CharlmError("interactive=true writes one text; leave explain=false and num_samples at 1")
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


@dataclass
class ExportConfig:
    """What `python -m charlm.export` runs."""

    checkpoint: Optional[str] = setting(
        None, "a run directory (its `best.pt`) or a `.pt` file", shown=NEWEST, path=True)
    format: str = setting(
        "onnx", "`onnx` (one decoding step), `keras` (an `.npz` of Keras's get_weights()), `html` (the model in one"
        " web page: type a prompt and watch it write, no server, no network) or `hf` (a folder: model.safetensors,"
        " config.json and a README.md model card, as the Hugging Face Hub shares models)")
    out: Optional[str] = setting(
        None, "the file (a folder for `hf`) to write",
        shown="`model.onnx`, `keras_weights.npz`, `model.html` or `hf/` beside the checkpoint", path=True)

    def __post_init__(self) -> None:
        check_choice(self.format, "format", ("onnx", "keras", "html", "hf"))


@dataclass
class ConvertConfig:
    """What `python -m charlm.convert` runs."""

    format: str = setting("keras", "`keras` (`.weights.h5`, or `.npz` of get_weights()) or `trax` (`.npz`)")
    weights: Optional[str] = setting(None, "the file to read", shown="required", path=True)
    out: Optional[str] = setting(None, "the charlm checkpoint (`.pt`) to write", shown="required", path=True)
    reset_after: Optional[bool] = setting(
        None, "the Keras GRU's reset_after (required for Keras; Trax's cell is reset-before)", shown="none")
    flip_update_gate: bool = setting(False, "the weights use h' = (1-z)*h + z*n")
    overwrite: bool = setting(False, "write over `out` when it already holds a checkpoint (without it, refused)")

    def __post_init__(self) -> None:
        check_numbers(self, "")
        check_choice(self.format, "format", ("keras", "trax"))
        for key in ("weights", "out"):
            if not getattr(self, key):
                raise CharlmError(f"{key}= is required; `python -m charlm.convert --help` shows an example")
        if self.format == "keras" and self.reset_after is None:
            raise CharlmError("format=keras needs reset_after=true or reset_after=false (the Keras GRU's setting)")


@dataclass
class BenchConfig:
    """What `python -m charlm.bench` runs."""

    device: str = setting("cpu", "`cpu`, `cuda`, `cuda:N`, `mps` (Apple Silicon) or `auto`")
    models: str = setting("defaults", "`defaults`: data=timemachine's, model=reference's and data=tinyshakespeare's"
                          " models, each at its batch; `given`: d_model x n_layers at batch_size x seq_len only")
    d_model: int = setting(512, "model width")
    n_layers: int = setting(2, "stacked GRU layers")
    batch_size: int = setting(32, "lanes per training batch")
    seq_len: int = setting(100, "bytes per training window")
    steps: int = setting(5, "training steps per timed repetition")
    reps: int = setting(5, "timed repetitions of each training loop")
    sample_reps: int = setting(3, "timed repetitions of each sampling figure")
    precision: str = setting("auto", "charlm's precision: `auto`, `fp32` or `bf16`")
    plan: PlanConfig = field(default_factory=PlanConfig)
    skip: str = setting("", "`training` or `sampling`: leave that part out", shown="none")

    def __post_init__(self) -> None:
        check_numbers(self, "")
        for name in ("d_model", "n_layers", "batch_size", "seq_len", "steps", "reps", "sample_reps"):
            if getattr(self, name) < 1:
                raise CharlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_choice(self.precision, "precision", ("auto", "fp32", "bf16"))
        check_choice(self.skip, "skip", ("", "training", "sampling"))
        check_choice(self.models, "models", ("defaults", "given"))
        check_device(self.device, "device")


@dataclass
class DoctorConfig:
    """`python -m charlm.doctor` takes no settings."""
