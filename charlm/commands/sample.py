"""python sample.py: write text with a trained model, streamed; interactive=true writes one text in
turns with the user; explain=true shows each byte's candidates and every layer's gates."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from charlm.commands.settings import to_object, with_raw
from charlm.config import SampleConfig
from charlm.errors import CharlmError


def main(argv: list[str], usage: str, raw: dict[str, str]) -> None:
    """`python sample.py`: raw holds the prompt, stop text and file names exactly as typed."""
    from charlm.commands import run_composed

    run_composed("sample", argv, usage, lambda cfg, overrides, sweep_dir: run_sample(cfg, raw))


def run_sample(cfg: DictConfig, raw: dict[str, str]) -> None:
    """The composed config with the raw arguments, as a SampleConfig, sampled."""
    sample(to_object(with_raw(cfg, raw), SampleConfig))


def read_prompt(cfg: SampleConfig) -> str:
    """The prompt text: prompt=, or the contents of prompt_file= (UTF-8)."""
    if not cfg.prompt_file:
        return cfg.prompt
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise CharlmError(f"prompt_file={path} is not a file")
    return path.read_bytes().decode("utf-8", errors="surrogateescape")  # bytes kept as they are


def sample(cfg: SampleConfig) -> None:
    """Print the prompt and `length` new bytes (per sample) to stdout, streamed, following the plan
    cfg.plan resolves to (the kernels that decode).

    With stop=..., a sample ends after the first occurrence of that text instead.
    """
    from charlm import plan as plans

    with plans.use(plans.resolve(cfg.plan, "cpu", "fp32")[0]):
        _sample(cfg)


def _sample(cfg: SampleConfig) -> None:
    import random

    import torch  # only once the config is known to be good

    from charlm.checkpoint import held, load_checkpoint, locate_checkpoint, model_from_state
    from charlm.device import resolve_device
    from charlm.inference.sampling import sample_text, stream_text

    path = locate_checkpoint(cfg.checkpoint)
    state = load_checkpoint(path)
    device = resolve_device(cfg.device)
    model = model_from_state(state).to(device).eval()
    prompt = read_prompt(cfg)
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    generator = torch.Generator(device=device).manual_seed(seed)
    bf16 = " | bf16 matmuls" if cfg.precision == "bf16" else ""
    print(f"[{path} | {held(state)} | temperature {cfg.temperature} | seed {seed}{bf16}]", file=sys.stderr)
    if cfg.explain:
        return _explain(model, prompt, cfg, generator)
    if cfg.interactive:
        return _interactive(model, prompt, cfg, generator)
    kwargs = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=cfg.stop, generator=generator,
                  precision=cfg.precision)
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


def _interactive(model: Any, prompt: str, cfg: SampleConfig, generator: Any) -> None:
    """sample.py interactive=true: a line in, `length` bytes of continuation out, one text throughout.

    On a terminal a hint and a "> " prompt go to stderr; through a pipe nothing but the model's
    text is written, each turn ending with a line break, so a script can drive it.
    """
    from charlm.inference.sampling import Conversation

    terminal = sys.stdin.isatty()
    talk = Conversation(model, cfg.temperature, cfg.top_k, cfg.top_p, generator, cfg.precision)

    def turn(text: str) -> None:
        talk.read(text.encode("utf-8", "surrogateescape"))
        written = ""
        for piece in talk.write_text(cfg.length, cfg.stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
            written = piece
        # a turn ends with a line break: the model's own (stop=$'\n': one line per turn), or one added
        sys.stdout.write("" if written.endswith("\n") else "\n")
        sys.stdout.flush()

    if terminal:
        print("Type a line and press Enter: the model continues it. An empty line lets it go on;"
              " Ctrl-D ends.", file=sys.stderr)
    if prompt:
        sys.stdout.write(prompt)
        turn(prompt)
    try:
        while True:
            if terminal:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # Ctrl-D, or the end of the piped input
                break
            turn(line.rstrip("\r\n"))
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(130)


def _explain(model: Any, prompt: str, cfg: SampleConfig, generator: Any) -> None:
    """sample.py explain=true: each generated byte with its top 5 and every layer's gates."""
    from charlm.inference.explain import explain_steps, format_json, format_step

    text = prompt.encode("utf-8", "surrogateescape")
    for s in explain_steps(model, text, cfg.length, cfg.temperature, cfg.top_k, cfg.top_p, generator):
        print(format_json(s) if cfg.explain_format == "json" else format_step(s) + "\n", flush=True)
        text += bytes((s["byte"],))
    if cfg.explain_format == "text":
        print("text: " + text.decode("utf-8", errors="replace"))
