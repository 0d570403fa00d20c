"""What this process may use of the machine: the core count every thread budget is sized from.

usable_cores()                           # CPUs in the affinity mask, capped by a cgroup (container) quota
compute_threads(0, accelerated=False)    # a forward pass's intra-op threads: all usable cores; 1 on a GPU
cpu_features()                           # CpuFeatures(model, flags): the matrix units the CPU has (/proc/cpuinfo)
cpu_path(features.flags)                 # the fastest CPU path that keeps ranking, for those units
lower_priority(10)                       # the calling thread, and threads it starts, 10 nice levels lower
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

# The /proc/cpuinfo flags of the vector and matrix units a forward pass can use: AVX2 (every x86-64 server of
# the last decade), AVX-512, bf16 dot products (AVX512-BF16, AMX-BF16) and int8 dot products (AVX512-VNNI,
# AVX-VNNI, AMX-INT8; AMX-TILE is the tile registers the AMX instructions need).
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process can run on at once: its CPU affinity, capped by a cgroup v2 or v1 CPU quota.

    A container limited to 2 CPUs on a 64-core host sees 64 in os.cpu_count(); sizing thread pools from that
    oversubscribes it 32 times over.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def compute_threads(requested: int, accelerated: bool) -> int:
    """Intra-op threads of a forward pass: ``requested``, or by default every usable core on a CPU (the model is
    the bottleneck there) and one when an accelerator computes (the host only launches its kernels)."""
    return requested or (1 if accelerated else usable_cores())


def _quota(cgroup: Path) -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        limit, period = (cgroup / "cpu.max").read_text().split()
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        limit = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if limit <= 0 else limit / period
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class CpuFeatures:
    model: str  # /proc/cpuinfo's "model name", e.g. "Intel(R) Xeon(R) Platinum 8480+"
    flags: frozenset[str]  # which of MATRIX_FLAGS the CPU has


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """The CPU's model name and which of ``MATRIX_FLAGS`` it has, from its first processor's entry (an
    unreadable file, or another OS: "unknown" and no flags)."""
    model, flags = "unknown", frozenset()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return CpuFeatures(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split()) & frozenset(MATRIX_FLAGS)
    return CpuFeatures(model, flags)


def cpu_path(flags: frozenset[str] | set[str]) -> str:
    """The fastest path on a CPU with ``flags`` that keeps fp32's ranking (benchmarks/serve_bench.py measures
    each; README, "Which path on which CPU"): "torch-bf16" with bf16 matrix units (AMX-BF16, AVX512-BF16),
    "onnx-int8" with int8 dot products only (VNNI, AMX-INT8), else "onnx-fp32" (an int8 GEMM gains nothing
    without them, and ONNX Runtime's fp32 GEMMs beat torch's on AVX2). Neither lower precision is chosen for a
    user: both change scores, so a model's rank agreement is checked first (the int8 export refuses itself
    below --min-agreement)."""
    if any(f in flags for f in BF16_FLAGS):
        return "torch-bf16"
    if any(f in flags for f in INT8_FLAGS):
        return "onnx-int8"
    return "onnx-fp32"


def lower_priority(levels: int) -> None:
    """The calling thread ``levels`` nice levels below where it is (at most 19); the threads it starts inherit it.
    The server's work that keeps cores busy (a CPU's forward passes, decode worker processes) runs below its event
    loop, so the loop takes a core the moment it wakes: it admits, refuses and dispatches for every request, and a
    process feeding a GPU is bound by it (docs/DESIGN.md, "Threads"). Linux sets it per thread; elsewhere, or
    where it is not allowed, nothing changes."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(os.getpriority(os.PRIO_PROCESS, me) + levels, 19))
    except (AttributeError, OSError):
        pass
