"""`tandem bench --split-cores`: the edge on one core, the cloud on another, one thread each.

Guarantees:
- `plan_cores` picks two CPUs from those this process may run on (its affinity, read at run
  time): the lowest for the edge, the next for the cloud. Fewer than two is a ValueError.
- Roles (`role_of`): `target` and `cloud_only` (the target alone, in this process) run as the
  cloud does, on the cloud's core; `tandem`, `tandem_model` and `assisted`, which run drafter
  and target in turn in one thread of this process, may use both cores (they never overlap, so
  this is the sequential reference, with no contention); every other method (the drafter
  alone, the networked methods' edge side) runs on the edge's core.
- `pin` sets the affinity of every thread of a process (Linux applies `sched_setaffinity` per
  thread, and a thread inherits its creator's), so threads created later inherit it too.
  Children started afterwards inherit it as well: start the cloud's processes first.
- The cloud's replica pins itself (`cloud_node.serve_app`, from `REPLICA_CPUS_ENV`); Ray's
  helpers, Serve's proxy, the gateway and the link shaper are not pinned. `observe` reads back
  what the kernel applied (`Cpus_allowed_list` of each thread) for the benchmark's JSON.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

THREADS = 1  # torch and ONNX Runtime threads per side
CLOUD_SIDE = frozenset({"target", "cloud_only"})
BOTH_SIDES = frozenset({"tandem", "tandem_model", "assisted"})


@dataclass(frozen=True)
class CorePlan:
    """Which CPU each side runs on."""

    available: tuple[int, ...]  # this process's affinity when the benchmark started
    edge: int
    cloud: int

    def cpus_for(self, method: str) -> frozenset[int]:
        role = role_of(method)
        return frozenset({self.cloud} if role == "cloud" else {self.edge} if role == "edge" else {self.edge, self.cloud})

    def describe(self) -> dict[str, Any]:
        return {"available_cpus": list(self.available), "edge_cpus": [self.edge], "cloud_cpus": [self.cloud],
                "threads_per_side": THREADS, "target_alone_cpus": [self.cloud],
                "both_sides_cpus": sorted({self.edge, self.cloud}),
                "both_sides_methods": sorted(BOTH_SIDES),
                "not_pinned": "Ray's helper processes, Serve's proxy, the gateway, the link shaper"}


class Placement:
    """A plan applied to this process, method by method, and what the kernel applied."""

    def __init__(self, plan: CorePlan) -> None:
        self.plan = plan
        self.observed: dict[str, list[str]] = {}  # role -> this process's threads' Cpus_allowed_list
        self.cloud: dict[str, Any] | None = None  # the cloud node's side (`RemoteStack.pinning`), when started

    def limit_threads(self, pair: Any, drafter_dir: Any) -> None:
        """One torch thread in this process, and the pair's drafter with one ONNX Runtime thread."""
        import torch

        from edge_node.drafter import DrafterModel

        torch.set_num_threads(THREADS)
        pair.drafter = DrafterModel(drafter_dir, threads=THREADS)

    def enter(self, method: str) -> None:
        """Pin this process for `method` (call it outside the timed part)."""
        pin(self.plan.cpus_for(method))
        self.observed.setdefault(role_of(method), observe())

    def describe(self) -> dict[str, Any]:
        import torch

        return self.plan.describe() | {"bench_process_torch_threads": torch.get_num_threads(),
                                       "bench_process_cpus_allowed": dict(self.observed), "cloud": self.cloud}


def role_of(method: str) -> str:
    """'cloud', 'edge' or 'both' (see the module doc)."""
    return "cloud" if method in CLOUD_SIDE else "both" if method in BOTH_SIDES else "edge"


def plan_cores(available: Iterable[int]) -> CorePlan:
    cpus = tuple(sorted(set(available)))
    if len(cpus) < 2:
        raise ValueError(f"--split-cores needs 2 CPUs, this process may use {len(cpus)} ({list(cpus)})")
    return CorePlan(cpus, cpus[0], cpus[1])


def pin(cpus: Iterable[int], pid: int | None = None) -> None:
    """Pin every thread of process `pid` (default: this one) to `cpus`."""
    wanted = set(cpus)
    for _ in range(2):  # a thread started during the first pass by an unpinned one is caught here
        for tid in _threads(pid):
            try:
                os.sched_setaffinity(tid, wanted)
            except ProcessLookupError:  # the thread ended meanwhile
                continue


def observe(pid: int | None = None) -> list[str]:
    """The distinct `Cpus_allowed_list` values of the threads of `pid` (one value: all agree)."""
    seen: set[str] = set()
    for tid in _threads(pid):
        try:
            with open(f"/proc/{pid or 'self'}/task/{tid}/status") as f:
                seen.update(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
        except OSError:
            continue
    return sorted(seen)


def _threads(pid: int | None) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid or 'self'}/task")]
    except OSError:
        return []


def replicas(cloud_pid: int) -> list[dict[str, Any]]:
    """Each Serve replica process under the cloud node, with what its threads may run on."""
    import psutil

    found = []
    try:
        tree = psutil.Process(cloud_pid).children(recursive=True)
    except psutil.Error:
        return []
    for proc in tree:
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica" in title:
            found.append({"pid": proc.pid, "cpus_allowed_list": observe(proc.pid)})
    return found


def helpers_allowed(cloud_pid: int) -> list[str]:
    """The distinct `Cpus_allowed_list` values of the threads of the cloud's other processes (the
    node's own, Ray's helpers, Serve's proxy), which stay unpinned."""
    import psutil

    seen: set[str] = set()
    try:
        procs = [psutil.Process(cloud_pid), *psutil.Process(cloud_pid).children(recursive=True)]
    except psutil.Error:
        return []
    for proc in procs:
        try:
            if "ServeReplica" not in " ".join(proc.cmdline()):
                seen.update(observe(proc.pid))
        except psutil.Error:
            continue
    return sorted(seen)
