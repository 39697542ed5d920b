"""python -m charlm.doctor: every path this machine offers, as a matrix a user can read."""
import pytest
import torch

from conftest import run_cli


@pytest.mark.system
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
    assert "CPU bf16 matmuls are " in out
    path = next(line for line in out.splitlines() if line.startswith("CPU GRU time loops and decoding: "))
    if "fused C++ kernels" in path:  # and the two paths were checked against each other
        line = next(line for line in out.splitlines() if line.startswith("cpu fused kernels"))
        assert " ✓ " in line and "agree with PyTorch's operations" in line, line
        assert "threads; recurrent matmuls: fp32 by " in path and ", bf16 by " in path, path
    else:
        assert "PyTorch operations (" in path
    choice = next(line for line in out.splitlines() if "data=timemachine (256x2, batch 64x100) on cpu: " in line)
    assert "a training step took" in choice or "bf16 matmuls are no faster than fp32" in choice  # either CPU
    assert out.rstrip().endswith(" passed, 0 failed")
    assert list(tmp_path.iterdir()) == []  # it leaves nothing behind
