"""nn.GRU's layers with a hand-written backward: the fast path for training on CPU.

Same equations and parameters as nn.GRU (reset gate after the recurrent matmul):

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

Why it is faster than autograd through nn.GRU on CPU: only the recurrent matmul and that step's
elementwise work on its (B, H) slices run per time step, in cache. The input projections, every
weight gradient and the input gradient are one large matmul each over all T*B positions,
where autograd through nn.GRU does a small weight-gradient matmul at every step. The two time
loops are one call each into charlm/model/kernels/gru_loops.cpp where it builds (charlm.model.native),
else forward_loop and backward_loop below, the same computation in PyTorch's operations. In
fp32 or under bf16 autocast (bf16 matmuls; gates and state float32). `python -m charlm.bench`
measures it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from charlm.model import native
from charlm.model.dropout import dropout
from charlm.model.gru import layer_weights
from charlm.model.matmuls import mm, mm_tn


def forward_loop(gi, h0, w_hh_t, b_hh, b_ih=None):
    """The time loop of the forward pass in PyTorch's operations: what the kernels'
    gru_forward computes. gi (T, B, 3H) = W_i x (+ b_i where b_ih is None) and w_hh_t (H, 3H) in
    the matmul dtype, h0 (B, H), b_hh and b_ih float32 -> out (T, B, H) float32, out in the matmul
    dtype, and the gates saved for backward_loop: rz (T, B, 2H), n (T, B, H), ghn = W_hn h + b_hn
    (T, B, H)."""
    seq, batch, three = gi.shape
    hid = three // 3
    f32 = dict(dtype=h0.dtype, device=h0.device)
    out, rz = torch.empty(seq, batch, hid, **f32), torch.empty(seq, batch, 2 * hid, **f32)
    n, ghn = torch.empty(seq, batch, hid, **f32), torch.empty(seq, batch, hid, **f32)
    out_mm = out if gi.dtype == h0.dtype else torch.empty(seq, batch, hid, dtype=gi.dtype, device=gi.device)
    h, h_mm = h0, h0.to(gi.dtype)
    for t in range(seq):
        gh = torch.addmm(b_hh, h_mm, w_hh_t) if gi.dtype == b_hh.dtype else torch.mm(h_mm, w_hh_t).to(h.dtype) + b_hh
        gi_t = gi[t] if b_ih is None else gi[t].to(h0.dtype) + b_ih
        torch.sigmoid(gi_t[:, : 2 * hid] + gh[:, : 2 * hid], out=rz[t])
        ghn[t] = gh[:, 2 * hid :]
        torch.tanh(torch.addcmul(gi_t[:, 2 * hid :], rz[t, :, :hid], ghn[t]), out=n[t])
        h = torch.lerp(n[t], h, rz[t, :, hid:], out=out[t])  # n + z * (h - n)
        if out_mm is not out:
            out_mm[t] = h
        h_mm = out_mm[t]
    return out, out_mm, rz, n, ghn


def backward_loop(d_out, h0, out, rz, n, ghn, w_hh):
    """The time loop of the backward pass in PyTorch's operations: what the kernels'
    gru_backward computes. -> d_gi = dL/d(W_i x + b_i), d_gh = dL/d(W_h h + b_h), each (T, B, 3H)
    in the dtype of w_hh (3H, H), dL/dh0 (B, H), and the bias gradients dL/db_i, dL/db_h (3H)."""
    seq, batch, hid = out.shape
    d_gi = torch.empty(seq, batch, 3 * hid, dtype=w_hh.dtype, device=out.device)
    d_gh = torch.empty(seq, batch, 3 * hid, dtype=w_hh.dtype, device=out.device)
    carry = torch.zeros_like(h0)  # dL/dh flowing back from step t+1
    # Step by step, so each step's tensors stay in cache; the weight gradients come after.
    for t in range(seq - 1, -1, -1):
        r, z, n_t = rz[t, :, :hid], rz[t, :, hid:], n[t]
        h_prev = out[t - 1] if t > 0 else h0
        dh = carry + d_out[t]
        d_pre_n = dh * (1 - z) * (1 - n_t * n_t)
        d_r = d_pre_n * ghn[t] * r * (1 - r)
        d_z = dh * (h_prev - n_t) * z * (1 - z)
        d_gi[t] = torch.cat([d_r, d_z, d_pre_n], dim=1)
        d_gh[t] = torch.cat([d_r, d_z, d_pre_n * r], dim=1)
        carry = torch.addmm(dh * z, d_gh[t], w_hh) if w_hh.dtype == dh.dtype else dh * z + d_gh[t] @ w_hh
    d_b_ih, d_b_hh = (d.view(seq * batch, -1).sum(0, dtype=h0.dtype) for d in (d_gi, d_gh))
    return d_gi, d_gh, carry, d_b_ih, d_b_hh


class GRULayer(torch.autograd.Function):
    """One layer over a time-major sequence: x (T, B, I), h0 (B, H) -> out (T, B, H), float32.

    mm_dtype: the dtype of every matmul (float32, or bfloat16 under bf16 autocast: the weights
    are cast once per call); the gates, the state and the gradients it returns keep the dtype of
    the weights. The time loops are the kernels' where the plan runs them, else forward_loop and
    backward_loop.
    """

    @staticmethod
    def forward(ctx: Any, x, h0, w_ih, w_hh, b_ih, b_hh, mm_dtype):  # type: ignore[override]
        with torch.autocast("cpu", enabled=False):  # the dtypes are chosen here, op by op
            return GRULayer._forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mm_dtype)

    @staticmethod
    def _forward(ctx: Any, x, h0, w_ih, w_hh, b_ih, b_hh, mm_dtype):
        seq, batch, _ = x.shape
        x_mm, w_ih_mm = x.to(mm_dtype), w_ih.to(mm_dtype)
        # W_i x without b_i: the time loop adds it (float32), saving the matmul a pass over gi
        gi = mm(x_mm.reshape(seq * batch, -1), w_ih_mm.t()).view(seq, batch, -1)
        ctx.x_dtype = x.dtype
        return _loop_forward(ctx, gi, h0, w_hh, b_hh, mm_dtype, (x_mm, w_ih_mm), b_ih)

    @staticmethod
    def backward(ctx: Any, d_out):  # type: ignore[override]
        (x_mm, w_ih_mm), flat_gi, d_h0, d_w_hh, d_b_ih, d_b_hh = _loop_backward(ctx, d_out)
        seq, batch, _ = x_mm.shape
        d_x = mm(flat_gi, w_ih_mm).view(seq, batch, -1).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        d_w_ih = mm_tn(flat_gi, x_mm.reshape(seq * batch, -1)).to(ctx.param_dtype)
        return d_x, d_h0, d_w_ih, d_w_hh, d_b_ih, d_b_hh, None


class GRUTableLayer(torch.autograd.Function):
    """The first layer read straight from the bytes: x (T, B) int64, h0 (B, H), the embedding
    (256, I) -> out (T, B, H), float32; what GRULayer computes from embedding[x].

    Each position's input projection W_i e depends only on its byte, so it is a row of one
    (256, 3H) table, E W_i^T (the loop adds b_i): one small matmul instead of one over all T*B
    positions, and backward sums each position's gradient into its byte's row (index_add) before
    two small matmuls give the embedding's and W_i's gradients. For T*B of 1,600 bytes at width
    256 that is a fifth of a training step's arithmetic left out. Only without dropout on the
    embeddings, which would make every position's input its own.
    """

    @staticmethod
    def forward(ctx: Any, x, h0, embed, w_ih, w_hh, b_ih, b_hh, mm_dtype):  # type: ignore[override]
        with torch.autocast("cpu", enabled=False):
            seq, batch = x.shape
            e_mm, w_ih_mm = embed.to(mm_dtype), w_ih.to(mm_dtype)
            table = torch.mm(e_mm, w_ih_mm.t())  # (256, 3H); b_i is added in the loop, as GRULayer's
            gi = table.index_select(0, x.reshape(-1)).view(seq, batch, -1)
            return _loop_forward(ctx, gi, h0, w_hh, b_hh, mm_dtype, (x, e_mm, w_ih_mm), b_ih)

    @staticmethod
    def backward(ctx: Any, d_out):  # type: ignore[override]
        (x, e_mm, w_ih_mm), flat_gi, d_h0, d_w_hh, d_b_ih, d_b_hh = _loop_backward(ctx, d_out)
        d_table = torch.zeros(e_mm.size(0), flat_gi.size(1), dtype=ctx.param_dtype, device=flat_gi.device)
        d_table = d_table.index_add_(0, x.reshape(-1), flat_gi.to(ctx.param_dtype)).to(e_mm.dtype)
        d_embed = (d_table @ w_ih_mm).to(ctx.param_dtype)
        d_w_ih = (d_table.t() @ e_mm).to(ctx.param_dtype)
        return None, d_h0, d_embed, d_w_ih, d_w_hh, d_b_ih, d_b_hh, None


def _loop_forward(ctx: Any, gi, h0, w_hh, b_hh, mm_dtype, keep: tuple, b_ih=None) -> torch.Tensor:
    """GRULayer's and GRUTableLayer's time loop from gi (T, B, 3H) = W_i x (+ b_i where b_ih is
    None) in the matmul dtype; saves `keep` (what the input projection's gradients need) and the
    loop's tensors for _loop_backward."""
    w_hh_mm = w_hh.to(mm_dtype)
    w_hh_t = w_hh_mm.t().contiguous()  # the loop's small matmuls read a contiguous (H, 3H) fastest
    h0 = h0.to(w_hh.dtype).contiguous()
    ops = _native(mm_dtype)
    b_ih = None if b_ih is None else b_ih.to(w_hh.dtype)
    out, out_mm, rz, n, ghn = (ops.gru_forward if ops else forward_loop)(gi, h0, w_hh_t, b_hh, b_ih)
    ctx.save_for_backward(*keep, h0, w_hh_mm, out, out_mm, rz, n, ghn)
    ctx.n_keep, ctx.param_dtype = len(keep), w_hh.dtype
    return out


def _loop_backward(ctx: Any, d_out) -> tuple:
    """-> (the tensors kept, dL/dgi flat (T*B, 3H) in the matmul dtype, and the gradients of h0,
    W_h, b_i, b_h in the weights' dtype)."""
    saved = ctx.saved_tensors
    keep, (h0, w_hh_mm, out, out_mm, rz, n, ghn) = saved[: ctx.n_keep], saved[ctx.n_keep :]
    seq, batch, hid = out.shape
    d_out = d_out.to(out.dtype).contiguous()
    ops = _native(w_hh_mm.dtype)
    d_gi, d_gh, d_h0, d_b_ih, d_b_hh = (ops.gru_backward if ops else backward_loop)(
        d_out, h0, out, rz, n, ghn, w_hh_mm)
    flat_gh = d_gh.view(seq * batch, 3 * hid)
    h_prev = out_mm[:-1].reshape(-1, hid)  # the state each step's recurrent matmul read
    d_w_hh = mm_tn(flat_gh[batch:], h_prev) + d_gh[0].t() @ h0.to(w_hh_mm.dtype)
    like = ctx.param_dtype
    return keep, d_gi.view(seq * batch, 3 * hid), d_h0.to(like), d_w_hh.to(like), d_b_ih.to(like), d_b_hh.to(like)


def _native(mm_dtype: torch.dtype) -> Optional[Any]:
    """The plan's kernels where they are on and take this dtype (float32, bfloat16), else None."""
    return native.ops() if mm_dtype in (torch.float32, torch.bfloat16) else None


def fused_gru(gru: nn.GRU, x: torch.Tensor, h0: torch.Tensor | None,
              embed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `gru` (batch_first, unidirectional, with biases) with GRULayer: what gru(x, h0) returns.

    x (B, T, I), h0 (L, B, H) or None -> out (B, T, H), h_n (L, B, H). Dropout between layers
    as nn.GRU applies it (training mode only). With `embed` (256, I), x is (B, T) bytes and the
    first layer reads embed[x] through GRUTableLayer: what gru(embed[x], h0) returns.
    """
    if h0 is None:
        h0 = (x if embed is None else embed).new_zeros(gru.num_layers, x.size(0), gru.hidden_size)
    mm_dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else gru.weight_hh_l0.dtype
    seq_in = x.t().contiguous() if embed is not None else x.transpose(0, 1).contiguous()  # time-major
    finals = []
    for k in range(gru.num_layers):
        if k > 0 and gru.dropout and gru.training:
            seq_in = dropout(seq_in, gru.dropout, training=True)
        if k == 0 and embed is not None:
            seq_in = GRUTableLayer.apply(seq_in, h0[k], embed, *layer_weights(gru, k), mm_dtype)
        else:
            seq_in = GRULayer.apply(seq_in, h0[k], *layer_weights(gru, k), mm_dtype)
        finals.append(seq_in[-1])
    return seq_in.transpose(0, 1), torch.stack(finals)


def can_fuse(gru: nn.Module, x: torch.Tensor) -> bool:
    """True where fused_gru is used: a float32 nn.GRU on CPU, in float32 or under bf16 autocast,
    run eagerly (export, tracing and torch.compile see nn.GRU itself). Without gradients
    (the trainer's evaluations, evaluate.py) only where the plan's kernels run: they are faster
    than nn.GRU's own C++ loop there, and PyTorch's operations step by step are slower than it."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return (
        (torch.is_grad_enabled() or native.ops() is not None)
        and isinstance(gru, nn.GRU)
        and x.device.type == "cpu"
        and gru.batch_first
        and gru.bias
        and not gru.bidirectional
        and gru.proj_size == 0
        and gru.weight_hh_l0.dtype == torch.float32
        and (not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == torch.bfloat16)
    )
