"""The CUDA paths, run wherever a GPU is present (skipped elsewhere): train, sample, evaluate,
bf16, resume on the CPU, and two processes over NCCL where two GPUs exist."""
import os
import subprocess
import sys

import pytest
import torch

from charlm import CharLM, ModelConfig
from charlm import plan as plans
from charlm.checkpoint import load_checkpoint
from helpers import ROOT, TINY, run_cli

pytestmark = pytest.mark.cuda
CUDA_TINY = tuple(a for a in TINY if not a.startswith("train.precision")) + ("train.device=cuda",)


def checkpoint_tensors(state):
    out = []
    for part in (state["model"], state["optimizer"]["state"]):
        for v in part.values():
            out += list(v.values()) if isinstance(v, dict) else [v]
    return [t for t in out + [state["hidden"]] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_on_cuda_then_sample_evaluate_and_resume_on_the_cpu(tmp_path, text_file, precision):
    args = ("data=text", f"data.path={text_file}", *CUDA_TINY, "model.n_layers=2", "model.dropout=0.1",
            f"train.precision={precision}", "train.max_steps=6", "train.eval_every=3")
    proc = run_cli("train.py", *args, "out_dir=run", cwd=tmp_path)
    assert "on cuda" in proc.stdout and f"precision: {precision} (" in proc.stdout
    if precision == "bf16":
        assert "GRU fp32 (cuDNN" in proc.stdout  # never silently fp16
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    tensors = [t for t in checkpoint_tensors(state) if t.is_floating_point()]
    assert {t.device.type for t in tensors} == {"cpu"} and {t.dtype for t in tensors} == {torch.float32}
    sampled = run_cli("sample.py", "checkpoint=run", "prompt=the", "length=16", "seed=1", "device=cuda", cwd=tmp_path)
    assert len(sampled.stdout.encode()) >= len("the") + 16
    scored = run_cli("evaluate.py", "checkpoint=run", "device=cuda", "split=val", "format=json", cwd=tmp_path)
    assert '"loss"' in scored.stdout
    resumed = run_cli("train.py", *args[:-2], "train.device=cpu", "train.max_steps=8", "train.resume=run",
                      cwd=tmp_path)
    assert "resumed from step 6" in resumed.stdout and "on cpu" in resumed.stdout


@pytest.mark.parametrize("cell", ["reset_after", "reset_before"])
def test_bf16_autocast_on_cuda_keeps_a_float32_state_close_to_fp32(cell):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=64, n_layers=2, cell=cell)).cuda()
    x = torch.randint(0, 256, (4, 32), device="cuda")
    ref, h_ref = model(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        log_probs, h = model(x)
    assert h.dtype == torch.float32 and log_probs.dtype == torch.float32
    assert (h - h_ref).abs().max() < 0.05 and (log_probs - ref).abs().max() < 0.1


def test_auto_precision_is_bf16_where_the_gpu_has_bf16_units():
    plan, why, _ = plans.resolve(device="cuda")
    major, _ = torch.cuda.get_device_capability()
    assert plan.device == "cuda" and plan.precision == ("bf16" if major >= 8 else "fp32")
    assert "compute capability" in why["precision"]


def test_two_processes_over_nccl_hold_identical_weights(tmp_path, text_file):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train.py"), "data=text", f"data.path={text_file}", *CUDA_TINY, "model.dropout=0",
         "train.max_steps=12", "train.eval_every=6", "out_dir=ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes hold identical weights: largest difference between them 0\n" in proc.stdout
