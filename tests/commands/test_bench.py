"""python -m charlm.bench prints its table; a precision that does not exist is one line."""
import pytest

from helpers import run_cli


def test_bad_precision_is_one_line(tmp_path):
    proc = run_cli("train.py", "train.precision=fp8", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: train.precision must be auto, fp32 or bf16, got 'fp8'"


@pytest.mark.slow
def test_bench_prints_its_table(tmp_path):
    proc = run_cli("-m", "charlm.bench", "models=given", "d_model=16", "batch_size=4", "seq_len=8", "steps=1",
                   "reps=2", "sample_reps=1", cwd=tmp_path)
    out = proc.stdout
    for line in ("matmul peak at the start", "peak beside it (median) ", "% of the fp32 peak",
                 "plain nn.GRU loop", "charlm step",
                 "ratio charlm / plain", "batch 1   fp32", "batch 1   bf16", "batch 64  fp32", "batch 64  bf16",
                 "2,000 vs 500 bytes cost", "peak memory:"):
        assert line in out, out
    bad = run_cli("-m", "charlm.bench", "batch_size=0", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "batch_size must be at least 1" in bad.stderr


def test_the_bench_reads_the_time_machine_that_ships_from_any_directory(tmp_path, monkeypatch):
    import torch

    from charlm.commands.bench import _batches
    from charlm.data.corpora import PACKAGED

    monkeypatch.chdir(tmp_path)  # no data/ here
    book = (PACKAGED / "timemachine.txt").read_bytes()
    (x, y), = _batches(1, 4, 64, torch.device("cpu"))
    for row in range(4):
        window = bytes(x[row].tolist()) + bytes(y[row, -1:].tolist())
        assert window in book  # a window of the book, not random bytes
