"""Where a model runs and in which precision: device names, and the fp32-or-bf16 choice.

What each part of CharLM computes in, per precision (the run header prints the line that applies):

    fp32   everything float32
    bf16   autocast: the output layer and the GRU's matmuls in bfloat16; the embedding, the
           log-softmax, the weights, the optimizer state and the carried hidden state in float32.
           On CUDA, nn.GRU (cuDNN) stays float32: autocast would run it in float16, not bfloat16.

bf16 on a CPU without bf16 instructions (no AMX, no AVX-512 BF16) is emulated: correct but slow,
so the tests can run it anywhere. With AVX-512 BF16 but no AMX (Intel's Xeons where AMX is off or
hidden) bf16 matmuls are native yet no faster than fp32's. precision=auto takes bf16 where the
device does bf16 matmuls faster than fp32, by what it has (charlm.plan.auto_precision), never by
timing: the precision is one part of the run's plan.
"""
from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch

from charlm.errors import CharlmError


def mps_available() -> bool:
    """Whether PyTorch can use an Apple GPU (Metal Performance Shaders) here."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str, key: str = "device") -> torch.device:
    """auto -> cuda when present, else Apple's mps, else cpu; a GPU that is not there is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if name == "mps" and not mps_available():
        raise CharlmError(f"{key}=mps but this machine has no Apple GPU that PyTorch can use (mps needs Apple"
                          f" Silicon, macOS 12.3 or newer and a PyTorch built with it); use {key}=cpu or {key}=auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CharlmError(f"{key}={name} but no CUDA GPU is available; use {key}=cpu or {key}=auto")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise CharlmError(
                f"{key}={name} but this machine has {torch.cuda.device_count()} GPU(s), cuda:0"
                f" to cuda:{torch.cuda.device_count() - 1}"
            )
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in, and why it was chosen (kept in checkpoints as plain data)."""

    bf16: bool
    why: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self, device: torch.device) -> torch.autocast:
        """The context a training step's forward pass runs in."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def parts(self, cell: str, device: torch.device) -> str:
        """What actually computes in which precision, part by part."""
        if not self.bf16:
            return "everything float32"
        if cell == "lstm":
            gru = "LSTM bf16 (oneDNN)" if device.type == "cpu" else "LSTM fp32 (cuDNN; autocast would make it fp16)"
        elif cell == "reset_before":
            gru = "GRU matmuls and gates bf16"
        elif device.type == "cuda":
            gru = "GRU fp32 (cuDNN; autocast would make it fp16)"
        else:
            gru = "GRU matmuls bf16, gates fp32"
        return f"embedding fp32, {gru}, output layer bf16, log-softmax fp32; weights and hidden state float32"


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the
    system: a training step allocates its activations anew, and memory handed back is faulted in
    again page by page, tens of thousands of page faults a default Time Machine step. True where
    it took effect (glibc, Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def plan_precision(name: str, why: str) -> Precision:
    """The Precision of a plan's precision part (fp32, bf16), with the reason it was chosen."""
    return Precision(name == "bf16", why)
