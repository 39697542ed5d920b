"""Apple Silicon (train.device=mps), run wherever PyTorch can use an Apple GPU (skipped elsewhere):
train, sample and evaluate there, resume on the CPU; and, everywhere, the settings and the one
line a machine without it gets."""
import pytest

from charlm.device import mps_available
from helpers import TINY, copy_run, one_error_line, run_cli

needs_mps = pytest.mark.skipif(not mps_available(), reason="needs an Apple GPU (mps); this machine has none")
MPS_TINY = tuple(a for a in TINY if not a.startswith("train.precision")) + ("train.device=mps",)


@pytest.mark.mps
@needs_mps
def test_train_on_mps_then_sample_evaluate_and_resume_on_the_cpu(tmp_path, text_file):
    args = ("data=text", f"data.path={text_file}", *MPS_TINY, "model.n_layers=2", "model.dropout=0.1",
            "train.max_steps=6", "train.eval_every=3")
    proc = run_cli("train.py", *args, "out_dir=run", cwd=tmp_path)
    assert "on mps" in proc.stdout and "precision: fp32 (auto: mps: fp32)" in proc.stdout
    sampled = run_cli("sample.py", "checkpoint=run", "prompt=the", "length=16", "seed=1", "device=mps", cwd=tmp_path)
    assert sampled.stdout.startswith("the")
    scored = run_cli("evaluate.py", "checkpoint=run", "device=mps", "split=val", "format=json", cwd=tmp_path)
    assert '"loss"' in scored.stdout
    resumed = run_cli("train.py", "train.resume=run", "train.device=cpu", "train.max_steps=8", cwd=tmp_path)
    assert "resumed from step 6" in resumed.stdout and "on cpu" in resumed.stdout


def test_mps_is_a_device_every_command_takes_and_its_absence_is_one_line(tmp_path, tiny_run):
    if mps_available():
        pytest.skip("this machine has an Apple GPU: the test above runs")
    copy_run(tiny_run, tmp_path, "run")
    for script, key in (("train.py", "train.device"), ("sample.py", "device"), ("evaluate.py", "device")):
        given = () if script == "train.py" else ("checkpoint=run",)
        proc = run_cli(script, f"{key}=mps", *given, cwd=tmp_path, check=False)
        one_error_line(proc, f"{key}=mps but this machine has no Apple GPU", f"{key}=cpu")
    one_error_line(run_cli("train.py", "train.device=metal", cwd=tmp_path, check=False),
                   "train.device must be auto, cpu, cuda, cuda:N or mps")
