"""Keras and Trax GRU language-model weights as charlm checkpoints, and charlm's as Keras's, exactly.

The Keras model is Embedding(256, d) -> GRU(d, return_sequences=True) x n -> Dense(256), given as a
`.weights.h5` file or an `.npz` of `model.get_weights()`. Keras keeps gates in the order z, r, h
in `kernel` (in, 3U) and `recurrent_kernel` (U, 3U); with reset_after=True its `bias` is (2, 3U)
= [input; recurrent] and the maths is PyTorch's (-> model.cell=reset_after); with
reset_after=False the bias is (3U,) and the reset gate acts before the recurrent matmul
(-> model.cell=reset_before). Trax's GRUCell is reset-before too: w1 (in+U, 2U) [update; reset],
b1 (2U,), w2 (in+U, U), b2 (U,). The result is an ordinary charlm checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm.checkpoint import model_settings, model_state
from charlm.config import ModelConfig
from charlm.errors import CharlmError
from charlm.model.network import CharLM

NOT_EQUIVALENT = (
    "reset-before and reset-after GRUs compute different functions (the reset gate multiplies h"
    " before the recurrent matmul in one, the matmul's result in the other); no weight mapping"
    " makes them equal, so charlm will not convert between them"
)


def _zrh_to_rzn(a: np.ndarray, u: int) -> np.ndarray:
    """Reorder gate blocks along the last axis from Keras's z, r, h to PyTorch's r, z, n."""
    z, r, h = a[..., :u], a[..., u : 2 * u], a[..., 2 * u :]
    return np.concatenate([r, z, h], axis=-1)


def _rzn_to_zrh(a: np.ndarray, u: int) -> np.ndarray:
    r, z, n = a[..., :u], a[..., u : 2 * u], a[..., 2 * u :]
    return np.concatenate([z, r, n], axis=-1)


def _flip(state: dict[str, torch.Tensor], n_layers: int, u: int) -> None:
    """Negate the update gate's weights and biases in place (h' = z*h + (1-z)*n <-> (1-z)*h + z*n)."""
    for k in range(n_layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            state[f"gru.{name}_l{k}"][u : 2 * u] *= -1


def _checkpoint(state: dict[str, np.ndarray], d: int, n_layers: int, cell: str, flip: bool) -> dict[str, Any]:
    """A loadable charlm model from numpy arrays named like charlm's state_dict."""
    model = CharLM(ModelConfig(d_model=d, n_layers=n_layers, dropout=0.0, cell=cell))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    if flip:
        _flip(tensors, n_layers, d)
    model.load_state_dict(tensors)  # strict: every weight present with the right shape
    return {**model_state(model), "step": 0, "best_val_loss": float("nan"), "source": "converted"}


def from_keras(weights: list[np.ndarray], reset_after: bool, flip: bool = False) -> dict[str, Any]:
    """charlm checkpoint state from Keras get_weights() order: embedding, (kernel, recurrent, bias) x n, dense."""
    if len(weights) < 6 or (len(weights) - 3) % 3:
        raise CharlmError(
            f"expected embedding, 3 arrays per GRU layer and dense kernel+bias; got {len(weights)} arrays"
        )
    emb, dense_k, dense_b = weights[0], weights[-2], weights[-1]
    if emb.shape[0] != 256 or dense_k.shape[-1] != 256:
        raise CharlmError(f"not a byte model: embedding {emb.shape}, dense {dense_k.shape}; both need 256 symbols")
    d, n_layers = emb.shape[1], (len(weights) - 3) // 3
    state = {"embed.weight": emb, "head.weight": dense_k.T, "head.bias": dense_b}
    for k in range(n_layers):
        kernel, recurrent, bias = weights[1 + 3 * k : 4 + 3 * k]
        u = recurrent.shape[0]
        if u != d:
            raise CharlmError(f"GRU layer {k} has {u} units; charlm needs every layer as wide as the embedding ({d})")
        if reset_after and bias.shape != (2, 3 * u):
            raise CharlmError(
                f"GRU layer {k} bias is {bias.shape}: that is a reset_after=False model; use reset_after=false"
            )
        if not reset_after and bias.shape != (3 * u,):
            raise CharlmError(
                f"GRU layer {k} bias is {bias.shape}: that is a reset_after=True model; use reset_after=true"
            )
        state[f"gru.weight_ih_l{k}"] = _zrh_to_rzn(kernel, u).T
        state[f"gru.weight_hh_l{k}"] = _zrh_to_rzn(recurrent, u).T
        b_ih, b_hh = (bias[0], bias[1]) if reset_after else (bias, np.zeros_like(bias))
        state[f"gru.bias_ih_l{k}"] = _zrh_to_rzn(b_ih, u)
        state[f"gru.bias_hh_l{k}"] = _zrh_to_rzn(b_hh, u)
    return _checkpoint(state, d, n_layers, "reset_after" if reset_after else "reset_before", flip)


def to_keras(state: dict[str, Any]) -> list[np.ndarray]:
    """Keras get_weights() order from a charlm checkpoint (reset_after as the checkpoint's cell)."""
    cfg = ModelConfig(**model_settings(state))
    w = {k: v.double().numpy() for k, v in state["model"].items()}
    u = cfg.d_model
    out = [w["embed.weight"]]
    for k in range(cfg.n_layers):
        b_ih, b_hh = _rzn_to_zrh(w[f"gru.bias_ih_l{k}"], u), _rzn_to_zrh(w[f"gru.bias_hh_l{k}"], u)
        if cfg.cell == "reset_after":
            bias = np.stack([b_ih, b_hh])
        else:  # Keras reset_after=False has one bias; every b_hh block adds outside the reset gate
            bias = b_ih + b_hh
        out += [_rzn_to_zrh(w[f"gru.weight_ih_l{k}"].T, u), _rzn_to_zrh(w[f"gru.weight_hh_l{k}"].T, u), bias]
    out += [w["head.weight"].T, w["head.bias"]]
    return [a.astype(np.float32) for a in out]


def from_trax(arrays: dict[str, np.ndarray], flip: bool = False) -> dict[str, Any]:
    """charlm checkpoint state from Trax-style arrays: embedding, gru{k}/w1, b1, w2, b2, dense/w, dense/b."""
    try:
        emb, dense_w, dense_b = arrays["embedding"], arrays["dense/w"], arrays["dense/b"]
    except KeyError as e:
        raise CharlmError(
            f"missing array {e} (expected embedding, gru0/w1, gru0/b1, gru0/w2, gru0/b2, ..., dense/w, dense/b)"
        ) from None
    d = emb.shape[1]
    n_layers = len({k.split("/")[0] for k in arrays if k.startswith("gru")})
    state = {"embed.weight": emb, "head.weight": dense_w.T, "head.bias": dense_b}
    for k in range(n_layers):
        w1, b1, w2, b2 = (arrays[f"gru{k}/{n}"] for n in ("w1", "b1", "w2", "b2"))
        u = w2.shape[1]
        n_in = w1.shape[0] - u
        upd, rst = w1[:, :u], w1[:, u:]  # Trax: update gate first, then reset
        state[f"gru.weight_ih_l{k}"] = np.concatenate([rst[:n_in], upd[:n_in], w2[:n_in]], 1).T
        state[f"gru.weight_hh_l{k}"] = np.concatenate([rst[n_in:], upd[n_in:], w2[n_in:]], 1).T
        state[f"gru.bias_ih_l{k}"] = np.concatenate([b1[u:], b1[:u], b2])
        state[f"gru.bias_hh_l{k}"] = np.zeros(3 * u)
    return _checkpoint(state, d, n_layers, "reset_before", flip)


def read_keras(path: Path) -> list[np.ndarray]:
    """Arrays in get_weights() order from an .npz (arr_0, arr_1, ...) or a Keras 3 .weights.h5."""
    if path.suffix == ".npz":
        with np.load(path) as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]
    try:
        import h5py
    except ImportError:
        raise CharlmError(
            "reading .weights.h5 needs h5py (pip install h5py), or save an .npz of model.get_weights()"
        ) from None
    layers: list[tuple[int, int, list[np.ndarray]]] = []
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and name.endswith("vars") and len(obj):
                layer = name.split("/")[1] if name.startswith("layers/") else name.split("/")[0]
                kind = 0 if layer.startswith("embedding") else 2 if layer.startswith("dense") else 1
                index = int(layer.rsplit("_", 1)[1]) if layer.rsplit("_", 1)[-1].isdigit() else 0
                layers.append((kind, index, [obj[str(i)][()] for i in range(len(obj))]))
        f.visititems(visit)
    return [a for _, _, arrays in sorted(layers, key=lambda t: (t[0], t[1])) for a in arrays]
