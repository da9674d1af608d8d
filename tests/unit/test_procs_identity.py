"""`tandem down` must never signal a process that merely reuses a recorded pid."""

from __future__ import annotations

import os
import subprocess
import sys

from tandem.ops import procs


def test_identity_of_a_live_process_matches_itself() -> None:
    me = procs.identity(os.getpid())
    assert me and procs.same_process(os.getpid(), me)


def test_a_reused_pid_is_not_ours() -> None:
    boot, start = procs.identity(os.getpid()).split(":")
    assert not procs.same_process(os.getpid(), f"{boot}:{int(start) + 1}")


def test_a_dead_leader_counts_only_on_the_same_boot() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    recorded = procs.identity(child.pid)
    child.wait()
    assert procs.identity(child.pid) == ""
    boot = recorded.split(":")[0]
    assert procs.same_process(child.pid, recorded)
    assert not procs.same_process(child.pid, f"another-boot-{boot}:1")
    assert not procs.same_process(child.pid, "")
