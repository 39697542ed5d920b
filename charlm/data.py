"""Corpora (download, verify, cache), position splits and batching.

A corpus is held as a read-only uint8 array (one byte per element, memory-mapped), split by
position into train | val | test. Every batch comes from inside one split.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import DataConfig
from .corpora import CORPORA, PACKAGED
from .errors import CharlmError
from .tokenizer import START_BYTE


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_corpus(name: str, cache_dir: str | Path, url: Optional[str] = None,
                  announce: Optional[Callable[[str], None]] = None) -> Path:
    """Path of a verified named corpus: the copy in cache_dir, else the one charlm ships, else one
    downloaded into cache_dir first (announce, if given, is told before a download starts)."""
    corpus = CORPORA[name]
    path = Path(cache_dir) / f"{name}.txt"
    if not path.exists() and corpus.packaged:
        path = PACKAGED / f"{name}.txt"  # checked by its hash below like any copy
    elif not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        source = url or corpus.url
        if announce:
            announce(f"downloading {name} from {source}")
        try:
            # Downloads to a temp file, checks the hash, and only then moves it into place.
            torch.hub.download_url_to_file(source, str(path), hash_prefix=corpus.sha256)
        except RuntimeError as e:
            if "invalid hash value" in str(e):
                raise CharlmError(
                    f"download of {name} from {source} has the wrong SHA-256 ({e}); nothing was saved"
                ) from None
            raise CharlmError(f"could not download {name} from {source}: {e}") from None
        except OSError as e:
            raise CharlmError(
                f"could not download {name} from {source}: {e}; "
                f"put the file at {path} yourself, or use data=text data.path=<file>"
            ) from None
    actual = sha256_of(path)
    if actual != corpus.sha256:
        raise CharlmError(
            f"{path} is not the expected {name} corpus: SHA-256 {actual}, expected "
            f"{corpus.sha256}; delete it to download it again"
        )
    return path


def corpus_path(cfg: DataConfig, announce: Optional[Callable[[str], None]] = None) -> Path:
    """The file that cfg names, checked to be a readable, non-empty file (announce: see ensure_corpus)."""
    path = ensure_corpus(cfg.name, cfg.cache_dir, announce=announce) if cfg.name in CORPORA else Path(cfg.path)
    if not path.exists():
        raise CharlmError(f"data file {path} does not exist; check data.path")
    if path.is_dir():
        raise CharlmError(f"data.path={path} is a directory; give a text file")
    if not os.access(path, os.R_OK):
        raise CharlmError(f"data file {path} is not readable; check its permissions")
    if path.stat().st_size == 0:
        raise CharlmError(f"data file {path} is empty; give a file with some text")
    return path


def load_bytes(path: str | Path) -> np.ndarray:
    """The file as a read-only uint8 array, memory-mapped (the corpus is never copied whole)."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise CharlmError(f"cannot read {path} ({e.strerror}); check that it is a readable file") from None


def split(data: np.ndarray, train_frac: float, val_frac: float) -> dict[str, np.ndarray]:
    """Split by position: data = train | val | test (views, no copies)."""
    n = len(data)
    a = int(n * train_frac)
    b = int(n * (train_frac + val_frac))
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


def stream_batches(data: np.ndarray, batch_size: int, seq_len: int) -> "StreamBatches":
    """Stateful truncated-BPTT batches over data; see StreamBatches."""
    return StreamBatches(data, batch_size, seq_len)


class StreamBatches:
    """The stream cut into batch_size contiguous lanes, read in consecutive seq_len windows.

        lanes (B, L+1), a start byte then L bytes of the stream each (read per window from the
        memory-mapped stream, never copied whole):
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
        self.data, self.seq_len = data, seq_len  # data stays memory-mapped: nothing is copied whole
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
