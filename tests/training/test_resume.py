"""Resume does what docs/resume.md says: the run's own command resumes it, every override takes
effect or is refused, and a changed batch restarts the lanes instead of mixing up their states."""
import json
import math
import shutil
import signal
import time

import pytest
import torch

from charlm.checkpoint import load_checkpoint
from charlm.training.schedule import lr_factor
from helpers import ROOT, TINY, run_cli, scalars, small_text, start_training, wait_for

RUN = ("data=text", "data.path=notes.txt", *TINY, "model.n_layers=2", "out_dir=run")


@pytest.fixture
def work(tmp_path, text_file):
    (tmp_path / "notes.txt").write_bytes(text_file.read_bytes())
    return tmp_path


def wait_past(path, step, proc, timeout=120):
    end = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never passed step {step}"
        try:
            if load_checkpoint(path)["step"] > step:
                return
        except Exception:  # being replaced at this moment: read it again
            pass
        time.sleep(0.1)


@pytest.mark.system
@pytest.mark.slow
def test_the_runs_own_command_resumes_after_kill_9_then_stops_on_ctrl_c(work):
    command = (*RUN, "train.max_steps=100000", "train.eval_every=5")
    proc = start_training(work, *command)
    wait_for(work / "run" / "last.pt", proc)
    proc.kill()  # kill -9: no chance to save
    proc.communicate(timeout=60)
    killed_at = load_checkpoint(work / "run" / "last.pt")["step"]

    proc = start_training(work, *command, "train.resume=run")  # the same command plus the flag
    wait_past(work / "run" / "last.pt", killed_at, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"resumed from step {killed_at}" in out and "stopped by SIGINT" in out and "train.resume=run" in out
    stopped_at = load_checkpoint(work / "run" / "last.pt")["step"]
    assert stopped_at > killed_at

    done = run_cli("train.py", *command[:-2], f"train.max_steps={stopped_at + 3}", "train.eval_every=5",
                   "train.resume=run", cwd=work)
    assert f"resumed from step {stopped_at}" in done.stdout
    assert load_checkpoint(work / "run" / "last.pt")["step"] == stopped_at + 3


def test_lr_and_weight_decay_given_on_resume_take_effect(work):
    run_cli("train.py", *RUN, "train.max_steps=6", "train.eval_every=3", cwd=work)
    run_cli("train.py", *RUN, "train.max_steps=8", "train.eval_every=3", "train.lr=0.01",
            "train.weight_decay=0.05", "train.resume=run", cwd=work)
    state = load_checkpoint(work / "run" / "last.pt")
    decay, no_decay = state["optimizer"]["param_groups"]
    assert decay["initial_lr"] == no_decay["initial_lr"] == 0.01
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert state["scheduler"]["base_lrs"] == [0.01, 0.01]
    expected = 0.01 * lr_factor(8, warmup=5, total=8, min_ratio=1e-4 / 0.01)
    assert scalars(work / "run", "train/lr")[-1] == (8, pytest.approx(expected, rel=1e-6))
    yaml = (work / "run" / "config.yaml").read_text()
    assert "lr: 0.01\n" in yaml and "weight_decay: 0.05\n" in yaml  # config.yaml says what ran


@pytest.mark.parametrize("batch", [4, 16])
def test_another_batch_on_resume_restarts_the_lanes(work, batch):
    run_cli("train.py", *RUN, "train.max_steps=6", "train.eval_every=3", cwd=work)
    proc = run_cli("train.py", *RUN, "train.max_steps=8", "train.eval_every=4", f"train.batch_size={batch}",
                   "train.resume=run", cwd=work)
    assert f"train.batch_size 8 -> {batch}: every lane restarts from a zero state" in proc.stdout
    state = load_checkpoint(work / "run" / "last.pt")
    assert state["step"] == 8 and state["hidden"].shape == (2, batch, 32)
    assert f"batch_size: {batch}\n" in (work / "run" / "config.yaml").read_text()


def test_repeating_the_runs_group_choices_is_accepted(work):
    run_cli("train.py", *RUN, "train.max_steps=4", "train.eval_every=2", cwd=work)
    proc = run_cli("train.py", "data=text", "data.path=notes.txt", "model=small", *TINY, "model.n_layers=2",
                   "train.max_steps=6", "train.eval_every=2", "train.resume=run", cwd=work)
    assert "resumed from step 4" in proc.stdout
    assert torch.is_tensor(load_checkpoint(work / "run" / "last.pt")["hidden"])


def test_a_checkpoint_written_by_earlier_code_loads_resumes_and_samples(tmp_path):
    """tests/training/checkpoint_cb2759b.pt: 4 steps of an 8x1 model, written by charlm at cb2759b
    (before the command layer and the folders), with notes.txt as its text."""
    shutil.copy(ROOT / "tests" / "training" / "checkpoint_cb2759b.pt", tmp_path / "old.pt")
    (tmp_path / "notes.txt").write_text(small_text(), encoding="utf-8")
    wrote = run_cli("sample.py", "checkpoint=old.pt", "prompt=the", "length=8", "seed=0", cwd=tmp_path)
    assert wrote.stdout.startswith("the") and "step 4" in wrote.stderr
    resumed = run_cli("train.py", "train.resume=old.pt", "train.max_steps=6", cwd=tmp_path)
    assert "resumed from step 4" in resumed.stdout
    assert load_checkpoint(tmp_path / "old" / "last.pt")["step"] == 6  # the run's own out_dir, as saved


def test_an_lstm_fine_tunes_and_is_scored_dynamically(tmp_path):
    """The LSTM's state ([h, c]) is saved whole; a fine-tuning run starts from its weights, and
    dynamic evaluation scores it (its exact resume: tests/test_plan.py, for every cell)."""
    (tmp_path / "notes.txt").write_text(small_text(), encoding="utf-8")
    args = ("data=text", "data.path=notes.txt", *TINY, "model.cell=lstm", "model.n_layers=2", "model.dropout=0.1",
            "train.max_steps=10", "train.eval_every=10")
    run_cli("train.py", *args, "out_dir=one_go", cwd=tmp_path)
    a = load_checkpoint(tmp_path / "one_go" / "last.pt")
    assert a["model_config"]["cell"] == "lstm" and a["hidden"].shape == (2, 8, 64)
    not_model = [a for a in TINY if not a.startswith("model.")]  # the size and cell come from the source
    tuned = run_cli("train.py", "data=text", "data.path=notes.txt", *not_model, "train.max_steps=3",
                    "train.init_from=one_go", "out_dir=tuned", cwd=tmp_path)
    assert "init_from: " in tuned.stdout and "32x2 LSTM" in tuned.stdout
    scored = json.loads(run_cli("evaluate.py", "checkpoint=tuned", "dynamic=true", "format=json", cwd=tmp_path).stdout)
    assert math.isfinite(scored["dynamic_loss"]) and math.isfinite(scored["loss"])
