"""Finding a text: the cached copy of a named corpus, the one that ships with charlm, or a
download (each checked by its SHA-256), or the user's own file; then read, and known by its
identity (size and SHA-256), which a run records so that a resume can tell the same text."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from charlm.config import DataConfig
from charlm.data.corpora import CORPORA, PACKAGED
from charlm.errors import CharlmError


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


# Texts up to this size are read into memory: a file changed or cut short while a run reads it
# then cannot reach the run (a memory-mapped file cut short kills its reader with SIGBUS). Larger
# ones are memory-mapped, and must not be changed while a run reads them.
IN_MEMORY_LIMIT = 256 << 20  # bytes


def load_bytes(path: str | Path) -> np.ndarray:
    """The file as a read-only uint8 array: a copy in memory, or memory-mapped above IN_MEMORY_LIMIT."""
    try:
        if os.stat(path).st_size > IN_MEMORY_LIMIT:
            return np.memmap(path, dtype=np.uint8, mode="r")
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise CharlmError(f"cannot read {path} ({e.strerror}); check that it is a readable file") from None
    data.flags.writeable = False
    return data


def identity(path: str | Path, data: np.ndarray) -> dict[str, object]:
    """What a run records of its text: where it was read, its size and its SHA-256."""
    return {"path": str(Path(path).resolve()), "bytes": int(len(data)),
            "sha256": hashlib.sha256(memoryview(np.ascontiguousarray(data))).hexdigest()}


def changed(saved: dict[str, object], now: dict[str, object]) -> str:
    """How the text now differs from the one a run recorded ("" where it is the same)."""
    if saved["sha256"] == now["sha256"]:
        return ""
    return (f"{saved['bytes']:,} bytes with SHA-256 {str(saved['sha256'])[:12]}... when the run started,"
            f" {now['bytes']:,} bytes with SHA-256 {str(now['sha256'])[:12]}... now")
