"""The test side of tests/support/ingest_worker.py: its fork server and the jobs it runs.

`ForkServer(log, *serve_args)` starts `python -m tests.support.ingest_worker --serve` and reads
its stdout lines on a thread, with their arrival times; `submit(*args)` starts one job (a forked
child) and returns its `Job`, whose methods read that job's lines up to a wanted one. Every wait
is bounded by WAIT_S and fails with the server's stderr when the server ends or stays silent.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 120.0  # upper bound on any one wait (a busy 2-core machine)


class ForkServer:
    """The worker server process, and its stdout lines with their arrival times."""

    def __init__(self, log: Path, *serve_args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.ingest_worker", "--serve", *serve_args], cwd=ROOT,
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

    def run(self, *args: str) -> Job:
        """Submit a job and wait for its end."""
        job = self.submit(*args)
        job.finish()
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

    def field(self, prefix: str) -> str:
        """The rest of this job's first line starting with `prefix`."""
        found = [line[len(prefix):] for line in self.lines if line.startswith(prefix)]
        assert found, f"no line {prefix!r} in {self.lines}; stderr: {self.server.log.read_text()[-3000:]}"
        return found[0]
