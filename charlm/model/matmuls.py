"""The training step's large matmuls on the CPU: which code runs each.

float32 (mm, mm_tn): through oneDNN where it is the faster. torch.mm's float32 matmul is MKL's
sgemm in PyTorch's x86 builds, and MKL runs its AVX2 code on AMD CPUs: on a Zen 5 EPYC, whose
AVX-512 units do twice the work of AVX2's, oneDNN's fp32 matmul (which PyTorch also carries, as
torch.ops.mkldnn._linear_pointwise) reached 427 GFLOP/s at the default model's shapes against
MKL's 188. Which is faster is measured once per process, on a shape of the default model's, and
oneDNN is taken only for a clear win; elsewhere (where MKL's code is as fast, oneDNN limited to
AVX2, no oneDNN) everything stays torch.mm. The results are float32 matmuls either way, equal to
rounding.

bfloat16: torch.mm (oneDNN, with AMX where the CPU has it), except the weight gradients (mm_tn),
which go to native_gru.cpp's pair kernel where it is built (AVX-512 BF16 without AMX): oneDNN
takes a transposed first operand 15-30% longer there than the same product laid out plainly, and
the pair kernel packs both operands in cache as it goes. Its sums stay float32 to the end
(torch.mm's bfloat16 result is rounded to bfloat16).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch

from charlm.model import native

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "mm": oneDNN's matmul or None (torch.mm), "why": status()


def onednn_matmul() -> Optional[Callable]:
    """(a, b) -> a @ b by oneDNN's fp32 matmul, where this PyTorch has it, else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise  # linear(x, w) = x @ w.T
        op(torch.ones(2, 2), torch.ones(2, 2), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    return lambda a, b: op(a, b.t(), None, "none", [], "")


def _best_micros(fn: Callable, a: torch.Tensor, b: torch.Tensor, reps: int = 7) -> float:
    fn(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(a, b)
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def _choose() -> tuple[Optional[Callable], str]:
    onednn = onednn_matmul()
    if onednn is None:
        return None, "torch.mm (this PyTorch has no oneDNN fp32 matmul to compare)"
    g = torch.Generator().manual_seed(0)  # not the global generator: choosing must not move it
    a, b = torch.randn(1024, 256, generator=g), torch.randn(256, 768, generator=g)
    mkl, ours = _best_micros(torch.mm, a, b), _best_micros(onednn, a, b)
    figures = f"{ours:.0f} µs by oneDNN, {mkl:.0f} µs by torch.mm for 1024x256 @ 256x768"
    if ours < 0.75 * mkl:  # a clear win only, not noise
        return onednn, f"oneDNN ({figures})"
    return None, f"torch.mm ({figures})"


def _matmul() -> Optional[Callable]:
    if "mm" not in _state:
        with _lock:
            if "mm" not in _state:
                _state["mm"], _state["why"] = _choose()
    return _state["mm"]


def library() -> str:
    """Which library the large float32 matmuls run in: 'oneDNN' or 'torch.mm'."""
    return "oneDNN" if _matmul() is not None else "torch.mm"


def status() -> str:
    """Which library the large float32 matmuls run in, and the timings that chose it."""
    _matmul()
    return str(_state["why"])


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D tensors."""
    if a.dtype == torch.float32 and a.device.type == "cpu":
        onednn = _matmul()
        if onednn is not None:
            return onednn(a, b)
    return torch.mm(a, b)


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b (a weight gradient: both operands are positions x features); float32 in, float32
    out; bfloat16 in, float32 out through the fused kernels, else bfloat16. oneDNN's fp32 matmul
    reads a transposed first operand slowly, so there it computes (b.T @ a).T."""
    if a.device.type == "cpu":
        if a.dtype == torch.float32 and _matmul() is not None:
            return mm(b.t(), a).t()
        if a.dtype == torch.bfloat16:
            kernels = native.ops()
            if kernels is not None:
                return kernels.mm_tn(a, b)
    return torch.mm(a.t(), b)
