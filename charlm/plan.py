"""The plan: every choice of which code computes a step, made once, named, printed and saved.

    resolve(settings, device, precision, saved)  -> (Plan, reasons, note)   the choices for a run
    use(plan)                                    the plan the model code below follows (a context)
    current()                                    the plan in use (auto's, resolved once, if none was given)
    Plan.line()                                  the one line the run header, doctor and bench print

What a plan decides, each by a setting (`plan.<name>=`, `train.precision=`), `auto` by default:

    precision     fp32 or bf16 (train.precision)
    kernels       which build of charlm's C++ kernels (charlm/model/kernels/) runs the GRU's time
                  loops, decoding, dropout masks and the output layer's log-softmax; `off`: PyTorch's
                  operations compute the same things
    matmul        the large float32 training matmuls: torch.mm, or oneDNN's
    weight_grads  the weight gradients: charlm's kernels where the build has one, or the library's
    lstm          nn.LSTM on the CPU: oneDNN's fused kernel, or PyTorch's own loop
    table         whether a GRU's first layer reads its input projection from a 256-row table of the
                  bytes where nothing drops the embeddings (model.embed_dropout=false), or computes it
                  from the embeddings as the other layers do
    threads       how many CPU threads run the step (the kernels split their work by it)

`auto` chooses by what this CPU and this PyTorch can do, never by a stopwatch, so that the same
command computes the same thing at every moment and in every process. Each rule below gives its
reason (docs/plan.md has the table); a choice that measures faster on your machine is one setting
away, and `python -m charlm.bench` runs any plan.
A resumed run replays the plan its checkpoint saved (charlm.training.state).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Optional

import torch

from charlm.config import PlanConfig
from charlm.cpu import AVX512_BUILDS, BUILDS, bf16_capped, cpu_flags, cpu_vendor, is_x86, runnable_builds
from charlm.errors import CharlmError


@dataclass(frozen=True)
class Plan:
    """Which code computes each part of a step; plain data, saved in every checkpoint."""

    device: str = "cpu"
    precision: str = "fp32"
    kernels: str = "off"
    matmul: str = "torch"
    weight_grads: str = "library"
    lstm: str = "pytorch"
    table: str = "on"
    threads: int = 1

    def line(self) -> str:
        """The plan as the settings that force it: `precision=fp32 kernels=avx2 ...`."""
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"


# --- the rules of auto --------------------------------------------------------------------------


def auto_precision(device: torch.device, flags: Optional[frozenset[str]] = None, vendor: Optional[str] = None,
                   capability: Optional[str] = None) -> tuple[str, str]:
    """(precision, why) that train.precision=auto takes on this device, by capability (flags,
    vendor and PyTorch's CPU capability are this machine's unless given)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return "fp32", f"this GPU (compute capability {major}.{minor}) has no bf16 units"
        return "bf16", f"this GPU (compute capability {major}.{minor}) has bf16 units"
    if device.type != "cpu":
        return "fp32", f"{device.type}: fp32"
    flags = cpu_flags() if flags is None else flags
    vendor = cpu_vendor() if vendor is None else vendor
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if bf16_capped() or capability != "AVX512":
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return "fp32", ("bf16 instructions are switched off for PyTorch here"
                            " (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)")
        return "fp32", "this CPU has no bf16 matmul instructions: bf16 would be emulated, and slower"
    if "amx_bf16" in flags:
        return "bf16", "this CPU's AMX does bf16 matmuls faster than fp32"
    if "avx512_bf16" in flags and vendor == "AuthenticAMD":
        return "bf16", "AVX-512 BF16 on AMD does bf16 matmuls faster than fp32"
    if "avx512_bf16" in flags:
        return "fp32", "AVX-512 BF16 without AMX is no faster than fp32 on Intel"
    return "fp32", "this CPU has no bf16 matmul instructions: bf16 would be emulated, and slower"


def auto_kernels() -> tuple[str, str]:
    """(build, why): the newest build this CPU runs, or off where the kernels are switched off."""
    if os.environ.get("CHARLM_NATIVE", "1") == "0":
        return "off", "CHARLM_NATIVE=0 turns the kernels off"
    builds = runnable_builds()
    return builds[-1], f"the newest build this CPU runs ({', '.join(builds)})"


def auto_matmul(flags: Optional[frozenset[str]] = None, vendor: Optional[str] = None,
                capability: Optional[str] = None) -> tuple[str, str]:
    """oneDNN where PyTorch's MKL would leave AVX-512 unused (AMD CPUs), else torch.mm."""
    from charlm.model.matmuls import onednn_matmul

    flags = cpu_flags() if flags is None else flags
    vendor = cpu_vendor() if vendor is None else vendor
    avx512 = "avx512f" in flags and (capability or torch.backends.cpu.get_cpu_capability()) == "AVX512"
    if avx512 and vendor == "AuthenticAMD":
        if onednn_matmul() is None:
            return "torch", "this PyTorch has no oneDNN fp32 matmul"
        return "onednn", "MKL (torch.mm) runs AVX2 code on AMD CPUs; oneDNN runs AVX-512"
    return "torch", "torch.mm runs this CPU's widest vectors" if is_x86() else "torch.mm"


def auto_weight_grads(kernels: str) -> tuple[str, str]:
    """charlm's tile and pair kernels where the build has them (AVX-512), else the library's."""
    if kernels in AVX512_BUILDS:
        return "charlm", f"the {kernels} build has weight-gradient kernels"
    return "library", "no weight-gradient kernel in this build" if kernels != "off" else "the kernels are off"


def auto_lstm(bf16: bool) -> tuple[str, str]:
    """oneDNN's fused LSTM where oneDNN builds one on this CPU in this precision, else PyTorch's loop."""
    if onednn_lstm_works(bf16):
        return "onednn", f"oneDNN builds {'a bf16' if bf16 else 'an fp32'} LSTM on this CPU"
    return "pytorch", f"oneDNN has no {'bf16' if bf16 else 'fp32'} LSTM for this CPU"


@functools.lru_cache(maxsize=None)
def onednn_lstm_works(bf16: bool = False) -> bool:
    """Whether oneDNN builds an LSTM on this CPU in this precision (it finds none in bf16 on CPUs
    without bf16 instructions, nor at all with ONEDNN_MAX_CPU_ISA=AVX2): one tiny forward pass, a
    capability check, not a timing."""
    if not torch.backends.mkldnn.is_available():
        return False
    with torch.random.fork_rng(devices=[]):  # its random weights must not move the run's generator
        lstm = torch.nn.LSTM(4, 4, batch_first=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lstm(torch.zeros(1, 2, 4))
        return True
    except RuntimeError as e:
        if "primitive descriptor" in str(e):
            return False
        raise


# --- resolving ----------------------------------------------------------------------------------


def resolve(settings: Optional[PlanConfig] = None, device: torch.device | str = "cpu", precision: str = "auto",
            saved: Optional[dict[str, Any]] = None) -> tuple[Plan, dict[str, str], str]:
    """The plan for these settings on this machine -> (plan, why each part, note).

    `auto` parts replay `saved` (a checkpoint's plan) where this machine can run it, else take
    auto's rule; the note says where a saved part could not be replayed (then the weights will not
    equal those of a run in one go bit for bit). A part forced that this machine cannot run is a
    CharlmError in one line."""
    settings = settings or PlanConfig()
    device = torch.device(device)
    saved = dict(saved or {})
    why: dict[str, str] = {}
    cannot: list[str] = []

    def pick(name: str, setting: Any, check, auto) -> Any:
        """setting as given (checked), else the saved value where it still runs, else auto's."""
        if setting not in ("auto", 0):
            problem = check(setting)
            if problem:
                raise CharlmError(f"plan.{name}={setting} cannot run here: {problem}")
            why[name] = "as set"
            return setting
        if name in saved:
            problem = check(saved[name])
            if not problem:
                why[name] = "as the checkpoint's plan"
                return saved[name]
            value, why[name] = auto()
            cannot.append(f"{name}={saved[name]} ({problem}; {name}={value} runs instead)")
            return value
        value, why[name] = auto()
        return value

    def check_precision(value: str) -> str:
        if device.type == "cuda" and value == "bf16" and torch.cuda.get_device_capability(device) < (8, 0):
            return "this GPU has no bf16 units"
        return ""

    chosen_precision = pick("precision", precision, check_precision, lambda: auto_precision(device))
    if precision != "auto":
        why["precision"] = f"train.precision={precision}"
    kernels = _built_or_off(pick("kernels", settings.kernels, _check_kernels, auto_kernels), settings.kernels,
                            saved, why, cannot)
    matmul = pick("matmul", settings.matmul, _check_matmul, auto_matmul)
    weight_grads = pick("weight_grads", settings.weight_grads, lambda v: _check_weight_grads(v, kernels),
                        lambda: auto_weight_grads(kernels))
    bf16 = chosen_precision == "bf16"
    lstm = pick("lstm", settings.lstm, lambda v: _check_lstm(v, bf16), lambda: auto_lstm(bf16))
    table = pick("table", settings.table, lambda v: "",
                 lambda: ("on", "the same values with a fifth less arithmetic, where nothing drops the embeddings"))
    threads = pick("threads", settings.threads, _check_threads,
                   lambda: (torch.get_num_threads(), "PyTorch's default, one per core"))
    plan = Plan(device=device.type, precision=chosen_precision, kernels=kernels, matmul=matmul,
                weight_grads=weight_grads, lstm=lstm, table=table, threads=int(threads))
    note = ""
    if cannot:
        note = ("plan: this machine cannot run the checkpoint's " + "; ".join(cannot)
                + ": the weights will not equal those of a run in one go bit for bit")
    return plan, why, note


def _built_or_off(kernels: str, setting: str, saved: dict[str, Any], why: dict[str, str], cannot: list[str]) -> str:
    """The chosen build where it compiles (once, cached) and loads; else off, as a machine without
    a compiler runs (a forced build that cannot be made is a CharlmError)."""
    from charlm.model import native

    if kernels == "off" or native.load(kernels) is not None:
        return kernels
    if setting != "auto":
        raise CharlmError(f"plan.kernels={kernels} cannot run here: {native.status(kernels)}")
    if saved.get("kernels") == kernels:
        cannot.append(f"kernels={kernels} ({native.status(kernels)}; kernels=off runs instead)")
    why["kernels"] = native.status(kernels)
    return "off"


def _check_kernels(value: str) -> str:
    if value == "off":
        return ""
    if value not in BUILDS:
        return f"no such build (one of {', '.join(BUILDS)})"
    if value not in runnable_builds():
        return f"this CPU runs the builds {', '.join(runnable_builds()) or 'none'}"
    return ""


def _check_matmul(value: str) -> str:
    from charlm.model.matmuls import onednn_matmul

    if value == "onednn" and onednn_matmul() is None:
        return "this PyTorch has no oneDNN fp32 matmul"
    return ""


def _check_weight_grads(value: str, kernels: str) -> str:
    if value == "charlm" and kernels not in AVX512_BUILDS:
        return (f"charlm's weight-gradient kernels are in the AVX-512 builds ({', '.join(AVX512_BUILDS)}),"
                f" not kernels={kernels}")
    return ""


def _check_lstm(value: str, bf16: bool) -> str:
    if value == "onednn" and not onednn_lstm_works(bf16):
        return f"oneDNN has no {'bf16' if bf16 else 'fp32'} LSTM for this CPU"
    return ""


def _check_threads(value: int) -> str:
    return "" if int(value) >= 1 else "at least 1"


# --- the plan in use ------------------------------------------------------------------------------

_lock = threading.Lock()
_active: Optional[Plan] = None
_default: Optional[Plan] = None


def current() -> Plan:
    """The plan the model code follows: the one in use(), else auto's for the CPU (resolved once)."""
    global _default
    if _active is not None:
        return _active
    if _default is None:
        with _lock:
            if _default is None:
                _default = resolve()[0]
    return _default


@contextlib.contextmanager
def use(plan: Plan) -> Iterator[Plan]:
    """Follow `plan` inside the block (its threads too); the plan and threads before it come back after."""
    global _active
    before, threads = _active, torch.get_num_threads()
    _active = plan
    if plan.threads != threads:
        torch.set_num_threads(plan.threads)
    try:
        yield plan
    finally:
        _active = before
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def from_saved(saved: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A checkpoint's plan as a dict of known parts (an older checkpoint's precision alone)."""
    if not saved:
        return {}
    names = {f.name for f in fields(Plan)}
    return {k: v for k, v in saved.items() if k in names and k != "device"}
