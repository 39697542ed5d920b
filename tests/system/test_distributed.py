"""torchrun with 2 CPU processes (gloo) and Hydra sweeps; what the collectives are handed."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from charlm import CharLM, ModelConfig
from charlm.checkpoint import load_checkpoint
from charlm.training.distributed import Dist, dropout_seed
from helpers import ROOT, TINY, run_cli

ARGS = (*TINY, "model.dropout=0", "train.batch_size=8", "train.max_steps=12", "train.eval_every=6")
IDENTICAL = "2 processes hold identical weights: largest difference between them 0\n"


def torchrun(tmp_path, *args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,  # a rank left waiting would hang
    )


class _Handed(Exception):
    """Raised by the stand-in collectives once they have seen their tensors."""


def test_every_collective_is_handed_tensors_on_the_training_device(monkeypatch):
    """NCCL takes GPU tensors only: every tensor a collective gets must be on Dist.device. The
    meta device stands in for a GPU here (a CPU tensor would show up as 'cpu')."""
    seen = []

    def stand_in(name):
        def collective(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a]
            seen.append((name, sorted({t.device.type for t in tensors}), sorted({str(t.dtype) for t in tensors})))
            raise _Handed
        return collective

    monkeypatch.setattr(dist, "all_reduce", stand_in("all_reduce"))
    monkeypatch.setattr(dist, "all_gather", stand_in("all_gather"))
    d = Dist(rank=0, world=2, device=torch.device("meta"))
    model = CharLM(ModelConfig(d_model=8, n_layers=1))
    calls = {
        "agree": lambda: d.agree([1.0], [0.5, 0.0]),
        "from_main": lambda: d.from_main([1.0]),
        "gather_lanes": lambda: d.gather_lanes(torch.zeros(1, 4, 8, device="meta")),
        "gather_states": lambda: d.gather_states(torch.get_rng_state()),
        "weight_spread": lambda: d.weight_spread(model),
    }
    for name, call in calls.items():
        with pytest.raises(_Handed):
            call()
    assert len(seen) == len(calls)
    assert all(devices == ["meta"] for _, devices, _ in seen), seen
    assert ("all_reduce", ["meta"], ["torch.float64"]) in seen  # the step's numbers: float64


def test_each_rank_has_its_own_dropout_stream():
    seeds = {dropout_seed(0, rank) for rank in range(8)}
    assert len(seeds) == 8 and dropout_seed(0, 1) == dropout_seed(0, 1) != dropout_seed(1, 1)


@pytest.mark.system
@pytest.mark.slow
def test_two_processes_match_one(tmp_path, text_file):
    args = ("data=text", f"data.path={text_file}", *ARGS)
    run_cli("train.py", *args, "out_dir=single", cwd=tmp_path)
    proc = torchrun(tmp_path, *args, "out_dir=ddp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x 2 processes" in proc.stdout
    assert IDENTICAL in proc.stdout
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


@pytest.mark.system
@pytest.mark.slow
def test_with_dropout_each_rank_draws_its_own_masks_and_the_weights_stay_identical(tmp_path, text_file):
    proc = torchrun(tmp_path, "data=text", f"data.path={text_file}", *ARGS, "model.n_layers=2",
                    "model.dropout=0.3", "out_dir=ddp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert IDENTICAL in proc.stdout  # gradients are averaged: different masks, one set of weights
    ranks = load_checkpoint(tmp_path / "ddp" / "last.pt")["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


@pytest.mark.system
@pytest.mark.slow
def test_two_processes_stop_together_on_a_time_budget(tmp_path, text_file):
    proc = torchrun(tmp_path, "data=text", f"data.path={text_file}", *ARGS, "train.max_seconds=5",
                    "out_dir=ddp", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # one clock (rank 0's) drives both schedules: the same learning rate at every step
    assert IDENTICAL in proc.stdout
    spread = float(re.search(r"largest difference between them (\S+)", proc.stdout).group(1))
    assert spread == 0.0
    state = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert state["step"] > 12 and 3 < state["seconds"] < 6.5  # the budget, not train.max_steps, ended it


@pytest.mark.system
@pytest.mark.slow
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
        assert "val/best_loss" in acc.Tags()["scalars"]
