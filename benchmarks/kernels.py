"""Time each of charlm's C++ kernels against its PyTorch reference, and against another commit's.

    python benchmarks/kernels.py                          # this checkout's kernels (auto's build)
    python benchmarks/kernels.py --build portable         # another build this CPU runs
    python benchmarks/kernels.py --against HEAD~1         # and that commit's kernels, in turn

For a maintainer after a change to charlm/model/kernels/: every op at the default model's shapes
(256 wide, 64 x 100 bytes a step; decoding one byte), checked against its reference (the largest
difference is printed), then timed: median microseconds of `--reps` calls, the versions taken in
turn so that the machine's drift hits them alike. `--against` builds that commit's kernels from
`git show` into a temporary folder and loads them beside this checkout's (each build has its own
op namespace); it needs a commit with charlm/model/kernels/build.cpp.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from charlm import (  # noqa: E402
    CharLM,
    ModelConfig,
    cpu,  # noqa: E402
)
from charlm import plan as plans  # noqa: E402
from charlm.inference import sampling  # noqa: E402
from charlm.model import fused_gru, native  # noqa: E402
from charlm.model.stepping import Stepper  # noqa: E402


def kernels_of(rev: str, into: Path) -> Path:
    """charlm/model/kernels/ as commit `rev` has it, written into `into`."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:charlm/model/kernels"],
                             capture_output=True, text=True)
    if listing.returncode != 0 or "build.cpp" not in listing.stdout.split():
        raise SystemExit(f"--against {rev}: that commit has no charlm/model/kernels/build.cpp to build")
    for name in listing.stdout.split():
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:charlm/model/kernels/{name}"],
                              capture_output=True, check=True).stdout
        (into / name).write_bytes(text)
    return into


def cases(H: int = 256, B: int = 64, T: int = 100) -> list[tuple[str, Callable[[Any], Any], Callable[[], Any]]]:
    """(name, op(kernels) -> result, reference() -> result) at the default model's shapes."""
    g = torch.Generator().manual_seed(0)
    gi, h0 = torch.randn(T, B, 3 * H, generator=g), torch.randn(B, H, generator=g)
    w_hh = torch.randn(3 * H, H, generator=g) / H**0.5
    w_t, b_hh = w_hh.t().contiguous(), torch.randn(3 * H, generator=g)
    saved = fused_gru.forward_loop(gi, h0, w_t, b_hh)
    out, _, rz, n, ghn = saved
    d_out = torch.randn_like(out)
    a, b = torch.randn(T * B, 3 * H, generator=g), torch.randn(T * B, H, generator=g)
    logits, bias = torch.randn(T * B, 256, generator=g), torch.randn(256, generator=g)
    x = torch.randn(T, B, H, generator=g)
    rows = [
        ("gru_forward fp32", lambda k: k.gru_forward(gi, h0, w_t, b_hh, None)[0],
         lambda: fused_gru.forward_loop(gi, h0, w_t, b_hh)[0]),
        ("gru_backward fp32", lambda k: k.gru_backward(d_out, h0, out, rz, n, ghn, w_hh)[0],
         lambda: fused_gru.backward_loop(d_out, h0, out, rz, n, ghn, w_hh)[0]),
        ("gru_forward bf16", lambda k: k.gru_forward(gi.bfloat16(), h0, w_t.bfloat16(), b_hh, None)[0],
         lambda: fused_gru.forward_loop(gi.bfloat16(), h0, w_t.bfloat16(), b_hh)[0]),
        ("mm_tn fp32 (weight gradient)", lambda k: k.mm_tn(a, b), lambda: a.t() @ b),
        ("mm_tn bf16 (weight gradient)", lambda k: k.mm_tn(a.bfloat16(), b.bfloat16()),
         lambda: (a.bfloat16().t() @ b.bfloat16()).float()),
        ("log_softmax_rows", lambda k: k.log_softmax_rows(logits, bias), lambda: torch.log_softmax(logits + bias, -1)),
        ("dropout_mask p=0.2 (kept fraction)", lambda k: (k.dropout_mask(x, 0.2, 1) != 0).float().mean(),
         lambda: (F.dropout(x, 0.2) != 0).float().mean()),
    ]
    # decoding one byte of a 256x2 model: the kernels' step on the weights as Stepper lays them out,
    # against Stepper's own step in PyTorch's operations
    torch.manual_seed(0)
    model = CharLM(ModelConfig(d_model=H, n_layers=2)).eval()
    fast = Stepper(model)
    with plans.use(replace(plans.current(), kernels="off")):
        plain = Stepper(model)
    byte, h = torch.tensor([116]), torch.randn(2, 1, H) * 0.5
    log_probs = torch.log_softmax(torch.randn(64, 256, generator=g) * 3, dim=-1)
    rows += [
        ("gru_decode 256x2, one byte", lambda k: k.gru_decode(byte, h, *fast.native_weights)[0],
         lambda: plain(byte, h)[0]),
        ("draw, 64 rows at T=0.8 (same bytes)", lambda k: k.draw(log_probs, 0.8, torch.Generator().manual_seed(0)),
         lambda: sampling.next_byte(log_probs, 0.8, None, torch.Generator().manual_seed(0))),
    ]
    return rows


def micros(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default=plans.auto_kernels()[0], choices=list(cpu.BUILDS))
    parser.add_argument("--against", help="a commit whose kernels to time beside this checkout's")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    with plans.use(replace(plans.current(), kernels=args.build)):  # the build under test, for Stepper
        return run(args)


def run(args: argparse.Namespace) -> int:
    versions = {"this checkout": native.load(args.build)}
    if versions["this checkout"] is None:
        raise SystemExit(f"the {args.build} kernels are not available: {native.status(args.build)}")
    with tempfile.TemporaryDirectory(prefix="charlm-kernels-") as tmp:
        if args.against:
            old = native.load(args.build, kernels_of(args.against, Path(tmp)))
            if old is None:
                raise SystemExit(f"{args.against}'s {args.build} kernels did not build")
            versions[args.against] = old
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
        print(f"charlm kernels | {args.build} build | {cpu} | torch {torch.__version__} |"
              f" {torch.get_num_threads()} threads | median µs of {args.reps} calls, in turn")
        print(f"{'op':<36}{'reference':>12}" + "".join(f"{name:>16}" for name in versions) + "   largest difference")
        for name, op, reference in cases():
            expect = reference()
            diffs = [float((op(k).double() - expect.double()).abs().max()) for k in versions.values()]
            times: dict[str, list[float]] = {"reference": [], **{v: [] for v in versions}}
            for _ in range(args.reps):
                times["reference"].append(micros(reference))
                for v, k in versions.items():
                    times[v].append(micros(lambda k=k: op(k)))
            print(f"{name:<36}" + "".join(f"{statistics.median(t):>12,.0f}" if i == 0 else
                                          f"{statistics.median(t):>16,.0f}" for i, t in enumerate(times.values()))
                  + "   " + ", ".join(f"{d:.1g}" for d in diffs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
