"""Run a command and keep what it printed as a dated record under benchmarks/records/.

    python benchmarks/record.py                       # python -m charlm.bench, this machine's row
    python benchmarks/record.py --name tm-default -- python train.py data=timemachine
    python benchmarks/record.py --name page -- python -m charlm.bench models=given d_model=128

A record is the evidence behind a figure in the README or docs/: the commit (and whether the
tree had changes), the machine (`lscpu`'s model and flags, PyTorch's CPU capability, the GPU if
any), the exact command, its exit status, wall time and peak memory, and its whole output. The
command's output is shown as it runs. Figures in the docs link to the record they come from.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records"


def machine() -> dict[str, str]:
    """What made the figures: CPU model and flags, cores, PyTorch's view of them, the GPU."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu capability (torch.backends.cpu.get_cpu_capability())": torch.backends.cpu.get_cpu_capability(),
            "cores (os.cpu_count())": str(os.cpu_count())}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", lscpu, re.M))
        info["cpu (lscpu Model name)"] = fields.get("Model name", "?")
        info["cpu family / model"] = f"{fields.get('CPU family', '?')} / {fields.get('Model', '?')}"
        info["flags (lscpu, the SIMD ones)"] = " ".join(
            f for f in fields.get("Flags", "").split() if re.match(r"(avx|fma|amx|sse4|f16c|bmi)", f))
    except (OSError, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["gpu"] = "Apple MPS"
    return info


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def run(command: list[str]) -> tuple[int, str, float, int]:
    """(exit status, stdout and stderr as they interleaved, wall seconds, peak resident KB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = bytearray()
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        out += chunk
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    status = proc.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return status, out.decode("utf-8", errors="replace"), time.perf_counter() - t0, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="bench", help="the record's name after its date and machine")
    parser.add_argument("--note", default="", help="a line on what the record is for")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ... (default: python -m charlm.bench)")
    args = parser.parse_args()
    command = [a for a in args.command if a != "--"] or [sys.executable, "-m", "charlm.bench"]
    if command[0] == "python":
        command[0] = sys.executable
    status, output, seconds, peak = run(command)  # first: this process stays small while it forks
    info = machine()
    typed = ["python", *command[1:]] if command[0] == sys.executable else command
    shown = " ".join(shlex.quote(a) for a in typed)
    cpu = re.sub(r"[^a-z0-9]+", "-", info.get("cpu (lscpu Model name)", "cpu").lower()).strip("-")[:40]
    path = RECORDS / f"{datetime.date.today().isoformat()}-{cpu}-{args.name}.md"
    lines = [f"# {args.name}: `{shown}`", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}", f"- commit: {commit()}"]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [f"- command (from the repository root): `{shown}`", f"- exit status: {status}",
              f"- wall time: {seconds:.1f} s; peak resident memory of the command: {peak / 1024:.0f} MB", "",
              "## Output", "", "```", output.rstrip("\n"), "```", ""]
    RECORDS.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"\nwrote {path.relative_to(ROOT)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
