"""GRU and LSTM layers in NumPy, float64, written straight from the equations (for checking, not speed).

Weights use PyTorch's layout for every variant: w_ih (3U, in), w_hh (3U, U), b_ih (3U,),
b_hh (3U,), gate blocks in the order r, z, n.

    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    reset_after  (PyTorch, cuDNN, Keras default):  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    reset_before (Trax, d2l, Keras reset_after=False): n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
    update="old" (Cho et al., PyTorch, Keras, Trax):  h' = z * h + (1 - z) * n
    update="new" (Wikipedia, char-rnn):              h' = (1 - z) * h + z * n

The LSTM (nn.LSTM, cuDNN): w_ih (4U, in), w_hh (4U, U), b_ih, b_hh (4U,), gate blocks i, f, g, o.

    i  = sigmoid(W_ii x + b_ii + W_hi h + b_hi)      f = sigmoid(W_if x + b_if + W_hf h + b_hf)
    g  = tanh(W_ig x + b_ig + W_hg h + b_hg)         o = sigmoid(W_io x + b_io + W_ho h + b_ho)
    c' = f * c + i * g                               h' = o * tanh(c')
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


def lstm_step(x: np.ndarray, h: np.ndarray, c: np.ndarray, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One LSTM step: x (B, in), h and c (B, U) -> {"h": h', "c": c', "i", "f", "g", "o"}, all (B, U)."""
    u = h.shape[-1]
    a = x @ w["w_ih"].T + w["b_ih"] + h @ w["w_hh"].T + w["b_hh"]  # (B, 4U): i, f, g, o
    i, f, o = sigmoid(a[:, :u]), sigmoid(a[:, u : 2 * u]), sigmoid(a[:, 3 * u :])
    g = np.tanh(a[:, 2 * u : 3 * u])
    c_new = f * c + i * g
    return {"h": o * np.tanh(c_new), "c": c_new, "i": i, "f": f, "g": g, "o": o}


def lstm_layer(x: np.ndarray, h0: np.ndarray, c0: np.ndarray, w: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """x (B, T, in), h0 and c0 (B, U) -> outputs (B, T, U), last h (B, U), last c (B, U)."""
    h, c, outs = h0, c0, []
    for t in range(x.shape[1]):
        s = lstm_step(x[:, t], h, c, w)
        h, c = s["h"], s["c"]
        outs.append(h)
    return np.stack(outs, axis=1), h, c


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

    params uses charlm's state_dict names (embed.weight, gru.weight_ih_l0 or lstm.weight_ih_l0, ...,
    head.weight); cell is reset_after, reset_before or lstm.
    """
    x = params["embed.weight"][tokens]
    prefix = "lstm" if cell == "lstm" else "gru"
    for k in range(n_layers):
        w = {name: params[f"{prefix}.{name.replace('w_', 'weight_').replace('b_', 'bias_')}_l{k}"]
             for name in ("w_ih", "w_hh", "b_ih", "b_hh")}
        zeros = np.zeros((x.shape[0], w["w_hh"].shape[1]))
        x = lstm_layer(x, zeros, zeros, w)[0] if cell == "lstm" else gru_layer(x, zeros, w, cell)[0]
    logits = x @ params["head.weight"].T + params["head.bias"]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
