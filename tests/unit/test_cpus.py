"""`cloud_node.cpus`: the CPU count comes from affinity and the cgroup quota, never just the host's
cores. cgroup files are written to a temporary folder standing in for /sys/fs/cgroup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloud_node.cpus import available_cpus, cgroup_quota


def _v1(root: Path, quota: str, period: str) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(("text", "quota"), [
    ("max 100000", None), ("150000 100000", 1.5), ("200000 100000\n", 2.0), ("garbage", None), ("5 0", None),
])
def test_cgroup_v2_cpu_max(tmp_path: Path, text: str, quota: float | None) -> None:
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_quota(tmp_path) == quota


def test_cgroup_v1_quota_and_unlimited(tmp_path: Path) -> None:
    assert cgroup_quota(_v1(tmp_path / "a", "50000", "100000")) == 0.5
    assert cgroup_quota(_v1(tmp_path / "b", "-1", "100000")) is None
    assert cgroup_quota(tmp_path / "none") is None


def test_a_pod_limit_below_the_host_caps_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (tmp_path / "cpu.max").write_text("150000 100000")
    assert available_cpus(tmp_path) == 2  # 1.5 CPUs rounded up, not the host's 64
    (tmp_path / "cpu.max").write_text("max 100000")
    assert available_cpus(tmp_path) == 64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert available_cpus(tmp_path) == 3  # affinity narrower than the quota
    (tmp_path / "cpu.max").write_text("1000 100000")
    assert available_cpus(tmp_path) == 1  # a tiny quota still leaves one thread


def test_this_machine(tmp_path: Path) -> None:
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)
