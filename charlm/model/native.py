"""charlm's fused GRU kernels (charlm/model/native_gru.cpp): compiled for this CPU on first use,
cached, and used where they load; PyTorch's own operations compute the same thing elsewhere.

    ops()     torch.ops.charlm (gru_forward, gru_backward, mm_tn, gru_decode, gemv_layout, draw,
              gru_write, dropout_mask, log_softmax_rows and its backward, threads, recurrent_matmul),
              or None
    status()  one line: which path runs, and why
    matmuls() what the time loops' recurrent matmuls (and bf16 weight gradients) run on

The first use compiles the file with the C++ compiler and ninja that torch.utils.cpp_extension
uses (10-20 s on two cores), into ~/.cache/charlm/kernels (CHARLM_CACHE moves it); later
runs load the cached library in well under a second. CHARLM_NATIVE=0 turns the kernels off.
When they cannot be built (no compiler, no ninja), one line says so, once, and every path runs
in PyTorch's operations instead: the same results, more operations per time step.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import torch

SOURCE = Path(__file__).with_name("native_gru.cpp")

LOADED = "fused C++ kernels (charlm/model/native_gru.cpp)"  # status() where they run

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": the loaded ops or None, "why": the status line


def cache_dir() -> Path:
    """Where the compiled kernels are kept."""
    root = os.environ.get("CHARLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "charlm")
    return Path(root) / "kernels"


def _arch() -> str:
    """-march for the build: this CPU's own instruction sets, or those ATEN_CPU_CAPABILITY limits
    PyTorch to (avx2: as an AVX2-only CPU would run)."""
    limit = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    return {"avx2": "x86-64-v3", "default": "x86-64-v2"}.get(limit, "native")


def _cflags() -> list[str]:
    """The compiler's flags. -fopenmp: at::parallel_for is compiled into the kernels, and without
    OpenMP it runs every loop on one thread (the library links to the libgomp torch loaded).
    -fno-trapping-math: the gate loops' clamps and NaN checks may become vector selects (without
    it, GCC vectorizes them for AVX-512, which masks, but not for AVX2)."""
    return ["-O3", f"-march={_arch()}", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]


def _build_key() -> str:
    """Source (its text and where it is: two checkouts must not rebuild each other's), torch,
    Python, the flags and this CPU's instruction sets: a change to any builds anew."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    parts = [SOURCE.read_bytes(), str(SOURCE.resolve()).encode(), torch.__version__.encode(), sys.version.encode(),
             flags.encode(), " ".join(_cflags()).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def _load() -> tuple[Optional[Any], str]:
    if os.environ.get("CHARLM_NATIVE", "1") == "0":
        return None, "PyTorch operations (CHARLM_NATIVE=0 turns the fused kernels off)"
    if sys.platform != "linux":
        return None, f"PyTorch operations (the fused kernels are built on Linux only, this is {sys.platform})"
    if hasattr(torch.ops.charlm, "gru_forward"):  # loaded already, by another copy of this module
        return torch.ops.charlm, LOADED
    import shutil

    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"PyTorch operations (no C++ compiler '{compiler}' to build the fused kernels)"
    if not cpp_extension.is_ninja_available():
        try:  # the ninja package (a dependency) can sit outside PATH, e.g. in a venv not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass
    if not cpp_extension.is_ninja_available():
        return None, "PyTorch operations (ninja, which builds the fused kernels, is not installed: pip install ninja)"
    name = f"charlm_native_{_build_key()}"
    where = cache_dir() / name
    built = (where / f"{name}.so").exists()
    if not built:
        print(f"charlm: compiling the fused GRU kernels for this CPU, once (10-20 s; cached in {where})",
              file=sys.stderr, flush=True)
    try:
        where.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name, [str(SOURCE)], build_directory=str(where), is_python_module=False, verbose=False,
            extra_cflags=_cflags(), extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # a compiler error, a missing library, a full disk: run without them
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        why = f"PyTorch operations (the fused kernels did not build: {first[:160]})"
        print(f"charlm: {why}; training and sampling go on, slower", file=sys.stderr, flush=True)
        return None, why
    return torch.ops.charlm, LOADED


def ops() -> Optional[Any]:
    """torch.ops.charlm with the fused kernels, built or loaded on the first call; None where they
    cannot be had (then status() says why)."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                _state["ops"], _state["why"] = _load()
    return _state["ops"]


def status() -> str:
    """Which path the GRU's time loop and batch-1 decoding take on the CPU, and why."""
    ops()
    return _state["why"]


def matmuls() -> str:
    """What the training time loops' recurrent matmuls run on, in fp32 and in bf16: charlm's own
    micro-kernel for this CPU's vector instructions (each thread then runs the whole loop for its
    rows of the batch), or at::mm; and whether the bf16 weight gradients take the pair kernel
    (mm_tn); '' without the kernels."""
    kernels = ops()
    if kernels is None:
        return ""
    said = []
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        isa = kernels.recurrent_matmul(dtype)
        said.append(f"{name} by at::mm" if isa == "at::mm" else f"{name} by charlm's {isa} micro-kernel")
    line = "recurrent matmuls: " + ", ".join(said)
    if kernels.tn_kernel("bfloat16", 768, 256):  # mm_tn takes a weight gradient of the default model's
        line += "; bf16 weight gradients by charlm's pair kernel"
    return line
