"""`python sample.py`: load a trained model and stream text from a prompt."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, locate_checkpoint, model_from_state
from .config import SampleConfig
from .errors import CharlmError
from .sampling import sample_text, stream_text
from .device import resolve_device


def read_prompt(cfg: SampleConfig) -> str:
    """The prompt text: prompt=, or the contents of prompt_file= (UTF-8)."""
    if not cfg.prompt_file:
        return cfg.prompt
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise CharlmError(f"prompt_file={path} is not a file")
    return path.read_bytes().decode("utf-8", errors="replace")


def sample(cfg: SampleConfig) -> None:
    """Print the prompt and `length` new bytes (per sample) to stdout, streamed.

    With stop=..., a sample ends after the first occurrence of that text instead.
    """
    path = locate_checkpoint(cfg.checkpoint)
    state = load_checkpoint(path)
    device = resolve_device(cfg.device)
    model = model_from_state(state).to(device).eval()
    prompt = read_prompt(cfg)
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    generator = torch.Generator(device=device).manual_seed(seed)
    print(
        f"[{path} | step {state['step']} | val loss {state['best_val_loss']:.4f} | "
        f"temperature {cfg.temperature} | seed {seed}]",
        file=sys.stderr,
    )
    if cfg.explain:
        from .explain import explain_steps, format_json, format_step

        text = prompt.encode("utf-8")
        for s in explain_steps(model, prompt.encode("utf-8"), cfg.length, cfg.temperature, cfg.top_k,
                               cfg.top_p, generator):
            print(format_json(s) if cfg.explain_format == "json" else format_step(s) + "\n", flush=True)
            text += bytes((s["byte"],))
        if cfg.explain_format == "text":
            print("text: " + text.decode("utf-8", errors="replace"))
        return
    kwargs = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=cfg.stop, generator=generator)
    if cfg.num_samples == 1:
        sys.stdout.write(prompt)
        for piece in stream_text(model, prompt, cfg.length, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for i, text in enumerate(sample_text(model, prompt, cfg.length, num_samples=cfg.num_samples, **kwargs)):
        if i:
            print("-" * 40)
        print(text)
