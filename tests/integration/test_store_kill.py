"""SIGKILL during ingestion leaves every document fully present or absent (real processes).

Each job is a real process, forked by the server in tests/support/ingest_worker.py (which
loaded the real embedder once), that adds documents of about CHUNKS chunks to its own store.
The test kills it:
- deterministically from inside, at a chosen SQL statement: in the middle of the chunk inserts
  and just before COMMIT (both must leave the document absent);
- from outside, at fractions of the duration D that the same job took for its first document
  (while embedding the second one, and around its commit).
Then it opens each store without a model and checks consistency and atomicity against the
job's progress lines. No assertion depends on where a timed kill lands, only on what the job
reported before it died.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.retrieval import chunk_text
from orchestrator.store import PersonalStore
from tests.support.ingest_worker import document_text

ROOT = Path(__file__).resolve().parents[2]
CHUNKS = 16  # per document: a second or two of embedding on one CPU thread
TIMED_FRACTIONS = (0.4, 0.95, 1.05, 1.2)
TIMED_DOCS = 4  # the timed kills land in document 1 or 2; the rest is margin
WAIT_S = 120.0  # upper bound on any one wait (a busy 2-core machine)


class ForkServer:
    """The worker server process, and its stdout lines with their arrival times."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.ingest_worker", "--serve"], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        self.lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.strip()))
        self.lines.put((time.monotonic(), None))

    def next_line(self) -> tuple[float, str]:
        try:
            at, line = self.lines.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError(f"worker server silent for {WAIT_S} s") from None
        if line is None:
            raise AssertionError(f"worker server ended: {self.log.read_text()[-3000:]}")
        return at, line

    def submit(self, *args: str) -> Job:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        job = Job(self)
        job.pid = int(job.wait_for_prefix("pid ").split()[1])
        return job

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Job:
    def __init__(self, server: ForkServer) -> None:
        self.server = server
        self.pid = 0
        self.lines: list[str] = []
        self.signal: int | None = None  # set when the job has ended

    def wait_for_prefix(self, prefix: str) -> str:
        while True:
            _, line = self.server.next_line()
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def wait_for(self, wanted: str) -> float:
        """The arrival time of line `wanted`; fails if the job ends first."""
        while True:
            at, line = self.server.next_line()
            self.lines.append(line)
            if line == wanted:
                return at
            if line.startswith("exited "):
                raise AssertionError(f"job ended before {wanted!r}: {self.lines}; stderr: "
                                     f"{self.server.log.read_text()[-3000:]}")

    def finish(self) -> list[str]:
        self.signal = int(self.wait_for_prefix(f"exited {self.pid} ").split()[2])
        return self.lines


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ForkServer]:
    s = ForkServer(tmp_path / "server.log")
    try:
        yield s
    finally:
        s.close()


def _kill_timed(job: Job, fraction: float) -> None:
    """Measure D on document 0, then SIGKILL at `fraction` * D after document 1 starts."""
    job.wait_for("ready")
    t0 = job.wait_for("start 0")
    duration = job.wait_for("done 0") - t0
    t1 = job.wait_for("start 1")
    time.sleep(max(0.0, t1 + fraction * duration - time.monotonic()))
    os.kill(job.pid, signal.SIGKILL)


def _state(lines: list[str], i: int) -> str:
    for marker, state in (("done", "done"), ("commit", "committing"),
                          ("begin", "in transaction"), ("start", "embedding")):
        if f"{marker} {i}" in lines:
            return state
    return "not started"


def _verify(path: Path, lines: list[str], docs: int) -> list[str]:
    """Open a killed job's store (no model needed) and check it against the job's lines.

    Returns each document's state when the job died."""
    with PersonalStore(path, None) as store:
        assert store.check_consistency() == []
        present = {d.title: d for d in store.list()}
        assert set(present) <= {f"doc {i}" for i in range(docs)}
        states = []
        for i in range(docs):
            state, info = _state(lines, i), present.get(f"doc {i}")
            if info is not None:  # fully there: every chunk, vector and FTS row
                expected = len(chunk_text(document_text(i, CHUNKS)))
                assert info.chunk_count == expected == store.chunk_rows(info.id)
            if state == "done":
                assert info is not None, f"doc {i} was reported added but is gone"
            elif state != "committing":  # killed before COMMIT started
                assert info is None, f"doc {i} is present though killed while {state}"
            states.append(state)
    return states


def test_sigkill_during_ingest_leaves_documents_whole_or_absent(server: ForkServer,
                                                                tmp_path: Path) -> None:
    assert server.next_line()[1] == "serving"
    common = ("--chunks", str(CHUNKS))
    killed_before_commit = 0

    # From inside, at a statement: mid-way through the chunk inserts, then just before COMMIT.
    for name, args, expected in [
            ("mid_insert", ("--kill-sql", "INSERT INTO chunks", "--kill-nth", str(CHUNKS // 2)),
             "in transaction"),
            ("at_commit", ("--kill-sql", "COMMIT"), "committing")]:
        store = tmp_path / name / "store.sqlite3"
        job = server.submit(str(store), *common, *args)
        job.finish()
        assert job.signal == signal.SIGKILL, job.lines
        assert _verify(store, job.lines, 1) == [expected]
        with PersonalStore(store, None) as opened:
            assert opened.count() == 0  # killed before the commit: absent
        killed_before_commit += 1

    # From outside, at fractions of the duration D of this job's first document.
    for n, fraction in enumerate(TIMED_FRACTIONS):
        store = tmp_path / f"timed{n}" / "store.sqlite3"
        job = server.submit(str(store), *common, "--docs", str(TIMED_DOCS))
        _kill_timed(job, fraction)
        job.finish()
        assert job.signal == signal.SIGKILL, job.lines
        states = _verify(store, job.lines, TIMED_DOCS)
        killed_before_commit += sum(s in ("embedding", "in transaction") for s in states)
    assert killed_before_commit >= 2

    # The crashed store still takes documents: a fresh process adds one to it.
    store = tmp_path / "at_commit" / "store.sqlite3"
    job = server.submit(str(store), *common)
    job.finish()
    assert job.signal == 0 and job.lines[-2] == "exit", job.lines
    assert _verify(store, job.lines, 1) == ["done"]
