"""charlm's C++ kernels (charlm/model/kernels/): compiled per build on first use, cached, loaded.

    ops()           the kernels of the plan in use (charlm.plan), or None where its kernels are off
    load(build)     torch.ops.charlm_<build> with every op, compiled once and cached; None where
                    it cannot be built (status(build) says why)
    status(build)   one line: which code runs the GRU's loops, and why
    matmuls(kernels) what the training loops' recurrent matmuls run on

A build is a set of compiler flags (charlm.cpu.BUILDS: portable, avx2, avx512, avx512bf16, amx),
not this CPU's -march=native, so that a plan names exactly the code it runs. Each build registers
its ops under its own namespace (torch.ops.charlm_avx2, ...): several load side by side, which is
how the tests check every build this CPU runs against the same reference.

The first use of a build compiles the files with the C++ compiler and ninja that
torch.utils.cpp_extension uses, into ~/.cache/charlm/kernels (CHARLM_CACHE moves it); later runs
load the cached library. The cache key holds the sources' text, torch, Python, the environment
(sys.prefix), the compiler and the flags, so that two virtual environments never rebuild each
other's, and two checkouts of the same sources share one build. When a build cannot be made (no
compiler, no ninja), one line says so, once, and the run computes the same things in PyTorch's
operations.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from charlm import cpu, plan

KERNELS = Path(__file__).with_name("kernels")

_lock = threading.Lock()
_loaded: dict[tuple[str, str], tuple[Optional[Any], str]] = {}  # (build, source dir or "") -> (ops, status)


def sources(where: Path = KERNELS) -> list[Path]:
    """The kernels' C++ files, headers included (their text is part of the cache key)."""
    return sorted(p for p in where.iterdir() if p.suffix in (".cpp", ".h"))


def cache_dir() -> Path:
    """Where the compiled kernels are kept."""
    root = os.environ.get("CHARLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "charlm")
    return Path(root) / "kernels"


def cflags(build: str, namespace: str) -> list[str]:
    """The compiler's flags for a build. -fopenmp: at::parallel_for is compiled into the kernels,
    and without OpenMP it runs every loop on one thread (the library links to the libgomp torch
    loaded). -fno-trapping-math: the gate loops' clamps and NaN checks may become vector selects
    (without it, GCC vectorizes them for AVX-512, which masks, but not for AVX2). Hidden symbols:
    two builds in one process never resolve each other's functions."""
    return ["-O3", *cpu.build_flags(build), "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
            "-fvisibility=hidden", f"-DCHARLM_LIBRARY_NS={namespace}"]


def _compiler_version(compiler: str) -> bytes:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _build_key(build: str, where: Path, compiler: str) -> str:
    """The sources' text, torch, Python and its environment, the compiler and the flags: a change to
    any builds anew. Two checkouts of the same sources share a build (a fresh clone compiles
    nothing); sources elsewhere than the package's own have a namespace of their own (namespace())."""
    parts = [p.read_bytes() for p in sources(where)]
    parts += [torch.__version__.encode(), sys.version.encode(), sys.prefix.encode(), _compiler_version(compiler),
              " ".join(cflags(build, "ns")).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def namespace(build: str, where: Path = KERNELS) -> str:
    """The op namespace of a build of the sources in `where`: charlm_<build> for the package's own."""
    if where.resolve() == KERNELS.resolve():
        return f"charlm_{build}"
    return f"charlm_{build}_{hashlib.sha256(str(where.resolve()).encode()).hexdigest()[:8]}"


def _key(build: str, where: Path) -> tuple[str, str]:
    # the package's own sources need no filesystem call: ops() asks on every layer and every byte
    return (build, "") if where is KERNELS else (build, str(where.resolve()))


def load(build: str, where: Path = KERNELS) -> Optional[Any]:
    """torch.ops.<namespace(build)> with every kernel, built or loaded once per process; None
    where the build cannot be made here (status(build) says why)."""
    key = _key(build, where)
    found = _loaded.get(key)
    if found is None:
        with _lock:
            if key not in _loaded:
                _loaded[key] = _load(build, where)
            found = _loaded[key]
    return found[0]


def status(build: str, where: Path = KERNELS) -> str:
    """Which code runs the GRU's time loops and decoding for this build, and why."""
    if build == "off":
        return "PyTorch operations (plan kernels=off)"
    load(build, where)
    return _loaded[_key(build, where)][1]


def ops() -> Optional[Any]:
    """The kernels of the plan in use (charlm.plan.current()), or None where its kernels are off."""
    build = plan.current().kernels
    return None if build == "off" else load(build)


def _load(build: str, where: Path) -> tuple[Optional[Any], str]:
    ns = namespace(build, where)
    loaded = f"charlm's {build} kernels (charlm/model/kernels/)"
    if sys.platform != "linux":
        return None, f"PyTorch operations (the kernels are built on Linux only, this is {sys.platform})"
    if hasattr(getattr(torch.ops, ns), "gru_forward"):  # loaded already, by another copy of this module
        return getattr(torch.ops, ns), loaded
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"PyTorch operations (no C++ compiler '{compiler}' to build the kernels)"
    if not cpp_extension.is_ninja_available():
        try:  # the ninja package (a dependency) can sit outside PATH, e.g. in a venv not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
    if not cpp_extension.is_ninja_available():
        return None, "PyTorch operations (ninja, which builds the kernels, is not installed: pip install ninja)"
    name = f"{ns}_{_build_key(build, where, compiler)}"
    out = cache_dir() / name
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _BuildLock(out):
            if not (out / f"{name}.so").exists():
                print(f"charlm: compiling the {build} kernels, once (10-60 s; cached in {out})",
                      file=sys.stderr, flush=True)
            cpp_extension.load(
                name, [str(where / "build.cpp")], build_directory=str(out),
                is_python_module=False, verbose=False, extra_cflags=cflags(build, ns), extra_ldflags=["-fopenmp"],
            )
    except Exception as e:  # a compiler error, a missing library, a full disk: run without them
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        why = f"PyTorch operations (the {build} kernels did not build: {first[:160]})"
        print(f"charlm: {why}; training and sampling go on, slower", file=sys.stderr, flush=True)
        return None, why
    return getattr(torch.ops, ns), loaded


class _BuildLock:
    """One compile of a build at a time, across processes, by an flock on a file beside it: the
    kernel drops an flock when its holder dies (kill -9, a closed terminal, the OOM killer), so a
    killed compile never blocks the next run. Holding it, any lock file torch's builder left
    (its FileBaton, which a killed process leaves behind and every later build would wait on
    forever) is stale, and is removed."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.fd = -1

    def __enter__(self) -> "_BuildLock":
        import fcntl  # Linux only, as the kernels are

        self.fd = os.open(self.out / ".charlm-build.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        stale = self.out / "lock"  # torch.utils.file_baton.FileBaton's
        if stale.exists():
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def matmuls(build: str) -> str:
    """What the training time loops' recurrent matmuls run on, in fp32 and in bf16, for a build:
    charlm's own micro-kernel for its vector instructions (each thread then runs the whole loop for
    its rows of the batch), or at::mm; '' where the kernels are off."""
    kernels = None if build == "off" else load(build)
    if kernels is None:
        return ""
    said = []
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        isa = kernels.recurrent_matmul(dtype)
        said.append(f"{name} by at::mm" if isa == "at::mm" else f"{name} by charlm's {isa} micro-kernel")
    return "recurrent matmuls: " + ", ".join(said)
