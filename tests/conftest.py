"""Shared fixtures: a small corpus, the reference corpora seeded into a cache, CLI runners."""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reference corpora live beside the project (../shared/data); tests never download them.
SHARED_DATA = Path(os.environ.get("CHARLM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def small_text() -> str:
    """About 20 KB of varied, learnable text (ASCII and a little UTF-8)."""
    lines = [
        f"the {a} {b} crossed the {c} at {n} o'clock; café déjà vu.\n"
        for n, (a, b, c) in enumerate(
            [(a, b, c) for a in ("grey", "swift", "old") for b in ("traveller", "machine", "fox")
             for c in ("river", "hall", "lawn")] * 12
        )
    ]
    return "".join(lines)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(small_text(), encoding="utf-8")
    return path


@pytest.fixture
def timemachine_cache(tmp_path: Path) -> Path:
    """A data cache holding the real Time Machine file (skips if the shared copy is absent)."""
    src = SHARED_DATA / "timemachine.txt"
    if not src.exists():
        pytest.skip(f"reference corpus not found at {src}")
    cache = tmp_path / "data"
    cache.mkdir()
    shutil.copy(src, cache / "timemachine.txt")
    return cache


def run_cli(script: str, *args: str, cwd: Path, check: bool = True, in_process: bool = True
            ) -> subprocess.CompletedProcess:
    """Run train.py / sample.py / evaluate.py / `-m charlm.X` as a user would, from cwd: the finished
    command's exit status and output.

    By default in this process: the same entry point (runpy runs the script as __main__), without a
    new interpreter's start-up for every command. In a process of its own where a test needs one
    (in_process=False) or where Hydra's own flags (-m sweeps, --cfg) are given.
    """
    own_args = args[1:] if script == "-m" else args
    if in_process and not any(a.startswith("-") and a not in ("-h", "--help") for a in own_args):
        proc = _run_here(script, args, cwd)
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, *([script] if script == "-m" else [str(ROOT / script)]), *args]
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8",
                              timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_here(script: str, args: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess:
    """The command as __main__ in this process, with its own argv, working directory and output."""
    out, err = io.StringIO(), io.StringIO()
    argv = [*args] if script == "-m" else [str(ROOT / script), *args]
    saved_argv, saved_cwd, status = sys.argv, os.getcwd(), 0
    try:
        sys.argv = list(argv)
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if script == "-m":
                    runpy.run_module(args[0], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


TINY = ("model.d_model=32", "model.n_layers=1", "train.batch_size=8", "train.seq_len=32", "train.precision=fp32",
        "train.log_every=5", "train.sample_length=20", "train.warmup_steps=5")


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda skip, not fail, where there is no GPU (they run wherever there is one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
