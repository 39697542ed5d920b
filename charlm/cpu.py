"""What this CPU offers charlm: its instruction-set flags and vendor, and the kernel builds it runs.

    cpu_flags(), cpu_vendor()      as Linux's /proc/cpuinfo names them (empty elsewhere)
    BUILDS, build_flags(build)     each build of charlm's C++ kernels: its compiler flags, the CPU flags it needs
    runnable_builds()              the builds this CPU runs, oldest first, within ATEN_CPU_CAPABILITY's limit
    bf16_capped()                  whether ONEDNN_MAX_CPU_ISA keeps oneDNN from its bf16 instructions

charlm.plan's rules read these; nothing here times anything.
"""
from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch

# The kernel builds, oldest CPUs first: the compiler's flags and the CPU flags (as /proc/cpuinfo
# names them) each needs. x86-64-v2..v4 are the psABI's levels: v3 adds AVX2 and FMA, v4 AVX-512.
_V2 = {"sse4_2", "popcnt", "ssse3", "cx16"}
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
BUILDS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "portable": (("-march=x86-64-v2",), frozenset(_V2)),
    "avx2": (("-march=x86-64-v3",), frozenset(_V3)),
    "avx512": (("-march=x86-64-v4",), frozenset(_V4)),
    "avx512bf16": (("-march=x86-64-v4", "-mavx512bf16"), frozenset(_V4 | {"avx512_bf16"})),
    # AMX's bfloat16 matmuls are oneDNN's: this build leaves bf16 training matmuls to at::mm
    "amx": (("-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
            frozenset(_V4 | {"avx512_bf16", "amx_tile", "amx_bf16"})),
}
AVX512_BUILDS = ("avx512", "avx512bf16", "amx")
# How far ATEN_CPU_CAPABILITY (torch.backends.cpu.get_cpu_capability()) lets a build go.
_CAP = {"DEFAULT": "portable", "AVX2": "avx2", "ZVECTOR": "portable", "VSX": "portable"}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux names them (empty where /proc/cpuinfo has none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """'AuthenticAMD', 'GenuineIntel', ... ('' where /proc/cpuinfo does not say)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def runnable_builds(flags: Optional[frozenset[str]] = None, capability: Optional[str] = None) -> list[str]:
    """The kernel builds this CPU can run, oldest first, within ATEN_CPU_CAPABILITY's limit."""
    if not is_x86():
        return ["portable"]  # the compiler's defaults for this architecture (no x86 micro-kernels)
    flags = cpu_flags() if flags is None else flags
    cap = _CAP.get(capability or torch.backends.cpu.get_cpu_capability())
    names = list(BUILDS)
    usable = [b for b in names if BUILDS[b][1] <= flags]
    return [b for b in usable if cap is None or names.index(b) <= names.index(cap)]


def build_flags(build: str) -> tuple[str, ...]:
    """The compiler's instruction-set flags for a build (none off x86: the compiler's default)."""
    return BUILDS[build][0] if is_x86() else ()


def bf16_capped() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA keeps oneDNN below its bf16 instructions (CI runs as an AVX2 CPU)."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return limit not in ("ALL", "DEFAULT") and "BF16" not in limit and "AMX" not in limit
