"""Lose nothing: crash safety, bit-exact resume, graceful stop, non-finite losses."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charlm.checkpoint import load_checkpoint
from conftest import ROOT, TINY, run_cli, scalars, start_training, wait_for

ARGS = ("data=text", "data.path=notes.txt", *TINY, "model.n_layers=2", "model.dropout=0.1")


def model_tensors(path: Path) -> dict:
    return load_checkpoint(path)["model"]


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("batching", ["random"])  # stream batching: tests/test_plan.py, for every cell
def test_stop_and_resume_is_bit_exact(tmp_path, text_file, batching):
    # a quarter of the text is 19 windows of 8x32: the 40 steps cross two epochs' starts
    args = (*ARGS, f"data.path={text_file}", f"train.batching={batching}", "train.max_steps=40",
            "train.eval_every=10", "data.train_frac=0.25")
    run_cli("train.py", *args, "out_dir=one_go", cwd=tmp_path)

    proc = start_training(tmp_path, *args, "out_dir=halves")
    wait_for(tmp_path / "halves" / "last.pt", proc)  # past step 10: stop somewhere after it
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "resume with:  python train.py train.resume=halves" in out
    stopped_at = load_checkpoint(tmp_path / "halves" / "last.pt")["step"]
    assert 10 <= stopped_at < 40
    run_cli("train.py", "train.resume=halves", cwd=tmp_path)

    a, b = model_tensors(tmp_path / "one_go" / "last.pt"), model_tensors(tmp_path / "halves" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for tag in ("train/loss", "val/loss"):
        one, two = scalars(tmp_path / "one_go", tag), scalars(tmp_path / "halves", tag)
        assert [s for s, _ in two] == sorted(set(s for s, _ in two))  # no duplicated steps
        assert one == two


@pytest.mark.system
@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_loadable_checkpoints(tmp_path, text_file):
    """Kill a real run at several points (checkpoints are written every step, so some kills land
    inside a write); every time both files load and the run resumes."""
    args = (*ARGS, f"data.path={text_file}", "train.eval_every=1", "train.max_steps=100000", "out_dir=run")
    last, best = tmp_path / "run" / "last.pt", tmp_path / "run" / "best.pt"
    steps = []
    for i, delay in enumerate([0.0, 0.13, 0.29, 0.41, 0.07]):
        proc = start_training(tmp_path, *(args if i == 0 else ("train.resume=run",)))
        if i == 0:
            wait_for(last, proc)
        else:  # wait for the resumed run to write at least once more
            end = time.time() + 120
            while load_checkpoint(last)["step"] <= steps[-1] and time.time() < end:
                time.sleep(0.02)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        state = load_checkpoint(last)  # raises if truncated
        load_checkpoint(best)
        steps.append(state["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]


def test_crash_inside_a_checkpoint_write_keeps_the_old_file(tmp_path):
    """A process that dies half-way through torch.save leaves the previous checkpoint intact."""
    script = f"""
import os, torch
from charlm.checkpoint import model_state, save_checkpoint
from charlm.model.network import CharLM, ModelConfig
path = {str(tmp_path / 'last.pt')!r}
model = CharLM(ModelConfig(d_model=8, n_layers=1))
torch.nn.init.ones_(model.head.bias)
save_checkpoint(path, {{**model_state(model), "step": 1, "best_val_loss": 1.0}})
real_save = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os._exit(9)
torch.save = dying_save
save_checkpoint(path, {{**model_state(model), "step": 2, "best_val_loss": 0.5}})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 9
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 1 and torch.equal(state["model"]["head.bias"], torch.ones(256))


def _train_in_process(tmp_path, text_file, nan_at, **train_overrides):
    """Run charlm.training.loop.train directly, with the loss replaced by NaN at step nan_at."""
    from charlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    cfg = RunConfig(
        data=DataConfig(name="text", path=str(text_file)),
        model=ModelConfig(d_model=16, n_layers=1),
        train=TrainConfig(batch_size=4, seq_len=16, max_steps=12, eval_every=5, log_every=1,
                          sample_length=5, warmup_steps=1, precision="fp32", **train_overrides),
    )
    calls = {"n": 0}
    real = torch.nn.functional.nll_loss

    def nll(*a, **k):
        out = real(*a, **k)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == nan_at:
                return out * float("nan")
        return out

    return cfg, nll


def test_nan_loss_stops_with_message_and_keeps_checkpoints(tmp_path, text_file, monkeypatch):
    import charlm.training.loop as tr
    from charlm.errors import CharlmError

    cfg, nll = _train_in_process(tmp_path, text_file, nan_at=7)
    monkeypatch.setattr(torch.nn.functional, "nll_loss", nll)
    out = tmp_path / "run"
    with pytest.raises(CharlmError, match="step 7: the loss or gradient became non-finite") as e:
        tr.train(cfg, out)
    assert "on_nonfinite=skip" in str(e.value)
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_loss_can_be_skipped_and_counted(tmp_path, text_file, monkeypatch):
    import charlm.training.loop as tr

    cfg, nll = _train_in_process(tmp_path, text_file, nan_at=7, on_nonfinite="skip")
    monkeypatch.setattr(torch.nn.functional, "nll_loss", nll)
    tr.train(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 12 and state["skipped"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
