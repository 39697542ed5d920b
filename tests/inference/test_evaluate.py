"""python evaluate.py: bytes scored, loss, perplexity, bits per byte over a whole text."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from charlm import load_model
from charlm.data.tokenizer import START_BYTE
from helpers import TINY, copy_run, run_cli, small_text


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("eval")
    copy_run(tiny_run, tmp, "run")
    (tmp / "other.txt").write_text("the old fox crossed the lawn at noon; café.\n" * 40, encoding="utf-8")
    # like Tiny Shakespeare: train and val only, no test split
    run_cli("train.py", "data=text", "data.path=notes.txt", "data.train_frac=0.9", "data.val_frac=0.1", *TINY,
            "train.max_steps=2", "train.eval_every=2", "out_dir=no_test", cwd=tmp)
    return tmp


def direct_loss(model, data: bytes) -> float:
    """The whole text in one forward pass from the start byte: the definition."""
    y = torch.tensor(list(data))
    x = torch.cat([torch.tensor([START_BYTE]), y[:-1]])
    with torch.no_grad():
        log_probs, _ = model(x.unsqueeze(0))
    return F.nll_loss(log_probs[0], y).item()


def test_whole_file_matches_direct_computation(trained):
    proc = run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=other.txt", "format=json", cwd=trained)
    result = json.loads(proc.stdout)
    data = (trained / "other.txt").read_bytes()
    assert result["bytes"] == len(data) and result["split"] == "all"
    expected = direct_loss(load_model(trained / "run"), data)
    assert result["loss"] == pytest.approx(expected, abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert result["bpb"] == pytest.approx(expected / math.log(2), abs=1e-4)


def test_test_split_in_text_form(trained):
    proc = run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=notes.txt", "split=test", cwd=trained)
    data = (trained / "notes.txt").read_bytes()
    n_test = len(data) - int(len(data) * 0.95)
    assert f"bytes:       {n_test:,}" in proc.stdout
    assert proc.stderr == ""  # figures only: no warnings
    assert "nats/byte" in proc.stdout and "perplexity" in proc.stdout and "bits/byte" in proc.stdout
    expected = direct_loss(load_model(trained / "run"), data[-n_test:])
    loss = float(proc.stdout.split("loss:")[1].split()[0])
    assert loss == pytest.approx(expected, abs=1e-4)


def test_bad_split_is_one_line(trained):
    proc = run_cli("evaluate.py", "checkpoint=run", "split=dev", cwd=trained, check=False)
    assert proc.returncode == 1 and "split" in proc.stderr and "Traceback" not in proc.stderr


def strict_json(text: str) -> dict:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_defaults_to_the_checkpoints_own_text_and_its_test_split(trained):
    proc = run_cli("evaluate.py", "checkpoint=run", "format=json", cwd=trained)
    result = strict_json(proc.stdout)
    data = (trained / "notes.txt").read_bytes()
    n_test = len(data) - int(len(data) * 0.95)
    assert result["data"] == "notes.txt" and result["split"] == "test" and result["bytes"] == n_test
    assert result["loss"] == pytest.approx(direct_loss(load_model(trained / "run"), data[-n_test:]), abs=1e-4)
    assert proc.stderr == ""


def test_without_a_test_split_it_scores_val_and_says_so(trained):
    proc = run_cli("evaluate.py", "checkpoint=no_test", "format=json", cwd=trained)
    result = strict_json(proc.stdout)
    data = (trained / "notes.txt").read_bytes()
    assert result["split"] == "val" and result["bytes"] == len(data) - int(len(data) * 0.9)
    assert math.isfinite(result["loss"])
    assert "no test split" in proc.stderr and "scoring val" in proc.stderr


def test_dynamic_evaluation_adapts_and_changes_no_file(trained):
    """other.txt repeats one line 40 times: a model that follows the text it reads does better."""
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (trained / "run").iterdir()}
    out = run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=other.txt", "dynamic=true",
                  "format=json", cwd=trained)
    result = json.loads(out.stdout)
    assert result["dynamic_loss"] < result["loss"] - 0.2, result
    plain = direct_loss(load_model(trained / "run"), (trained / "other.txt").read_bytes())
    assert result["loss"] == pytest.approx(plain, abs=1e-4)  # the static figure is still the plain one
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (trained / "run").iterdir()} == before
    text = run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=other.txt", "dynamic=true",
                   cwd=trained).stdout
    assert "static" in text and "dynamic" in text and f"{result['dynamic_bpb']:.4f}" in text


def test_dynamic_evaluation_scores_each_window_before_learning_from_it(trained):
    """One window holding the whole text: no update comes before any byte is scored, so the
    dynamic figure is the static one. (A look at a byte before scoring it would lower it.)"""
    n = len((trained / "other.txt").read_bytes())
    result = json.loads(run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=other.txt", "dynamic=true",
                                f"dynamic_window={n}", "dynamic_lr=10", "format=json", cwd=trained).stdout)
    assert result["dynamic_loss"] == pytest.approx(result["loss"], abs=1e-5)


def test_a_long_scoring_outside_a_terminal_says_how_far_it_is_in_plain_lines(trained):
    (trained / "long.txt").write_text(small_text() * 6, encoding="utf-8")  # about 130 KB
    proc = run_cli("evaluate.py", "checkpoint=run", "data=text", "data.path=long.txt", cwd=trained)
    lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr and lines[-1].startswith("scoring: 100% (")
    assert [int(line.split(":")[1].split("%")[0]) for line in lines] == list(range(10, 101, 10))
