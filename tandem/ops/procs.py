"""Starting and stopping the local stack's processes.

Guarantees:
- Each child runs in its own process group (session), so stopping it also stops what it
  started (Ray's raylet and GCS under the cloud node).
- `start` returns only once the child printed its ready line (`NAME key=HOST:PORT ...`); a child
  that exits or stays silent past the timeout raises `ChildFailed` with the tail of its log.
- `Stack` stops every child it started when it exits, on success, error or Ctrl-C: SIGTERM to
  the group, then SIGKILL after a grace period, then SIGKILL to every process left in the
  child's session (Ray's workers sit in process groups of their own). Nothing is left running.
- Processes are found and signalled through psutil and POSIX sessions (`os.getsid`,
  `os.killpg`), never by reading /proc: Linux and macOS alike (not Windows: no sessions).
- A process is recorded by pid and `identity` (boot time + start time); `same_process` tells
  whether a recorded pid still names that process, so `tandem down` never signals a reused pid.
  Single kills also go through psutil, which re-checks the start time before each signal.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_LEGACY_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # before psutil
_START_TOLERANCE_S = 0.005  # half of Linux's 10 ms start-time resolution
_BOOT_TOLERANCE_S = 1.0


class ChildFailed(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    fields: dict[str, str] = field(default_factory=dict)  # key=value pairs from the ready line

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _read_ready(child: Child, ready: re.Pattern, found: threading.Event) -> None:
    assert child.proc.stdout is not None
    with open(child.log_path, "a") as logf:
        for line in child.proc.stdout:
            logf.write(line)
            logf.flush()
            if not found.is_set():
                child.fields.update(dict(re.findall(r"(\w+)=(\S+)", line)))
                if ready.search(line):
                    found.set()


def _watch_log(child: Child, ready: re.Pattern, found: threading.Event) -> None:
    """For a detached child: find the ready line in its log file (stdout goes there directly).
    Only complete lines count: a half-flushed `cloud grpc=127.0.` must not pass for an address."""
    seen = 0
    while not found.is_set() and child.proc.poll() is None:
        try:
            text = child.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        lines = text[:text.rfind("\n") + 1].splitlines()
        for line in lines[seen:]:
            child.fields.update(dict(re.findall(r"(\w+)=(\S+)", line)))
            if ready.search(line):
                found.set()
                return
        seen = len(lines)
        time.sleep(0.1)


def start(name: str, argv: Sequence[str], *, log_dir: Path, timeout_s: float, env: dict[str, str] | None = None,
          ready: str | None = None, detach: bool = False) -> Child:
    """Start a child and wait for its ready line (default: a line starting with `name `).

    A detached child writes stdout and stderr straight to its log file, so it keeps running
    after this process exits (`tandem up`); otherwise stdout is read through a pipe.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(list(argv), stdout=out if detach else subprocess.PIPE, stderr=out,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True, env=env, bufsize=1)
    child = Child(name, proc, log_path)
    found = threading.Event()
    pattern = re.compile(ready or rf"^{re.escape(name)}\s")
    threading.Thread(target=_watch_log if detach else _read_ready, args=(child, pattern, found),
                     daemon=True, name=f"{name}-stdout").start()
    deadline = time.monotonic() + timeout_s
    while not found.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with code {proc.returncode}" if proc.returncode is not None else f"not ready after {timeout_s:.0f} s"
            stop(child)
            raise ChildFailed(f"{name} {why}; last log lines:\n{child.log_tail()}")
    return child


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of session `sid`, zombies excepted (they are dead). Ray puts its workers
    in process groups of their own, but they stay in the session the child was started in."""
    members = []
    for pid in psutil.pids():
        try:
            proc = psutil.Process(pid)  # taken first: its start time guards the signal sent later
            if os.getsid(pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def session_members(sid: int) -> list[int]:
    """The pids of `session_processes(sid)`."""
    return [proc.pid for proc in session_processes(sid)]


def session_alive(sid: int) -> bool:
    return bool(session_processes(sid))


def kill_session(sid: int, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL every process of session `sid` until none is left or `timeout_s` passed; the pids
    still alive then (empty on success). psutil re-checks pid and start time before each signal,
    so a pid reused meanwhile is never signalled."""
    deadline = time.monotonic() + timeout_s
    while left := session_processes(sid):
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if time.monotonic() > deadline:
            return [proc.pid for proc in left]
        time.sleep(0.1)
    return []


def stop(child: Child, grace_s: float = 15.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers; then SIGKILL whatever is
    left in the child's session."""
    _stop_group(child, grace_s)
    if left := kill_session(child.proc.pid):
        log.warning("%s: processes %s survive SIGKILL", child.name, left)


def stop_session(sid: int, grace_s: float = 15.0) -> None:
    """Stop a detached child we are not the parent of (`tandem down`): SIGTERM its group, wait up
    to `grace_s` for its session to empty, then SIGKILL what is left. Check `same_process` first:
    a recorded pid may have been reused."""
    try:
        os.killpg(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while session_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left := kill_session(sid):
        log.warning("session %d: processes %s survive SIGKILL", sid, left)


def identity(pid: int) -> str:
    """What tells this process apart from a later one with the same pid: `BOOT:START`, the boot
    time (whole seconds since the epoch) and the process's start in seconds after boot ("" if
    it is gone). START does not move when the wall clock is set; BOOT moves with it."""
    try:
        boot = psutil.boot_time()
        start = psutil.Process(pid).create_time() - boot
    except psutil.Error:
        return ""
    return f"{boot:.0f}:{start:.3f}"


def same_process(pid: int, recorded: str) -> bool:
    """Whether `pid` still names the process recorded as `identity(pid)`, or, if that process has
    exited, whether its session may still hold our children: the kernel does not hand out a pid
    that is still some session's id, so a dead leader's pid with live session members is ours,
    but only on the same boot. A legacy record (`BOOT_ID:TICKS`, before psutil) is ours only
    while its leader lives: its boot id can no longer be checked."""
    rec = _Recorded.parse(recorded)
    if rec is None:
        return False
    now = _Recorded.parse(identity(pid))
    if now is None:
        return rec.boot is not None and _same_boot(rec.boot, psutil.boot_time())
    assert now.boot is not None
    same_start = abs(now.start - rec.start) < _START_TOLERANCE_S
    return same_start and (rec.boot is None or _same_boot(rec.boot, now.boot))


@dataclass(frozen=True)
class _Recorded:
    boot: float | None  # boot time, seconds since the epoch; None for a legacy record
    start: float  # the process's start, seconds after boot

    @classmethod
    def parse(cls, text: str) -> _Recorded | None:
        boot, _, start = text.partition(":")
        try:
            if _LEGACY_BOOT_ID.fullmatch(boot):
                return cls(None, int(start) / os.sysconf("SC_CLK_TCK"))
            return cls(float(boot), float(start))
        except (ValueError, OSError):
            return None


def _same_boot(recorded: float, now: float) -> bool:
    # A later boot starts after the recorded process did, never within a second of this one;
    # setting the clock by more than that makes us refuse (safe) rather than guess.
    return abs(now - recorded) <= _BOOT_TOLERANCE_S


def _stop_group(child: Child, grace_s: float) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; sweep stragglers in its group.
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


class Stack:
    """Children started in order and stopped in reverse order, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None,
              ready: str | None = None) -> Child:
        child = start(name, argv, log_dir=self.log_dir, timeout_s=timeout_s, env=env, ready=ready)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        while self.children:
            child = self.children.pop()
            log.info("stopping %s (pid %d)", child.name, child.proc.pid)
            stop(child)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_healthy(address: str, timeout_s: float, service: str = "", ca_cert: Path | None = None) -> None:
    """Poll grpc.health.v1 until SERVING (over TLS checked against `ca_cert` when given); raise
    ChildFailed on timeout. Health checks need no key on any node."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tandem.security import ClientTls, secure_channel

    deadline = time.monotonic() + timeout_s
    with secure_channel(address, ClientTls(ca_cert) if ca_cert else None, None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise ChildFailed(f"{address} not healthy after {timeout_s:.0f} s")
            time.sleep(0.2)
