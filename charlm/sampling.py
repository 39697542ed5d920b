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
    top_p: Optional[float] = None,
) -> torch.Tensor:
    """Choose the next byte from log_probs (N, 256) -> (N,) int64.

    temperature 0 is greedy (argmax); otherwise sample from softmax(log_probs / temperature),
    keeping only the top_k most likely bytes, and/or the smallest set of most likely bytes whose
    probability reaches top_p (nucleus sampling), when given.
    """
    if temperature == 0:
        return log_probs.argmax(dim=-1)
    logits = log_probs.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a byte when the bytes before it already reach top_p (the first is always kept)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
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
    top_p: Optional[float] = None,
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
            byte = next_byte(log_probs[:, -1], temperature, top_k, generator, top_p)  # (N,)
            yield byte
            x = byte.unsqueeze(1)  # (N, 1): one step per new byte
    finally:
        model.train(was_training)


def sample_text(model: CharLM, prompt: str, length: int, stop: str = "", **kwargs) -> list[str]:
    """The prompt plus up to `length` new bytes, decoded, for each of num_samples samples.

    With `stop`, each sample ends just after the first occurrence of stop in its new text.
    """
    num_samples = kwargs.get("num_samples", 1)
    stop_bytes = stop.encode("utf-8")
    steps: list[torch.Tensor] = []
    done = None  # (N,) bool: the sample's new text already holds stop
    for byte in generate(model, prompt.encode("utf-8"), length, **kwargs):
        steps.append(byte)
        if stop_bytes and len(steps) >= len(stop_bytes):  # end early once every sample holds stop
            tail = torch.stack(steps[-len(stop_bytes):], dim=1)  # (N, len(stop))
            hit = (tail == torch.tensor(list(stop_bytes), device=tail.device)).all(dim=1)
            done = hit if done is None else done | hit
            if bool(done.all()):
                break
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(num_samples)]
    if stop_bytes:  # cut each sample just after its first occurrence of stop
        cut = [bytes(r).find(stop_bytes) for r in rows]
        rows = [r[: c + len(stop_bytes)] if c >= 0 else r for r, c in zip(rows, cut)]
    return [prompt + decode(row) for row in rows]


def stream_text(model: CharLM, prompt: str, length: int, stop: str = "", **kwargs) -> Iterator[str]:
    """Pieces of text for one sample as they are generated (partial UTF-8 held back).

    With `stop`, the text ends just after the first occurrence of stop in the new text.
    """
    decoder = StreamDecoder()
    stop_bytes = stop.encode("utf-8")
    tail = b""
    for byte in generate(model, prompt.encode("utf-8"), length, num_samples=1, **kwargs):
        b = int(byte[0])
        piece = decoder.feed(b)
        if piece:
            yield piece
        if stop_bytes:
            tail = (tail + bytes((b,)))[-len(stop_bytes):]
            if tail == stop_bytes:
                break
    rest = decoder.finish()
    if rest:
        yield rest
