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
from .errors import CharlmError
from .evaluation import evaluate_loss, metrics
from .model import CharLM
from .sampling import sample_text


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu; cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CharlmError(f"device={name} but no CUDA GPU is available; use device=cpu or device=auto")
    return torch.device(name)


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


def resolve_precision(name: str, device: torch.device) -> tuple[bool, str]:
    """(use bf16 autocast?, why) for train.precision=auto|fp32|bf16 on device."""
    if name != "auto":
        return name == "bf16", f"train.precision={name}"
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return native, "auto: " + ("the GPU computes bf16 natively" if native else "this GPU lacks bf16")
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    if native:
        return True, "auto: this CPU has bf16 matrix instructions (AMX or AVX-512 BF16)"
    return False, "auto: this CPU has no AMX or AVX-512 BF16, so bf16 would be emulated and slower"


def make_optimizer(model: CharLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases)."""
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
    ddp, device = distributed.setup(tc.batch_size, resolve_device(tc.device))
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
    time_frac = [0.0]  # fraction of train.max_seconds used, which the schedule reads
    if budget:
        schedule = partial(budget_lr_factor, warmup=tc.warmup_steps, min_ratio=tc.min_lr / tc.lr)
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, time_frac[0]))
    else:
        scheduler = LambdaLR(
            optimizer, partial(lr_factor, warmup=tc.warmup_steps, total=tc.max_steps, min_ratio=tc.min_lr / tc.lr)
        )
    bf16, why = resolve_precision(tc.precision, device)
    say(f"precision: {'bf16 autocast' if bf16 else 'fp32'} ({why})")
    generator = torch.Generator().manual_seed(cfg.seed)  # random batching (every rank draws alike)
    lanes = ddp.lanes(tc.batch_size)
    step, best_val, best_step, h, spent = 0, math.inf, 0, None, 0.0  # spent: seconds trained before a resume
    log_sum, log_n, skipped = 0.0, 0, 0  # loss summed over the steps since the last log line; skipped steps
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        step, best_val, best_step = resume_state["step"], resume_state["best_val_loss"], resume_state["best_step"]
        log_sum, log_n, skipped = resume_state["log_sum"], resume_state["log_n"], resume_state["skipped"]
        spent = resume_state.get("seconds", 0.0)
        torch.set_rng_state(resume_state["rng"]["torch"])
        if device.type == "cuda" and resume_state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resume_state["rng"]["cuda"])
        generator.set_state(resume_state["rng"]["batches"])
        if resume_state.get("hidden") is not None:
            h = resume_state["hidden"][:, lanes].to(device)
        say(f"resumed from step {step} (best val loss {best_val:.4f})")
    # Rank 0 writes; under DDP the others only train.
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    writer = _open_writer(out_dir, cfg, resumed_at=step if resume_state else None) if ddp.main else None

    n_params = model.num_parameters()
    epoch_bytes = batches.n_windows * tc.batch_size * tc.seq_len if batches else len(train_data)
    say(
        f"{cfg.data.name}: {len(train_data):,} train / {len(val_data):,} val bytes | "
        f"model {cfg.model.d_model}x{cfg.model.n_layers} GRU, {n_params / 1e6:.2f}M params | "
        + (f"a {budget:g} s budget of steps of " if budget else f"{tc.max_steps} steps of ")
        + f"{tc.batch_size}x{tc.seq_len} "
        + ("" if budget else f"({tc.max_steps * tc.batch_size * tc.seq_len / epoch_bytes:.1f} epochs) ")
        + f"on {device}"
        f"{f' x {ddp.world} processes' if ddp.world > 1 else ''} | {out_dir}"
    )

    def evaluate() -> dict[str, float]:
        loss, _ = evaluate_loss(model, val_data, seq_len=256, lanes=_eval_lanes(len(val_data)), device=device)
        return metrics(loss)

    def save(*names: str) -> None:
        """Write the whole training state (a collective under DDP: every rank must call it)."""
        hidden = None if h is None else ddp.gather_lanes(h.detach()).cpu()
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
            },
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
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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
            # One all-reduce under DDP: the ranks agree on the loss, on a signal to stop and on the
            # time budget, so that they all stop together.
            loss_value, stop_votes, time_votes = ddp.mean([loss.item(), float(stop.signum is not None), out_of_time])
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
                last = time_votes > 0
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
        say(f"{ddp.world} processes agree on the weights (largest difference {spread:.2e})")
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


def _eval_lanes(n: int) -> int:
    """Lanes for evaluation: each at least 1 KiB long, at most 64 of them."""
    return max(1, min(64, n // 1024))


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
    metric = {f"hparam/best_val_{k}": v for k, v in final.items()}
    exp, ssi, sei = hparams(flat, metric)
    fw = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        fw.add_summary(summary)
    for key, value in metric.items():
        writer.add_scalar(key, value)


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
