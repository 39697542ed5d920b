"""python -m charlm.bench: how fast charlm trains and samples on this machine, in one table.

    python -m charlm.bench [device=cuda] [models=given d_model=512 batch_size=32] [reps=5] ...

First the machine's matmul peak in fp32 and bf16, measured in this run; every rate after it is
also given as a fraction of the peak measured beside it: on a shared machine the peak itself
drifts from minute to minute. Each repetition of a training row is set against the better of two
matmuls just before it, and the row gives the median of those fractions (the median rate over
the best of all the peaks would count every slow moment against the rate and none against the
peak); the sampling rows against the best of five before them. Training, for the default models of data=timemachine,
model=reference and data=tinyshakespeare (or only the one given): charlm's real step (CharLM,
AdamW, gradient clipping, train.precision=auto) against a plain PyTorch loop (Embedding ->
nn.GRU -> Linear -> LogSoftmax, Adam, fp32), same sizes and same batches, timed in turn in this
one process; medians with min-max over `reps` repetitions. Sampling: bytes/s at batch 1 and 64
for the 256- and 512-wide models, and the cost of 2,000 bytes over 500 (4 means linear).
Every row runs the plan printed at the start, the trainer's for this machine (charlm.plan);
`plan.<part>=` and `precision=` force any part, so that two plans can be compared row by row.
Peak memory: the process's resident high-water mark (and CUDA's, on a GPU).
"""
from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from charlm import plan as plans
from charlm.config import BenchConfig, ModelConfig, TrainConfig
from charlm.data.corpora import PACKAGED
from charlm.device import Precision, keep_freed_memory, plan_precision, resolve_device
from charlm.inference.sampling import generate
from charlm.model import matmuls, native
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
    """n (x, y) batches of random windows of The Time Machine, the copy that ships with charlm
    (whatever the working directory), repeated where a window is longer than the book."""
    g = torch.Generator().manual_seed(0)
    text = torch.frombuffer(bytearray((PACKAGED / "timemachine.txt").read_bytes()), dtype=torch.uint8)
    if len(text) < seq + 2:
        text = text.repeat((seq + 2) // len(text) + 1)
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


class Peak:
    """The machine's matmul peak in fp32 and bf16: a (size, size) @ (size, size) matmul, timed
    whenever measure() is called, so that each row of the table is set against the peak measured
    beside it (on a shared machine the peak itself drifts from minute to minute).

    fp32 runs in the library the plan's fp32 matmuls use (charlm/model/matmuls.py: torch.mm, or
    oneDNN with plan.matmul=onednn, as auto takes on AMD CPUs with AVX-512, where MKL runs AVX2 code)."""

    def __init__(self, device: torch.device):
        self.device = device
        # bf16 no faster than fp32 (emulated, or AVX-512 BF16 without AMX: auto's precision is fp32
        # there): where emulated, a 2048^3 matmul takes tens of seconds, and a smaller one shows the rate
        self.slow_bf16 = device.type == "cpu" and plans.auto_precision(device)[0] == "fp32"
        self.size = {"fp32": 2048, "bf16": 256 if self.slow_bf16 else 2048}
        g = torch.Generator().manual_seed(0)
        self.operands = {
            name: tuple(torch.randn(self.size[name], self.size[name], generator=g).to(device=device, dtype=dtype)
                        for _ in range(2))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
        self.matmul: dict[str, Callable] = {"fp32": matmuls.mm, "bf16": torch.mm}
        self.rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for name in self.rates:  # warm up
            self.matmul[name](*self.operands[name])

    def measure(self, name: str) -> float:
        """GFLOP/s of one matmul in precision `name` (fp32, bf16), now."""
        a, b = self.operands[name]
        mm = self.matmul[name]
        rate = 2 * self.size[name] ** 3 / _time(lambda: mm(a, b), self.device) / 1e9
        self.rates[name].append(rate)
        return rate

    def best(self, name: str, reps: int = 5) -> float:
        """The best of `reps` measurements now."""
        return max(self.measure(name) for _ in range(reps))

    def now(self, name: str) -> float:
        """The peak at this moment: the better of two measurements in a row."""
        return self.best(name, reps=2)


def _rows(args: BenchConfig) -> list[tuple[str, int, int, int, int, bool]]:
    """(name, d_model, n_layers, batch, seq, whether its model drops the embeddings) of each model
    the table times: the recipe's training then reads them, not layer 0's table."""
    if args.models == "given":
        return [(f"d_model={args.d_model} n_layers={args.n_layers}", args.d_model, args.n_layers,
                 args.batch_size, args.seq_len, False)]
    from charlm.commands.settings import run_config

    rows = []  # each corpus's model and batch as train.py composes them (the recipes); reference at 32 lanes
    for name, overrides in (("data=timemachine (the default)", []), ("model=reference", ["model=reference",
                            "train.batch_size=32"]), ("data=tinyshakespeare", ["data=tinyshakespeare"])):
        cfg = run_config(overrides)
        drops = cfg.model.dropout > 0 and cfg.model.embed_dropout
        rows.append((name, cfg.model.d_model, cfg.model.n_layers, cfg.train.batch_size, cfg.train.seq_len, drops))
    return rows


def bench_training(args: BenchConfig, device: torch.device, peak: Peak, precision: Precision) -> Iterator[str]:
    yield (f"training: tokens/s, median (min-max) of {args.reps} repetitions of {args.steps} steps (more where"
             f" {args.steps} steps hold under {MIN_TOKENS:,} tokens, so that a small model's repetition is not"
             " lost in noise; models=given takes steps as given); the matmul rate is 6 x weights outside the"
             " embedding per token (where layer 0 is read from a table, its input weights count 6 x 256 rows"
             " a step instead); the fraction of the peak is the median over the repetitions of each one's"
             " against the peak just before it (the better of two matmuls); without dropout, each path the"
             " recipe's training takes")
    for name, d_model, n_layers, batch, seq, drops in _rows(args):
        yield from _train_row(args, device, peak, precision, name, d_model, n_layers, batch, seq, drops)


MIN_TOKENS = 16_000  # per timed repetition: 5 default steps hold 32,000, Tiny Shakespeare's 8,000


def _train_row(args: BenchConfig, device: torch.device, peak: Peak, precision: Precision, name: str,
               d_model: int, n_layers: int, batch: int, seq: int, drops_embeddings: bool) -> Iterator[str]:
    torch.manual_seed(0)
    plain = PlainGRU(d_model, n_layers).to(device)
    ours = CharLM(ModelConfig(d_model=d_model, n_layers=n_layers, dropout=0.0)).to(device)
    ours.load_state_dict(plain.state_dict())  # same names, same initial weights
    # where the recipe drops the embeddings, its training reads them: time that path
    with plans.use(replace(plans.current(), table="off") if drops_embeddings else plans.current()):
        yield from _train_rows(args, device, peak, precision, name, plain, ours, batch, seq)


def _train_rows(args: BenchConfig, device: torch.device, peak: Peak, precision: Precision, name: str,
                plain: nn.Module, ours: CharLM, batch: int, seq: int) -> list[str]:
    d_model, n_layers = ours.config.d_model, ours.config.n_layers
    tc = TrainConfig(batch_size=batch, seq_len=seq)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    table = ours.reads_a_table(torch.zeros(batch, seq, dtype=torch.long, device=device))
    ours_opt = make_optimizer(ours, tc)
    steps = args.steps if args.models == "given" else max(args.steps, -(-MIN_TOKENS // (batch * seq)))
    batches = _batches(steps, batch, seq, device)

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
    t_plain, t_ours, p_plain, p_ours = [], [], [], []
    for _ in range(args.reps):  # in turn, so drift in the machine's speed hits both alike
        p_plain.append(peak.now("fp32"))  # each repetition beside the peak of its own moment
        t_plain.append(_time(plain_steps, device))
        p_ours.append(peak.now(precision.name))
        t_ours.append(_time(our_steps, device))
    tokens = steps * batch * seq
    flop = 6 * sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("embed"))
    if table:  # the table's three matmuls of 256 rows a step replace layer 0's input matmuls
        flop -= 6 * ours.gru.weight_ih_l0.numel() * (1 - 256 / (batch * seq))
    plain_rate, plain_s = _fmt(t_plain, tokens)
    our_rate, our_s = _fmt(t_ours, tokens)
    peaks = {"fp32": statistics.median(p_plain), precision.name: statistics.median(p_ours)}
    ours_label = f"charlm step, {precision.name} ({precision.why.split(':')[0]})"
    return [
        f"  {name}: {d_model} x {n_layers} layers, batch {batch} x {seq}, {flop / 1e6:.1f} MFLOP per token"
        + (" (layer 0 from a table)," if table else ",")
        + f" {steps} steps a repetition; peak beside it (median) "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in sorted(peaks.items())),
        f"    {'plain nn.GRU loop, fp32, Adam':<34}{plain_s} tokens/s "
        + _of_peak(plain_rate * flop, _paired(t_plain, p_plain, tokens * flop), "fp32"),
        f"    {ours_label:<34}{our_s} tokens/s "
        + _of_peak(our_rate * flop, _paired(t_ours, p_ours, tokens * flop), precision.name),
        f"    {'ratio charlm / plain':<34}{our_rate / plain_rate:>9.2f}x   ({precision.why})",
    ]


def _paired(times: list[float], peaks: list[float], flop: float) -> float:
    """The median over repetitions of each one's rate as a fraction of the peak measured just
    before it (flop: a repetition's arithmetic)."""
    return statistics.median(flop / t / 1e9 / p for t, p in zip(times, peaks))


def _of_peak(flops: float, fraction: float, precision: str) -> str:
    return f"{flops / 1e9:6.1f} GFLOP/s = {fraction:4.0%} of the {precision} peak"


def bench_sampling(args: BenchConfig, device: torch.device, peak: Peak, precision: Precision) -> Iterator[str]:
    peaks = {"fp32": peak.best("fp32"), "bf16": peak.best("bf16")}
    # where bf16 matmuls are no faster than fp32, bf16 decoding is set against the higher peak, fp32's
    against = {"fp32": "fp32", "bf16": "fp32" if peak.slow_bf16 else "bf16"}
    yield (f"sampling: bytes/s at temperature 0.8, state carried (one step per byte), median of {args.sample_reps};"
           f" decoding on the CPU: {native.status(plans.current().kernels)};"
           f" peaks fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f}"
           " GFLOP/s, best of 5 before it; bf16: sample.py precision=bf16"
           + (", set against the fp32 peak (bf16 matmuls are no faster here)" if peak.slow_bf16 else ""))
    widths = sorted({row[1] for row in _rows(args) if row[1] >= 256} or {args.d_model})
    for d_model in widths:
        torch.manual_seed(0)
        model = CharLM(ModelConfig(d_model=d_model, n_layers=args.n_layers)).to(device).eval()
        # per byte: every matmul but layer 0's input projection, which is a table read
        flop = 2 * sum(p.numel() for n, p in model.named_parameters()
                       if p.dim() == 2 and not n.startswith(("embed", "gru.weight_ih_l0")))
        for n, precision in ((1, "fp32"), (1, "bf16"), (64, "fp32"), (64, "bf16")):
            times = {}
            for length in (500, 2000):
                g = torch.Generator(device=device).manual_seed(0)

                def run(length=length, n=n, g=g, precision=precision) -> list:
                    return [b.cpu() for b in generate(model, b"t", length, 0.8, num_samples=n, generator=g,
                                                      precision=precision)]

                run()  # warm up
                times[length] = sorted(_time(run, device) for _ in range(args.sample_reps))
            med = statistics.median(times[2000])
            rate = n * 2000 / med
            ratio = med / statistics.median(times[500])
            versus = against[precision]
            yield (f"  {d_model} x {args.n_layers}, batch {n:<3} {precision} {rate:>10,.0f} bytes/s "
                   f"{_of_peak(rate * flop, rate * flop / 1e9 / peaks[versus], versus)}"
                   f"  (2,000 vs 500 bytes cost {ratio:.2f}x, linear is 4)")


def main(argv: list[str]) -> int:
    """`python -m charlm.bench [key=value ...]`: the exit status."""
    from charlm.commands import run_tool

    return run_tool(BenchConfig, argv, __doc__, _bench)


def _bench(args: BenchConfig) -> int:
    device = resolve_device(args.device)
    keep_freed_memory()  # as the trainer does
    plan, why, _ = plans.resolve(args.plan, device, args.precision)
    precision = plan_precision(plan.precision, ("auto: " if args.precision == "auto" else "") + why["precision"])
    with plans.use(plan):
        return _bench_with(args, device, plan, precision)


def _bench_with(args: BenchConfig, device: torch.device, plan: plans.Plan, precision: Precision) -> int:
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
    print(f"plan: {plan.line()}")
    if device.type == "cpu":
        print(f"GRU time loops: {native.status(plan.kernels)}"
              + (f"; {native.matmuls(plan.kernels)}" if plan.kernels != "off" else ""))
    peak = Peak(device)
    fp32, bf16 = peak.best("fp32"), peak.best("bf16")
    fp32_by = f" by {'oneDNN' if plan.matmul == 'onednn' else 'torch.mm'}" if device.type == "cpu" else ""
    print(f"matmul peak at the start, best of 5 {peak.size['fp32']}^3 matmuls: fp32 {fp32:.0f} GFLOP/s{fp32_by}, bf16 "
          + (f"{bf16:.2f} GFLOP/s (no faster than fp32 on this CPU, {peak.size['bf16']}^3)" if peak.slow_bf16
             else f"{bf16:.0f} GFLOP/s")
          + "; each row below is set against the peak measured beside it", flush=True)
    for name, section in (("training", bench_training), ("sampling", bench_sampling)):
        if name != args.skip:
            for line in section(args, device, peak, precision):
                print(line, flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak memory: {rss:,.0f} MiB resident"
          + (f", {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB on the GPU"
             if device.type == "cuda" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
