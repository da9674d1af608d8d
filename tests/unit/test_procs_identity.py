"""`tandem down` must never signal a process that merely reuses a recorded pid."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from tandem.ops import procs


def _parts(recorded: str) -> tuple[float, float]:
    boot, start = recorded.split(":")
    return float(boot), float(start)


def test_identity_of_a_live_process_matches_itself() -> None:
    me = procs.identity(os.getpid())
    assert me and procs.same_process(os.getpid(), me)


def test_identity_is_boot_time_and_start_after_boot() -> None:
    boot, start = _parts(procs.identity(os.getpid()))
    assert abs(boot - psutil.boot_time()) <= 1
    assert abs(boot + start - psutil.Process().create_time()) < 1.01


def test_a_reused_pid_is_not_ours() -> None:
    boot, start = _parts(procs.identity(os.getpid()))
    assert not procs.same_process(os.getpid(), f"{boot:.0f}:{start + 0.01:.3f}")  # one Linux tick later
    assert not procs.same_process(os.getpid(), f"{boot:.0f}:{start - 1:.3f}")


def test_the_same_start_on_another_boot_is_not_ours() -> None:
    boot, start = _parts(procs.identity(os.getpid()))
    assert not procs.same_process(os.getpid(), f"{boot - 3600:.0f}:{start:.3f}")


def test_a_dead_leader_counts_only_on_the_same_boot() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    recorded = procs.identity(child.pid)
    child.wait()
    assert procs.identity(child.pid) == ""
    boot, start = _parts(recorded)
    assert procs.same_process(child.pid, recorded)
    assert not procs.same_process(child.pid, f"{boot - 3600:.0f}:{start:.3f}")
    assert not procs.same_process(child.pid, f"another-boot-{boot}:1")
    assert not procs.same_process(child.pid, "")


def test_a_legacy_record_counts_only_while_its_leader_lives() -> None:
    """Records written before psutil: `BOOT_ID:TICKS` (the boot id, the start in clock ticks)."""
    boot_id, tick = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", 1 / os.sysconf("SC_CLK_TCK")
    ticks = round((psutil.Process().create_time() - psutil.boot_time()) / tick)
    assert procs.same_process(os.getpid(), f"{boot_id}:{ticks}")
    assert not procs.same_process(os.getpid(), f"{boot_id}:{ticks + 1}")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child_ticks = round((psutil.Process(child.pid).create_time() - psutil.boot_time()) / tick)
    child.wait()
    assert not procs.same_process(child.pid, f"{boot_id}:{child_ticks}")
