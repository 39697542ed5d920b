"""Recurrent layers written out: the reset-before GRU cell, one step of either GRU cell with its
gates, and one step of an nn.LSTM layer with its gates.

Both use nn.GRU's parameter names and layout (weight_ih_l{k} (3U, in), weight_hh_l{k} (3U, U),
bias_ih_l{k}, bias_hh_l{k}; gate blocks r, z, n), so checkpoints of either cell look alike and
charlm.model.reference checks both. The equations are in charlm/model/reference.py.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from charlm.model.dropout import dropout


def layer_weights(gru: nn.Module, k: int) -> tuple[torch.Tensor, ...]:
    """(weight_ih, weight_hh, bias_ih, bias_hh) of layer k of an nn.GRU, a ResetBeforeGRU or an nn.LSTM."""
    return tuple(getattr(gru, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


class ResetBeforeGRU(nn.Module):
    """Stacked GRU with the reset gate applied before the recurrent matmul (Trax, d2l, Keras
    reset_after=False): n = tanh(W_in x + b_in + W_hn (r * h) + b_hn). batch_first, like nn.GRU."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, dropout
        for k in range(num_layers):
            size_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(3 * hidden_size, size_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(3 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(3 * hidden_size)))
        bound = 1 / math.sqrt(hidden_size)  # nn.GRU's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, in), h0 (L, B, U) or None -> outputs (B, T, U), h_n (L, B, U)."""
        batch, u = x.size(0), self.hidden_size
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, batch, u)
        finals = []
        for k in range(self.num_layers):
            if k > 0 and self.dropout and self.training:
                x = dropout(x, self.dropout, training=True)
            w_ih, w_hh, b_ih, b_hh = layer_weights(self, k)
            # Every bias adds outside the reset gate here, so all of them go into the input
            # projections, one matmul for all steps; each step is then 6 ops (the loop's cost is
            # per-op overhead, not arithmetic).
            x_proj = torch.addmm(b_ih + b_hh, x.reshape(-1, x.size(-1)), w_ih.t()).view(batch, -1, 3 * u)
            w_rz, w_n = w_hh[: 2 * u].t(), w_hh[2 * u :].t()
            h, outs = h0[k], []
            for t in range(x.size(1)):
                xp = x_proj[:, t]
                r, z = torch.sigmoid(torch.addmm(xp[:, : 2 * u], h, w_rz)).chunk(2, dim=1)
                n = torch.tanh(torch.addmm(xp[:, 2 * u :], r * h, w_n))
                # z * h + (1 - z) * n; under autocast n and z are bf16 while the state stays float32
                h = torch.lerp(n.to(h.dtype), h, z.to(h.dtype))
                outs.append(h)
            x = torch.stack(outs, dim=1)
            finals.append(h)
        return x, torch.stack(finals)


def step_with_gates(
    x: torch.Tensor, h: torch.Tensor, weights: tuple[torch.Tensor, ...], cell: str
) -> dict[str, torch.Tensor]:
    """One step of one layer: x (B, in), h (B, U) -> {"h", "r", "z", "n"}, each (B, U)."""
    w_ih, w_hh, b_ih, b_hh = weights
    u = h.size(-1)
    gi = x @ w_ih.t() + b_ih
    if cell == "reset_after":
        gh = h @ w_hh.t() + b_hh
        r = torch.sigmoid(gi[:, :u] + gh[:, :u])
        z = torch.sigmoid(gi[:, u : 2 * u] + gh[:, u : 2 * u])
        n = torch.tanh(gi[:, 2 * u :] + r * gh[:, 2 * u :])
    else:
        gh = h @ w_hh[: 2 * u].t() + b_hh[: 2 * u]
        r = torch.sigmoid(gi[:, :u] + gh[:, :u])
        z = torch.sigmoid(gi[:, u : 2 * u] + gh[:, u:])
        n = torch.tanh(gi[:, 2 * u :] + (r * h) @ w_hh[2 * u :].t() + b_hh[2 * u :])
    return {"h": z * h + (1 - z) * n, "r": r, "z": z, "n": n}


def lstm_step_with_gates(
    x: torch.Tensor, state: torch.Tensor, weights: tuple[torch.Tensor, ...]
) -> dict[str, torch.Tensor]:
    """One step of one nn.LSTM layer (gate blocks i, f, g, o): x (B, in), state [h, c] (B, 2U)
    -> {"state" (B, 2U), "h", "c", "i", "f", "g", "o"}, each but state (B, U)."""
    w_ih, w_hh, b_ih, b_hh = weights
    u = w_hh.size(1)
    h, c = state[:, :u], state[:, u:]
    gates = x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
    i, f, o = (torch.sigmoid(gates[:, k * u : (k + 1) * u]) for k in (0, 1, 3))
    g = torch.tanh(gates[:, 2 * u : 3 * u])
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return {"state": torch.cat([h_new, c_new], dim=-1), "h": h_new, "c": c_new, "i": i, "f": f, "g": g, "o": o}
