"""train.init_from: a new run that starts from another run's weights, on any text."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from charlm.checkpoint import load_checkpoint, save_checkpoint
from charlm.interop.convert import from_keras
from helpers import TINY, random_keras_weights, run_cli, small_text

QUICK = (*TINY, "train.warmup_steps=2", "train.eval_bytes=0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on one text (sentences about travellers and machines)."""
    work = tmp_path_factory.mktemp("base")
    (work / "a.txt").write_text(small_text(), encoding="utf-8")
    run_cli("train.py", "data=text", "data.path=a.txt", *QUICK, "train.max_steps=150", "train.eval_every=150",
            "out_dir=base", cwd=work)
    return work / "base"


@pytest.fixture
def base_run(trained):
    def copy_into(tmp_path):
        shutil.copytree(trained, tmp_path / "base")
        # another text in the same language: the same sentences, other words in them
        other = small_text().replace("crossed", "walked along").replace("o'clock", "in the evening")
        (tmp_path / "b.txt").write_text(other, encoding="utf-8")
    return copy_into


def bpb(tmp_path, run):
    out = run_cli("evaluate.py", f"checkpoint={run}", "data=text", "data.path=b.txt", "format=json", cwd=tmp_path)
    return json.loads(out.stdout)["bpb"]


def test_fine_tuning_beats_the_same_model_from_scratch(tmp_path, base_run):
    base_run(tmp_path)
    steps = ("train.max_steps=15", "train.eval_every=15")
    tuned = run_cli("train.py", "data=text", "data.path=b.txt", *QUICK, *steps, "train.init_from=base",
                    "out_dir=tuned", cwd=tmp_path)
    run_cli("train.py", "data=text", "data.path=b.txt", *QUICK, *steps, "out_dir=scratch", cwd=tmp_path)
    assert f"init_from: {tmp_path / 'base' / 'best.pt'} (step 150 on text" in tuned.stdout
    assert bpb(tmp_path, "tuned") < bpb(tmp_path, "scratch") - 0.3
    saved = yaml.safe_load((tmp_path / "tuned" / "config.yaml").read_text())
    assert saved["train"]["init_from"] == str(tmp_path / "base" / "best.pt")
    assert load_checkpoint(tmp_path / "tuned" / "last.pt")["step"] == 15  # counted from 0, not from 150
    events = next((tmp_path / "tuned").glob("events.out.tfevents.*")).read_bytes()
    assert b"train.init_from" in events and str(tmp_path / "base" / "best.pt").encode() in events  # HParams


def test_fine_tuning_starts_from_the_source_weights(tmp_path, base_run):
    base_run(tmp_path)
    run_cli("train.py", "data=text", "data.path=b.txt", *QUICK, "train.max_steps=1", "train.eval_every=1",
            "train.lr=1e-12", "train.min_lr=0", "train.init_from=base/best.pt", "out_dir=tuned", cwd=tmp_path)
    source, tuned = load_checkpoint(tmp_path / "base" / "best.pt"), load_checkpoint(tmp_path / "tuned" / "last.pt")
    for name, weight in source["model"].items():
        torch.testing.assert_close(tuned["model"][name], weight, atol=1e-6, rtol=0)


def test_model_settings_that_fit_apply_and_others_are_refused(tmp_path, base_run):
    base_run(tmp_path)
    run_cli("train.py", "data=text", "data.path=b.txt", *QUICK, "train.max_steps=2", "train.eval_every=2",
            "train.init_from=base", "model.dropout=0.1", "out_dir=drop", cwd=tmp_path)
    model = yaml.safe_load((tmp_path / "drop" / "config.yaml").read_text())["model"]
    assert model == {"d_model": 32, "n_layers": 1, "dropout": 0.1, "embed_dropout": True, "cell": "reset_after"}
    for override, key in (("model.d_model=64", "model.d_model"), ("model=reference", "model.d_model"),
                          ("model.cell=reset_before", "model.cell"), ("model.n_layers=2", "model.n_layers")):
        args = [a for a in QUICK if not a.startswith(f"{key}=")]
        proc = run_cli("train.py", "data=text", "data.path=b.txt", *args, "train.init_from=base", override,
                       "out_dir=refused", cwd=tmp_path, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and override in lines[0] and "32x1" in lines[0], proc.stderr
        assert not (tmp_path / "refused").exists()
    both = run_cli("train.py", "data=text", "data.path=b.txt", "train.init_from=base", "train.resume=base",
                   cwd=tmp_path, check=False)
    assert both.returncode == 1 and "not both" in both.stderr


def test_fine_tuning_a_converted_keras_model(tmp_path):
    """A checkpoint that never trained here (converted from Keras) is a base like any other."""
    save_checkpoint(tmp_path / "keras.pt", from_keras(random_keras_weights(16, 1, True), reset_after=True))
    (tmp_path / "b.txt").write_text(small_text(), encoding="utf-8")
    out = run_cli("train.py", "data=text", "data.path=b.txt", *QUICK[2:], "train.max_steps=2", "train.eval_every=2",
                  "train.init_from=keras.pt", "out_dir=tuned", cwd=tmp_path).stdout
    assert "init_from:" in out and "model 16x1 GRU" in out
    assert np.isfinite(load_checkpoint(tmp_path / "tuned" / "best.pt")["best_val_loss"])
