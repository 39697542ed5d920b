"""Writing a file so that a crash or a failed write (a full disk, a read-only or vanished directory)
leaves the old file or the new one, never half of one, and no temporary file behind."""
from __future__ import annotations

import errno
import os
from pathlib import Path

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
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666, dir_fd=dir_fd)
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


_BY_DIRECTORY = all(f in os.supports_dir_fd for f in (os.open, os.rename, os.unlink))


def _write_by_path(path: Path, data: bytes) -> None:
    """atomic_write where directories cannot be opened (Windows)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
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


def write_error(path: str | Path, e: OSError) -> str:
    """One line: which file could not be written, why, and what to do about it."""
    cause = e.strerror or type(e).__name__
    advice = _ADVICE.get(e.errno, "fix that")
    return f"could not write {path} ({cause}); {advice}"
