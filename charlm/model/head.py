"""The output layer and its log-softmax in one autograd step on the CPU: log_softmax(x W^T + b).

What CharLM's head computes (nn.Linear, then log_softmax in float32), with fewer passes over the
(N, 256) logits: the matmul runs without its bias, the kernels' log_softmax_rows (kernels/log_softmax.cpp) adds the
bias and normalises each row in one pass (bfloat16 logits read straight into float32), and its
backward gives the logits' gradient in the matmul dtype and the bias gradient in one pass more.
nn.Linear's path takes five (the bias, the cast, the log-softmax, its backward, the cast back)
and a sum. Used where the fused kernels load; export, tracing and torch.compile see nn.Linear.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from charlm.model import native
from charlm.model.matmuls import mm, mm_tn


class LogSoftmaxHead(torch.autograd.Function):
    """x (..., D) float32, weight (V, D), bias (V) float32 -> log-probabilities (..., V) float32,
    the matmuls in mm_dtype (float32, or bfloat16 under bf16 autocast)."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, mm_dtype):  # type: ignore[override]
        ops = native.ops()
        with torch.autocast("cpu", enabled=False):
            # one pass: x's layout (often a transposed view) to rows, in the matmul dtype
            x_mm = torch.empty(x.shape, dtype=mm_dtype, device=x.device).copy_(x).view(-1, x.size(-1))
            w_mm = weight.to(mm_dtype)
            log_probs = ops.log_softmax_rows(mm(x_mm, w_mm.t()), bias)
        ctx.save_for_backward(x_mm, w_mm, log_probs)
        ctx.x_shape, ctx.x_stride, ctx.param_dtype = x.shape, x.stride(), weight.dtype
        return log_probs.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, d_log_probs):  # type: ignore[override]
        x_mm, w_mm, log_probs = ctx.saved_tensors
        d_logits, d_bias = native.ops().log_softmax_rows_backward(
            d_log_probs.reshape(log_probs.shape), log_probs, w_mm)
        d_x = None
        if ctx.needs_input_grad[0]:  # in x's own layout, so that the GRU's backward reads it as is
            d_x = torch.empty_strided(ctx.x_shape, ctx.x_stride, dtype=ctx.param_dtype, device=x_mm.device)
            d_x.copy_(mm(d_logits, w_mm).view(ctx.x_shape))
        d_weight = mm_tn(d_logits, x_mm).to(ctx.param_dtype)
        return d_x, d_weight, d_bias.to(ctx.param_dtype), None


def can_fuse(head: nn.Module, x: torch.Tensor) -> bool:
    """True where log_softmax_head is used: a float32 nn.Linear with a bias on the CPU, in float32
    or under bf16 autocast, run eagerly, where the fused kernels load."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return (
        isinstance(head, nn.Linear)
        and head.bias is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and head.weight.dtype == torch.float32
        and (not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == torch.bfloat16)
        and native.ops() is not None
    )


def log_softmax_head(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """torch.log_softmax(head(x), -1) in float32, through LogSoftmaxHead."""
    mm_dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else torch.float32
    return LogSoftmaxHead.apply(x, head.weight, head.bias, mm_dtype)
