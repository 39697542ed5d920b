"""Run directories are owned: one writer at a time, and a finished run is never written over unasked.

    claim_run_dir(out_dir, resuming, overwrite)   lock out_dir, then check what it already holds
      RunLock                                     an OS lock on out_dir/.charlm.lock, held while
                                                  training; the OS drops it when the process dies
                                                  (kill -9 included), so it never goes stale
    clear_run(out_dir)                            overwrite=true: delete the old run, just before
                                                  the new one writes its first file
    write_run_config(out_dir, cfg)                the run's settings as out_dir/config.yaml

Readers (sample.py, evaluate.py, a second look at the checkpoints) never take the lock: they are
never blocked. Under torchrun rank 0 takes it for all ranks (charlm.training.loop.train).
"""
from __future__ import annotations

import os
import shlex
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from charlm.errors import CharlmError
from charlm.files import TMP_SUFFIX, atomic_write, write_error

LOCK_NAME = ".charlm.lock"
RUN_FILES = ("best.pt", "last.pt", "config.yaml")  # besides TensorBoard's events.out.tfevents.*

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # Windows: a lock on the file's first byte, dropped by the OS the same way
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def run_files(out_dir: Path) -> list[str]:
    """The names of what a training run leaves in out_dir that are there now (empty: no run)."""
    if not out_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    return found + sorted(p.name for p in out_dir.glob("events.out.tfevents.*"))


class RunLock:
    """An exclusive lock on a run directory, released by release() or by the process's end."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.fd: Optional[int] = None
        self.created: list[Path] = []  # the directories acquire() made, deepest first

    def acquire(self) -> "RunLock":
        """Take the lock, or raise CharlmError naming the process that holds it."""
        out_dir = self.path.parent
        self.created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
        doing = f"create out_dir={out_dir}"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            doing = f"write in out_dir={out_dir}"
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if self.path.is_symlink():  # O_NOFOLLOW: the lock is never written through a link (ELOOP)
                raise CharlmError(f"{self.path} is a symbolic link, which a run will not write through; remove"
                                  " it (the file it points to is untouched) and run again") from None
            raise CharlmError(f"cannot {doing} ({e.strerror}); choose a writable directory") from None
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise CharlmError(f"out_dir={out_dir} is being written by another training run ({holder});"
                              " wait for it to end or stop it, or choose another out_dir")
        self.fd = fd
        _write_holder(fd)
        return self

    def release(self) -> None:
        """Unlock; a directory this lock created and nothing else wrote to is removed again."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no stale name for the next reader
            if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                self.path.unlink()  # while still locked: a later writer opens a new file
                for d in self.created:
                    d.rmdir()
        except OSError:
            pass
        _unlock(self.fd)
        os.close(self.fd)
        self.fd = None


def claim_run_dir(out_dir: Path, resuming: bool, overwrite: bool) -> RunLock:
    """Lock out_dir for this run, then make sure the run may write there: a new run refuses a
    directory that already holds a run, unless overwrite (see clear_run); a resume expects one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CharlmError(f"out_dir={out_dir} is a file; give a directory")
    lock = RunLock(out_dir).acquire()
    try:
        found = run_files(out_dir)
        if found and not resuming and not overwrite:
            arg = shlex.quote(f"train.resume={out_dir}")
            raise CharlmError(
                f"out_dir={out_dir} already holds a run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''});"
                f" continue it with `python train.py {arg}`, choose another out_dir, or add overwrite=true"
                " to delete it and start over")
        _remove(out_dir, [name + TMP_SUFFIX for name in RUN_FILES])  # what a kill -9 in mid-write left
    except BaseException:
        lock.release()
        raise
    return lock


def clear_run(out_dir: Path) -> None:
    """overwrite=true: delete the run out_dir holds (the caller holds the lock, and calls this only
    once the new run is ready to write its first file, so a run that cannot start deletes nothing)."""
    _remove(out_dir, run_files(out_dir))


def write_run_config(out_dir: Path, cfg: Any, plan: Any = None) -> None:
    """The run's resolved settings (a RunConfig) as out_dir/config.yaml, written atomically; its
    `plan:` section is the plan the run follows (charlm.plan.Plan), every part resolved."""
    import yaml

    settings = asdict(cfg)
    if plan is not None:
        settings["plan"] = asdict(plan)
    try:
        atomic_write(out_dir / "config.yaml", yaml.safe_dump(settings, sort_keys=False, allow_unicode=True).encode())
    except OSError as e:
        raise CharlmError(write_error(out_dir / "config.yaml", e) + ", then run the same command again") from None


def _remove(out_dir: Path, names: list[str]) -> None:
    for name in names:
        try:
            (out_dir / name).unlink(missing_ok=True)
        except OSError as e:
            raise CharlmError(f"cannot delete {out_dir / name} ({e.strerror})") from None


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message a second writer gets (best effort: a full disk may refuse)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]  # as typed: the root scripts take
    command = " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]])  # paths out of sys.argv
    text = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8", errors="replace")[:1000], 0)
    except (OSError, AttributeError):  # no space for even this, or no pwrite (Windows)
        pass


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1000).decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "its process did not say which"
