"""python evaluate.py: score a text with a trained model (bytes, nats/byte, perplexity, bits/byte),
statically and with dynamic evaluation, and write the page of the text read through the model."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from charlm.commands.settings import to_object, with_raw
from charlm.config import EvaluateConfig
from charlm.errors import CharlmError
from charlm.files import output_file

EVALUATE_SEQ_LEN = 512  # bytes per window for evaluate.py (one stream: the window only sets the work per call)


def main(argv: list[str], usage: str, raw: dict[str, str]) -> None:
    """`python evaluate.py`: raw holds the file names exactly as typed."""
    from charlm.commands import run_composed

    run_composed("evaluate", argv, usage, lambda cfg, overrides, sweep_dir: run_evaluate(cfg, overrides, raw))


def run_evaluate(cfg: DictConfig, overrides: list[str], raw: dict[str, str]) -> None:
    """The composed config with the raw arguments, as an EvaluateConfig, scored. Without data= on the
    command line the checkpoint's own text is scored."""
    config = to_object(with_raw(cfg, raw), EvaluateConfig)
    given = [o.lstrip("+~").split("=")[0].split(".")[0] for o in [*overrides, *raw]]
    evaluate(config, data_given="data" in given)


def evaluate(cfg: EvaluateConfig, data_given: bool = True) -> dict[str, Any]:
    """`python evaluate.py`: score a split (or a whole file) and print the figures.

    Without data= on the command line (data_given False), the checkpoint's own corpus is scored.
    The plan cfg.plan resolves to says which kernels score it.
    """
    from charlm import plan as plans

    with plans.use(plans.resolve(cfg.plan, "cpu", "fp32")[0]):
        return _evaluate(cfg, data_given)


def _evaluate(cfg: EvaluateConfig, data_given: bool) -> dict[str, Any]:
    from charlm.inference.scoring import dynamic_loss, evaluate_loss, metrics

    path, model, text_path, which, data = _scored_text(cfg, data_given)
    if cfg.html:  # checked before the scoring, which may take minutes
        output_file(cfg.html, "html", "page.html", inputs=[path, text_path])
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with _bar(len(data), "scoring") as bar:
        loss, n = evaluate_loss(model, data, seq_len=EVALUATE_SEQ_LEN, lanes=1, device=device, progress=bar.update)
    result = {"checkpoint": str(path), "data": str(text_path), "split": which, "bytes": n, **metrics(loss),
              "seconds": round(time.perf_counter() - t0, 3)}
    if cfg.dynamic:
        t0 = time.perf_counter()
        with _bar(len(data), "dynamic") as bar:
            dyn, _ = dynamic_loss(model, data, cfg.dynamic_window, cfg.dynamic_lr, device, progress=bar.update)
        result.update({f"dynamic_{k}": v for k, v in metrics(dyn).items()},
                      dynamic_lr=cfg.dynamic_lr, dynamic_window=cfg.dynamic_window,
                      dynamic_seconds=round(time.perf_counter() - t0, 3))
    if cfg.html:
        result["html"] = str(_write_html(cfg, model, path, text_path, which, data, result["bpb"]))
    if cfg.format == "json":
        print(json.dumps(result, allow_nan=False))
        return result
    lines = [f"{text_path} [{which}] scored by {path}", f"bytes:       {n:,}"]
    rows = [("loss", "loss", " nats/byte", ".4f"), ("perplexity", "perplexity", "", ".3f"),
            ("bits/byte", "bpb", "", ".4f")]
    if cfg.dynamic:
        lines.append(f"{'':13}{'static':>10}  {'dynamic':>10}   (dynamic_lr={cfg.dynamic_lr:g},"
                     f" dynamic_window={cfg.dynamic_window})")
        lines += [f"{name + ':':13}{result[key]:>10{fmt}}  {result['dynamic_' + key]:>10{fmt}}{unit}"
                  for name, key, unit, fmt in rows]
    else:
        lines += [f"{name + ':':13}{result[key]:{fmt}}{unit}" for name, key, unit, fmt in rows]
    if cfg.html:
        lines.append(f"page:        {result['html']}")
    print("\n".join(lines))
    return result


LONG = 100_000  # bytes from which a scoring shows its progress


def _bar(total: int, what: str) -> Any:
    """Progress on stderr for a long scoring (stdout keeps just the figures): a bar on a terminal,
    elsewhere (a log file, a pipe) a plain line at every tenth of the text."""
    from tqdm import tqdm

    if total >= LONG and not sys.stderr.isatty():
        return _Lines(total, what)
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, file=sys.stderr, leave=False,
                disable=None if total >= LONG else True)


class _Lines:
    """`scoring: 30% (300,000 of 1,000,000 bytes)` lines, for output that is not a terminal."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done, self.said = total, what, 0, 0

    def update(self, n: int) -> None:
        self.done += n
        tenth = 10 * self.done // self.total
        if tenth > self.said:
            self.said = tenth
            print(f"{self.what}: {10 * tenth}% ({self.done:,} of {self.total:,} bytes)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_Lines":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _scored_text(cfg: EvaluateConfig, data_given: bool) -> tuple[Path, Any, Path, str, Any]:
    """(checkpoint path, its model on cfg.device, the text's path, the split's name, its bytes).

    Without data= on the command line the checkpoint's own text and split fractions are used; the
    split defaults to test, else val (said on stderr), or the whole file for data=text.
    """
    from charlm.checkpoint import load_checkpoint, locate_checkpoint, model_from_state, run_settings
    from charlm.config import DataConfig
    from charlm.data.batches import split
    from charlm.data.text import corpus_path, load_bytes
    from charlm.device import resolve_device

    path = locate_checkpoint(cfg.checkpoint)
    device = resolve_device(cfg.device)
    state = load_checkpoint(path)
    model = model_from_state(state).to(device)
    data_cfg = cfg.data if data_given else DataConfig(**run_settings(state)["data"])
    text_path = corpus_path(data_cfg, lambda message: print(message, file=sys.stderr))
    data = load_bytes(text_path, data_cfg.separator, data_cfg.cache_dir)
    parts = split(data, data_cfg.train_frac, data_cfg.val_frac)
    which, note = cfg.split, ""
    if which is None and data_given and data_cfg.name == "text":
        which = "all"  # a file of one's own: all of it
    elif which is None:
        which = "test" if len(parts["test"]) else "val"
        if which == "val":
            note = f"{data_cfg.name} has no test split (data.train_frac + data.val_frac = 1): scoring val"
    if which != "all":
        data = parts[which]
    if len(data) == 0:
        raise CharlmError(
            f"split={which} of {text_path} is empty at data.train_frac={data_cfg.train_frac},"
            f" data.val_frac={data_cfg.val_frac}; choose another split (train, val, test or all)"
        )
    if note:
        print(note, file=sys.stderr)
    return path, model, text_path, which, data


def _write_html(cfg: EvaluateConfig, model: Any, path: Path, text_path: Path, which: str, data: Any,
                bpb_all: float) -> Path:
    """evaluate.py html=FILE: the first html_bytes of the scored text, read through the model."""
    from charlm.inference.reading import read_text, write_page

    out = Path(cfg.html)
    shown = bytes(data[: cfg.html_bytes])
    numbers = read_text(model, shown, next(model.parameters()).device)
    about = {"title": f"{text_path.name} [{which}] through {path}", "source": f"{text_path} [{which}]",
             "checkpoint": str(path), "cell": model.config.cell, "total": len(data), "bpb_all": bpb_all}
    return write_page(out, shown, numbers, about)
