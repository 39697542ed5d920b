"""The one decoder: sample.py, the trainer's in-training samples and the Python API use it."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from charlm.data.tokenizer import START_BYTE, StreamDecoder, decode
from charlm.model import native
from charlm.model.network import CharLM
from charlm.model.stepping import Stepper

# Bytes written per kernel call where Stepper.write can: enough to spread the call's own cost,
# few enough that a consumer that stops reading mid-chunk leaves the state and the generator at
# most this many bytes ahead.
WRITE_CHUNK = 32
# Bytes of a prompt read per call: the memory a prompt takes (the activations and the 256 outputs
# of each byte read at once) stays bounded, whatever its length.
PROMPT_CHUNK = 4096


@torch.no_grad()
def read_through(model: CharLM, data: bytes, h: Optional[torch.Tensor] = None, num_samples: int = 1
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Read data into the model's state, PROMPT_CHUNK bytes a call, from the start byte where h is
    None -> (log-probabilities of the byte after data (N, 256), the state), or (None, h) when
    there was nothing to read."""
    device = next(model.parameters()).device
    seq = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if h is None:
        seq = torch.cat([torch.tensor([START_BYTE], dtype=torch.uint8), seq])
    log_probs = None
    for start in range(0, len(seq), PROMPT_CHUNK):
        piece = seq[start : start + PROMPT_CHUNK].to(device=device, dtype=torch.long)
        out, h = model(piece.unsqueeze(0).expand(num_samples, -1), h)
        log_probs = out[:, -1]
    return log_probs, h


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
    if top_k is None and top_p is None and log_probs.device.type == "cpu":
        ops = native.ops()
        if ops is not None:  # the same draw in one call (kernels/decoding.cpp)
            return ops.draw(log_probs, float(temperature), generator)
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
    # Inverse-CDF sampling: one uniform number per row, where torch.multinomial draws one per
    # byte (256 per row). The draw stays strictly below the total, so it always lands on a byte
    # with probability above zero.
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


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
    precision: str = "fp32",
) -> Iterator[torch.Tensor]:
    """Yield `length` new bytes, one (num_samples,) tensor per step, continuing prompt.

    The prompt is read once, after the start byte; then each new byte costs one GRU step with
    the hidden state carried (never a re-run of the whole sequence), and the bytes stay on the
    model's device until the caller reads them. precision="bf16" takes those steps with the
    matmuls in bfloat16 (Stepper); the prompt is read in float32 either way.
    """
    was_training = model.training
    model.eval()
    try:
        if length == 0:
            return
        log_probs, h = read_through(model, prompt, num_samples=num_samples)  # the prompt, once
        step = Stepper(model, precision)
        if step.can_write(temperature, top_k, top_p):  # WRITE_CHUNK bytes a kernel call
            for start in range(0, length, WRITE_CHUNK):
                chunk, log_probs, h = step.write(log_probs, h, temperature, min(WRITE_CHUNK, length - start), generator)
                yield from chunk
            return
        for i in range(length):
            byte = next_byte(log_probs, temperature, top_k, generator, top_p)  # (N,)
            yield byte
            if i + 1 < length:
                log_probs, h, _ = step(byte, h)
    finally:
        model.train(was_training)


def sample_text(model: CharLM, prompt: str, length: int, stop: str = "", **kwargs) -> list[str]:
    """The prompt plus up to `length` new bytes, decoded, for each of num_samples samples.

    With `stop`, each sample ends just after the first occurrence of stop in its new text.
    """
    num_samples = kwargs.get("num_samples", 1)
    stop_bytes = stop.encode("utf-8", "surrogateescape")
    steps: list[torch.Tensor] = []
    done = None  # (N,) bool: the sample's new text already holds stop
    for byte in generate(model, prompt.encode("utf-8", "surrogateescape"), length, **kwargs):
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

    With `stop`, the text ends just after the first occurrence of stop in the new text. kwargs:
    temperature, top_k, top_p, generator, precision.
    """
    was_training = model.training
    try:
        talk = Conversation(model, **kwargs)
        talk.read(prompt.encode("utf-8", "surrogateescape"))
        yield from talk.write_text(length, stop)
    finally:
        model.train(was_training)


class Conversation:
    """One text written in turns (sample.py interactive=true, and stream_text's single turn):
    read() takes text into the model's state, write() continues it; the hidden state carries
    across both, so the turns are one text. The first read starts from the start byte."""

    def __init__(self, model: CharLM, temperature: float = 0.8, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 precision: str = "fp32"):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.stepper = Stepper(model, precision)
        self.h: Optional[torch.Tensor] = None  # None: nothing read yet
        self.log_probs = torch.empty(0)

    @torch.no_grad()
    def read(self, data: bytes) -> None:
        """Take data into the text."""
        log_probs, self.h = read_through(self.model, data, self.h)
        if log_probs is not None:
            self.log_probs = log_probs

    @torch.no_grad()
    def write(self, length: int, stop: bytes = b"") -> Iterator[int]:
        """Up to `length` new bytes, each part of the text once chosen; ends after `stop` if it appears."""
        if self.h is None:
            self.read(b"")
        tail = b""
        if self.stepper.can_write(self.temperature, self.top_k, self.top_p):  # WRITE_CHUNK bytes a kernel call
            written = 0
            while written < length:
                chunk, self.log_probs, self.h = self.stepper.write(
                    self.log_probs, self.h, self.temperature, min(WRITE_CHUNK, length - written), self.generator,
                    stop, tail)
                got = bytes(chunk[:, 0].tolist())
                yield from got
                written += len(got)
                tail = (tail + got)[-len(stop):] if stop else b""
                if stop and tail == stop:
                    return
            return
        for _ in range(length):
            byte = next_byte(self.log_probs, self.temperature, self.top_k, self.generator, self.top_p)
            self.log_probs, self.h, _ = self.stepper(byte, self.h)
            b = int(byte[0])
            yield b
            if stop:
                tail = (tail + bytes((b,)))[-len(stop):]
                if tail == stop:
                    return

    def write_text(self, length: int, stop: str = "") -> Iterator[str]:
        """write() decoded as it goes: an incomplete UTF-8 character is held back until its last
        byte (or the end of the turn, where it becomes U+FFFD)."""
        decoder = StreamDecoder()
        for byte in self.write(length, stop.encode("utf-8", "surrogateescape")):
            piece = decoder.feed(byte)
            if piece:
                yield piece
        rest = decoder.finish()
        if rest:
            yield rest
