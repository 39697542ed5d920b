"""The one decoder: sample.py, the trainer's in-training samples and the Python API use it."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .model import CharLM
from .tokenizer import START_BYTE, StreamDecoder, decode


def next_byte(
    log_probs: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """Choose the next byte from log_probs (N, 256) -> (N,) int64.

    temperature 0 is greedy (argmax); otherwise sample from softmax(log_probs / temperature),
    keeping only the top_k most likely bytes when top_k is given.
    """
    if temperature == 0:
        return log_probs.argmax(dim=-1)
    logits = log_probs.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CharLM,
    prompt: bytes,
    length: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Iterator[torch.Tensor]:
    """Yield `length` new bytes, one (num_samples,) tensor per step, continuing prompt.

    The prompt is read once, after the start byte; then each new byte costs one GRU step with
    the hidden state carried (never a re-run of the whole sequence).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        context = torch.tensor([START_BYTE, *prompt], dtype=torch.long, device=device)
        x = context.unsqueeze(0).expand(num_samples, -1)  # (N, 1 + len(prompt))
        h = None
        for _ in range(length):
            log_probs, h = model(x, h)
            byte = next_byte(log_probs[:, -1], temperature, top_k, generator)  # (N,)
            yield byte
            x = byte.unsqueeze(1)  # (N, 1): one step per new byte
    finally:
        model.train(was_training)


def sample_text(model: CharLM, prompt: str, length: int, **kwargs) -> list[str]:
    """The prompt plus `length` new bytes, decoded, for each of num_samples samples."""
    steps = list(generate(model, prompt.encode("utf-8"), length, **kwargs))
    if not steps:
        return [prompt] * kwargs.get("num_samples", 1)
    new = torch.stack(steps, dim=1).tolist()  # (N, length)
    return [prompt + decode(row) for row in new]


def stream_text(model: CharLM, prompt: str, length: int, **kwargs) -> Iterator[str]:
    """Pieces of text for one sample as they are generated (partial UTF-8 held back)."""
    decoder = StreamDecoder()
    for byte in generate(model, prompt.encode("utf-8"), length, num_samples=1, **kwargs):
        piece = decoder.feed(int(byte[0]))
        if piece:
            yield piece
    tail = decoder.finish()
    if tail:
        yield tail
