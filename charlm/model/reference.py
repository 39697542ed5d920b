"""A GRU layer in NumPy, float64, written straight from the equations (for checking, not speed).

Weights use PyTorch's layout for every variant: w_ih (3U, in), w_hh (3U, U), b_ih (3U,),
b_hh (3U,), gate blocks in the order r, z, n.

    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    reset_after  (PyTorch, cuDNN, Keras default):  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    reset_before (Trax, d2l, Keras reset_after=False): n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
    update="old" (Cho et al., PyTorch, Keras, Trax):  h' = z * h + (1 - z) * n
    update="new" (Wikipedia, char-rnn):              h' = (1 - z) * h + z * n
"""
from __future__ import annotations

import numpy as np


def sigmoid(a: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-a))."""
    return 1.0 / (1.0 + np.exp(-a))


def gru_step(
    x: np.ndarray, h: np.ndarray, w: dict[str, np.ndarray], cell: str = "reset_after", update: str = "old"
) -> dict[str, np.ndarray]:
    """One step: x (B, in), h (B, U) -> {"h": h', "r": r, "z": z, "n": n}, all (B, U)."""
    u = h.shape[-1]
    w_ir, w_iz, w_in = w["w_ih"][:u], w["w_ih"][u : 2 * u], w["w_ih"][2 * u :]
    w_hr, w_hz, w_hn = w["w_hh"][:u], w["w_hh"][u : 2 * u], w["w_hh"][2 * u :]
    b_ir, b_iz, b_in = w["b_ih"][:u], w["b_ih"][u : 2 * u], w["b_ih"][2 * u :]
    b_hr, b_hz, b_hn = w["b_hh"][:u], w["b_hh"][u : 2 * u], w["b_hh"][2 * u :]
    r = sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    if cell == "reset_after":
        n = np.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    elif cell == "reset_before":
        n = np.tanh(x @ w_in.T + b_in + (r * h) @ w_hn.T + b_hn)
    else:
        raise ValueError(f"cell must be reset_after or reset_before, got {cell!r}")
    if update == "old":
        h_new = z * h + (1 - z) * n
    elif update == "new":
        h_new = (1 - z) * h + z * n
    else:
        raise ValueError(f"update must be old or new, got {update!r}")
    return {"h": h_new, "r": r, "z": z, "n": n}


def gru_layer(
    x: np.ndarray, h0: np.ndarray, w: dict[str, np.ndarray], cell: str = "reset_after", update: str = "old"
) -> tuple[np.ndarray, np.ndarray]:
    """x (B, T, in), h0 (B, U) -> outputs (B, T, U), last state (B, U)."""
    h, outs = h0, []
    for t in range(x.shape[1]):
        h = gru_step(x[:, t], h, w, cell, update)["h"]
        outs.append(h)
    return np.stack(outs, axis=1), h


def flip_update_gate(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same function under the other update-gate orientation: negate the z weights and biases.

    sigmoid(-a) = 1 - sigmoid(a), so z becomes 1 - z and the two forms of h' swap.
    """
    u = w["w_hh"].shape[1]
    out = {k: v.copy() for k, v in w.items()}
    for k in out:
        out[k][u : 2 * u] *= -1
    return out


def language_model(
    tokens: np.ndarray, params: dict[str, np.ndarray], n_layers: int, cell: str = "reset_after"
) -> np.ndarray:
    """The whole model: tokens (B, T) -> log-probabilities (B, T, 256), from a zero state.

    params uses charlm's state_dict names (embed.weight, gru.weight_ih_l0, ..., head.weight).
    """
    x = params["embed.weight"][tokens]
    for k in range(n_layers):
        w = {name: params[f"gru.{name.replace('w_', 'weight_').replace('b_', 'bias_')}_l{k}"]
             for name in ("w_ih", "w_hh", "b_ih", "b_hh")}
        x, _ = gru_layer(x, np.zeros((x.shape[0], w["w_hh"].shape[1])), w, cell)
    logits = x @ params["head.weight"].T + params["head.bias"]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
