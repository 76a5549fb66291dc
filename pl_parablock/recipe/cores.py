"""The cores this process may actually run on (no torch: the launcher asks before it imports anything heavy)."""

from __future__ import annotations

import math
import os

__all__ = ["available_cores"]


def available_cores() -> int:
    """The cores this process may actually run on: its CPU affinity, capped by a cgroup CPU quota.

    ``os.cpu_count()`` counts the machine's cores; a process started under
    ``taskset``, a container's cpuset or a ``cpu.max`` quota (Docker's
    ``--cpus``, Kubernetes' CPU limit) gets fewer. Threads sized from the
    machine's count would then wait on each other at every parallel region.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform (macOS, Windows)
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """The cgroup v2 CPU quota in cores (``cpu.max``: ``QUOTA PERIOD``), or ``None`` when unlimited or unknown."""
    try:
        with open(path, encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None
