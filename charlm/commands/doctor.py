"""python -m charlm.doctor: check every path this machine offers.

    python -m charlm.doctor

Prints the plan `python train.py` follows on this machine (charlm.plan), each part with the
reason auto chose it, then runs every path this machine offers on a tiny model, in about a
minute: the kernels against PyTorch's operations, and for the CPU and each CUDA device, in fp32
and bf16 and with both GRU cells and the LSTM, the real trainer (6 steps), a resume in the other
precision, the sampler and the evaluator; then two processes under torchrun (gloo on the CPU,
NCCL where two GPUs exist). Prints a matrix of ✓ / ✗ with timings. Exit status 1 if any path
failed.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from charlm import plan as plans
from charlm.checkpoint import load_checkpoint, model_from_state
from charlm.config import DataConfig, DoctorConfig, ModelConfig, RunConfig, TrainConfig
from charlm.device import mps_available
from charlm.inference.sampling import sample_text
from charlm.inference.scoring import evaluate_loss
from charlm.model import native
from charlm.model.network import CharLM
from charlm.model.stepping import Stepper
from charlm.training.loop import train

TEXT = "".join(f"the {w} traveller came back at {n} o'clock; café déjà vu.\n"
               for n, w in enumerate(["time", "grey", "swift", "old"] * 60))


def _tiny(text: Path, out: Path, device: str, precision: str, cell: str, **train_kw) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="text", path=str(text)),
        model=ModelConfig(d_model=32, n_layers=2, dropout=0.1, cell=cell),
        train=TrainConfig(batch_size=8, seq_len=32, max_steps=6, eval_every=3, warmup_steps=2, log_every=3,
                          sample_length=16, device=device, precision=precision, **train_kw),
        out_dir=str(out),
    )


def check_single(text: Path, work: Path, device: str, precision: str, cell: str) -> str:
    """Train, resume in the other precision, sample and evaluate; return what was checked."""
    run = work / f"{device.replace(':', '')}-{precision}-{cell}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(_tiny(text, run, device, precision, cell), run)
        state = load_checkpoint(run / "last.pt")
        other = "fp32" if precision == "bf16" else "bf16"
        cfg = _tiny(text, run, device, other, cell, resume=str(run / "last.pt"))
        cfg.train.max_steps = 8
        train(cfg, run, resume_state=state)
    state = load_checkpoint(run / "last.pt")
    floats = [t for t in state["model"].values()] + [state["hidden"]]
    if state["step"] != 8 or any(t.dtype != torch.float32 for t in floats):
        dtypes = sorted({str(t.dtype) for t in floats})
        raise RuntimeError(f"resumed run ended at step {state['step']} with dtypes {dtypes}")
    model = model_from_state(state).to(device).eval()
    text_out = sample_text(model, "the ", 20, temperature=0.8, generator=torch.Generator(device).manual_seed(0))[0]
    loss, _ = evaluate_loss(model, np.frombuffer(text.read_bytes()[:4096], np.uint8), lanes=4, device=device)
    if not np.isfinite(loss) or len(text_out) < 20:
        raise RuntimeError(f"evaluation gave {loss}, sample {text_out!r}")
    return f"train, resume in {other}, sample, evaluate (val {loss:.2f})"


def check_ddp(text: Path, work: Path, device: str) -> str:
    """Two processes under torchrun; they must end with identical weights."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = ["data=text", f"data.path={text}", "model.d_model=32", "model.n_layers=2", "model.dropout=0.1",
            "train.batch_size=8", "train.seq_len=32", "train.max_steps=6", "train.eval_every=3",
            "train.precision=fp32", f"train.device={device}", f"out_dir={work / ('ddp-' + device)}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "charlm", "train", *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)  # charlm's train command, installed or in a clone
    found = re.search(r"2 processes (hold identical weights|DISAGREE on the weights): .*", proc.stdout)
    if proc.returncode != 0 or not found or "identical" not in found.group(0):
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise RuntimeError(found.group(0) if found else f"exit {proc.returncode}: {tail[0]}")
    return found.group(0)


def check_native() -> str:
    """The fused C++ kernels against PyTorch's operations: a training step's gradients in fp32 and
    a decoding step of a tiny GRU, in fp32 and with sample.py's precision=bf16."""
    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=32, n_layers=2, dropout=0.0))
    x = torch.randint(0, 256, (4, 16))
    grads, probs = [], []
    for kernels in (plans.current().kernels, "off"):  # the plan's kernels, then PyTorch's operations
        with plans.use(replace(plans.current(), kernels=kernels)):
            model.zero_grad()
            model(x)[0].sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            steps = [Stepper(model.eval(), precision) for precision in ("fp32", "bf16")]
            with torch.no_grad():
                probs.append(torch.stack([step(x[:, 0], model.init_hidden(4))[0] for step in steps]))
        model.train()
    diff = max(float((grads[0] - grads[1]).abs().max()), float((probs[0] - probs[1]).abs().max()))
    if diff > 1e-4:
        raise RuntimeError(f"the fused kernels and PyTorch's operations differ by {diff:.2g}")
    return f"training and decoding (fp32, bf16) agree with PyTorch's operations (largest difference {diff:.1g})"


def _with_plan(plan: plans.Plan, fn: Callable[[], str]) -> str:
    with plans.use(plan):
        return fn()


def _row(label: str, fn: Callable[[], str]) -> tuple[bool, str]:
    t = time.perf_counter()
    try:
        detail, ok = fn(), True
    except Exception as e:  # a failing path is a row of the report, not the end of it
        frame = traceback.extract_tb(e.__traceback__)[-1]
        first = str(e).splitlines()[0] if str(e) else ""
        detail, ok = f"{type(e).__name__}: {first} ({Path(frame.filename).name}:{frame.lineno})", False
    line = f"{label:<34} {'✓' if ok else '✗'} {time.perf_counter() - t:6.1f} s  {detail}"
    print(line, flush=True)
    return ok, line


def main(argv: list[str]) -> int:
    """`python -m charlm.doctor`: the exit status (1 if any path failed; 2 for a bad argument)."""
    from charlm.commands import run_tool

    return run_tool(DoctorConfig, argv, __doc__, _doctor, error_status=2)


def _doctor(_: DoctorConfig) -> int:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "CPU") if Path("/proc/cpuinfo").exists() else "CPU"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"charlm doctor | torch {torch.__version__} | {cpu} | CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} | {torch.get_num_threads()} threads | {gpus} CUDA GPU(s)")
    plan, why, _ = plans.resolve()
    print(f"plan: {plan.line()}")
    for part, reason in why.items():
        print(f"  {part}={getattr(plan, part)}: {reason}")
    ops = native.load(plan.kernels) if plan.kernels != "off" else None
    print(f"CPU GRU time loops and decoding: {native.status(plan.kernels)}"
          + (f", on {ops.threads()} threads; {native.matmuls(plan.kernels)}" if ops else ""))
    for device in range(gpus):
        precision, reason = plans.auto_precision(torch.device(f"cuda:{device}"))
        print(f"cuda:{device}: precision={precision} ({reason})")
    if mps_available():
        precision, reason = plans.auto_precision(torch.device("mps"))
        print(f"mps: precision={precision} ({reason})")
    results = []
    if ops is not None:
        results.append(_row("cpu kernels", lambda: _with_plan(plan, check_native)))
    with tempfile.TemporaryDirectory(prefix="charlm-doctor-") as tmp:
        work = Path(tmp)
        text = work / "text.txt"
        text.write_text(TEXT, encoding="utf-8")
        devices = ["cpu"] + [f"cuda:{i}" for i in range(gpus)] + (["mps"] if mps_available() else [])
        for device in devices:
            for precision in ("fp32", "bf16"):
                for cell in ("reset_after", "reset_before", "lstm"):
                    label = f"{device} {precision} {cell}"
                    results.append(_row(label, lambda: check_single(text, work, device, precision, cell)))
        if gpus == 0:
            print(f"{'cuda':<34} - no GPU: torch.cuda.is_available() is False")
        if not mps_available():
            print(f"{'mps':<34} - no Apple GPU: torch.backends.mps.is_available() is False")
        results.append(_row("2 processes, gloo (CPU)", lambda: check_ddp(text, work, "cpu")))
        if gpus >= 2:
            results.append(_row("2 processes, NCCL (cuda)", lambda: check_ddp(text, work, "cuda")))
        else:
            print(f"{'2 processes, NCCL (cuda)':<34} - needs two GPUs, this machine has {gpus}")
    failed = sum(not ok for ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
