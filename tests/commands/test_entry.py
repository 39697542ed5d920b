"""`charlm COMMAND` and `python -m charlm COMMAND`: every command behind one name."""
from charlm.checkpoint import load_checkpoint
from helpers import TINY, run_cli


def test_every_command_runs_under_one_name(tmp_path, text_file):
    out = run_cli("-m", "charlm", "train", "data=text", f"data.path={text_file}", *TINY, "train.max_steps=4",
                  "train.eval_every=4", "out_dir=run", cwd=tmp_path)
    assert "done: 4 steps" in out.stdout and load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4
    sampled = run_cli("-m", "charlm", "sample", "checkpoint=run", "prompt=the, (x)", "length=5", cwd=tmp_path)
    assert sampled.stdout.startswith("the, (x)")  # free text taken as typed, as sample.py takes it
    scored = run_cli("-m", "charlm", "evaluate", "checkpoint=run", "data=text", f"data.path={text_file}",
                     cwd=tmp_path)
    assert "bits/byte:" in scored.stdout
    exported = run_cli("-m", "charlm", "export", "checkpoint=run", "format=html", "out=page.html", cwd=tmp_path)
    assert "wrote page.html" in exported.stdout


def test_help_and_an_unknown_command(tmp_path):
    listing = run_cli("-m", "charlm", "--help", cwd=tmp_path)
    for name in ("train", "sample", "evaluate", "export", "convert", "bench", "doctor"):
        assert f"charlm {name}" in listing.stdout
    assert "python train.py (or: charlm train)" in run_cli("-m", "charlm", "train", "--help", cwd=tmp_path).stdout
    bad = run_cli("-m", "charlm", "trian", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: charlm has no command 'trian'")
