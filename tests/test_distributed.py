"""torchrun with 2 CPU processes (gloo) and Hydra sweeps."""
import os
import subprocess
import sys

import pytest
import torch

from charlm.checkpoint import load_checkpoint
from conftest import ROOT, TINY, run_cli

ARGS = (*TINY, "model.dropout=0", "train.batch_size=8", "train.max_steps=12", "train.eval_every=6")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, text_file):
    args = ("data=text", f"data.path={text_file}", *ARGS)
    run_cli("train.py", *args, "out_dir=single", cwd=tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), *args, "out_dir=ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x 2 processes" in proc.stdout
    assert "2 processes agree on the weights" in proc.stdout
    assert proc.stdout.count("best val loss") == 1  # rank 0 alone reports
    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert b["step"] == 12 and b["hidden"].shape == a["hidden"].shape  # every lane's state kept
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-4), k
    assert abs(a["best_val_loss"] - b["best_val_loss"]) < 1e-3
    # the same run resumes in one process (another world size)
    proc = run_cli("train.py", "train.resume=ddp", "train.max_steps=14", cwd=tmp_path)
    assert "resumed from step 12" in proc.stdout


@pytest.mark.slow
def test_two_processes_stop_together_on_a_time_budget(tmp_path, text_file):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), "data=text", f"data.path={text_file}", *ARGS, "train.max_seconds=5",
         "out_dir=ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,  # a rank left waiting would hang
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes agree on the weights" in proc.stdout
    state = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert state["step"] > 12 and 3 < state["seconds"] < 6.5  # the budget, not train.max_steps, ended it


def test_sweep_gives_one_run_per_job(tmp_path, text_file):
    proc = run_cli("train.py", "-m", "model.d_model=16,24", "data=text", f"data.path={text_file}",
                   *TINY[1:], "train.max_steps=4", "train.eval_every=4", cwd=tmp_path)
    runs = sorted(p.parent for p in (tmp_path / "runs" / "text").glob("sweep_*/*/best.pt"))
    assert len(runs) == 2, proc.stdout
    assert {load_checkpoint(r / "best.pt")["model_config"]["d_model"] for r in runs} == {16, 24}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in runs:
        acc = EventAccumulator(str(r))
        acc.Reload()
        assert "hparam/best_val_loss" in acc.Tags()["scalars"]
