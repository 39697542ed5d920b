"""What a training run shows and writes besides checkpoints: the header, the progress bar,
TensorBoard events, config.yaml and the summary. Rank 0 reports; on other ranks it is silent."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from .config import Config
from .errors import CharlmError
from .evaluation import metrics


class Reporter:
    """Rank 0's voice (active=True); a no-op on the other ranks."""

    def __init__(self, active: bool, out_dir: Path, cfg: Config, resumed_at: Optional[int]) -> None:
        self.active, self.out_dir, self.cfg = active, out_dir, cfg
        self.writer = _open_writer(out_dir, cfg, resumed_at) if active else None
        self.bar: Optional[tqdm] = None
        self.last_val: Optional[float] = None
        self.tokens, self.t_log = 0, time.perf_counter()  # tokens trained since the last log line

    def say(self, message: str) -> None:
        """A line for the user (above the bar once it exists)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def start(self, step: int, total: Optional[int]) -> None:
        """The progress bar, from `step` of `total` (None: a time budget, estimated as it goes)."""
        self.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stdout, disable=not self.active)
        self.t_log = time.perf_counter()

    def stepped(self, tokens: int, total: Optional[int] = None) -> None:
        """One step done (tokens over all ranks); total re-estimates the bar's end."""
        self.tokens += tokens
        if total is not None:
            self.bar.total = total
        self.bar.update(1)

    def log(self, step: int, train_loss: float, lr: float, grad_norm: float, skipped: int) -> None:
        """The train/* scalars and the bar's figures, every train.log_every steps."""
        tok_s = self.tokens / (time.perf_counter() - self.t_log)
        if self.writer:
            for tag, value in (("loss", train_loss), ("bpb", train_loss / math.log(2)), ("lr", lr),
                               ("grad_norm", grad_norm), ("tokens_per_sec", tok_s)):
                self.writer.add_scalar(f"train/{tag}", value, step)
            if skipped:
                self.writer.add_scalar("train/skipped_steps", skipped, step)
            postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
            if self.last_val is not None:
                postfix["val"] = f"{self.last_val:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
        self.tokens, self.t_log = 0, time.perf_counter()

    def evaluation(self, step: int, m: dict[str, float], best: float, sample: str, improved: bool) -> None:
        """The val/* scalars, the sample, and the line under the bar."""
        self.last_val = m["loss"]
        for key, value in m.items():
            self.writer.add_scalar(f"val/{key}", value, step)
        self.writer.add_text("sample", "    " + sample.replace("\n", "\n    "), step)  # markdown code
        # curves of the best so far: the HParams tab reads their last points
        self.writer.add_scalar("val/best_loss", best, step)
        self.writer.add_scalar("val/best_bpb", best / math.log(2), step)
        self.say(f"step {step}: val loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | "
                 f"{m['bpb']:.3f} bits/byte{' (best)' if improved else ''}\n    "
                 + sample.strip().replace("\n", "\n    ")[:300])

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()
        self.t_log = time.perf_counter()  # tokens/s measures training, not evaluation

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer:
            self.writer.close()
            self.writer = None

    def summary(self, summary: dict[str, Any]) -> None:
        """HParams and the closing lines."""
        if not self.active:
            return
        final = metrics(summary["best_val_loss"])
        summary.update(best_val_bpb=final["bpb"], best_val_perplexity=final["perplexity"])
        _write_hparams(self.writer, self.cfg, final)
        self.close()
        _print_summary(summary)


def _open_writer(out_dir: Path, cfg: Config, resumed_at: Optional[int]):
    """The run directory's config.yaml and TensorBoard writer."""
    from torch.utils.tensorboard import SummaryWriter  # slow import; only rank 0 needs it

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(_to_yaml(asdict(cfg)))
    except OSError as e:
        raise CharlmError(f"cannot create out_dir={out_dir} ({e.strerror}); choose a writable directory") from None
    # purge_step drops events a killed run wrote after its last checkpoint (at `resumed_at`,
    # whose own events came before the save): no duplicated steps in the curves.
    return SummaryWriter(str(out_dir), purge_step=None if resumed_at is None else resumed_at + 1)


def _to_yaml(d: dict) -> str:
    from omegaconf import OmegaConf  # only for writing the resolved config out

    return OmegaConf.to_yaml(OmegaConf.create(d))


def _write_hparams(writer, cfg: Config, final: dict[str, float]) -> None:
    """Hyperparameters and final metrics into this run's own event file (TensorBoard's HParams tab)."""
    from torch.utils.tensorboard.summary import hparams

    flat = {}
    for section in ("data", "model", "train"):
        for key, value in asdict(getattr(cfg, section)).items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    flat["seed"] = cfg.seed
    # The metrics are the val/best_* curves logged at every evaluation: no single-point cards of
    # their own, which TensorBoard's Time Series tab would show above the loss curves.
    metric = {"val/best_loss": final["loss"], "val/best_bpb": final["bpb"]}
    exp, ssi, sei = hparams(flat, metric)
    fw = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        fw.add_summary(summary)


def _print_summary(s: dict[str, Any]) -> None:
    out = s["out_dir"]
    minutes, seconds = divmod(int(s["seconds"]), 60)
    print(
        f"\ndone: {s['steps']} steps ({s['steps_this_run']} in this run, {minutes}m{seconds:02d}s)\n"
        f"best val loss {s['best_val_loss']:.4f} nats/byte | perplexity {s['best_val_perplexity']:.2f} | "
        f"{s['best_val_bpb']:.3f} bits/byte (step {s['best_step']})\n"
        f"checkpoints:  {out}/best.pt  {out}/last.pt\n"
        f"sample:       python sample.py checkpoint={out} prompt=\"t\" length=200\n"
        f"tensorboard:  tensorboard --logdir {'runs' if Path(out).parts[0] == 'runs' else out}"
    )
