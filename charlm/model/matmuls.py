"""The training step's large matmuls on the CPU: which code runs each.

float32 (mm, mm_tn): through oneDNN where it is the faster. torch.mm's float32 matmul is MKL's
sgemm in PyTorch's x86 builds, and MKL runs its AVX2 code on AMD CPUs: on a Zen 5 EPYC, whose
AVX-512 units do twice the work of AVX2's, oneDNN's fp32 matmul (which PyTorch also carries, as
torch.ops.mkldnn._linear_pointwise) reached 427 GFLOP/s at the default model's shapes against
MKL's 188. Which is faster is measured once per process, on a shape of the default model's, and
oneDNN is taken only for a clear win; elsewhere (where MKL's code is as fast, oneDNN limited to
AVX2, no oneDNN) everything stays torch.mm. The results are float32 matmuls either way, equal to
rounding. The float32 weight gradients (mm_tn) go to native_gru.cpp's tile where, timed the
same way against that library, it is faster by a tenth or more (on the Zen 5 by 23-51%).

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

_lock = threading.RLock()  # re-entered: choosing the weight gradients' code asks which library mm chose
_state: dict[str, Any] = {}  # "mm": oneDNN's matmul or None (torch.mm), "why"; "tn": _tn_kernel(), "tn_why"


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


def _best_micros_in_turn(one: Callable, other: Callable, a: torch.Tensor, b: torch.Tensor,
                         reps: int = 7) -> tuple[float, float]:
    """The best of `reps` timings of one(a, b) and of other(a, b), in µs, the calls taken in turn
    so that the machine's drift hits both alike."""
    one(a, b), other(a, b)
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for k, fn in enumerate((one, other)):
            t = time.perf_counter()
            fn(a, b)
            best[k] = min(best[k], time.perf_counter() - t)
    return best[0] * 1e6, best[1] * 1e6


def _choose() -> tuple[Optional[Callable], str]:
    onednn = onednn_matmul()
    if onednn is None:
        return None, "torch.mm (this PyTorch has no oneDNN fp32 matmul to compare)"
    g = torch.Generator().manual_seed(0)  # not the global generator: choosing must not move it
    a, b = torch.randn(1024, 256, generator=g), torch.randn(256, 768, generator=g)
    mkl, ours = _best_micros_in_turn(torch.mm, onednn, a, b)
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
    """Which code runs the large float32 matmuls and their weight gradients, and the timings that
    chose it."""
    _matmul()
    _tn_kernel()
    return f"{_state['why']}; weight gradients by {_state['tn_why']}"


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D tensors."""
    if a.dtype == torch.float32 and a.device.type == "cpu":
        onednn = _matmul()
        if onednn is not None:
            return onednn(a, b)
    return torch.mm(a, b)


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b (a weight gradient: both operands are positions x features). float32: by the
    fused kernels' tile where it was timed faster (_tn_kernel), else by the library's matmul;
    bfloat16: float32 out of the fused kernels where they load, else torch.mm's bfloat16."""
    if a.device.type == "cpu":
        kernels = native.ops()
        if a.dtype == torch.float32:
            if _tn_kernel() and kernels.tn_kernel("float32", a.size(1), b.size(1)):
                return kernels.mm_tn(a, b)
            return _library_tn(a, b)
        if a.dtype == torch.bfloat16 and kernels is not None:
            return kernels.mm_tn(a, b)
    return torch.mm(a.t(), b)


def _library_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b in float32 by the library mm chose. oneDNN's fp32 matmul reads a transposed first
    operand slowly, so there it computes (b.T @ a).T."""
    if _matmul() is not None:
        return mm(b.t(), a).t()
    return torch.mm(a.t(), b)


def _tn_kernel() -> bool:
    """Whether float32 weight gradients go to the fused kernels' tile: timed once per process
    against the library's on a weight gradient of the default model's shape, and taken only for
    a clear win (on a Zen 5 EPYC it ran 23-51% faster than oneDNN at the models' shapes)."""
    if "tn" not in _state:
        with _lock:
            if "tn" not in _state:
                _state["tn"], _state["tn_why"] = _choose_tn()
    return bool(_state["tn"])


def _choose_tn() -> tuple[bool, str]:
    kernels = native.ops()
    name = library()
    if kernels is None or not kernels.tn_kernel("float32", 768, 256):
        return False, f"{name} (charlm's kernels have no float32 tile for them here)"
    g = torch.Generator().manual_seed(0)  # not the global generator: choosing must not move it
    a, b = torch.randn(2048, 768, generator=g), torch.randn(2048, 256, generator=g)
    library_us, ours = _best_micros_in_turn(_library_tn, kernels.mm_tn, a, b)
    figures = f"{ours:.0f} µs by charlm's tile, {library_us:.0f} µs by {name} for 2048x768 by 2048x256"
    if ours < 0.9 * library_us:  # a clear win only (the two timed in turn), not noise
        return True, f"charlm's tile ({figures})"
    return False, f"{name} ({figures})"
