"""Finding a text: the cached copy of a named corpus, the one that ships with charlm, or a
download (each checked by its SHA-256), or the user's own file; then read, and known by its
identity (size and SHA-256), which a run records so that a resume can tell the same text."""
from __future__ import annotations

import glob
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
    """The file, folder or glob that cfg names, checked to hold readable, non-empty text (announce:
    see ensure_corpus). A folder or a glob is read as one text (load_bytes)."""
    path = ensure_corpus(cfg.name, cfg.cache_dir, announce=announce) if cfg.name in CORPORA else Path(cfg.path)
    if path.is_dir() or is_glob(path):
        files, _ = text_files(path)
        if not files:
            raise CharlmError(f"data.path={path} holds no text files (hidden files and files with NUL bytes are"
                              " left out); give a folder or a pattern with some text")
        return path
    if not path.exists():
        raise CharlmError(f"data file {path} does not exist; check data.path")
    if not os.access(path, os.R_OK):
        raise CharlmError(f"data file {path} is not readable; check its permissions")
    if path.stat().st_size == 0:
        raise CharlmError(f"data file {path} is empty; give a file with some text")
    return path


# Texts up to this size are read into memory: a file changed or cut short while a run reads it
# then cannot reach the run (a memory-mapped file cut short kills its reader with SIGBUS). Larger
# ones are memory-mapped, and must not be changed while a run reads them.
IN_MEMORY_LIMIT = 256 << 20  # bytes


def is_glob(path: str | Path) -> bool:
    return any(c in str(path) for c in "*?[")


def text_files(path: Path) -> tuple[list[Path], int]:
    """(the texts a folder (recursively) or a glob (`notes/**/*.txt`) names, in sorted order; how
    many binary files were left out). A text is a regular file, not hidden (no part of its path
    below the folder starts with a dot), with no NUL byte in its first 8 KiB (a binary file's mark)."""
    if is_glob(path):
        found, base = sorted(Path(p) for p in glob.glob(str(path), recursive=True)), None
    else:
        found, base = sorted(path.rglob("*")), path
    files, binary = [], 0
    for p in found:
        parts = p.relative_to(base).parts if base is not None else (p.name,)
        if not p.is_file() or any(part.startswith(".") for part in parts):
            continue
        if _binary(p):
            binary += 1
        else:
            files.append(p)
    return files, binary


def _binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return True


def separator_bytes(separator: str) -> bytes:
    r"""data.separator as bytes: `\n`, `\t` and `\\` as typed on a command line become a line
    break, a tab and a backslash."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    out, i = [], 0
    while i < len(separator):
        if separator[i] == "\\" and separator[i + 1 : i + 2] in escapes:
            out.append(escapes[separator[i + 1]])
            i += 2
        else:
            out.append(separator[i])
            i += 1
    return "".join(out).encode("utf-8", "surrogateescape")


def load_bytes(path: str | Path, separator: str = "\\n\\n", cache_dir: str | Path = "data",
               files: Optional[list[Path]] = None) -> np.ndarray:
    """The text as a read-only uint8 array: a copy in memory, or memory-mapped above IN_MEMORY_LIMIT.
    A folder or a glob is its text files (text_files) joined by separator (data.separator), written
    once into cache_dir and memory-mapped (_joined); files: text_files(path)'s list, where the caller
    has it already."""
    path = Path(path)
    if path.is_dir() or is_glob(path):
        return _joined(files if files is not None else text_files(path)[0], separator_bytes(separator),
                       Path(cache_dir))
    try:
        if os.stat(path).st_size > IN_MEMORY_LIMIT:
            return np.memmap(path, dtype=np.uint8, mode="r")
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise CharlmError(f"cannot read {path} ({e.strerror}); check that it is a readable file") from None
    data.flags.writeable = False
    return data


def _joined(files: list[Path], separator: bytes, cache_dir: Path) -> np.ndarray:
    """Several files as one text, separator between each two, memory-mapped from a file written
    once into cache_dir/joined/ (streamed file by file: the texts are never copied whole into
    memory). Its name comes from the files' paths, sizes and times and the separator, so a change
    to any of them writes a new one."""
    stats = [f.stat() for f in files]
    key = hashlib.sha256(separator + b"\0".join(
        f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode("utf-8", "surrogateescape")
        for f, st in zip(files, stats))).hexdigest()[:32]
    joined = Path(cache_dir) / "joined" / f"{key}.txt"
    if not joined.exists():
        try:
            joined.parent.mkdir(parents=True, exist_ok=True)
            tmp = joined.with_name(joined.name + f".{os.getpid()}.tmp")
            with open(tmp, "wb") as out:
                for k, f in enumerate(files):
                    if k and separator:
                        out.write(separator)
                    with open(f, "rb") as src:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            out.write(chunk)
            os.replace(tmp, joined)
        except OSError as e:
            raise CharlmError(f"cannot join the texts into {joined} ({e.strerror}); make data.cache_dir"
                              f"={cache_dir} writable, or choose another") from None
    if joined.stat().st_size == 0:
        raise CharlmError("the texts of data.path are all empty; give some text")
    return np.memmap(joined, dtype=np.uint8, mode="r")


def file_identities(files: list[Path], base: Path) -> list[dict[str, object]]:
    """Each file of a folder or a glob: its path (below base where it is inside), size and SHA-256."""
    out = []
    for f in files:
        try:
            name = f.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            name = str(f)
        out.append({"path": name, "bytes": f.stat().st_size, "sha256": sha256_of(f)})
    return out


def identity(path: str | Path, data: np.ndarray, files: Optional[list[Path]] = None) -> dict[str, object]:
    """What a run records of its text: where it was read, its size and its SHA-256 (and, for a
    folder or a glob, each file's: file_identities)."""
    found = {"path": str(Path(path).resolve()), "bytes": int(len(data)),
             "sha256": hashlib.sha256(memoryview(np.ascontiguousarray(data))).hexdigest()}
    if files is not None:
        found["files"] = file_identities(files, Path(path) if Path(path).is_dir() else Path())
    return found


def changed(saved: dict[str, object], now: dict[str, object]) -> str:
    """How the text now differs from the one a run recorded ("" where it is the same)."""
    if saved["sha256"] == now["sha256"]:
        return ""
    if "files" in saved and "files" in now:
        was = {f["path"]: f["sha256"] for f in saved["files"]}
        new = {f["path"]: f["sha256"] for f in now["files"]}
        what = ([f"{n} changed" for n in was if n in new and new[n] != was[n]] + [f"{n} is gone" for n in was
                if n not in new] + [f"{n} is new" for n in new if n not in was])
        if what:
            return ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "")
    return (f"{saved['bytes']:,} bytes with SHA-256 {str(saved['sha256'])[:12]}... when the run started,"
            f" {now['bytes']:,} bytes with SHA-256 {str(now['sha256'])[:12]}... now")
