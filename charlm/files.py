"""Writing a file so that a crash or a failed write (a full disk, a read-only or vanished directory)
leaves the old file or the new one, never half of one, and no temporary file behind."""
from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path
from typing import Iterable, Optional

from charlm.errors import CharlmError

TMP_SUFFIX = ".tmp"

# What the user can do about each way a write fails.
_ADVICE = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some of your disk quota",
    errno.EROFS: "the file system is read-only; make it writable",
    errno.EACCES: "make the directory writable for you",
    errno.EPERM: "make the directory writable for you",
    errno.ENOENT: "the directory is gone (was it moved or deleted?); put it back",
}


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write data to path: beside it first, flushed to disk, then renamed over it.

    An OSError (ENOSPC, EROFS, EACCES, ENOENT, ...) leaves path as it was and removes the
    temporary file, then propagates. Where the OS allows it, every step goes through one handle
    on the directory, so a directory renamed in the middle of a write still ends with the file
    or nothing in it, never a temporary.
    """
    path = Path(path)
    if not _BY_DIRECTORY:
        return _write_by_path(path, data)
    tmp = path.name + TMP_SUFFIX
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        try:
            fd = _create(tmp, dir_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        except OSError:
            pass
    finally:
        os.close(dir_fd)


def _create(name: str, dir_fd: int) -> int:
    """A new file `name` in the directory dir_fd, for writing. What a killed write left there
    (a file, or a symbolic link someone put in its place) is unlinked first, and the new one is
    created exclusively: a write never goes through a link into a file elsewhere."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=dir_fd)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BY_DIRECTORY = all(f in os.supports_dir_fd for f in (os.open, os.rename, os.unlink))


def _write_by_path(path: Path, data: bytes) -> None:
    """atomic_write where directories cannot be opened (Windows)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.unlink(missing_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def write_file(path: Path, data: bytes, setting: str) -> None:
    """atomic_write for a command's output file: a failed write is one line naming the setting."""
    try:
        atomic_write(path, data)
    except OSError as e:
        raise CharlmError(write_error(f"{setting}={path}", e)) from None


def write_error(path: str | Path, e: OSError) -> str:
    """One line: which file could not be written, why, and what to do about it."""
    cause = e.strerror or type(e).__name__
    advice = _ADVICE.get(e.errno, "fix that")
    return f"could not write {path} ({cause}); {advice}"


def output_file(path: str | Path, setting: str, example: str, inputs: Iterable[Optional[Path]] = (),
                overwrite: Optional[bool] = None) -> Path:
    """The one rule for a file a command writes (html, onnx, keras, a converted checkpoint): checked
    before any work, so that a refusal costs nothing and destroys nothing. One line, naming the
    setting (`out=`, `html=`) and what to do, where path

    - is an existing directory, or sits in a directory that does not exist;
    - is one of the command's own inputs (the checkpoint it reads, its weights or its text);
    - holds a checkpoint (a `.pt`, or a file in torch.save's format), unless overwrite is true
      (None: the command has no overwrite setting, and never writes over one).

    The file is then written by atomic_write: a symbolic link at path is replaced, never written
    through, and the name returned is the one written (no suffix is added).
    """
    path = Path(path)
    if path.is_dir():
        raise CharlmError(f"{setting}={path} is a directory; give a file name, such as {path / example}")
    if not path.parent.is_dir():
        raise CharlmError(f"{setting}={path}: the directory {path.parent} does not exist; create it, or choose"
                          " another place")
    if path.exists() or path.is_symlink():
        for given in inputs:
            if given is not None and _same_file(path, Path(given)):
                raise CharlmError(f"{setting}={path} is this command's input {given}; writing there would destroy"
                                  " it: choose another file name")
        if not overwrite and is_checkpoint(path):
            raise CharlmError(f"{setting}={path} holds a checkpoint, which this would write over; choose another"
                              " file name" + (", or add overwrite=true" if overwrite is not None else ""))
    return path


def is_checkpoint(path: Path) -> bool:
    """Whether path is (or a link at path leads to) a checkpoint: a .pt or .pth file, or any file
    in torch.save's zip format (which holds a data.pkl)."""
    if not path.exists():
        return False
    if path.suffix in (".pt", ".pth"):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
