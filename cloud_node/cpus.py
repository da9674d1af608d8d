"""How many CPUs this process may really use: the smaller of its CPU affinity and its cgroup quota.

Guarantees: `available_cpus()` is at least 1 and never more than `os.cpu_count()`. In a container
whose CPU limit is below the host's core count (a Kubernetes pod with `limits.cpu: 2` on a
64-core node) it returns the limit rounded up, not the host's count, read from cgroup v2
(`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); unreadable or unlimited files
mean no quota. Reads a few small files; no other I/O.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (e.g. 1.5), or None when there is none."""
    v2 = _read(root / "cpu.max")  # "max 100000" or "150000 100000"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            return int(quota) / int(period)
        return None
    quota_v1, period_v1 = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_v1 and period_v1 and quota_v1.lstrip("-").isdigit() and period_v1.isdigit():
        quota, period = int(quota_v1), int(period_v1)
        if quota > 0 and period > 0:
            return quota / period
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: affinity, capped by the cgroup quota (rounded up), at least 1."""
    total = os.cpu_count() or 1
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = total
    quota = cgroup_quota(root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, min(count, total))
