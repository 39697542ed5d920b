"""python -m charlm.doctor: every path this machine offers, as a matrix a user can read."""
import pytest
import torch

from charlm import plan as plans
from helpers import run_cli


@pytest.mark.system
@pytest.mark.slow  # a torchrun pair among its rows: the slow run and CI's
def test_doctor_runs_every_path_here_and_says_what_it_cannot(tmp_path):
    proc = run_cli("-m", "charlm.doctor", cwd=tmp_path)
    out = proc.stdout
    for row in ("cpu fp32 reset_after", "cpu fp32 reset_before", "cpu bf16 reset_after", "cpu bf16 reset_before",
                "2 processes, gloo (CPU)"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert " ✓ " in line and " s  " in line, line  # passed, with its time
    assert "largest difference between them 0\n" in out
    if not torch.cuda.is_available():
        assert "cuda                               - no GPU" in out
        assert "needs two GPUs, this machine has 0" in out
    # the plan train.py follows here, each part with auto's reason: what the run header prints
    plan, why, _ = plans.resolve()
    assert f"plan: {plan.line()}\n" in out
    for part, reason in why.items():
        assert f"  {part}={getattr(plan, part)}: {reason}\n" in out
    path = next(line for line in out.splitlines() if line.startswith("CPU GRU time loops and decoding: "))
    if plan.kernels != "off":  # and the kernels were checked against PyTorch's operations
        line = next(line for line in out.splitlines() if line.startswith("cpu kernels"))
        assert " ✓ " in line and "agree with PyTorch's operations" in line, line
        assert f"charlm's {plan.kernels} kernels" in path, path
        assert "threads; recurrent matmuls: fp32 by " in path and ", bf16 by " in path, path
    else:
        assert "PyTorch operations (" in path
    assert out.rstrip().endswith(" passed, 0 failed")
    assert list(tmp_path.iterdir()) == []  # it leaves nothing behind
