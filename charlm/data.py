"""Corpora (download, verify, cache), position splits and batching.

A corpus is held as a read-only uint8 array (one byte per element, memory-mapped), split by
position into train | val | test. Every batch comes from inside one split.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import CharlmError
from .tokenizer import START_BYTE


@dataclass(frozen=True)
class Corpus:
    url: str
    sha256: str
    size: int


CORPORA: dict[str, Corpus] = {
    "timemachine": Corpus(
        url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        sha256="8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516",
        size=178_979,
    ),
    "tinyshakespeare": Corpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
    ),
}


@dataclass
class DataConfig:
    """Which text to train on and how to split it (fractions by position)."""

    name: str = "timemachine"  # a key of CORPORA, or "text" for data.path
    path: Optional[str] = None  # the file for name=text
    cache_dir: str = "data"  # where named corpora are downloaded to
    train_frac: float = 0.9
    val_frac: float = 0.05  # test gets the rest

    def __post_init__(self) -> None:
        if self.name not in CORPORA and self.name != "text":
            known = ", ".join([*CORPORA, "text"])
            raise CharlmError(f"unknown corpus data.name={self.name!r}; choose one of: {known}")
        if self.name == "text" and not self.path:
            raise CharlmError("data=text needs a file: add data.path=<your text file>")
        if not (0 < self.train_frac < 1 and 0 < self.val_frac < 1):
            raise CharlmError("data.train_frac and data.val_frac must each be between 0 and 1")
        if self.train_frac + self.val_frac > 1 + 1e-9:
            raise CharlmError(
                f"data.train_frac + data.val_frac = {self.train_frac + self.val_frac:g} is over 1;"
                " they and the test split must share the text"
            )


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_corpus(name: str, cache_dir: str | Path, url: Optional[str] = None) -> Path:
    """Path of a verified named corpus in cache_dir, downloading it first if it is missing."""
    corpus = CORPORA[name]
    path = Path(cache_dir) / f"{name}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        source = url or corpus.url
        print(f"downloading {name} from {source}")
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


def corpus_path(cfg: DataConfig) -> Path:
    """The file that cfg names, checked to be a readable, non-empty file."""
    path = ensure_corpus(cfg.name, cfg.cache_dir) if cfg.name in CORPORA else Path(cfg.path)
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
    return np.memmap(path, dtype=np.uint8, mode="r")


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

        lanes (B, L+1), a start byte then L bytes of the stream each:
          lane 0: 0 | s[0]      ... s[L-1]
          lane 1: 0 | s[L]      ... s[2L-1]
          ...
        window k: x = lanes[:, kT : kT+T]     y = lanes[:, kT+1 : kT+T+1]

    y is x shifted left by one, and window k+1 continues window k in every lane, so the hidden
    state is carried from one batch to the next (detached). An epoch is n_windows windows; the
    state starts from zero at the start of each epoch, where every lane begins with the start byte.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int):
        lane_len = len(data) // batch_size
        self.n_windows = lane_len // seq_len
        if self.n_windows < 1:
            raise CharlmError(
                f"the training text ({len(data):,} bytes) is too short for batch_size={batch_size}"
                f" lanes of seq_len={seq_len}: it needs at least {batch_size * seq_len:,} bytes;"
                " lower train.batch_size or train.seq_len, or use more text"
            )
        lanes = np.asarray(data[: batch_size * lane_len]).reshape(batch_size, lane_len)
        start = np.full((batch_size, 1), START_BYTE, dtype=np.uint8)
        self.lanes = torch.from_numpy(np.concatenate([start, lanes], axis=1))  # (B, L+1) uint8
        self.seq_len = seq_len

    def window(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window k of an epoch: x, y (B, T) int64."""
        t = self.seq_len
        w = self.lanes[:, k * t : k * t + t + 1].long()
        return w[:, :-1], w[:, 1:]


def random_batch(
    data: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size windows at random offsets, each a fresh text: x = [0, w[:-1]], y = w. (B, T) int64."""
    starts = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=generator)
    y = torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts.tolist()])).long()
    x = torch.cat([torch.full((batch_size, 1), START_BYTE, dtype=torch.long), y[:, :-1]], dim=1)
    return x, y
