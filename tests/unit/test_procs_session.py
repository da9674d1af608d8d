"""Stopping a child stops its whole session, including processes in process groups of their own
(as Ray puts its workers), and zombies do not count as members."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tandem.ops import procs

# The leader starts one grandchild in a process group of its own (like a Ray worker) and one that
# exits at once and is never reaped (a zombie), prints both pids, then sleeps.
_LEADER = """
import subprocess, sys, time
worker = subprocess.Popen(["sleep", "60"], process_group=0)
zombie = subprocess.Popen(["true"])
print(worker.pid, zombie.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def leader() -> Iterator[tuple[subprocess.Popen, int, int]]:
    proc = subprocess.Popen([sys.executable, "-c", _LEADER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    worker, zombie = map(int, proc.stdout.readline().split())
    deadline = time.monotonic() + 5
    while psutil.Process(zombie).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    yield proc, worker, zombie
    procs.kill_session(proc.pid)
    proc.wait()


def test_members_are_the_live_processes_of_the_session(leader) -> None:
    proc, worker, zombie = leader
    assert os.getpgid(worker) != os.getpgid(proc.pid)
    assert sorted(procs.session_members(proc.pid)) == sorted([proc.pid, worker])
    assert zombie not in procs.session_members(proc.pid)
    assert os.getpid() not in procs.session_members(proc.pid)
    assert procs.session_alive(proc.pid)


def test_kill_session_kills_processes_in_other_groups(leader) -> None:
    proc, worker, _ = leader
    assert procs.kill_session(proc.pid) == []
    proc.wait(5)
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    assert not procs.session_alive(proc.pid)


def test_stop_leaves_nothing_of_the_session(leader, tmp_path: Path) -> None:
    proc, worker, _ = leader
    procs.stop(procs.Child("leader", proc, tmp_path / "leader.log"), grace_s=2)
    assert proc.returncode is not None
    assert procs.session_members(proc.pid) == []
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE


def test_stop_session_of_a_detached_child(leader) -> None:
    """`tandem down`: we are not the parent of the recorded processes in general."""
    proc, worker, _ = leader
    assert procs.same_process(proc.pid, procs.identity(proc.pid))
    procs.stop_session(proc.pid, grace_s=0.2)
    assert procs.session_members(proc.pid) == []
    assert proc.wait(5) is not None
