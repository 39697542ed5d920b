"""nn.GRU's layers with a hand-written backward: the fast path for training on CPU.

Same equations and parameters as nn.GRU (reset gate after the recurrent matmul):

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

Why it is faster than autograd through nn.GRU on CPU: only the recurrent matmul and a few
elementwise ops on that step's (B, H) slices run per time step, in cache. The input projections, every
weight gradient and the input gradient are one large matmul each over all T*B positions,
where autograd through nn.GRU does a small weight-gradient matmul at every step.
`python -m charlm.bench` measures the difference.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from charlm.model.gru import layer_weights


class GRULayer(torch.autograd.Function):
    """One layer over a time-major sequence: x (T, B, I), h0 (B, H) -> out (T, B, H)."""

    @staticmethod
    def forward(ctx: Any, x, h0, w_ih, w_hh, b_ih, b_hh):  # type: ignore[override]
        seq, batch, _ = x.shape
        hid = w_hh.size(1)
        gi = torch.addmm(b_ih, x.reshape(seq * batch, -1), w_ih.t()).view(seq, batch, 3 * hid)
        out = x.new_empty(seq, batch, hid)
        rz = x.new_empty(seq, batch, 2 * hid)  # sigmoid gates r, z
        n = x.new_empty(seq, batch, hid)  # candidate
        ghn = x.new_empty(seq, batch, hid)  # W_hn h + b_hn, which r multiplies
        w_hh_t = w_hh.t()
        h = h0
        for t in range(seq):
            gh = torch.addmm(b_hh, h, w_hh_t)
            torch.sigmoid(gi[t, :, : 2 * hid] + gh[:, : 2 * hid], out=rz[t])
            ghn[t] = gh[:, 2 * hid :]
            torch.tanh(torch.addcmul(gi[t, :, 2 * hid :], rz[t, :, :hid], ghn[t]), out=n[t])
            h = torch.lerp(n[t], h, rz[t, :, hid:], out=out[t])  # n + z * (h - n)
        ctx.save_for_backward(x, h0, w_ih, w_hh, out, rz, n, ghn)
        return out

    @staticmethod
    def backward(ctx: Any, d_out):  # type: ignore[override]
        x, h0, w_ih, w_hh, out, rz, n, ghn = ctx.saved_tensors
        seq, batch, hid = out.shape
        d_out = d_out.contiguous()
        d_gh = torch.empty(seq, batch, 3 * hid, dtype=out.dtype, device=out.device)  # dL/d(W_h h + b_h)
        d_gin = torch.empty(seq, batch, hid, dtype=out.dtype, device=out.device)  # dL/d(W_in x + b_in)
        carry = torch.zeros_like(h0)  # dL/dh flowing back from step t+1
        # Step by step, so each step's tensors stay in cache; the weight gradients come after.
        for t in range(seq - 1, -1, -1):
            r, z, n_t = rz[t, :, :hid], rz[t, :, hid:], n[t]
            h_prev = out[t - 1] if t > 0 else h0
            dh = carry + d_out[t]
            d_pre_n = torch.mul(dh * (1 - z), 1 - n_t * n_t, out=d_gin[t])
            torch.mul(d_pre_n * ghn[t], r * (1 - r), out=d_gh[t, :, :hid])
            torch.mul(dh * (h_prev - n_t), z * (1 - z), out=d_gh[t, :, hid : 2 * hid])
            torch.mul(d_pre_n, r, out=d_gh[t, :, 2 * hid :])
            carry = torch.addmm(dh * z, d_gh[t], w_hh)
        flat_gh = d_gh.view(seq * batch, 3 * hid)
        flat_rz, flat_n = flat_gh[:, : 2 * hid], d_gin.view(seq * batch, hid)  # d_gi = [flat_rz, flat_n]
        flat_x = x.reshape(seq * batch, -1)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = torch.addmm(flat_rz @ w_ih[: 2 * hid], flat_n, w_ih[2 * hid :]).view(seq, batch, -1)
        d_w_ih = torch.cat([flat_rz.t() @ flat_x, flat_n.t() @ flat_x])
        d_w_hh = torch.addmm(d_gh[0].t() @ h0, flat_gh[batch:].t(), out[:-1].reshape(-1, hid))
        d_b_ih = torch.cat([flat_rz.sum(0), flat_n.sum(0)])
        return d_x, carry, d_w_ih, d_w_hh, d_b_ih, flat_gh.sum(0)


def fused_gru(gru: nn.GRU, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `gru` (batch_first, unidirectional, with biases) with GRULayer: what gru(x, h0) returns.

    x (B, T, I), h0 (L, B, H) or None -> out (B, T, H), h_n (L, B, H). Dropout between layers
    as nn.GRU applies it (training mode only).
    """
    if h0 is None:
        h0 = x.new_zeros(gru.num_layers, x.size(0), gru.hidden_size)
    seq_in = x.transpose(0, 1).contiguous()  # time-major: each step's rows are contiguous
    finals = []
    for k in range(gru.num_layers):
        if k > 0 and gru.dropout and gru.training:
            seq_in = F.dropout(seq_in, gru.dropout, training=True)
        seq_in = GRULayer.apply(seq_in, h0[k], *layer_weights(gru, k))
        finals.append(seq_in[-1])
    return seq_in.transpose(0, 1), torch.stack(finals)


def can_fuse(gru: nn.Module, x: torch.Tensor) -> bool:
    """True where fused_gru is used: training an nn.GRU on CPU in float32 outside autocast, run
    eagerly (export, tracing and torch.compile see nn.GRU itself). Without gradients (evaluation,
    evaluate.py) nn.GRU's own C++ loop is faster (docs/speed.md)."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return (
        torch.is_grad_enabled()
        and isinstance(gru, nn.GRU)
        and x.device.type == "cpu"
        and gru.batch_first
        and gru.bias
        and not gru.bidirectional
        and gru.proj_size == 0
        and gru.weight_hh_l0.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )
