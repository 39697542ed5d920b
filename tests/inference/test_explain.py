"""Explain mode: its numbers against the NumPy reference, and what sample.py prints."""
import json

import numpy as np
import pytest

from charlm.data.tokenizer import START_BYTE
from charlm.inference.explain import explain_steps, format_step
from charlm.inference.sampling import sample_text
from charlm.model.reference import gru_layer, gru_step
from helpers import TINY, numpy_params, random_model, run_cli


@pytest.mark.parametrize("cell", ["reset_after", "reset_before"])
def test_explain_matches_reference_and_sampler(cell):
    model = random_model(cell, d=10, layers=2).float()
    prompt = b"traveller yo"
    steps = list(explain_steps(model, prompt, 4, temperature=0))
    greedy = sample_text(model, prompt.decode(), 4, temperature=0)[0]
    assert bytes(s["byte"] for s in steps) == greedy.encode()[len(prompt):]

    # Step 1 by the reference: read [0] + prompt[:-1] per layer, then one step on the last byte.
    p = {k: v.astype(np.float64) for k, v in numpy_params(model).items()}
    seq = np.array([[START_BYTE, *prompt]])
    x = p["embed.weight"][seq]
    for k, layer in enumerate(steps[0]["layers"]):
        names = ("w_ih", "w_hh", "b_ih", "b_hh")
        w = {n: p[f"gru.{n.replace('w_', 'weight_').replace('b_', 'bias_')}_l{k}"] for n in names}
        _, h = gru_layer(x[:, :-1], np.zeros((1, 10)), w, cell)
        g = gru_step(x[:, -1], h, w, cell)
        assert layer["z"]["mean"] == pytest.approx(g["z"].mean(), abs=1e-5)
        assert layer["z"]["max"] == pytest.approx(g["z"].max(), abs=1e-5)
        assert layer["r"]["min"] == pytest.approx(g["r"].min(), abs=1e-5)
        assert layer["r"]["first"] == pytest.approx(g["r"][0, :8], abs=1e-4)
        cand, old = np.abs((1 - g["z"]) * g["n"]).sum(), np.abs(g["z"] * h).sum()
        assert layer["candidate_share"] == pytest.approx(cand / (cand + old), abs=1e-5)
        outs, _ = gru_layer(x, np.zeros((1, 10)), w, cell)
        x = outs
    logits = x[0, -1] @ p["head.weight"].T + p["head.bias"]
    top = np.argsort(-logits)[:5]
    assert [t["byte"] for t in steps[0]["top"]] == top.tolist()
    assert steps[0]["top"][0]["logit"] == pytest.approx(logits[top[0]], abs=1e-4)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert steps[0]["top"][0]["p"] == pytest.approx(probs[top[0]], abs=1e-5)
    assert "the model predicts" in format_step(steps[0])


def test_sample_explain_text_and_json(tmp_path, text_file):
    run_cli("train.py", "data=text", f"data.path={text_file}", *TINY, "model.cell=reset_before",
            "train.max_steps=6", "train.eval_every=6", "out_dir=run", cwd=tmp_path)
    text = run_cli("sample.py", "checkpoint=run", "prompt=traveller yo", "length=3", "temperature=0",
                   "explain=true", cwd=tmp_path).stdout
    assert text.count("the model predicts") == 3 and "layer 1 update z: mean" in text
    assert "from the candidate" in text and text.strip().splitlines()[-1].startswith("text: traveller yo")
    js = run_cli("sample.py", "checkpoint=run", "prompt=traveller yo", "length=3", "temperature=0",
                 "explain=true", "explain_format=json", cwd=tmp_path).stdout
    steps = [json.loads(line) for line in js.strip().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and len(steps[0]["top"]) == 5
    assert steps[0]["context"] == "traveller yo" and len(steps[0]["layers"]) == 1


def test_explain_shows_the_lstms_gates_and_its_cell_state_share():
    model = random_model("lstm", d=10, layers=2).float()
    steps = list(explain_steps(model, b"the ", 2, temperature=0))
    explained = bytes(s["byte"] for s in steps).decode("utf-8", errors="replace")
    assert "the " + explained == sample_text(model, "the ", 2, temperature=0)[0]  # the sampler's choice
    layer = steps[0]["layers"][0]
    assert set(layer) == {"layer", "i", "f", "o", "candidate_share"} and 0 <= layer["candidate_share"] <= 1
    text = format_step(steps[0])
    assert "input  i: mean" in text and "forget f: mean" in text and "output o: mean" in text
