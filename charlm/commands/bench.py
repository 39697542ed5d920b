"""python -m charlm.bench: how fast charlm trains and samples on this machine, in one table.

    python -m charlm.bench [device=cuda] [d_model=512] [batch_size=32] [reps=5] ...

Training: charlm's real step (CharLM, AdamW, gradient clipping, train.precision=auto) against a
plain PyTorch loop (Embedding -> nn.GRU -> Linear -> LogSoftmax, Adam, fp32), same sizes and
same batches, timed in turn in this one process; medians with min-max over `reps` repetitions.
Sampling: bytes/s at batch 1 and 64, and the cost of 2,000 bytes over 500 (4 means linear).
Peak memory: the process's resident high-water mark (and CUDA's, on a GPU).
"""
from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from charlm.config import BenchConfig, ModelConfig, TrainConfig
from charlm.device import choose_precision, resolve_device
from charlm.inference.sampling import generate
from charlm.model.network import CharLM
from charlm.training.step import make_optimizer, train_step


class PlainGRU(nn.Module):
    """The baseline: what a tutorial writes."""

    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.gru = nn.GRU(d_model, d_model, n_layers, batch_first=True)
        self.head = nn.Linear(d_model, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(x))
        return torch.log_softmax(self.head(out), dim=-1)


def _batches(n: int, batch: int, seq: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (x, y) batches of random windows of The Time Machine when it is in data/, else random bytes."""
    g = torch.Generator().manual_seed(0)
    path = Path("data/timemachine.txt")
    text = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) if path.exists() else None
    if text is None or len(text) < seq + 2:
        text = torch.randint(0, 256, (1 << 20,), generator=g, dtype=torch.uint8)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(text) - seq - 1, (batch,), generator=g)
        windows = torch.stack([text[s : s + seq + 1] for s in starts.tolist()]).long()
        out.append((windows[:, :-1].to(device), windows[:, 1:].to(device)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _fmt(times: list[float], work: float) -> tuple[float, str]:
    """(median rate, 'median (min-max)') for `work` units done in each of `times`."""
    rates = sorted(work / t for t in times)
    med = statistics.median(rates)
    return med, f"{med:>9,.0f}  ({rates[0]:,.0f}-{rates[-1]:,.0f})"


def bench_training(args: BenchConfig, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    tc = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    plain = PlainGRU(args.d_model, args.n_layers).to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    ours = CharLM(ModelConfig(d_model=args.d_model, n_layers=args.n_layers, dropout=0.0)).to(device)
    ours.load_state_dict(plain.state_dict())  # same names, same initial weights
    ours_opt = make_optimizer(ours, tc)
    precision = choose_precision(args.precision, ours, device, (args.batch_size, args.seq_len))
    bf16, why = precision.bf16, precision.why
    batches = _batches(args.steps, args.batch_size, args.seq_len, device)

    def plain_steps() -> float:
        for x, y in batches:
            loss = F.nll_loss(plain(x).reshape(-1, 256), y.reshape(-1))
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()
        return loss.item()

    def our_steps() -> float:  # the trainer's own step
        for x, y in batches:
            loss, _, _ = train_step(ours, ours, ours_opt, precision, x, y, None, tc.grad_clip)
            ours_opt.step()
        return loss.item()

    plain_steps(), our_steps()  # warm up: allocator, kernels, optimizer state
    t_plain, t_ours = [], []
    for _ in range(args.reps):  # in turn, so drift in the machine's speed hits both alike
        t_plain.append(_time(plain_steps, device))
        t_ours.append(_time(our_steps, device))
    tokens = args.steps * args.batch_size * args.seq_len
    plain_rate, plain_s = _fmt(t_plain, tokens)
    our_rate, our_s = _fmt(t_ours, tokens)
    flops = 6 * sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("embed"))
    return [
        f"training, d_model {args.d_model} x {args.n_layers} layers, batch {args.batch_size} x seq {args.seq_len}, "
        f"{args.steps} steps per repetition, {args.reps} repetitions",
        f"  plain nn.GRU loop, fp32, Adam      {plain_s} tokens/s",
        f"  charlm step, {'bf16' if bf16 else 'fp32'} ({why.split(':')[0]}){' ' * max(1, 17 - len(why.split(':')[0]))}"
        f"{our_s} tokens/s",
        f"  ratio charlm / plain               {our_rate / plain_rate:>9.2f}x",
        f"  charlm's precision                 {why}",
        f"  matmul work per token              {flops / 1e6:>9.1f} MFLOP (6 x weights: forward + backward)",
        f"  charlm's matmul rate               {our_rate * flops / 1e9:>9.1f} GFLOP/s",
    ]


def bench_sampling(args: BenchConfig, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=args.d_model, n_layers=args.n_layers)).to(device).eval()
    lines = ["sampling, temperature 0.8, hidden state carried (one GRU step per byte)"]
    for n in (1, 64):
        times = {}
        for length in (500, 2000):
            g = torch.Generator(device=device).manual_seed(0)
            def run(length=length, n=n, g=g) -> list:
                return [b.cpu() for b in generate(model, b"t", length, 0.8, num_samples=n, generator=g)]

            run()  # warm up
            times[length] = sorted(_time(run, device) for _ in range(args.sample_reps))
        med = statistics.median(times[2000])
        rate = n * 2000 / med
        ratio = med / statistics.median(times[500])
        lines.append(
            f"  batch {n:<3} {rate:>10,.0f} bytes/s  (2,000 bytes in {med:.2f} s;"
            f" 2,000 vs 500 bytes cost {ratio:.2f}x, linear is 4)"
        )
    return lines


def main(argv: list[str]) -> int:
    """`python -m charlm.bench [key=value ...]`: the exit status."""
    from charlm.commands import run_tool

    return run_tool(BenchConfig, argv, __doc__, _bench)


def _bench(args: BenchConfig) -> int:
    device = resolve_device(args.device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"charlm bench | torch {torch.__version__} | {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({cpu})")
        + f" | {torch.get_num_threads()} threads | CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    for name, section in (("training", bench_training), ("sampling", bench_sampling)):
        if name != args.skip:
            print("\n".join(section(args, device)), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak memory: {peak:,.0f} MiB resident"
          + (f", {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB on the GPU"
             if device.type == "cuda" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
