"""ONNX export of one decoding step, the shape incremental decoding needs:

    byte (N,) int64, hidden (n_layers, N, d_model) float32
        -> log_probs (N, 256) float32, hidden_out (n_layers, N, d_model) float32

N (the batch) is dynamic. Start with byte 0 (start of text) and a zero hidden state, feed the
prompt one byte at a time, then feed back each chosen byte with hidden_out.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from charlm.files import write_file
from charlm.model.network import CharLM


class DecodeStep(nn.Module):
    """One byte in, the next byte's log-probabilities and the new hidden state out."""

    def __init__(self, model: CharLM):
        super().__init__()
        self.model = model

    def forward(self, byte: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, hidden_out = self.model(byte.unsqueeze(1), hidden)  # (N, 1, 256), (L, N, state)
        return log_probs[:, 0], hidden_out


def export_onnx(model: CharLM, out: str | Path, opset: int = 17) -> Path:
    """Write model's single decoding step to out as ONNX (dynamic batch)."""
    out = Path(out)
    model = copy.deepcopy(model).eval().cpu()
    if isinstance(model.recurrent, (nn.GRU, nn.LSTM)):
        # Dropout between layers does nothing at inference, but the exporter wires a stacked
        # nn.GRU that has it differently: the graph then computes other numbers (0.15 nats off).
        model.recurrent.dropout = 0.0
    step = DecodeStep(model)
    byte = torch.zeros(2, dtype=torch.long)
    hidden = model.init_hidden(2)
    with warnings.catch_warnings():
        # The tracer's notes on nn.GRU's shape checks, the legacy exporter's deprecation, and the
        # GRU batch-size caution (hidden is an input here, so any batch size runs) do not apply.
        warnings.simplefilter("ignore")
        graph = _export(step, byte, hidden, opset)
    write_file(out, graph, "out")
    return out


def _export(step: DecodeStep, byte: torch.Tensor, hidden: torch.Tensor, opset: int) -> bytes:
    """The graph as the bytes of an .onnx file (written by the caller, atomically)."""
    buffer = io.BytesIO()
    torch.onnx.export(
        step,
        (byte, hidden),
        buffer,
        input_names=["byte", "hidden"],
        output_names=["log_probs", "hidden_out"],
        dynamic_axes={"byte": {0: "batch"}, "hidden": {1: "batch"},
                      "log_probs": {0: "batch"}, "hidden_out": {1: "batch"}},
        opset_version=opset,
        dynamo=False,  # the TorchScript exporter maps nn.GRU to ONNX's own GRU operator
    )
    return buffer.getvalue()
