"""A text read through the model's eyes: per byte, the surprisal, the top 5 predictions, every
layer's gates and hidden units; and the units that follow simple features of the text.

`read_text` computes the numbers (evaluate.py html=FILE writes them as a page with
charlm/inference/reading_page.html). The model reads the text as evaluate.py does: one stream from the
start byte and a zero state. For byte t:

- surprisal and top 5 are the prediction of byte t, made from everything before it;
- gates and units are the step that reads byte t (its input is byte t), computed by
  charlm.model.stepping.Stepper with its gates, the same maths as the model's own GRU.
"""
from __future__ import annotations

import base64
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm import pages
from charlm.data.tokenizer import START_BYTE
from charlm.files import write_file
from charlm.model.network import CharLM
from charlm.model.stepping import Stepper

FEATURES = {
    "inside quotes": "between an opening and a closing quotation mark (\", “ ”, or ' not between letters)",
    "position in line": "bytes since the last line break",
    "inside parentheses": "between ( and )",
    "start of a word": "a letter after a space, a line break or punctuation",
}


@torch.no_grad()
def read_text(model: CharLM, data: bytes, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Per-byte numbers for data (see the module docstring), as numpy arrays:

    surprisal (T,) bits, top_bytes (T, 5), top_probs (T, 5), gates (the gates' names: z and r for
    a GRU, i, f and o for the LSTM) with <gate>_mean (L, T) for each, units (L, T, D) each layer's
    output h after reading each byte.
    """
    model.eval()
    step = Stepper(model)
    gates = ("i", "f", "o") if model.config.cell == "lstm" else ("z", "r")
    inputs = torch.tensor([START_BYTE, *data], dtype=torch.long, device=device)
    h = model.init_hidden(1, device)
    predictions, means, units = [], {g: [] for g in gates}, []
    for t in range(len(inputs)):
        log_probs, h, seen = step(inputs[t : t + 1], h, gates=True)
        predictions.append(log_probs[0])  # of byte t (the next one)
        if t > 0:  # the step that read byte t-1
            for g in gates:
                means[g].append(torch.stack([layer[g].mean() for layer in seen["layers"]]))
            units.append(torch.stack([layer["h"][0] for layer in seen["layers"]]))
    log_probs = torch.stack(predictions[:-1])  # (T, 256): the prediction of byte t
    target = torch.tensor(list(data), dtype=torch.long, device=device)
    top = torch.topk(log_probs, 5, dim=-1)
    return {
        "surprisal": (-log_probs.gather(1, target[:, None])[:, 0] / math.log(2)).cpu().numpy(),
        "top_bytes": top.indices.cpu().numpy(),
        "top_probs": top.values.exp().cpu().numpy(),
        "gates": list(gates),
        **{f"{g}_mean": torch.stack(means[g], 1).cpu().numpy() for g in gates},
        "units": torch.stack(units, 1).cpu().numpy(),
    }


def text_features(data: bytes) -> dict[str, np.ndarray]:
    """FEATURES as one float per byte."""
    text = bytes(data)
    quotes, parens, column, word_start = [], [], [], []
    inside_q = inside_p = False
    col = 0
    prev = ord(" ")
    for i, b in enumerate(text):
        after = text[i + 1] if i + 1 < len(text) else ord(" ")
        if b == ord('"'):
            inside_q = not inside_q
        elif b == ord("'") and not _word(prev) and _word(after):
            inside_q = True  # 'The machine...
        elif b == ord("'") and not _word(after) and prev not in b" \n\t":
            inside_q = False  # ...standing.' (an apostrophe sits between letters: it's)
        elif text[i : i + 3] == "“".encode():
            inside_q = True
        elif text[i : i + 3] == "”".encode():
            inside_q = False
        if b == ord("("):
            inside_p = True
        elif b == ord(")"):
            inside_p = False
        quotes.append(inside_q)
        parens.append(inside_p)
        column.append(col)
        col = 0 if b == ord("\n") else col + 1
        word_start.append(chr(b).isalpha() and b < 128 and not (prev < 128 and chr(prev).isalnum()))
        prev = b
    return {
        "inside quotes": np.array(quotes, dtype=np.float64),
        "position in line": np.array(column, dtype=np.float64),
        "inside parentheses": np.array(parens, dtype=np.float64),
        "start of a word": np.array(word_start, dtype=np.float64),
    }


def _word(b: int) -> bool:
    return b < 128 and chr(b).isalnum()


def correlated_units(units: np.ndarray, features: dict[str, np.ndarray], top: int = 3) -> list[dict[str, Any]]:
    """For each feature that varies over the text, the `top` units whose activation (L, T, D)
    correlates most with it (Pearson's r, either sign)."""
    n_layers, length, width = units.shape
    flat = units.transpose(1, 0, 2).reshape(length, n_layers * width).astype(np.float64)
    flat = flat - flat.mean(0)
    unit_norm = np.sqrt((flat**2).sum(0))
    rows = []
    for name, values in features.items():
        v = values - values.mean()
        if not np.any(v):
            continue  # the feature is constant over this text: nothing to correlate
        r = (v @ flat) / (np.sqrt((v**2).sum()) * np.where(unit_norm > 0, unit_norm, np.inf))
        best = np.argsort(-np.abs(r))[:top]
        rows.append({"feature": name, "meaning": FEATURES[name],
                     "units": [{"layer": int(i // width) + 1, "unit": int(i % width), "r": round(float(r[i]), 3)}
                               for i in best]})
    return rows


def write_page(path: str | Path, data: bytes, numbers: dict[str, Any], about: dict[str, Any]) -> Path:
    """The self-contained page (charlm/inference/reading_page.html, no network) for read_text's numbers.

    about: title, source, checkpoint, cell, total (bytes in the whole scored text) and bpb_all
    (evaluate.py's figure for all of them).
    """
    units = numbers["units"]
    n_layers, _, width = units.shape
    payload = {
        **about,
        "bytes": list(data),
        "layers": n_layers,
        "width": width,
        "surprisal": [round(float(v), 5) for v in numbers["surprisal"]],
        "top_bytes": numbers["top_bytes"].tolist(),
        "top_probs": np.round(numbers["top_probs"], 4).tolist(),
        "gates": numbers["gates"],
        **{f"{g}_mean": np.round(numbers[f"{g}_mean"], 4).tolist() for g in numbers["gates"]},
        # each unit's activation (tanh-bounded, in [-1, 1]) in 1/127 steps: a page of a few MB
        "units": base64.b64encode(np.clip(np.round(units * 127), -127, 127).astype(np.int8).tobytes()).decode(),
        "correlated": correlated_units(units, text_features(data)),
    }
    template = (resources.files("charlm.inference") / "reading_page.html").read_text(encoding="utf-8")
    page = pages.fill(template, about["title"], DATA=pages.embed(payload))
    path = Path(path)
    write_file(path, page.encode("utf-8"), "html")
    return path
