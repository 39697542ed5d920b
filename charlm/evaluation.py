"""Loss of a model over a whole text, with the hidden state carried across windows."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .model import CharLM
from .tokenizer import START_BYTE


def metrics(loss: float) -> dict[str, float]:
    """loss (nats/byte) -> loss, perplexity = exp(loss), bits per byte = loss / ln 2."""
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": loss / math.log(2)}


@torch.no_grad()
def evaluate_loss(
    model: CharLM,
    data: np.ndarray,
    seq_len: int = 256,
    lanes: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """Mean NLL (nats/byte) of every byte of data and how many bytes were scored.

    The text is cut into `lanes` contiguous pieces read side by side (a batch), each starting
    from the start byte and a zero state, the state carried window to window. lanes=1 scores the
    text exactly as one stream; more lanes are faster and cost a little context at each lane
    start. Up to lanes-1 bytes at the very end are left out so that the lanes are equal.
    """
    lanes = max(1, min(lanes, len(data)))
    lane_len = len(data) // lanes
    if lane_len == 0:
        return float("nan"), 0
    was_training = model.training
    model.eval()
    text = data[: lanes * lane_len].reshape(lanes, lane_len)  # a view: a memory-mapped text stays on disk
    total, h = 0.0, None
    prev = torch.full((lanes, 1), START_BYTE, dtype=torch.long)  # the byte before each window
    for t in range(0, lane_len, seq_len):
        y = torch.from_numpy(text[:, t : t + seq_len].astype(np.int64))  # a copy: the map is read-only
        x = torch.cat([prev, y[:, :-1]], 1)
        prev = y[:, -1:]
        log_probs, h = model(x.to(device), h)
        total += F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), y.to(device).reshape(-1), reduction="sum").item()
    model.train(was_training)
    n = lanes * lane_len
    return total / n, n


def run_evaluation(cfg) -> dict[str, float]:
    """Body of `python evaluate.py`: score a split (or a whole file) and print the figures."""
    from .checkpoint import load_checkpoint, locate_checkpoint, model_from_state
    from .data import corpus_path, load_bytes, split
    from .train import resolve_device

    path = locate_checkpoint(cfg.checkpoint)
    device = resolve_device(cfg.device)
    model = model_from_state(load_checkpoint(path)).to(device)
    text_path = corpus_path(cfg.data)
    data = load_bytes(text_path)
    which = cfg.split or ("all" if cfg.data.name == "text" else "test")
    if which != "all":
        data = split(data, cfg.data.train_frac, cfg.data.val_frac)[which]
    t0 = time.perf_counter()
    loss, n = evaluate_loss(model, data, seq_len=512, lanes=1, device=device)
    result = {
        "checkpoint": str(path),
        "data": str(text_path),
        "split": which,
        "bytes": n,
        **metrics(loss),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if cfg.format == "json":
        print(json.dumps(result))
    else:
        print(
            f"{text_path} [{which}] scored by {path}\n"
            f"bytes:       {n:,}\n"
            f"loss:        {loss:.4f} nats/byte\n"
            f"perplexity:  {result['perplexity']:.3f}\n"
            f"bits/byte:   {result['bpb']:.4f}"
        )
    return result
