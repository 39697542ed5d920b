"""Weights from Keras and Trax, and back to Keras: exact, and checked against Keras itself."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from charlm.checkpoint import load_model, model_from_state
from charlm.interop.convert import from_keras, from_trax, to_keras
from charlm.model.reference import gru_step
from helpers import ROOT, random_keras_weights, run_cli


def log_probs(state, tokens):
    with torch.no_grad():
        return model_from_state(state).eval()(torch.from_numpy(tokens))[0].numpy()


def keras_gru_numpy(weights, tokens, reset_after):
    """Keras's own equations (gate order z, r, h), written out independently of charlm."""
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    x = weights[0][tokens].astype(np.float64)
    n_layers = (len(weights) - 3) // 3
    for k in range(n_layers):
        kernel, rec, bias = (a.astype(np.float64) for a in weights[1 + 3 * k : 4 + 3 * k])
        u = rec.shape[0]
        b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, np.zeros_like(bias))
        h, outs = np.zeros((x.shape[0], u)), []
        for t in range(x.shape[1]):
            xi = x[:, t] @ kernel + b_in
            if reset_after:
                hr = h @ rec + b_rec
                z, r = sig(xi[:, :u] + hr[:, :u]), sig(xi[:, u:2*u] + hr[:, u:2*u])
                hh = np.tanh(xi[:, 2*u:] + r * hr[:, 2*u:])
            else:
                z, r = sig(xi[:, :u] + h @ rec[:, :u]), sig(xi[:, u:2*u] + h @ rec[:, u:2*u])
                hh = np.tanh(xi[:, 2*u:] + (r * h) @ rec[:, 2*u:])
            h = z * h + (1 - z) * hh
            outs.append(h)
        x = np.stack(outs, 1)
    logits = x @ weights[-2] + weights[-1]
    top = logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top


TOKENS = np.random.default_rng(5).integers(0, 256, (2, 30))


@pytest.mark.parametrize("reset_after", [True, False])
def test_keras_import_matches_keras_equations_and_round_trips(reset_after):
    weights = random_keras_weights(8, 2, reset_after)
    state = from_keras(weights, reset_after)
    assert state["model_config"]["cell"] == ("reset_after" if reset_after else "reset_before")
    diff = np.abs(log_probs(state, TOKENS) - keras_gru_numpy(weights, TOKENS, reset_after)).max()
    assert diff < 1e-4
    back = to_keras(state)
    assert all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights, back))


def test_trax_import_matches_trax_equations():
    rng = np.random.default_rng(3)
    d = 6
    arrays = {"embedding": rng.normal(0, 0.5, (256, d)), "dense/w": rng.normal(0, 0.5, (d, 256)),
              "dense/b": rng.normal(0, 0.5, 256)}
    for k in range(2):
        arrays |= {f"gru{k}/w1": rng.normal(0, 0.5, (2 * d, 2 * d)), f"gru{k}/b1": rng.normal(0, 0.5, 2 * d),
                   f"gru{k}/w2": rng.normal(0, 0.5, (2 * d, d)), f"gru{k}/b2": rng.normal(0, 0.5, d)}
    state = from_trax(arrays)
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    x = arrays["embedding"][TOKENS]
    for k in range(2):  # Trax GRUCell as DESIGN.md writes it
        w1, b1, w2, b2 = (arrays[f"gru{k}/{n}"] for n in ("w1", "b1", "w2", "b2"))
        h, outs = np.zeros((2, d)), []
        for t in range(x.shape[1]):
            u, r = np.split(sig(np.concatenate([x[:, t], h], 1) @ w1 + b1), 2, axis=1)
            c = np.tanh(np.concatenate([x[:, t], r * h], 1) @ w2 + b2)
            h = u * h + (1 - u) * c
            outs.append(h)
        x = np.stack(outs, 1)
    logits = x @ arrays["dense/w"] + arrays["dense/b"]
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert np.abs(log_probs(state, TOKENS) - ref).max() < 1e-4


def test_flip_update_gate_imports_the_other_orientation():
    weights = random_keras_weights(5, 1, True, seed=9)
    flipped = from_keras(weights, True, flip=True)
    # the same weights read as h' = (1-z)*h + z*n, written out with the reference
    x = weights[0][TOKENS].astype(np.float64)
    u = 5
    w = {"w_ih": np.concatenate([weights[1][:, u:2*u], weights[1][:, :u], weights[1][:, 2*u:]], 1).T,
         "w_hh": np.concatenate([weights[2][:, u:2*u], weights[2][:, :u], weights[2][:, 2*u:]], 1).T}
    w["b_ih"] = np.concatenate([weights[3][0][u:2*u], weights[3][0][:u], weights[3][0][2*u:]])
    w["b_hh"] = np.concatenate([weights[3][1][u:2*u], weights[3][1][:u], weights[3][1][2*u:]])
    h, outs = np.zeros((2, u)), []
    for t in range(x.shape[1]):
        h = gru_step(x[:, t], h, w, "reset_after", update="new")["h"]
        outs.append(h)
    logits = np.stack(outs, 1) @ weights[4] + weights[5]
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert np.abs(log_probs(flipped, TOKENS) - ref).max() < 1e-4


def run_convert(*args, cwd):
    return run_cli("-m", "charlm.convert", *args, cwd=cwd, check=False)


def test_convert_commands_and_refusal(tmp_path):
    np.savez(tmp_path / "k.npz", *random_keras_weights(8, 1, False))
    proc = run_convert("format=keras", "weights=k.npz", "out=m.pt", "reset_after=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model.cell=reset_before" in proc.stdout
    assert load_model(tmp_path / "m.pt").config.cell == "reset_before"
    wrong = run_convert("format=keras", "weights=k.npz", "out=m2.pt", "reset_after=true", cwd=tmp_path)
    assert wrong.returncode == 1 and "reset_after=false" in wrong.stderr and not (tmp_path / "m2.pt").exists()
    unsaid = run_convert("format=keras", "weights=k.npz", "out=m2.pt", cwd=tmp_path)
    assert unsaid.returncode == 1 and "needs reset_after=true or reset_after=false" in unsaid.stderr
    old_style = run_convert("keras", "k.npz", "m2.pt", cwd=tmp_path)
    assert old_style.returncode == 1 and "not a key=value setting" in old_style.stderr
    assert not (tmp_path / "m2.pt").exists()
    back = run_cli("-m", "charlm.export", "checkpoint=m.pt", "format=keras", "out=out.npz", cwd=tmp_path)
    assert "reset_after=False" in back.stdout
    with np.load(tmp_path / "out.npz") as f:
        again = [f[name] for name in f.files]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(again, random_keras_weights(8, 1, False)))
    flipped = run_convert("format=keras", "weights=k.npz", "out=f.pt", "reset_after=false", "flip_update_gate=true",
                          cwd=tmp_path)
    assert "negated the z weights and biases" in flipped.stdout
    for tool in ("convert", "export", "bench", "doctor"):
        shown = run_cli("-m", f"charlm.{tool}", "--help", cwd=tmp_path).stdout
        assert shown.startswith(f"python -m charlm.{tool}:"), shown


@pytest.mark.slow
def test_against_keras_itself(tmp_path):
    """Build real Keras models (torch backend), convert their files, compare log-probs to 1e-5."""
    script = f"""
import os, sys, json, numpy as np
os.environ["KERAS_BACKEND"] = "torch"
try:
    import keras
except ImportError:
    print("NO_KERAS"); sys.exit(0)
sys.path.insert(0, {str(ROOT)!r})
from charlm.interop.convert import from_keras, read_keras
from charlm.checkpoint import model_from_state
import torch
tokens = np.random.default_rng(0).integers(0, 256, (2, 40))
worst = {{}}
for reset_after in (True, False):
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(256, 16)]
        + [keras.layers.GRU(16, return_sequences=True, reset_after=reset_after) for _ in range(2)]
        + [keras.layers.Dense(256)])
    m.set_weights([np.random.default_rng(2).normal(0, 0.4, w.shape).astype("float32") for w in m.get_weights()])
    logits = np.asarray(keras.ops.convert_to_numpy(m(tokens)), dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    ref = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
    for kind in ("h5", "npz"):
        path = {str(tmp_path)!r} + f"/m_{{reset_after}}.{{'weights.h5' if kind == 'h5' else 'npz'}}"
        if kind == "h5":
            m.save_weights(path)
        else:
            np.savez(path, *m.get_weights())
        state = from_keras(read_keras(__import__("pathlib").Path(path)), reset_after)
        with torch.no_grad():
            ours = model_from_state(state).eval()(torch.from_numpy(tokens))[0].double().numpy()
        worst[f"{{reset_after}}-{{kind}}"] = float(np.abs(ours - ref).max())
print(json.dumps(worst))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if "NO_KERAS" in proc.stdout:
        pytest.skip("keras is not installed")
    import json

    worst = json.loads(proc.stdout.strip().splitlines()[-1])
    print("largest |difference| of log-probs vs Keras:", worst)
    assert len(worst) == 4 and max(worst.values()) < 1e-5
