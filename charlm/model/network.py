"""The byte-level language model: Embedding -> GRU (or LSTM) x n_layers -> Linear -> LogSoftmax.

The GRU is nn.GRU (reset gate after the recurrent matmul, cuDNN on CUDA; on CPU in float32 its
layers run through charlm.model.fused_gru for training, which computes the same thing faster) or, with
model.cell=reset_before, charlm.model.gru.ResetBeforeGRU (the Trax/d2l cell). model.cell=lstm is
nn.LSTM (oneDNN's fused kernel on the CPU, cuDNN on CUDA).

The recurrent state is one tensor (n_layers, B, state_size) for every cell, so that training,
resume, torchrun lanes and decoding carry it alike: h for a GRU (state_size = d_model), and
[h, c] side by side for the LSTM (state_size = 2 * d_model).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from charlm import plan
from charlm.config import ModelConfig
from charlm.model import head
from charlm.model.dropout import dropout
from charlm.model.fused_gru import can_fuse, fused_gru
from charlm.model.gru import ResetBeforeGRU

VOCAB_SIZE = 256  # every UTF-8 byte; no vocabulary file, no unknown token


class CharLM(nn.Module):
    """Predicts the next byte at every position of a byte sequence."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(VOCAB_SIZE, config.d_model)
        # nn.GRU applies dropout between layers only; the output dropout below covers the last.
        between = config.dropout if config.n_layers > 1 else 0.0
        if config.cell == "reset_before":
            self.gru: nn.Module = ResetBeforeGRU(config.d_model, config.d_model, config.n_layers, between)
        elif config.cell == "lstm":  # its weights are lstm.weight_ih_l0, ...: gate blocks i, f, g, o
            self.lstm = nn.LSTM(config.d_model, config.d_model, config.n_layers, dropout=between, batch_first=True)
        else:
            self.gru = nn.GRU(config.d_model, config.d_model, config.n_layers, dropout=between, batch_first=True)
        self.head = nn.Linear(config.d_model, VOCAB_SIZE)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) int64 bytes, h (n_layers, B, state_size) or None -> log_probs (B, T, 256), h.

        log_probs[:, t] is the distribution of the byte that follows x[:, t].
        """
        if self.reads_a_table(x):  # layer 0's input projection as a table of the bytes
            out, h = fused_gru(self.gru, x, h, embed=self.embed.weight)  # (B, T, D), (L, B, D)
            return self._head(out, h)
        p = self.config.dropout if self.config.embed_dropout else 0.0
        if self.config.cell == "reset_after" and can_fuse(self.gru, self.embed.weight):
            # looked up time-major, the order fused_gru runs in: no transposing copy either way,
            # and the embedding's gradient is summed from contiguous rows
            e = dropout(self.embed(x.t()), p, self.training).transpose(0, 1)
            out, h = fused_gru(self.gru, e, h)  # (B, T, D), (L, B, D)
            return self._head(out, h)
        e = dropout(self.embed(x), p, self.training)
        if self.config.cell == "lstm":
            hc = None if h is None else tuple(s.contiguous() for s in h.float().chunk(2, dim=-1))
            with torch.autocast("cuda", enabled=False) if e.is_cuda and torch.is_autocast_enabled("cuda") else _same():
                out, (h_n, c_n) = _run_lstm(self.lstm, e.float() if e.is_cuda else e, hc)  # cuDNN stays float32
            h = torch.cat([h_n, c_n], dim=-1)  # (L, B, 2D)
        elif isinstance(self.gru, nn.GRU) and e.is_cuda and torch.is_autocast_enabled("cuda"):
            # Autocast runs cuDNN's RNN in float16 whatever dtype it was asked for (no loss
            # scaling, a half-precision state): this GRU stays float32 (charlm.device).
            with torch.autocast("cuda", enabled=False):
                out, h = self.gru(e.float(), None if h is None else h.float())
        else:
            out, h = self.gru(e, h)
        return self._head(out, h)

    def reads_a_table(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs fused_gru from the bytes (GRUTableLayer): the plan's table on, a
        GRU on the fused path, at least 256 positions (the table's rows), no dropout on the embeddings."""
        embed_dropout = self.training and self.config.dropout > 0 and self.config.embed_dropout
        return (self.config.cell == "reset_after" and x.numel() >= VOCAB_SIZE and not embed_dropout
                and plan.current().table == "on" and can_fuse(self.gru, self.embed.weight))

    def _head(self, out: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dropout(out, self.config.dropout, self.training)
        if head.can_fuse(self.head, x):  # the same, in fewer passes over the logits
            return head.log_softmax_head(self.head, x), h.float()
        logits = self.head(x)  # (B, T, 256)
        # at least float32 for the normalisation (a half-precision autocast would lose mass), and
        # a float32 state to carry, whatever precision computed it
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        return log_probs, h.float()

    @property
    def recurrent(self) -> nn.Module:
        """The stacked recurrent layers: self.gru (either GRU cell) or self.lstm."""
        return self.lstm if self.config.cell == "lstm" else self.gru

    @property
    def state_size(self) -> int:
        """Width of the recurrent state per layer: d_model (GRU), or 2 * d_model for the LSTM's [h, c]."""
        return 2 * self.config.d_model if self.config.cell == "lstm" else self.config.d_model

    def init_hidden(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zero recurrent state (n_layers, batch_size, state_size): the start of a text."""
        return torch.zeros(self.config.n_layers, batch_size, self.state_size, device=device)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict's names and shapes for config, computed, not built: what a checkpoint is
    checked against before a model of its size is allocated (tests hold it to the model's own)."""
    d = config.d_model
    rnn, gates = ("lstm", 4) if config.cell == "lstm" else ("gru", 3)
    layers = {f"{rnn}.{name}_l{k}": shape for k in range(config.n_layers)
              for name, shape in (("weight_ih", (gates * d, d)), ("weight_hh", (gates * d, d)),
                                  ("bias_ih", (gates * d,)), ("bias_hh", (gates * d,)))}
    return {"embed.weight": (VOCAB_SIZE, d), **layers, "head.weight": (VOCAB_SIZE, d), "head.bias": (VOCAB_SIZE,)}


def _run_lstm(lstm: nn.LSTM, x: torch.Tensor, hc: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    """nn.LSTM through oneDNN's fused kernel or PyTorch's own loop on the CPU, as the plan says
    (plan.lstm: oneDNN finds no LSTM implementation on some instruction sets, e.g. with
    ONEDNN_MAX_CPU_ISA=AVX2, and the two round differently)."""
    if x.device.type != "cpu":
        return lstm(x, hc)
    # the plan's choice; under an autocast of the caller's own (outside a run's plan), the same
    # check the plan makes for bf16 (charlm.plan.onednn_lstm_works)
    bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if plan.current().lstm == "onednn" and (not bf16 or plan.onednn_lstm_works(True)):
        return lstm(x, hc)
    with warnings.catch_warnings():  # flags() also sets TF32 and warns that there is no Intel GPU
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            return lstm(x, hc)


def _same() -> contextlib.AbstractContextManager:
    """No change of autocast (the CPU's bf16 autocast runs nn.LSTM through oneDNN in bf16)."""
    return contextlib.nullcontext()
