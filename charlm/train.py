"""The training loop: batches in, checkpoints, TensorBoard events and a summary out."""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import Config, TrainConfig
from .data import StreamBatches, corpus_path, load_bytes, random_batch, split
from .device import Precision, choose_precision, resolve_device
from .errors import CharlmError
from .evaluation import evaluate_loss, metrics, training_eval_lanes
from .model import CharLM
from .sampling import sample_text


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def budget_lr_factor(step: int, time_frac: float, warmup: int, min_ratio: float) -> float:
    """The schedule under train.max_seconds, where time_frac is the part of the budget used:
    warmup ends after `warmup` steps or 5% of the budget, whichever comes first, and the cosine
    decay runs over the budget."""
    warm = min(1.0, max((step + 1) / max(1, warmup), time_frac / 0.05))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, time_frac))))


def make_optimizer(model: CharLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases): param_groups[0] decays, [1] does not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def train(cfg: Config, out_dir: Path, resume_state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train cfg's model on cfg's data, writing checkpoints and events to out_dir; return a summary.

    Under torchrun each process trains its share of the lanes (see charlm.distributed); rank 0
    alone evaluates, prints and writes.
    """
    tc = cfg.train
    ddp, device = distributed.setup(tc.batch_size, resolve_device(tc.device, "train.device"))
    say = print if ddp.main else (lambda *a, **k: None)
    if tc.device == "auto":
        say(f"device: {device} (train.device=auto{'' if device.type == 'cuda' else ', no CUDA GPU found'})")
    torch.manual_seed(cfg.seed)

    path = corpus_path(cfg.data)
    text = load_bytes(path)
    splits = split(text, cfg.data.train_frac, cfg.data.val_frac)
    train_data, val_data = splits["train"], splits["val"]
    if len(val_data) == 0:
        raise CharlmError(
            f"{path} ({len(text):,} bytes) leaves no validation text at"
            f" data.val_frac={cfg.data.val_frac}; use a longer text or raise data.val_frac"
        )
    val_total = len(val_data)
    if tc.eval_bytes:
        val_data = val_data[: tc.eval_bytes]
    batches = StreamBatches(train_data, tc.batch_size, tc.seq_len) if tc.batching == "stream" else None
    if batches is None and len(train_data) < tc.seq_len:
        raise CharlmError(
            f"the training text ({len(train_data):,} bytes) is shorter than train.seq_len={tc.seq_len};"
            " lower train.seq_len or use more text"
        )

    model = CharLM(cfg.model).to(device)
    optimizer = make_optimizer(model, tc)
    budget = tc.max_seconds
    time_frac = [0.0]  # fraction of train.max_seconds used (rank 0's clock), which the schedule reads
    if budget:
        schedule = partial(budget_lr_factor, warmup=tc.warmup_steps, min_ratio=tc.min_lr / tc.lr)
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, time_frac[0]))
    else:
        scheduler = LambdaLR(
            optimizer, partial(lr_factor, warmup=tc.warmup_steps, total=tc.max_steps, min_ratio=tc.min_lr / tc.lr)
        )
    lanes = ddp.lanes(tc.batch_size)
    precision = _precision(tc, model, device, ddp, (lanes.stop - lanes.start, tc.seq_len), resume_state)
    say(f"precision: {precision.name} ({precision.why}) | {precision.parts(cfg.model.cell, device)}")
    if ddp.world > 1:  # its own dropout masks on each rank; the batch order below stays shared
        torch.manual_seed(distributed.dropout_seed(cfg.seed, ddp.rank))
    generator = torch.Generator().manual_seed(cfg.seed)  # random batching (every rank draws alike)
    step, best_val, best_step, h, spent = 0, math.inf, 0, None, 0.0  # spent: seconds trained before a resume
    log_sum, log_n, skipped = 0.0, 0, 0  # loss summed over the steps since the last log line; skipped steps
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        _apply_rates(optimizer, scheduler, tc, resume_state["config"]["train"])
        step, best_val, best_step = resume_state["step"], resume_state["best_val_loss"], resume_state["best_step"]
        log_sum, log_n, skipped = resume_state["log_sum"], resume_state["log_n"], resume_state["skipped"]
        spent = resume_state.get("seconds", 0.0)
        _restore_rng(resume_state["rng"], ddp, device, cfg.seed, step)
        generator.set_state(resume_state["rng"]["batches"])
        h, note = _resumed_lanes(resume_state, tc, lanes, device)
        say(f"resumed from step {step} (best val loss {best_val:.4f}){note}")
    # Rank 0 writes; under DDP the others only train.
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    writer = _open_writer(out_dir, cfg, resumed_at=step if resume_state else None) if ddp.main else None

    n_params = model.num_parameters()
    epoch_bytes = batches.n_windows * tc.batch_size * tc.seq_len if batches else len(train_data)
    say(
        f"{cfg.data.name}: {len(train_data):,} train / {_val_scored(len(val_data), val_total)} val bytes | "
        f"model {cfg.model.d_model}x{cfg.model.n_layers} GRU, {n_params / 1e6:.2f}M params | "
        + (f"a {budget:g} s budget of steps of " if budget else f"{tc.max_steps} steps of ")
        + f"{tc.batch_size}x{tc.seq_len} "
        + ("" if budget else f"({tc.max_steps * tc.batch_size * tc.seq_len / epoch_bytes:.1f} epochs) ")
        + f"on {device}"
        f"{f' x {ddp.world} processes' if ddp.world > 1 else ''} | {out_dir}"
    )

    def evaluate() -> dict[str, float]:
        loss, _ = evaluate_loss(model, val_data, seq_len=256, lanes=training_eval_lanes(len(val_data)),
                                device=device)
        return metrics(loss)

    def save(*names: str) -> None:
        """Write the whole training state (a collective under DDP: every rank must call it)."""
        hidden = None if h is None else ddp.gather_lanes(h.detach()).cpu()
        ranks_rng = ddp.gather_states(torch.get_rng_state())  # each rank's dropout stream
        ranks_cuda = ddp.gather_states(torch.cuda.get_rng_state(device)) if device.type == "cuda" else []
        if not ddp.main:
            return
        state = {
            **ckpt.model_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "best_val_loss": best_val,
            "best_step": best_step,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "batches": generator.get_state(),
                "ranks": [{"torch": t, "cuda": c} for t, c in zip(ranks_rng, ranks_cuda or [None] * ddp.world)],
            },
            "precision": {"bf16": precision.bf16, "why": precision.why},
            "hidden": hidden,
            "log_sum": log_sum,
            "log_n": log_n,
            "skipped": skipped,
            "seconds": spent + time.perf_counter() - t_start,
            "config": asdict(cfg),
        }
        for name in names:
            ckpt.save_checkpoint(out_dir / name, state)

    sample_gen = torch.Generator(device=device)
    model.train()
    start_step, t_start = step, time.perf_counter()
    eval_seconds, eval_cost = 0.0, None  # time spent evaluating in this run; the last evaluation's cost
    last = not budget and step >= tc.max_steps  # the step in hand is the final one
    t_log, tokens_since_log, last_val = time.perf_counter(), 0, None
    stop = _StopOnSignal(announce=ddp.main)
    bar = tqdm(total=None if budget else tc.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               file=sys.stdout, disable=not ddp.main)
    with stop:
        while not last:
            if batches is not None:
                k = step % batches.n_windows
                if k == 0:
                    h = None  # a new epoch: every lane starts over at the start byte
                x, y = batches.window(k)
            else:
                x, y = random_batch(train_data, tc.batch_size, tc.seq_len, generator)
            x, y = x[lanes].to(device, non_blocking=True), y[lanes].to(device, non_blocking=True)
            with precision.autocast(device):
                log_probs, h_new = net(x, h)
                loss = F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf))
            out_of_time = 0.0
            if budget:  # train.max_seconds replaces train.max_steps
                now = time.perf_counter()
                elapsed = spent + now - t_start
                per_step = (now - t_start - eval_seconds) / (step + 1 - start_step)
                # the final evaluation must fit too; before the first one, guess it from the training speed
                final_eval = eval_cost if eval_cost is not None else len(val_data) * per_step / x.numel() / 3
                finish_at = budget - final_eval - per_step
                time_frac[0] = min(1.0, elapsed / max(finish_at, 1e-9))
                out_of_time = float(elapsed >= finish_at)
            # One all-reduce under DDP: the ranks average the loss and the votes to stop on a signal,
            # and take rank 0's clock (the part of the budget used, whether it has run out), so that
            # their schedules match step for step and they all stop together.
            (loss_value, stop_votes), (time_frac[0], out_of_time) = ddp.agree(
                [loss.item(), float(stop.signum is not None)], [time_frac[0], out_of_time]
            )
            step += 1
            if math.isfinite(loss_value) and math.isfinite(grad_norm):
                optimizer.step()
                h = h_new.detach() if batches is not None else None
                log_sum, log_n = log_sum + loss_value, log_n + 1
            elif tc.on_nonfinite == "skip":
                skipped += 1  # no update; the state restarts from zero
                h = None
                bar.write(f"step {step}: skipped, non-finite loss {loss_value} or gradient norm {grad_norm}")
            else:
                bar.close()
                raise CharlmError(
                    f"step {step}: the loss or gradient became non-finite (loss {loss_value}, gradient norm"
                    f" {grad_norm}); nothing was saved from it and the checkpoints in {out_dir} are as they"
                    " were; lower train.lr, or set train.on_nonfinite=skip"
                )
            if not budget:
                last = step >= tc.max_steps
            else:
                last = out_of_time > 0
                bar.total = step if last else step + int((finish_at - elapsed) / per_step) + 1
            scheduler.step()
            tokens_since_log += x.numel() * ddp.world
            bar.update(1)

            if writer and (step % tc.log_every == 0 or last):
                tok_s = tokens_since_log / (time.perf_counter() - t_log)
                train_loss = log_sum / log_n if log_n else math.nan  # nan: every step skipped
                writer.add_scalar("train/loss", train_loss, step)
                writer.add_scalar("train/bpb", train_loss / math.log(2), step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/grad_norm", grad_norm, step)
                writer.add_scalar("train/tokens_per_sec", tok_s, step)
                if skipped:
                    writer.add_scalar("train/skipped_steps", skipped, step)
                postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if last_val is not None:
                    postfix["val"] = f"{last_val:.3f}"
                bar.set_postfix(postfix, refresh=False)
                tokens_since_log, t_log = 0, time.perf_counter()
            if step % tc.log_every == 0 or last:
                log_sum, log_n = 0.0, 0

            if step % tc.eval_every == 0 or last:
                t_eval = time.perf_counter()
                improved = False
                if ddp.main:
                    m = evaluate()
                    last_val = m["loss"]
                    for key, value in m.items():
                        writer.add_scalar(f"val/{key}", value, step)
                    sample_gen.manual_seed(cfg.seed)
                    text = sample_text(model, "", tc.sample_length, temperature=0.8, generator=sample_gen)[0]
                    writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)  # markdown code
                    improved = m["loss"] < best_val
                    if improved:
                        best_val, best_step = m["loss"], step
                    # curves of the best so far: the HParams tab reads their last points
                    writer.add_scalar("val/best_loss", best_val, step)
                    writer.add_scalar("val/best_bpb", best_val / math.log(2), step)
                # best.pt first: whenever last.pt exists, a best.pt does too
                save(*(["best.pt"] if improved else []), "last.pt")
                if writer:
                    writer.flush()
                if ddp.main:
                    bar.write(
                        f"step {step}: val loss {m['loss']:.4f} | ppl {m['perplexity']:.2f} | "
                        f"{m['bpb']:.3f} bits/byte{' (best)' if improved else ''}\n    "
                        + text.strip().replace("\n", "\n    ")[:300]
                    )
                t_log = time.perf_counter()  # tokens/s measures training, not evaluation
                eval_cost = t_log - t_eval
                eval_seconds += eval_cost

            if stop_votes > 0 and not last:
                save("last.pt")  # the step in hand is finished; keep everything up to it
                if writer:
                    writer.close()
                bar.close()
                signum = stop.signum or signal.SIGTERM
                say(
                    f"\nstopped by {signal.Signals(signum).name} at step {step}; saved {out_dir}/last.pt\n"
                    f"resume with:  python train.py train.resume={out_dir}"
                )
                distributed.teardown(ddp)
                raise SystemExit(128 + signum)
    bar.close()
    elapsed = time.perf_counter() - t_start  # this run's wall time, evaluations included
    if ddp.world > 1:
        spread = ddp.weight_spread(model)
        say(f"{ddp.world} processes {'hold identical weights' if spread == 0 else 'DISAGREE on the weights'}:"
            f" largest difference between them {spread:.3g}")
    distributed.teardown(ddp)
    summary = {
        "steps": step,
        "seconds": elapsed,
        "steps_this_run": step - start_step,
        "best_val_loss": best_val,
        "best_step": best_step,
        "out_dir": str(out_dir),
    }
    if writer:
        final = metrics(best_val)
        summary.update(best_val_bpb=final["bpb"], best_val_perplexity=final["perplexity"])
        _write_hparams(writer, cfg, final)
        writer.close()
        _print_summary(summary)
    return summary


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


class _StopOnSignal:
    """Within `with`: Ctrl-C / SIGTERM set .signum so the loop can finish its step and save.

    A second Ctrl-C stops at once (the last checkpoint stays as it was).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt", flush=True)

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
