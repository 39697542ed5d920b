"""Position splits and batching of a text held as a read-only uint8 array (charlm.data.text).

The text is split by position into train | val | test; every batch comes from inside one split.
"""
from __future__ import annotations

import numpy as np
import torch

from charlm.data.tokenizer import START_BYTE
from charlm.errors import CharlmError


def split(data: np.ndarray, train_frac: float, val_frac: float) -> dict[str, np.ndarray]:
    """Split by position: data = train | val | test (views, no copies)."""
    n = len(data)
    a = int(n * train_frac)
    b = int(n * (train_frac + val_frac))
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


class StreamBatches:
    """The stream cut into batch_size contiguous lanes, read in consecutive seq_len windows.

        lanes (B, L+1), a start byte then L bytes of the stream each (read per window from the
        text, never copied whole):
          lane 0: 0 | s[0]      ... s[L-1]
          lane 1: 0 | s[L]      ... s[2L-1]
          ...
        window k: x = lanes[:, kT : kT+T]     y = lanes[:, kT+1 : kT+T+1]

    y is x shifted left by one, and window k+1 continues window k in every lane, so the hidden
    state is carried from one batch to the next (detached). An epoch is n_windows windows; the
    state starts from zero at the start of each epoch, where every lane begins with the start byte.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int):
        self.lane_len = len(data) // batch_size
        self.n_windows = self.lane_len // seq_len
        if self.n_windows < 1:
            raise CharlmError(
                f"the training text ({len(data):,} bytes) is too short for batch_size={batch_size}"
                f" lanes of seq_len={seq_len}: it needs at least {batch_size * seq_len:,} bytes;"
                " lower train.batch_size or train.seq_len, or use more text"
            )
        self.data, self.seq_len = data, seq_len  # the text itself: nothing is copied whole
        self.lane_starts = np.arange(batch_size)[:, None] * self.lane_len  # (B, 1)

    def window(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window k of an epoch: x, y (B, T) int64, read from the stream as (B, T+1) bytes."""
        t = self.seq_len
        w = self.data[self.lane_starts + (k * t + np.arange(-1, t))]  # lane positions kT-1 .. kT+T-1
        if k == 0:
            w[:, 0] = START_BYTE  # position -1 of each lane: the start byte
        w = torch.from_numpy(w).long()
        return w[:, :-1], w[:, 1:]


def random_batch(
    data: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size windows at random offsets, each a fresh text: x = [0, w[:-1]], y = w. (B, T) int64."""
    starts = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=generator)
    y = torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts.tolist()])).long()
    x = torch.cat([torch.full((batch_size, 1), START_BYTE, dtype=torch.long), y[:, :-1]], dim=1)
    return x, y
