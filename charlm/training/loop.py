"""The training loop: batches in, checkpoints, TensorBoard events and a summary out.

    train(cfg, out_dir)                 set up the processes, build a Trainer, run it
      charlm.training.step              load_splits (the text, cut by position: train | val | test),
                                        make_optimizer, train_step (forward, backward, clipping)
      Trainer                           model, optimizer, schedule (charlm.training.schedule), the
                                        plan (charlm.plan: which code computes a step), counters
        run                             the loop: next_batch -> train_step -> share_across_ranks
                                        -> step_or_skip -> log -> evaluate_and_save, until the steps
                                        or the time run out
      charlm.training.state             every checkpoint key, packed and unpacked in one place
      report                            handed in (charlm.training.report.Report): what the run says
"""
from __future__ import annotations

import math
import shlex
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch

from charlm import checkpoint as ckpt
from charlm import plan as plans
from charlm.config import RunConfig
from charlm.data.batches import StreamBatches, random_batch
from charlm.device import keep_freed_memory, resolve_device
from charlm.errors import CharlmError
from charlm.files import write_error
from charlm.inference.sampling import sample_text
from charlm.inference.scoring import evaluate_loss, metrics, training_eval_lanes
from charlm.model.network import CharLM
from charlm.training import distributed, state
from charlm.training.report import Report
from charlm.training.rundir import RunLock, claim_run_dir, clear_run, write_run_config
from charlm.training.schedule import Clock, make_scheduler
from charlm.training.signals import StopOnSignal
from charlm.training.step import load_splits, make_optimizer, train_step

EVAL_SEQ_LEN = 256  # bytes per window when the trainer scores the validation split
SAMPLE_TEMPERATURE = 0.8  # of the sample written at each evaluation


class Trainer:
    """One run: its model, optimizer, schedule, precision, batches and counters (see run())."""

    def __init__(self, cfg: RunConfig, out_dir: Path, ddp: distributed.Dist, device: torch.device, report: Report,
                 resume_state: Optional[dict[str, Any]] = None, init_state: Optional[dict[str, Any]] = None) -> None:
        tc = self.tc = cfg.train
        self.cfg, self.out_dir, self.ddp, self.device, self.report = cfg, out_dir, ddp, device, report
        say = report.say
        if tc.device == "auto":
            found = {"cuda": "", "mps": ", Apple's GPU"}.get(device.type, ", no CUDA GPU found")
            say(f"device: {device} (train.device=auto{found})")
        # the plan first (it may compile the kernels): every choice of code made once, before any step
        self.plan, self.precision, plan_note = state.run_plan(cfg, device, ddp, resume_state)
        torch.manual_seed(cfg.seed)
        self.train_data, self.val_data, val_total, self.corpus = load_splits(cfg, say)
        state.check_corpus(cfg, self.corpus, resume_state)
        self.batches = StreamBatches(self.train_data, tc.batch_size, tc.seq_len) if tc.batching == "stream" else None
        self.model = CharLM(cfg.model).to(device)
        # fine-tuning: the source's weights, then everything else anew
        init_note = state.start_from(self.model, init_state, tc.init_from) if init_state is not None else None
        self.optimizer = make_optimizer(self.model, tc)
        self.counters = state.counters(resume_state)
        self.clock = Clock(tc.max_seconds, self.counters.seconds, self.counters.step, len(self.val_data))
        self.scheduler = make_scheduler(self.optimizer, tc, self.clock)
        self.lanes = ddp.lanes(tc.batch_size)
        if ddp.world > 1:  # its own dropout masks on each rank; the batch order below stays shared
            torch.manual_seed(distributed.dropout_seed(cfg.seed, ddp.rank))
        self.generator = torch.Generator().manual_seed(cfg.seed)  # random batching (every rank draws alike)
        self.sample_gen = torch.Generator(device=device)  # the samples written at evaluations
        self.h: Optional[torch.Tensor] = None  # this rank's lanes' hidden state, carried batch to batch
        self.resumable = resume_state is not None  # whether out_dir has held a checkpoint of this run
        note = state.restore(self, resume_state) if resume_state else None
        self.net = torch.nn.parallel.DistributedDataParallel(self.model) if ddp.world > 1 else self.model
        restart = bool(tc.resume) and resume_state is None  # a run that saved no checkpoint, from step 0
        if ddp.main:
            if (cfg.overwrite or restart) and resume_state is None:
                clear_run(out_dir)  # the run is set up: only now is the old one deleted
            write_run_config(out_dir, cfg, self.plan)
        report.open(out_dir, cfg, resumed_at=self.counters.step if resume_state else None)
        self.report.say(f"plan: {self.plan.line()}")
        if plan_note:
            self.report.say(plan_note)
        self.report.say(f"precision: {self.precision.name} ({self.precision.why}) | "
                        f"{self.precision.parts(cfg.model.cell, device)}")
        if note is not None:
            self.report.say(note)
        if restart:
            self.report.say(f"{out_dir} held no checkpoint yet (it was stopped before its first save): training it"
                            " from step 0 with its config.yaml")
        if init_note is not None:
            self.report.say(init_note)
        self.report.say(self.header(val_total))

    def header(self, val_total: int) -> str:
        """One line: the text, the model, the length of the run, where it runs and writes."""
        tc, cfg, budget = self.tc, self.cfg, self.tc.max_seconds
        epoch_bytes = self.batches.n_windows * tc.batch_size * tc.seq_len if self.batches else len(self.train_data)
        return (
            f"{cfg.data.name}: {len(self.train_data):,} train / {_val_scored(len(self.val_data), val_total)} val"
            f" bytes | model {cfg.model.d_model}x{cfg.model.n_layers} {'LSTM' if cfg.model.cell == 'lstm' else 'GRU'},"
            f" {self.model.num_parameters() / 1e6:.2f}M"
            " params | " + (f"a {budget:g} s budget of steps of " if budget else f"{tc.max_steps} steps of ")
            + f"{tc.batch_size}x{tc.seq_len} "
            + ("" if budget else f"({tc.max_steps * tc.batch_size * tc.seq_len / epoch_bytes:.1f} epochs) ")
            + f"on {self.device}{f' x {self.ddp.world} processes' if self.ddp.world > 1 else ''} | {self.out_dir}"
        )

    def run(self) -> dict[str, Any]:
        """Train until train.max_steps or the time budget; a signal ends it after the step in hand."""
        p, tc = self.counters, self.tc
        stop = StopOnSignal(announce=self.report.say)
        self.model.train()
        last = not tc.max_seconds and p.step >= tc.max_steps  # the step in hand is the final one
        self.report.start(p.step, None if tc.max_seconds else tc.max_steps)
        self.clock.start()
        with stop:
            while not last:
                x, y = self.next_batch()
                loss, h_new, grad_norm = train_step(self.net, self.model, self.optimizer, self.precision, x, y,
                                                    self.h, tc.grad_clip)
                loss_value, stop_votes, out_of_time = self.share_across_ranks(loss, stop, x.numel())
                p.step += 1
                self.step_or_skip(loss_value, grad_norm, h_new)
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
            k = self.counters.step % self.batches.n_windows
            if k == 0:
                self.h = None  # a new epoch: every lane starts over at the start byte
            x, y = self.batches.window(k)
        else:
            x, y = random_batch(self.train_data, self.tc.batch_size, self.tc.seq_len, self.generator)
        return x[self.lanes].to(self.device, non_blocking=True), y[self.lanes].to(self.device, non_blocking=True)

    def share_across_ranks(self, loss: torch.Tensor, stop: StopOnSignal, tokens: int) -> tuple[float, float, float]:
        """(mean loss, votes to stop on a signal, out of time) across ranks, in one all-reduce.

        Every rank takes rank 0's clock (the part of the budget used, whether it has run out), so
        that their schedules match step for step and they all stop together.
        """
        frac, out_of_time = self.clock.read(self.counters.step + 1, tokens) if self.tc.max_seconds else (0.0, 0.0)
        (loss_value, stop_votes), (self.clock.frac, out_of_time) = self.ddp.agree(
            [loss.item(), float(stop.signum is not None)], [frac, out_of_time]
        )
        return loss_value, stop_votes, out_of_time

    def step_or_skip(self, loss_value: float, grad_norm: float, h_new: torch.Tensor) -> None:
        """Take the step, or apply train.on_nonfinite to a NaN/inf loss or gradient."""
        p = self.counters
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
        p = self.counters
        train_loss = p.log_sum / p.log_n if p.log_n else math.nan  # nan: every step skipped
        self.report.log(p.step, train_loss, self.scheduler.get_last_lr()[0], grad_norm, p.skipped)
        p.log_sum, p.log_n = 0.0, 0

    def evaluate_and_save(self) -> None:
        """Rank 0 scores the validation text and writes a sample; every rank joins the save."""
        p, t_eval, improved = self.counters, time.perf_counter(), False
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
        packed, failure = state.pack(self), ""
        if self.ddp.main:
            for name in names:
                try:
                    ckpt.save_checkpoint(self.out_dir / name, packed)
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
        return f"{failure}, then {again} (training stopped at step {self.counters.step}; {saved})"

    def stopped(self, signum: int) -> dict[str, Any]:
        """After a signal: the step in hand is finished; keep everything up to it."""
        self.save("last.pt")
        self.report.close()
        resume = shlex.quote(f"train.resume={self.out_dir}")
        self.report.say(f"\nstopped by {signal.Signals(signum).name} at step {self.counters.step}; saved"
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
        p = self.counters
        return {"steps": p.step, "seconds": self.clock.run_seconds(), "steps_this_run": p.step - self.clock.start_step,
                "best_val_loss": p.best_val_loss, "best_step": p.best_step, "out_dir": str(self.out_dir)}

    def _bar_total(self, last: bool) -> Optional[int]:
        """Under a time budget the bar's end is an estimate, updated every step."""
        if not self.tc.max_seconds:
            return None
        return self.counters.step if last else self.counters.step + self.clock.steps_left()


def train(cfg: RunConfig, out_dir: Path, resume_state: Optional[dict[str, Any]] = None,
          init_state: Optional[dict[str, Any]] = None, report: Optional[Report] = None) -> dict[str, Any]:
    """Train cfg's model on cfg's data, writing checkpoints and config.yaml to out_dir; return a
    summary (with "stopped_by", the signal number, when a signal ended it early). resume_state
    continues a run exactly; init_state (a checkpoint of cfg.model's size) gives a new run its
    first weights; report hears what the run has to say (silent by default).

    Under torchrun each process trains its share of the lanes (see charlm.training.distributed); rank 0
    alone evaluates, prints and writes.
    """
    ddp, device = distributed.setup(cfg.train.batch_size, resolve_device(cfg.train.device, "train.device"))
    keep_freed_memory()
    report = report or Report()
    report.activate(ddp.main)
    lock = None
    try:
        resuming = resume_state is not None or bool(cfg.train.resume)  # (a run that saved nothing: from step 0)
        lock = _claim(ddp, out_dir, resuming=resuming, overwrite=cfg.overwrite)
        trainer = Trainer(cfg, out_dir, ddp, device, report, resume_state, init_state)
        with plans.use(trainer.plan):
            return trainer.run()
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


def _val_scored(scored: int, total: int) -> str:
    """How much of the validation split each evaluation scores, for the header."""
    if scored == total:
        return f"{total:,}"
    return f"{total:,} (each evaluation scores the first {scored:,}: train.eval_bytes)"
