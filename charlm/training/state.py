"""Every key of a training checkpoint, packed and unpacked in one place.

    pack(trainer) -> state          model, optimizer, scheduler, Counters, RNG states of every rank,
                                    the plan (precision included), the carried hidden state, the
                                    text's identity (size, SHA-256), the config
    counters(state), restore(trainer, state), run_plan(...), check_corpus(...)   the way back
    start_from(model, state, source)    a fine-tuning run's first weights
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from charlm import plan as plans
from charlm.checkpoint import model_state, run_settings
from charlm.config import RunConfig, TrainConfig
from charlm.data import text
from charlm.device import Precision, plan_precision
from charlm.errors import CharlmError
from charlm.model.network import CharLM
from charlm.training import distributed


@dataclass
class Counters:
    """The run's counters; their names are checkpoint keys."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    log_sum: float = 0.0  # loss summed over the steps since the last log line
    log_n: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip)
    seconds: float = 0.0  # trained before this run started (in a checkpoint: up to its save)


def counters(state: Optional[dict[str, Any]]) -> Counters:
    """The counters a checkpoint holds (fresh ones for a new run)."""
    if state is None:
        return Counters()
    return Counters(**{f.name: state[f.name] for f in fields(Counters) if f.name in state})


def pack(trainer: Any) -> dict[str, Any]:
    """Everything a resume needs of a Trainer, as plain data (gathered from every rank; complete on rank 0)."""
    ddp, device = trainer.ddp, trainer.device
    hidden = None if trainer.h is None else ddp.gather_lanes(trainer.h.detach()).cpu()
    ranks_rng = ddp.gather_states(torch.get_rng_state())  # each rank's dropout stream
    ranks_cuda = ddp.gather_states(torch.cuda.get_rng_state(device)) if device.type == "cuda" else []
    return {
        **model_state(trainer.model),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        **asdict(replace(trainer.counters, seconds=trainer.counters.seconds + trainer.clock.run_seconds())),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            "batches": trainer.generator.get_state(),
            "ranks": [{"torch": t, "cuda": c} for t, c in zip(ranks_rng, ranks_cuda or [None] * ddp.world)],
            "mps": torch.mps.get_rng_state() if device.type == "mps" else None,  # one process on Apple's GPU
        },
        "precision": {"bf16": trainer.precision.bf16, "why": trainer.precision.why},
        "plan": asdict(trainer.plan),
        "hidden": hidden,
        "corpus": trainer.corpus,
        "config": asdict(trainer.cfg),
    }


def restore(trainer: Any, state: dict[str, Any]) -> str:
    """Load into a Trainer what pack() saved (the counters are read by counters()); the line to say."""
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    _apply_rates(trainer.optimizer, trainer.scheduler, trainer.tc, state["config"]["train"])
    _restore_rng(state["rng"], trainer.ddp, trainer.device, trainer.cfg.seed, trainer.counters.step)
    trainer.generator.set_state(state["rng"]["batches"])
    trainer.h, note = _resumed_lanes(state, trainer.tc, trainer.lanes, trainer.device)
    return f"resumed from step {trainer.counters.step} (best val loss {trainer.counters.best_val_loss:.4f}){note}"


def check_corpus(cfg: RunConfig, corpus: dict[str, Any], resume_state: Optional[dict[str, Any]]) -> None:
    """A resume reads the text its run started on, or is refused: best.pt would otherwise compare
    validation losses measured on two different texts. (A checkpoint from before this record: no check.)"""
    saved = (resume_state or {}).get("corpus")
    how = saved and text.changed(saved, corpus)
    if how:
        raise CharlmError(
            f"the text at {corpus['path']} has changed since this run started ({how}); a resume must read the"
            " same text: put it back (or name its copy with data.path=...), or start a new run from these weights"
            f" with train.init_from={cfg.train.resume}")


def start_from(model: CharLM, init_state: dict[str, Any], source: str) -> str:
    """Fine-tuning: init_state's weights into model; the line that says where they came from."""
    model.load_state_dict(init_state["model"])
    text = run_settings(init_state).get("data", {}).get("name", "its text")
    return (f"init_from: {source} (step {init_state['step']} on {text}, val loss {init_state['best_val_loss']:.4f});"
            " fresh optimizer and schedule from step 0")


def run_plan(cfg: RunConfig, device: torch.device, ddp: distributed.Dist, resume_state: Optional[dict[str, Any]]
             ) -> tuple[plans.Plan, Precision, str]:
    """The run's plan (charlm.plan): its settings, auto's choices replaying the plan a resumed
    checkpoint saved -> (plan, its precision, a note where the saved plan could not be replayed).
    Every rank trains in rank 0's precision."""
    state = resume_state or {}
    saved = plans.from_saved(state.get("plan"))
    if not saved and state.get("precision") is not None:  # a checkpoint from before plans: its precision
        saved = {"precision": "bf16" if state["precision"]["bf16"] else "fp32"}
    plan, why, note = plans.resolve(cfg.plan, device, cfg.train.precision, saved)
    (bf16,) = ddp.from_main([float(plan.bf16)])
    if bool(bf16) != plan.bf16:
        plan, why["precision"] = replace(plan, precision="bf16" if bf16 else "fp32"), "rank 0's choice"
    reason = why["precision"]
    if cfg.train.precision == "auto" and not reason.startswith("as the checkpoint"):
        reason = f"auto: {reason}"
    elif reason.startswith("as the checkpoint"):
        reason = "auto, as decided when the run started"
    return plan, plan_precision(plan.precision, reason), note


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
        elif device.type == "mps" and rng.get("mps") is not None:
            torch.mps.set_rng_state(rng["mps"])
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
