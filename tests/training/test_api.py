"""charlm.train from Python: the command line's settings, checks and messages, and a Run back."""
import pytest

import charlm
from charlm.checkpoint import load_checkpoint
from helpers import TINY


def test_train_from_python_returns_the_run_its_model_and_its_curves(tmp_path, text_file):
    sizes = {a.split("=")[0].split(".")[1]: a.split("=")[1] for a in TINY if a.startswith("model.")}
    run = charlm.train("data=text", f"data.path={text_file}", *[a for a in TINY if not a.startswith("model.")],
                       model=sizes, train={"max_steps": 6, "eval_every": 3}, out_dir=str(tmp_path / "nb"),
                       progress=False)
    assert run.out_dir == tmp_path / "nb" and run.steps == 6 and not run.stopped
    assert run.best_val_loss == load_checkpoint(tmp_path / "nb" / "best.pt")["best_val_loss"]
    assert isinstance(run.model, charlm.CharLM) and run.model.config.d_model == 32
    assert [step for step, _ in run.curve("val/loss")] == [3, 6]
    text = charlm.sample_text(run.model, "the ", 10, temperature=0)[0]
    assert text.startswith("the ") and len(text) > len("the ")


def test_a_bad_setting_raises_the_command_lines_one_line(tmp_path):
    with pytest.raises(charlm.CharlmError, match=r"^train.lrr is not a setting"):
        charlm.train("train.lrr=3", out_dir=str(tmp_path / "x"), progress=False)
    with pytest.raises(charlm.CharlmError, match="train.lr must be above 0"):
        charlm.train(train={"lr": -1}, out_dir=str(tmp_path / "x"), progress=False)
    with pytest.raises(charlm.CharlmError, match="key=value"):
        charlm.train("--cfg", progress=False)
    assert not (tmp_path / "x").exists()
