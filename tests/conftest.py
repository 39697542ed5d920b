"""Fixtures shared by every layer's tests (the helpers they use: tests/helpers.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import SHARED_DATA, TINY, run_cli, small_text


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny run (32x2, 40 steps on small_text() as notes.txt), trained once per test session for
    the command tests that only read a trained model: copy it (copy_run), never write into it."""
    work = tmp_path_factory.mktemp("tiny_run")
    (work / "notes.txt").write_text(small_text(), encoding="utf-8")
    run_cli("train.py", "data=text", "data.path=notes.txt", *TINY, "model.n_layers=2", "train.max_steps=40",
            "train.eval_every=20", "out_dir=run", cwd=work)
    return work / "run"


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda skip, not fail, where there is no GPU (they run wherever there is one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
