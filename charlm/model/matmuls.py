"""The training step's large matmuls on the CPU: which code runs each, as the plan says.

float32 (mm): torch.mm, or oneDNN's fp32 matmul with plan.matmul=onednn. torch.mm's float32
matmul is MKL's sgemm in PyTorch's x86 builds, and MKL runs its AVX2 code on AMD CPUs, so on an
AMD CPU with AVX-512 oneDNN's (which PyTorch also carries, as torch.ops.mkldnn._linear_pointwise)
uses vectors twice as wide; auto takes it there (charlm.plan). Either way the results are float32
matmuls, equal to rounding.

Weight gradients (mm_tn, a^T b with both operands positions x features): with
plan.weight_grads=charlm, the kernels' float32 tile and bfloat16 pair kernel where the build has
them (charlm/model/kernels/weight_grads.cpp says why they are faster); else the library's matmul.
bfloat16 matmuls are torch.mm's (oneDNN, with AMX where the CPU has it).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from charlm import plan
from charlm.model import native


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


_onednn: list[Optional[Callable]] = []  # onednn_matmul(), asked once


def _library() -> Optional[Callable]:
    """oneDNN's fp32 matmul where the plan takes it, else None (torch.mm)."""
    if plan.current().matmul != "onednn":
        return None
    if not _onednn:
        _onednn.append(onednn_matmul())
    return _onednn[0]


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D tensors."""
    if a.dtype == torch.float32 and a.device.type == "cpu":
        onednn = _library()
        if onednn is not None:
            return onednn(a, b)
    return torch.mm(a, b)


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b (a weight gradient: both operands are positions x features), float32: from bfloat16
    operands, the pair kernel's float32 sums where it takes them, else torch.mm's bfloat16 result."""
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16):
        kernels = native.ops()
        if plan.current().weight_grads == "charlm" and kernels is not None:
            if kernels.tn_kernel("float32" if a.dtype == torch.float32 else "bfloat16", a.size(1), b.size(1)):
                return kernels.mm_tn(a, b)
        if a.dtype == torch.float32 and _library() is not None:
            return mm(b.t(), a).t()  # oneDNN reads a transposed first operand slowly: (b.T @ a).T
    return torch.mm(a.t(), b).float() if a.dtype == torch.bfloat16 else torch.mm(a.t(), b)
