"""python train.py, end to end: tiny runs in a temporary directory."""
import re

import pytest
import torch
import yaml

from charlm import load_model
from charlm.checkpoint import load_checkpoint
from helpers import TINY, run_cli, scalars, small_text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 60-step run on a small text file, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "notes.txt").write_text(small_text(), encoding="utf-8")
    proc = run_cli("train.py", "data=text", "data.path=notes.txt", *TINY, "train.max_steps=60",
                   "train.eval_every=20", "train.lr=1e-2", "out_dir=runs/tiny", cwd=tmp)
    return tmp, tmp / "runs" / "tiny", proc


def test_outside_a_terminal_the_log_is_plain_lines(trained):
    """Redirected to a file (the fixture's pipe), no bar: one line per train.log_every steps."""
    _, _, proc = trained
    assert "\r" not in proc.stdout
    lines = re.findall(r"^step (\d+)/60 \| loss [0-9.]+ \| [0-9,]+ tok/s \| lr [0-9.e+-]+ \| ETA \d+m\d\ds$",
                       proc.stdout, re.M)
    assert [int(n) for n in lines] == list(range(5, 61, 5))  # TINY logs every 5 steps


def test_run_writes_config_checkpoints_and_events(trained):
    tmp, run, proc = trained
    for name in ("config.yaml", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["d_model"] == 32 and cfg["data"]["path"] == "notes.txt"
    assert [s for s, _ in scalars(run, "val/loss")] == [20, 40, 60]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "val/perplexity", "val/bpb"):
        assert scalars(run, tag), tag


def test_loss_drops(trained):
    _, run, _ = trained
    train_loss = scalars(run, "train/loss")
    assert train_loss[-1][1] < train_loss[0][1] - 1.0
    val = [v for _, v in scalars(run, "val/loss")]
    assert val[-1] < val[0]


def test_summary_tells_where_things_are(trained):
    _, run, proc = trained
    out = proc.stdout
    assert re.search(r"best val loss \d+\.\d+ nats/byte", out)
    assert "python sample.py checkpoint=runs/tiny" in out
    assert "tensorboard --logdir runs" in out


def test_checkpoints_are_plain_data(trained):
    _, run, _ = trained
    state = torch.load(run / "last.pt", weights_only=True)  # would raise on pickled classes
    assert state["step"] == 60 and state["model_config"]["d_model"] == 32
    model = load_model(run)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert load_checkpoint(run / "best.pt")["best_val_loss"] == pytest.approx(
        min(v for _, v in scalars(run, "val/loss")))


def test_resume_continues_step_count(tmp_path, text_file):
    args = ("data=text", f"data.path={text_file}", *TINY, "train.eval_every=10")
    run_cli("train.py", *args, "train.max_steps=10", "out_dir=halves", cwd=tmp_path)
    proc = run_cli("train.py", "train.resume=halves", "train.max_steps=30", cwd=tmp_path)
    assert "resumed from step 10" in proc.stdout
    assert load_checkpoint(tmp_path / "halves" / "last.pt")["step"] == 30
    assert [s for s, _ in scalars(tmp_path / "halves", "val/loss")] == [10, 20, 30]


def test_typo_in_override_fails_with_clear_message(tmp_path):
    proc = run_cli("train.py", "train.lrr=0.1", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "train.lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_wrong_type_fails_with_clear_message(tmp_path):
    proc = run_cli("train.py", "train.lr=fast", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "fast" in proc.stderr and "Traceback" not in proc.stderr


def test_text_without_path_says_what_to_add(tmp_path):
    proc = run_cli("train.py", "data=text", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "data.path" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, d_model, seq_len", [
    ((), 256, 100),  # The Time Machine
    (("data=tinyshakespeare",), 128, 25),
    (("data=text", "data.path=notes.txt"), 256, 100),
    (("data=tinyshakespeare", "model=small", "recipe=timemachine"), 256, 100),  # a choice on the command line wins
    (("data=tinyshakespeare", "model=small"), 256, 25),  # a named size over the corpus's recipe
    (("data=text", "data.path=notes.txt", "recipe=tinyshakespeare"), 128, 25),
    (("data=tinyshakespeare", "train.seq_len=8"), 128, 8),
])
def test_each_corpus_gets_its_tuned_model_and_schedule(tmp_path, args, d_model, seq_len):
    cfg = yaml.safe_load(run_cli("train.py", *args, "--cfg", "job", cwd=tmp_path).stdout)
    assert (cfg["model"]["d_model"], cfg["train"]["seq_len"]) == (d_model, seq_len)


def test_timemachine_from_seeded_cache(tmp_path, timemachine_cache):
    proc = run_cli("train.py", "data=timemachine", f"data.cache_dir={timemachine_cache}", *TINY,
                   "train.max_steps=5", "train.eval_every=5", "train.eval_bytes=2000", "out_dir=tm", cwd=tmp_path)
    assert "161,081 train" in proc.stdout
    assert (tmp_path / "tm" / "best.pt").is_file()
