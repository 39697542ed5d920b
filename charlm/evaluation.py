"""Loss of a model over a whole text, with the hidden state carried across windows."""
from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .model import CharLM
from .tokenizer import START_BYTE


EVAL_LANES_MAX = 64
EVALUATE_SEQ_LEN = 512  # bytes per window for evaluate.py (one stream: the window only sets the batch of work)


def training_eval_lanes(n: int) -> int:
    """Lanes for the evaluations during training: each at least 1 KiB, at most 64 of them.

    Each lane starts from a zero state, which costs a little context at 64 places; evaluate.py
    reads its split as one stream (lanes=1), exactly.
    """
    return max(1, min(EVAL_LANES_MAX, n // 1024))


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


def run_evaluation(cfg, data_given: bool = True) -> dict[str, float]:
    """Body of `python evaluate.py`: score a split (or a whole file) and print the figures.

    Without data= on the command line (data_given False), the checkpoint's own corpus is scored.
    """
    from .checkpoint import load_checkpoint, locate_checkpoint, model_from_state
    from .config import DataConfig
    from .data import corpus_path, load_bytes, split
    from .device import resolve_device
    from .errors import CharlmError

    path = locate_checkpoint(cfg.checkpoint)
    device = resolve_device(cfg.device)
    state = load_checkpoint(path)
    model = model_from_state(state).to(device)
    data_cfg = cfg.data if data_given else DataConfig(**state["config"]["data"])
    text_path = corpus_path(data_cfg)
    data = load_bytes(text_path)
    which, note = cfg.split, ""
    if which is None and data_given and data_cfg.name == "text":
        which = "all"  # a file of one's own: all of it
    elif which is None:
        parts = split(data, data_cfg.train_frac, data_cfg.val_frac)
        which = "test" if len(parts["test"]) else "val"
        if which == "val":
            note = f"{data_cfg.name} has no test split (data.train_frac + data.val_frac = 1): scoring val"
    if which != "all":
        data = split(data, data_cfg.train_frac, data_cfg.val_frac)[which]
    if len(data) == 0:
        raise CharlmError(
            f"split={which} of {text_path} is empty at data.train_frac={data_cfg.train_frac},"
            f" data.val_frac={data_cfg.val_frac}; choose another split (train, val, test or all)"
        )
    if note:
        print(note, file=sys.stderr)
    t0 = time.perf_counter()
    loss, n = evaluate_loss(model, data, seq_len=EVALUATE_SEQ_LEN, lanes=1, device=device)
    result = {
        "checkpoint": str(path),
        "data": str(text_path),
        "split": which,
        "bytes": n,
        **metrics(loss),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if cfg.format == "json":
        print(json.dumps(result, allow_nan=False))
    else:
        print(
            f"{text_path} [{which}] scored by {path}\n"
            f"bytes:       {n:,}\n"
            f"loss:        {loss:.4f} nats/byte\n"
            f"perplexity:  {result['perplexity']:.3f}\n"
            f"bits/byte:   {result['bpb']:.4f}"
        )
    return result
