"""ONNX export: one decoding step that matches PyTorch in onnxruntime."""
import numpy as np
import pytest
import torch

from charlm import CharLM, ModelConfig
from charlm.data.tokenizer import START_BYTE
from helpers import TINY, run_cli

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_onnx_matches_pytorch_over_100_steps(tmp_path):
    from charlm.interop.onnx import export_onnx

    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=48, n_layers=2, dropout=0.2)).eval()  # trained with dropout
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    batch = 3  # not the batch size used for export: the batch is dynamic
    byte = torch.full((batch,), START_BYTE, dtype=torch.long)
    h_torch = model.init_hidden(batch)
    h_onnx = h_torch.numpy()
    worst = 0.0
    for _ in range(100):
        with torch.no_grad():
            lp_torch, h_torch = model(byte.unsqueeze(1), h_torch)
        lp_onnx, h_onnx = session.run(None, {"byte": byte.numpy(), "hidden": h_onnx})
        worst = max(worst, float(np.abs(lp_onnx - lp_torch[:, 0].numpy()).max()),
                    float(np.abs(h_onnx - h_torch.numpy()).max()))
        byte = lp_torch[:, 0].argmax(-1)  # feed the same bytes to both
    assert worst < 1e-4


def test_export_command(tmp_path, text_file):
    run_cli("train.py", "data=text", f"data.path={text_file}", *TINY, "train.max_steps=2",
            "train.eval_every=2", "out_dir=run", cwd=tmp_path)
    proc = run_cli("-m", "charlm.export", "checkpoint=run", "format=onnx", cwd=tmp_path)
    assert (tmp_path / "run" / "model.onnx").is_file()
    assert "byte (N,) int64" in proc.stdout
    assert "one decoding step" in run_cli("-m", "charlm.export", "--help", cwd=tmp_path).stdout
    bad = run_cli("-m", "charlm.export", "checkpoint=run", "format=tflite", cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "format must be onnx, keras, html or hf" in bad.stderr
