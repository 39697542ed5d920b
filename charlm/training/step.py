"""One optimisation step, and what it needs: the optimizer, the text's splits."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from charlm.config import RunConfig, TrainConfig
from charlm.data.batches import split
from charlm.data.text import corpus_path, identity, is_glob, load_bytes, text_files
from charlm.device import Precision
from charlm.errors import CharlmError
from charlm.model.network import CharLM


def make_optimizer(model: CharLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases): param_groups[0] decays, [1] does not.

    PyTorch's fused AdamW where the weights are on the CPU or a CUDA GPU: one kernel for every
    tensor, where PyTorch's default on the CPU is a Python loop over them."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=fused or None)


def load_splits(cfg: RunConfig, announce: Optional[Callable[[str], None]] = None
                ) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """(train bytes, the val bytes each evaluation scores, all val bytes, the text's identity) of
    cfg's text (announce hears of a download)."""
    path = corpus_path(cfg.data, announce)
    files, binary = text_files(path) if path.is_dir() or is_glob(path) else (None, 0)
    text = load_bytes(path, cfg.data.separator, cfg.data.cache_dir, files)
    if files is not None and announce:
        skipped = f", {binary} binary file{'s' if binary != 1 else ''} skipped" if binary else ""
        announce(f"data.path={path}: {len(files)} text files{skipped}, {len(text):,} bytes in sorted order"
                 f" ({files[0]} ... {files[-1]}), data.separator={cfg.data.separator} between them")
    corpus = identity(path, text, files)
    splits = split(text, cfg.data.train_frac, cfg.data.val_frac)
    train_data, val_data = splits["train"], splits["val"]
    if len(val_data) == 0:
        raise CharlmError(
            f"{path} ({len(text):,} bytes) leaves no validation text at"
            f" data.val_frac={cfg.data.val_frac}; use a longer text or raise data.val_frac"
        )
    if cfg.train.batching == "random" and len(train_data) < cfg.train.seq_len:
        raise CharlmError(
            f"the training text ({len(train_data):,} bytes) is shorter than train.seq_len={cfg.train.seq_len};"
            " lower train.seq_len or use more text"
        )
    scored = val_data[: cfg.train.eval_bytes] if cfg.train.eval_bytes else val_data
    return train_data, scored, len(val_data), corpus


def train_step(
    net: torch.nn.Module, model: CharLM, optimizer: torch.optim.Optimizer, precision: Precision,
    x: torch.Tensor, y: torch.Tensor, h: Optional[torch.Tensor], grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Forward and backward of one batch, gradients clipped: x, y (B, T) bytes, h (L, B, D) or None
    -> (loss, new hidden state, gradient norm). The caller applies it with optimizer.step()."""
    with precision.autocast(x.device):
        log_probs, h_new = net(x, h)
        loss = F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
    return loss, h_new, grad_norm
