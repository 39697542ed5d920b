"""Where a model runs and in which precision: device names, and the fp32-or-bf16 choice.

What each part of CharLM computes in, per precision (the run header prints the line that applies):

    fp32   everything float32
    bf16   autocast: the output layer and the GRU's matmuls in bfloat16; the embedding, the
           log-softmax, the weights, the optimizer state and the carried hidden state in float32.
           On CUDA, nn.GRU (cuDNN) stays float32: autocast would run it in float16, not bfloat16.

bf16 on a CPU without bf16 instructions (no AMX, no AVX-512 BF16) is emulated: correct but slow,
so the tests can run it anywhere. With AVX-512 BF16 but no AMX (Intel's Xeons where AMX is off or
hidden) bf16 matmuls are native yet no faster than fp32's. precision=auto times a few training
steps of both and keeps bf16 only where it is faster for that model on that machine (like
cuDNN's benchmark mode).
"""
from __future__ import annotations

import copy
import ctypes
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from charlm.errors import CharlmError
from charlm.model import matmuls


def resolve_device(name: str, key: str = "device") -> torch.device:
    """auto -> cuda when present, else cpu; a GPU that is not there is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CharlmError(f"{key}={name} but no CUDA GPU is available; use {key}=cpu or {key}=auto")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise CharlmError(
                f"{key}={name} but this machine has {torch.cuda.device_count()} GPU(s), cuda:0"
                f" to cuda:{torch.cuda.device_count() - 1}"
            )
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in, and why it was chosen (kept in checkpoints as plain data)."""

    bf16: bool
    why: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self, device: torch.device) -> torch.autocast:
        """The context a training step's forward pass runs in."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def parts(self, cell: str, device: torch.device) -> str:
        """What actually computes in which precision, part by part."""
        if not self.bf16:
            return "everything float32"
        if cell == "lstm":
            gru = "LSTM bf16 (oneDNN)" if device.type == "cpu" else "LSTM fp32 (cuDNN; autocast would make it fp16)"
        elif cell == "reset_before":
            gru = "GRU matmuls and gates bf16"
        elif device.type == "cuda":
            gru = "GRU fp32 (cuDNN; autocast would make it fp16)"
        else:
            gru = "GRU matmuls bf16, gates fp32"
        return f"embedding fp32, {gru}, output layer bf16, log-softmax fp32; weights and hidden state float32"


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the
    system: a training step allocates its activations anew, and memory handed back is faulted in
    again page by page (about 21,000 page faults and 30 ms of a default Time Machine step of
    120 ms on a 2-core EPYC). True where it took effect (glibc, Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def choose_precision(
    setting: str,
    model: torch.nn.Module,
    device: torch.device,
    batch: tuple[int, int],
    measure: Optional[Callable[[bool], float]] = None,
    matmul: Optional[Callable[[torch.dtype], float]] = None,
) -> Precision:
    """train.precision=fp32|bf16 as given; auto: bf16 only where a training step is faster in it.

    batch is (lanes, seq_len) of one step on this process. measure(bf16) -> seconds per step and
    matmul(dtype) -> microseconds per small matmul replace the timings (tests use them).
    """
    if setting != "auto":
        return Precision(setting == "bf16", f"train.precision={setting}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        return Precision(False, f"auto: this GPU (compute capability {major}.{minor}) has no bf16 units")
    if device.type == "cpu":
        matmul = matmul or matmul_micros
        fp32_us, bf16_us = matmul(torch.float32), matmul(torch.bfloat16)
        if bf16_us >= fp32_us:  # emulated or no faster: a step would not be either, no need to time it
            return Precision(False, f"auto: bf16 matmuls are no faster than fp32 on this CPU ({bf16_us:.0f} µs"
                                    f" against {fp32_us:.0f} µs in fp32)")
    measure = measure or _step_timer(model, device, batch)
    times: dict[bool, list[float]] = {False: [], True: []}
    start = time.perf_counter()
    while len(times[True]) < 3 and (not times[True] or time.perf_counter() - start < 2.0):
        for bf16 in (False, True):  # in turn, so that drift in the machine's speed hits both alike
            times[bf16].append(measure(bf16))
    fp32_s, bf16_s = min(times[False]), min(times[True])
    figures = f"a training step took {fp32_s * 1e3:.1f} ms in fp32, {bf16_s * 1e3:.1f} ms in bf16"
    return Precision(bf16_s < 0.95 * fp32_s, f"auto: {figures}")  # a clear win only, not noise


def matmul_micros(dtype: torch.dtype, n: int = 256, reps: int = 20) -> float:
    """Microseconds for one (n, n) @ (n, 3n) matmul on the CPU in dtype (best of reps)."""
    g = torch.Generator().manual_seed(0)  # not the global generator: choosing must not move it
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, 3 * n, generator=g).to(dtype)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        matmuls.mm(a, b)  # float32 as training runs it: oneDNN's where that is faster than torch.mm
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def _step_timer(model: torch.nn.Module, device: torch.device, batch: tuple[int, int]) -> Callable[[bool], float]:
    """measure(bf16) -> seconds of one forward + backward of a copy of model on random bytes."""
    trial = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(0)  # not the global generator: choosing must not move it
    x, y = (torch.randint(0, 256, batch, generator=g).to(device) for _ in range(2))

    def step(bf16: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            log_probs, _ = trial(x)
            loss = F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), y.reshape(-1))
        loss.backward()
        trial.zero_grad(set_to_none=True)

    warm: set[bool] = set()

    def measure(bf16: bool) -> float:
        # dropout draws from the global generator: leave it as it was, so auto costs no reproducibility
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if bf16 not in warm:  # kernels, allocator, autocast's weight cache
                step(bf16)
                warm.add(bf16)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t = time.perf_counter()
            step(bf16)
            sync()
            once = time.perf_counter() - t
            if once >= 0.02:
                return once
            # a small model's step: time enough of them (20 ms) that one slow step is not the verdict
            reps = min(20, math.ceil(0.02 / max(once, 1e-4)))
            t = time.perf_counter()
            for _ in range(reps):
                step(bf16)
            sync()
            return (time.perf_counter() - t) / reps

    return measure
