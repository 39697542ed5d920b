"""Dropout for the CPU with F.dropout's semantics, its mask drawn by the kernels (kernels/dropout.cpp).

F.dropout on the CPU draws every element from one mt19937 stream in turn, one element after
another on one core, three times a step (the embedding, between the layers, before the output
layer). dropout_mask hashes each element's index with a seed drawn from PyTorch's generator,
vectorised on every thread: the same Bernoulli(1 - p) mask scaled by 1 / (1 - p), reproducible
under torch.manual_seed and across an exact resume (the trainer saves the generator's state).
Elsewhere (the plan's kernels off, CUDA, another dtype) it is F.dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from charlm.model import native


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p), in
    training only (F.dropout(x, p, training))."""
    if not training or p == 0:
        return x
    ops = native.ops() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if ops is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return x * ops.dropout_mask(x, p, seed)
