"""The model as one web page: `python -m charlm.export format=html` writes a self-contained HTML
file (charlm/interop/model_page.html) holding the weights, as float16, and the model's step in
plain JavaScript for both GRU cells. No library, no server, no network: open it from disk.

The weights travel as one base64 blob of float16 values, tensor after tensor in the order of
`tensor_names`; the page turns them back into float32 arrays and steps the model byte by byte exactly
as charlm.model.stepping.Stepper does (GRU gate blocks r, z, n, h' = z*h + (1-z)*n; LSTM blocks
i, f, g, o, c' = f*c + i*g, h' = o*tanh(c')).
"""
from __future__ import annotations

import base64
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm import pages
from charlm.files import write_file


def tensor_names(n_layers: int, cell: str) -> list[str]:
    """The state_dict keys the page reads, in the order they are packed."""
    rnn = "lstm" if cell == "lstm" else "gru"
    layers = [f"{rnn}.{w}_l{k}" for k in range(n_layers) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return ["embed.weight", *layers, "head.weight", "head.bias"]


def half_weights(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """The model's weights as the page holds them: float16 (what it computes with, in float32)."""
    names = tensor_names(state["model_config"]["n_layers"], state["model_config"]["cell"])
    return {name: state["model"][name].detach().to(torch.float16).cpu().numpy() for name in names}


def write_page(state: dict[str, Any], out: str | Path, title: str) -> Path:
    """Write the page for a checkpoint's state; the file's path."""
    mc = state["model_config"]
    weights = half_weights(state)
    blob = base64.b64encode(b"".join(a.tobytes() for a in weights.values())).decode("ascii")
    about = {"title": title, "d_model": mc["d_model"], "n_layers": mc["n_layers"], "cell": mc["cell"],
             "tensors": [[name, list(a.shape)] for name, a in weights.items()]}
    template = (resources.files("charlm.interop") / "model_page.html").read_text(encoding="utf-8")
    page = pages.fill(template, title, ABOUT=pages.embed(about), WEIGHTS=blob)
    out = Path(out)
    write_file(out, page.encode("utf-8"), "out")
    return out
