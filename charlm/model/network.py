"""The byte-level GRU language model: Embedding -> GRU x n_layers -> Linear -> LogSoftmax.

The GRU is nn.GRU (reset gate after the recurrent matmul, cuDNN on CUDA; on CPU in float32 its
layers run through charlm.model.fused_gru for training, which computes the same thing faster) or, with
model.cell=reset_before, charlm.model.gru.ResetBeforeGRU (the Trax/d2l cell).
"""
from __future__ import annotations

import torch
from torch import nn

from charlm.config import ModelConfig
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
        else:
            self.gru = nn.GRU(config.d_model, config.d_model, config.n_layers, dropout=between, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, VOCAB_SIZE)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) int64 bytes, h (n_layers, B, d_model) or None -> log_probs (B, T, 256), h.

        log_probs[:, t] is the distribution of the byte that follows x[:, t].
        """
        e = self.drop(self.embed(x))  # (B, T, D)
        if can_fuse(self.gru, e):
            out, h = fused_gru(self.gru, e, h)  # (B, T, D), (L, B, D)
        elif isinstance(self.gru, nn.GRU) and e.is_cuda and torch.is_autocast_enabled("cuda"):
            # Autocast runs cuDNN's RNN in float16 whatever dtype it was asked for (no loss
            # scaling, a half-precision state): this GRU stays float32 (charlm.device).
            with torch.autocast("cuda", enabled=False):
                out, h = self.gru(e.float(), None if h is None else h.float())
        else:
            out, h = self.gru(e, h)
        logits = self.head(self.drop(out))  # (B, T, 256)
        # at least float32 for the normalisation (a half-precision autocast would lose mass), and
        # a float32 state to carry, whatever precision computed it
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        return log_probs, h.float()

    def init_hidden(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zero hidden state (n_layers, batch_size, d_model): the start of a text."""
        return torch.zeros(self.config.n_layers, batch_size, self.config.d_model, device=device)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())
