"""What `python train.py` shows and writes besides checkpoints: the lines the run says, the progress
bar (or plain lines outside a terminal), TensorBoard events and the summary. The trainer is handed
a TrainReport (charlm.training.report.Report is its silent interface); rank 0's alone is active."""
from __future__ import annotations

import math
import shlex
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm import tqdm

from charlm.config import RunConfig
from charlm.inference.scoring import metrics
from charlm.training.report import Report


class TrainReport(Report):
    """Rank 0's voice (once activated); a no-op on the other ranks."""

    def __init__(self, notebook: bool = False) -> None:
        """notebook: the bar is tqdm.auto's (a widget in Jupyter), wherever stdout goes."""
        self.notebook = notebook
        self.active, self.writer, self.bar = False, None, None
        self.last_val: Optional[float] = None
        self.tokens, self.t_log = 0, time.perf_counter()  # tokens trained since the last log line

    def open(self, out_dir: Path, cfg: RunConfig, resumed_at: Optional[int]) -> None:
        """The run's TensorBoard writer (resumed_at: the step a resumed run continues from)."""
        self.out_dir, self.cfg = out_dir, cfg
        if self.active:
            try:
                self.writer = _open_writer(out_dir, resumed_at)
            except OSError as e:
                self._events_lost(e)

    def say(self, message: str) -> None:
        """A line for the user (above the bar once it exists)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def start(self, step: int, total: Optional[int]) -> None:
        """The progress bar, from `step` of `total` (None: a time budget, estimated as it goes).

        Outside a terminal (a log file, nohup, a cluster's job log) there is no bar, whose carriage
        returns would make the log one enormous line: log() prints a plain line instead.
        """
        self.plain = not sys.stdout.isatty() and not self.notebook
        if self.notebook:
            from tqdm.auto import tqdm as auto_tqdm

            self.bar = auto_tqdm(total=total, initial=step, desc="train", unit="step", disable=not self.active)
        else:
            self.bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stdout, disable=not self.active or self.plain)
        self.step, self.total, self.first_step = step, total, step
        self.t_log = self.t_start = time.perf_counter()

    def stepped(self, tokens: int, total: Optional[int] = None) -> None:
        """One step done (tokens over all ranks); total re-estimates the bar's end."""
        self.tokens += tokens
        self.step += 1
        if total is not None:
            self.bar.total = self.total = total
        self.bar.update(1)

    def log(self, step: int, train_loss: float, lr: float, grad_norm: float, skipped: int) -> None:
        """The train/* scalars and the bar's figures (or a plain line), every train.log_every steps."""
        tok_s = self.tokens / (time.perf_counter() - self.t_log)
        if self.active:
            scalars = {"loss": train_loss, "bpb": train_loss / math.log(2), "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_sec": tok_s, **({"skipped_steps": skipped} if skipped else {})}
            self.events(lambda: [self.writer.add_scalar(f"train/{tag}", v, step) for tag, v in scalars.items()])
            if self.plain:
                self.say(f"step {step}/{self.total or '?'} | loss {train_loss:.4f} | {tok_s:,.0f} tok/s | lr {lr:.2e}"
                         f" | ETA {self._eta()}")
            postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
            if self.last_val is not None:
                postfix["val"] = f"{self.last_val:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
        self.tokens, self.t_log = 0, time.perf_counter()

    def _eta(self) -> str:
        """The time left at this run's pace so far, as 1h02m or 3m20s."""
        done, elapsed = self.step - self.first_step, time.perf_counter() - self.t_start
        if not done or not self.total:
            return "?"
        seconds = int(elapsed / done * max(self.total - self.step, 0))
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"

    def evaluation(self, step: int, m: dict[str, float], best: float, sample: str, improved: bool) -> None:
        """The val/* scalars, the sample, and the line under the bar."""
        self.last_val = m["loss"]
        # with the curves of the best so far: the HParams tab reads their last points
        curves = {**m, "best_loss": best, "best_bpb": best / math.log(2)}
        self.events(lambda: [self.writer.add_scalar(f"val/{key}", v, step) for key, v in curves.items()])
        self.events(lambda: self.writer.add_text("sample", "    " + sample.replace("\n", "\n    "), step))  # markdown
        self.say(f"step {step}: val loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | "
                 f"{m['bpb']:.3f} bits/byte{' (best)' if improved else ''}\n    "
                 + sample.strip().replace("\n", "\n    ")[:300])

    def flush(self) -> None:
        self.events(lambda: self.writer.flush())
        self.t_log = time.perf_counter()  # tokens/s measures training, not evaluation

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.events(lambda: self.writer.close())
        self.writer = None

    def events(self, write: Callable[[], Any]) -> None:
        """Run one TensorBoard write. If it fails (a full disk, a vanished directory), warn once and
        train on without events: checkpoints matter more, and one that cannot be written stops the run."""
        if self.writer is None:
            return
        try:
            write()
        except OSError as e:
            self._events_lost(e)

    def _events_lost(self, e: OSError) -> None:
        writer, self.writer = self.writer, None
        self.say(f"warning: could not write TensorBoard events in {self.out_dir} ({e.strerror}); the curves stop"
                 " here, training and checkpoints go on")
        try:
            if writer is not None:
                writer.close()
        except OSError:
            pass

    def summary(self, summary: dict[str, Any]) -> None:
        """HParams and the closing lines."""
        if not self.active:
            return
        final = metrics(summary["best_val_loss"])
        summary.update(best_val_bpb=final["bpb"], best_val_perplexity=final["perplexity"])
        self.events(lambda: _write_hparams(self.writer, self.cfg, final))
        self.close()
        _print_summary(summary)


def _open_writer(out_dir: Path, resumed_at: Optional[int]):
    """The run directory's TensorBoard writer; its writing thread's errors reach the training thread."""
    from torch.utils.tensorboard import SummaryWriter  # slow import; only rank 0 needs it

    _quiet_writer_thread()
    # purge_step drops events a killed run wrote after its last checkpoint (at `resumed_at`,
    # whose own events came before the save): no duplicated steps in the curves.
    return SummaryWriter(str(out_dir), purge_step=None if resumed_at is None else resumed_at + 1)


def _quiet_writer_thread() -> None:
    """TensorBoard's writing thread prints a traceback when a write fails, then hands the error to
    the next call from the training thread (which Reporter.events handles): drop the traceback."""
    if getattr(threading.excepthook, "charlm", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)

    hook.charlm = True
    threading.excepthook = hook


def _write_hparams(writer, cfg: RunConfig, final: dict[str, float]) -> None:
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
        f"sample:       python sample.py {shlex.quote(f'checkpoint={out}')} prompt=\"t\" length=200\n"
        f"tensorboard:  tensorboard --logdir {'runs' if Path(out).parts[:1] == ('runs',) else shlex.quote(out)}"
    )
