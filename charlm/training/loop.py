"""The training loop: batches in, checkpoints, TensorBoard events and a summary out.

    train(cfg, out_dir)                 set up the processes, build a Trainer, run it
      load_splits                       the text, cut by position (train | val | test)
      Trainer                           model, optimizer, schedule (charlm.training.schedule), precision, Progress
        run                             the loop: next_batch -> train_step -> apply -> log
                                        -> evaluate_and_save, until the steps or the time run out
        to_checkpoint / restore         every checkpoint key, packed and unpacked in one place
      report                            handed in (charlm.training.report.Report): what the run says
"""
from __future__ import annotations

import math
import shlex
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from charlm import checkpoint as ckpt
from charlm.config import Config, TrainConfig
from charlm.data.batches import StreamBatches, random_batch, split
from charlm.data.text import corpus_path, load_bytes
from charlm.device import Precision, choose_precision, resolve_device
from charlm.errors import CharlmError
from charlm.files import write_error
from charlm.inference.sampling import sample_text
from charlm.inference.scoring import evaluate_loss, metrics, training_eval_lanes
from charlm.model.network import CharLM
from charlm.training import distributed
from charlm.training.report import Report
from charlm.training.rundir import RunLock, claim_run_dir, clear_run, write_run_config
from charlm.training.schedule import Clock, make_scheduler

EVAL_SEQ_LEN = 256  # bytes per window when the trainer scores the validation split
SAMPLE_TEMPERATURE = 0.8  # of the sample written at each evaluation


def make_optimizer(model: CharLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases): param_groups[0] decays, [1] does not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def load_splits(cfg: Config, announce: Optional[Callable[[str], None]] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(train bytes, the val bytes each evaluation scores, all val bytes) of cfg's text (announce
    hears of a download)."""
    path = corpus_path(cfg.data, announce)
    text = load_bytes(path)
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
    return train_data, scored, len(val_data)


@dataclass
class Progress:
    """The counters a checkpoint carries; their names are its keys."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    log_sum: float = 0.0  # loss summed over the steps since the last log line
    log_n: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip)
    seconds: float = 0.0  # trained before this run started (in a checkpoint: up to its save)


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


class Trainer:
    """One run: its model, optimizer, schedule, precision, batches and counters (see run())."""

    def __init__(self, cfg: Config, out_dir: Path, ddp: distributed.Dist, device: torch.device, report: Report,
                 resume_state: Optional[dict[str, Any]] = None, init_state: Optional[dict[str, Any]] = None) -> None:
        tc = self.tc = cfg.train
        self.cfg, self.out_dir, self.ddp, self.device, self.report = cfg, out_dir, ddp, device, report
        say = report.say
        if tc.device == "auto":
            say(f"device: {device} (train.device=auto{'' if device.type == 'cuda' else ', no CUDA GPU found'})")
        torch.manual_seed(cfg.seed)
        self.train_data, self.val_data, val_total = load_splits(cfg, say)
        self.batches = StreamBatches(self.train_data, tc.batch_size, tc.seq_len) if tc.batching == "stream" else None
        self.model = CharLM(cfg.model).to(device)
        if init_state is not None:  # fine-tuning: the source's weights, then everything else anew
            self.model.load_state_dict(init_state["model"])
        self.optimizer = make_optimizer(self.model, tc)
        self.progress = Progress(**{k: resume_state[k] for k in _progress_keys() if k in resume_state}
                                 ) if resume_state else Progress()
        self.clock = Clock(tc.max_seconds, self.progress.seconds, self.progress.step, len(self.val_data))
        self.scheduler = make_scheduler(self.optimizer, tc, self.clock)
        self.lanes = ddp.lanes(tc.batch_size)
        batch = (self.lanes.stop - self.lanes.start, tc.seq_len)
        self.precision = _precision(tc, self.model, device, ddp, batch, resume_state)
        if ddp.world > 1:  # its own dropout masks on each rank; the batch order below stays shared
            torch.manual_seed(distributed.dropout_seed(cfg.seed, ddp.rank))
        self.generator = torch.Generator().manual_seed(cfg.seed)  # random batching (every rank draws alike)
        self.sample_gen = torch.Generator(device=device)  # the samples written at evaluations
        self.h: Optional[torch.Tensor] = None  # this rank's lanes' hidden state, carried batch to batch
        self.resumable = resume_state is not None  # whether out_dir has held a checkpoint of this run
        note = self.restore(resume_state) if resume_state else None
        self.net = torch.nn.parallel.DistributedDataParallel(self.model) if ddp.world > 1 else self.model
        if ddp.main:
            if cfg.overwrite and resume_state is None:
                clear_run(out_dir)  # the run is set up: only now is the old one deleted
            write_run_config(out_dir, cfg)
        report.open(out_dir, cfg, resumed_at=self.progress.step if resume_state else None)
        self.report.say(f"precision: {self.precision.name} ({self.precision.why}) | "
                        f"{self.precision.parts(cfg.model.cell, device)}")
        if note is not None:
            self.report.say(note)
        if init_state is not None:
            source = init_state.get("config", {}).get("data", {}).get("name", "its text")
            self.report.say(f"init_from: {tc.init_from} (step {init_state['step']} on {source}, val loss "
                            f"{init_state['best_val_loss']:.4f}); fresh optimizer and schedule from step 0")
        self.report.say(self.header(val_total))

    def header(self, val_total: int) -> str:
        """One line: the text, the model, the length of the run, where it runs and writes."""
        tc, cfg, budget = self.tc, self.cfg, self.tc.max_seconds
        epoch_bytes = self.batches.n_windows * tc.batch_size * tc.seq_len if self.batches else len(self.train_data)
        return (
            f"{cfg.data.name}: {len(self.train_data):,} train / {_val_scored(len(self.val_data), val_total)} val"
            f" bytes | model {cfg.model.d_model}x{cfg.model.n_layers} GRU, {self.model.num_parameters() / 1e6:.2f}M"
            " params | " + (f"a {budget:g} s budget of steps of " if budget else f"{tc.max_steps} steps of ")
            + f"{tc.batch_size}x{tc.seq_len} "
            + ("" if budget else f"({tc.max_steps * tc.batch_size * tc.seq_len / epoch_bytes:.1f} epochs) ")
            + f"on {self.device}{f' x {self.ddp.world} processes' if self.ddp.world > 1 else ''} | {self.out_dir}"
        )

    def run(self) -> dict[str, Any]:
        """Train until train.max_steps or the time budget; a signal ends it after the step in hand."""
        p, tc = self.progress, self.tc
        stop = _StopOnSignal(announce=self.report.say)
        self.model.train()
        last = not tc.max_seconds and p.step >= tc.max_steps  # the step in hand is the final one
        self.report.start(p.step, None if tc.max_seconds else tc.max_steps)
        self.clock.start()
        with stop:
            while not last:
                x, y = self.next_batch()
                loss, h_new, grad_norm = train_step(self.net, self.model, self.optimizer, self.precision, x, y,
                                                    self.h, tc.grad_clip)
                loss_value, stop_votes, out_of_time = self.agree(loss, stop, x.numel())
                p.step += 1
                self.apply(loss_value, grad_norm, h_new)
                last = out_of_time > 0 if tc.max_seconds else p.step >= tc.max_steps
                self.scheduler.step()
                self.report.stepped(x.numel() * self.ddp.world, total=self._bar_total(last))
                if p.step % tc.log_every == 0 or last:
                    self.log(grad_norm)
                if p.step % tc.eval_every == 0 or last:
                    self.evaluate_and_save()
                if stop_votes > 0 and not last:
                    return self.stopped(stop.signum or signal.SIGTERM)
        return self.finish()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's lanes of the next batch, on the device: x, y (B/W, T), y = x shifted by one."""
        if self.batches is not None:
            k = self.progress.step % self.batches.n_windows
            if k == 0:
                self.h = None  # a new epoch: every lane starts over at the start byte
            x, y = self.batches.window(k)
        else:
            x, y = random_batch(self.train_data, self.tc.batch_size, self.tc.seq_len, self.generator)
        return x[self.lanes].to(self.device, non_blocking=True), y[self.lanes].to(self.device, non_blocking=True)

    def agree(self, loss: torch.Tensor, stop: "_StopOnSignal", tokens: int) -> tuple[float, float, float]:
        """(mean loss, votes to stop on a signal, out of time) across ranks, in one all-reduce.

        Every rank takes rank 0's clock (the part of the budget used, whether it has run out), so
        that their schedules match step for step and they all stop together.
        """
        frac, out_of_time = self.clock.read(self.progress.step + 1, tokens) if self.tc.max_seconds else (0.0, 0.0)
        (loss_value, stop_votes), (self.clock.frac, out_of_time) = self.ddp.agree(
            [loss.item(), float(stop.signum is not None)], [frac, out_of_time]
        )
        return loss_value, stop_votes, out_of_time

    def apply(self, loss_value: float, grad_norm: float, h_new: torch.Tensor) -> None:
        """Take the step, or apply train.on_nonfinite to a NaN/inf loss or gradient."""
        p = self.progress
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.h = h_new.detach() if self.batches is not None else None
            p.log_sum, p.log_n = p.log_sum + loss_value, p.log_n + 1
        elif self.tc.on_nonfinite == "skip":
            p.skipped += 1  # no update; the state restarts from zero
            self.h = None
            self.report.say(f"step {p.step}: skipped, non-finite loss {loss_value} or gradient norm {grad_norm}")
        else:
            self.report.close()
            raise CharlmError(
                f"step {p.step}: the loss or gradient became non-finite (loss {loss_value}, gradient norm"
                f" {grad_norm}); nothing was saved from it and the checkpoints in {self.out_dir} are as they"
                " were; lower train.lr, or set train.on_nonfinite=skip"
            )

    def log(self, grad_norm: float) -> None:
        """train/* scalars, then a fresh sum for the next log line."""
        p = self.progress
        train_loss = p.log_sum / p.log_n if p.log_n else math.nan  # nan: every step skipped
        self.report.log(p.step, train_loss, self.scheduler.get_last_lr()[0], grad_norm, p.skipped)
        p.log_sum, p.log_n = 0.0, 0

    def evaluate_and_save(self) -> None:
        """Rank 0 scores the validation text and writes a sample; every rank joins the save."""
        p, t_eval, improved = self.progress, time.perf_counter(), False
        if self.ddp.main:
            loss, _ = evaluate_loss(self.model, self.val_data, seq_len=EVAL_SEQ_LEN,
                                    lanes=training_eval_lanes(len(self.val_data)), device=self.device)
            m = metrics(loss)
            self.sample_gen.manual_seed(self.cfg.seed)
            sample = sample_text(self.model, "", self.tc.sample_length, temperature=SAMPLE_TEMPERATURE,
                                 generator=self.sample_gen)[0]
            improved = m["loss"] < p.best_val_loss
            if improved:
                p.best_val_loss, p.best_step = m["loss"], p.step
            self.report.evaluation(p.step, m, p.best_val_loss, sample, improved)
        # best.pt first: whenever last.pt exists, a best.pt does too
        self.save(*(["best.pt"] if improved else []), "last.pt")
        self.report.flush()
        self.clock.evaluated(time.perf_counter() - t_eval)

    def save(self, *names: str) -> None:
        """Write the whole training state (a collective under DDP: every rank must call it).

        A failed write (a full disk, a read-only or vanished directory) stops the run on every rank
        with one line that says what the checkpoints on disk still hold.
        """
        state, failure = self.to_checkpoint(), ""
        if self.ddp.main:
            for name in names:
                try:
                    ckpt.save_checkpoint(self.out_dir / name, state)
                    self.resumable = True
                except OSError as e:
                    failure = write_error(self.out_dir / name, e)
                    break
        (failed,) = self.ddp.from_main([float(bool(failure))])
        if failed:
            self.report.close()
            raise CharlmError(failure and self._stopped_by_write(failure) or "rank 0 could not write a checkpoint")

    def _stopped_by_write(self, failure: str) -> str:
        again = ("resume with: python train.py " + shlex.quote(f"train.resume={self.out_dir}")
                 if self.resumable else "run the same command again")
        saved = ckpt.describe_saved(self.out_dir)
        return f"{failure}, then {again} (training stopped at step {self.progress.step}; {saved})"

    def to_checkpoint(self) -> dict[str, Any]:
        """Everything a resume needs, as plain data (gathered from every rank; complete on rank 0)."""
        ddp, device = self.ddp, self.device
        hidden = None if self.h is None else ddp.gather_lanes(self.h.detach()).cpu()
        ranks_rng = ddp.gather_states(torch.get_rng_state())  # each rank's dropout stream
        ranks_cuda = ddp.gather_states(torch.cuda.get_rng_state(device)) if device.type == "cuda" else []
        return {
            **ckpt.model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **asdict(replace(self.progress, seconds=self.progress.seconds + self.clock.run_seconds())),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "batches": self.generator.get_state(),
                "ranks": [{"torch": t, "cuda": c} for t, c in zip(ranks_rng, ranks_cuda or [None] * ddp.world)],
            },
            "precision": {"bf16": self.precision.bf16, "why": self.precision.why},
            "hidden": hidden,
            "config": asdict(self.cfg),
        }

    def restore(self, state: dict[str, Any]) -> str:
        """Load what to_checkpoint saved (Progress is read in __init__); returns the line to print."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _apply_rates(self.optimizer, self.scheduler, self.tc, state["config"]["train"])
        _restore_rng(state["rng"], self.ddp, self.device, self.cfg.seed, self.progress.step)
        self.generator.set_state(state["rng"]["batches"])
        self.h, note = _resumed_lanes(state, self.tc, self.lanes, self.device)
        return f"resumed from step {self.progress.step} (best val loss {self.progress.best_val_loss:.4f}){note}"

    def stopped(self, signum: int) -> dict[str, Any]:
        """After a signal: the step in hand is finished; keep everything up to it."""
        self.save("last.pt")
        self.report.close()
        resume = shlex.quote(f"train.resume={self.out_dir}")
        self.report.say(f"\nstopped by {signal.Signals(signum).name} at step {self.progress.step}; saved"
                        f" {self.out_dir}/last.pt\nresume with:  python train.py {resume}")
        distributed.leave_together(self.ddp)
        return {**self._summary(), "stopped_by": signum}

    def finish(self) -> dict[str, Any]:
        """The end of the run: the ranks' agreement, HParams, the summary."""
        summary = self._summary()
        if self.ddp.world > 1:
            spread = self.ddp.weight_spread(self.model)
            verdict = "hold identical weights" if spread == 0 else "DISAGREE on the weights"
            self.report.say(f"{self.ddp.world} processes {verdict}: largest difference between them {spread:.3g}")
        self.report.summary(summary)
        distributed.leave_together(self.ddp)
        return summary

    def _summary(self) -> dict[str, Any]:
        p = self.progress
        return {"steps": p.step, "seconds": self.clock.run_seconds(), "steps_this_run": p.step - self.clock.start_step,
                "best_val_loss": p.best_val_loss, "best_step": p.best_step, "out_dir": str(self.out_dir)}

    def _bar_total(self, last: bool) -> Optional[int]:
        """Under a time budget the bar's end is an estimate, updated every step."""
        if not self.tc.max_seconds:
            return None
        return self.progress.step if last else self.progress.step + self.clock.steps_left()


def train(cfg: Config, out_dir: Path, resume_state: Optional[dict[str, Any]] = None,
          init_state: Optional[dict[str, Any]] = None, report: Optional[Report] = None) -> dict[str, Any]:
    """Train cfg's model on cfg's data, writing checkpoints and config.yaml to out_dir; return a
    summary (with "stopped_by", the signal number, when a signal ended it early). resume_state
    continues a run exactly; init_state (a checkpoint of cfg.model's size) gives a new run its
    first weights; report hears what the run has to say (silent by default).

    Under torchrun each process trains its share of the lanes (see charlm.training.distributed); rank 0
    alone evaluates, prints and writes.
    """
    ddp, device = distributed.setup(cfg.train.batch_size, resolve_device(cfg.train.device, "train.device"))
    report = report or Report()
    report.activate(ddp.main)
    lock = None
    try:
        lock = _claim(ddp, out_dir, resuming=resume_state is not None, overwrite=cfg.overwrite)
        return Trainer(cfg, out_dir, ddp, device, report, resume_state, init_state).run()
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown(ddp)


def _claim(ddp: distributed.Dist, out_dir: Path, resuming: bool, overwrite: bool) -> Optional[RunLock]:
    """Rank 0 locks out_dir for the whole run (charlm.training.rundir); every rank stops if it cannot."""
    lock, refusal = None, ""
    if ddp.main:
        try:
            lock = claim_run_dir(out_dir, resuming, overwrite)
        except CharlmError as e:
            refusal = str(e)
    (refused,) = ddp.from_main([float(bool(refusal))])
    if refused:
        raise CharlmError(refusal or f"rank 0 could not claim out_dir={out_dir}")
    return lock


def _progress_keys() -> list[str]:
    return [f.name for f in fields(Progress)]


class _StopOnSignal:
    """Within `with`: Ctrl-C / SIGTERM set .signum so the loop can finish its step and save.

    A second Ctrl-C stops at once (the last checkpoint stays as it was).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.announce = announce
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.announce(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt")

    def __enter__(self) -> "_StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _val_scored(scored: int, total: int) -> str:
    """How much of the validation split each evaluation scores, for the header."""
    if scored == total:
        return f"{total:,}"
    return f"{total:,} (each evaluation scores the first {scored:,}: train.eval_bytes)"


def _precision(
    tc: TrainConfig, model: CharLM, device: torch.device, ddp: distributed.Dist, batch: tuple[int, int],
    resume_state: Optional[dict[str, Any]],
) -> Precision:
    """train.precision for this run: auto is decided once, by rank 0, and a resume keeps the decision."""
    saved = (resume_state or {}).get("precision")
    if tc.precision == "auto" and saved is not None:
        why = saved["why"].removeprefix("auto: ")
        return Precision(saved["bf16"], f"auto, as decided when the run started: {why}")
    chosen = choose_precision(tc.precision, model, device, batch) if ddp.main else Precision(False, "")
    (bf16,) = ddp.from_main([float(chosen.bf16)])  # every rank trains in rank 0's choice
    return Precision(bool(bf16), chosen.why or "rank 0's choice")


def _apply_rates(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, tc: TrainConfig, saved: dict) -> None:
    """After loading a checkpoint's optimizer and scheduler: train.lr and train.weight_decay as now
    set take effect (the schedule continues at the same point, scaled to the new peak)."""
    scale = tc.lr / saved["lr"]
    scheduler.base_lrs = [tc.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = tc.lr
        group["lr"] *= scale
    optimizer.param_groups[0]["weight_decay"] = tc.weight_decay  # the matrices (make_optimizer)


def _restore_rng(rng: dict[str, Any], ddp: distributed.Dist, device: torch.device, seed: int, step: int) -> None:
    """Each rank's dropout stream as saved; a new number of processes starts new streams."""
    ranks = rng.get("ranks") or [{"torch": rng["torch"], "cuda": None}]
    if len(ranks) == ddp.world:
        torch.set_rng_state(ranks[ddp.rank]["torch"])
        if device.type == "cuda" and ranks[ddp.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ranks[ddp.rank]["cuda"], device)
        elif device.type == "cuda" and ddp.world == 1 and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        torch.manual_seed(distributed.dropout_seed(seed + step, ddp.rank))


def _resumed_lanes(
    state: dict[str, Any], tc: TrainConfig, lanes: slice, device: torch.device
) -> tuple[Optional[torch.Tensor], str]:
    """This rank's lanes of the saved hidden state, or None (and why) where they no longer fit."""
    saved = state["config"]["train"]
    if state.get("hidden") is None:
        return None, ""
    changed = [f"train.{k} {saved[k]} -> {getattr(tc, k)}" for k in ("batch_size", "seq_len", "batching")
               if saved[k] != getattr(tc, k)]
    if changed:  # the windows now cut the text elsewhere: a carried state would belong to other text
        return None, f"; {', '.join(changed)}: every lane restarts from a zero state"
    return state["hidden"][:, lanes].to(device), ""


