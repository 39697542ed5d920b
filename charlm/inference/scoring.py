"""Loss of a model over a whole text, with the hidden state carried across windows."""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from charlm.data.tokenizer import START_BYTE
from charlm.model.network import CharLM

EVAL_LANES_MAX = 16


def training_eval_lanes(n: int) -> int:
    """Lanes for the evaluations during training: each at least 1 KiB, at most 16 of them.

    Each lane starts from the start byte and a zero state, which costs a little context at each
    lane's start; evaluate.py reads its split as one stream (lanes=1), exactly. Sixteen lanes
    keep that cost small while giving each step's matmuls rows enough to keep the cores busy.
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
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[float, int]:
    """Mean NLL (nats/byte) of every byte of data and how many bytes were scored.

    The text is cut into `lanes` contiguous pieces read side by side (a batch), each starting
    from the start byte and a zero state, the state carried window to window. lanes=1 scores the
    text exactly as one stream; more lanes are faster and cost a little context at each lane
    start. Up to lanes-1 bytes at the very end are left out so that the lanes are equal.
    progress, if given, is told how many bytes each window scored.
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
        if progress:
            progress(y.numel())
    model.train(was_training)
    n = lanes * lane_len
    return total / n, n


def dynamic_loss(
    model: CharLM,
    data: np.ndarray,
    window: int,
    lr: float,
    device: torch.device | str = "cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[float, int]:
    """Mean NLL (nats/byte) of data under dynamic evaluation (Krause et al., 2018, plain SGD).

    The text is read as one stream, as evaluate_loss(lanes=1) reads it, in windows of `window`
    bytes. Each window is scored first, and only then is a copy of the model updated by one SGD
    step on that window's mean loss, so no byte is ever predicted by weights that have seen it.
    The hidden state is carried across windows. `model` itself is left as it was. progress, if
    given, is told how many bytes each window scored.
    """
    adapted = copy.deepcopy(model).to(device).eval()  # eval: no dropout; gradients still flow
    optimizer = torch.optim.SGD(adapted.parameters(), lr=lr)
    total, h = 0.0, None
    prev = torch.full((1, 1), START_BYTE, dtype=torch.long)
    for t in range(0, len(data), window):
        y = torch.from_numpy(np.asarray(data[t : t + window], dtype=np.int64)).unsqueeze(0)
        x = torch.cat([prev, y[:, :-1]], 1)
        prev = y[:, -1:]
        log_probs, h = adapted(x.to(device), h)
        loss = F.nll_loss(log_probs[0], y[0].to(device), reduction="sum")
        total += loss.item()  # scored before the update below
        optimizer.zero_grad(set_to_none=True)
        (loss / y.size(1)).backward()
        optimizer.step()
        h = h.detach()
        if progress:
            progress(y.size(1))
    return total / max(len(data), 1), len(data)
