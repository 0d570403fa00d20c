"""What this process may use of the machine: the core count every thread budget is sized from.

usable_cores()                           # CPUs in the affinity mask, capped by a cgroup (container) quota
compute_threads(0, accelerated=False)    # a forward pass's intra-op threads: all usable cores; 1 on a GPU
"""

from __future__ import annotations

import math
import os
from pathlib import Path


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
