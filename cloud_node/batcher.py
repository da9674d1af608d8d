"""One thread runs the engine; sessions' rounds and prefill chunks share its forward passes.

Guarantees:
- `Batcher.run(cache, ids, keep)` blocks until `ids` are appended to `cache` and returns the last
  `keep` rows of logits; callers on any number of threads are served together: every pass takes
  all queued rounds (oldest first) and fills the rest of its row budget with prefill chunks of
  newly opened sessions (oldest first), so a long prompt never stalls the running sessions for
  more than one pass (chunked prefill, as vLLM and SARATHI do). A round is never split; a prompt
  is cut into chunks of at most the budget, its `keep` rows in the last one.
- Batching window: when fewer rounds are queued than took part in the previous pass, the
  worker waits up to `window_ms` for the others before starting (they usually arrive within a
  few ms of their previous verdict); with one active session it never waits.
- By the engine's batch invariance, what a call gets does not depend on what it was batched
  with. An engine error fails every call of that pass (their caches may be half-written; callers
  drop them and re-prefill) and the worker goes on with the next pass.
- `close()` fails queued and future calls with `BatcherClosed`; the worker thread exits.
- `stats()` reports passes, rows, mean sessions per pass and the last pass's wall time, for
  status reports, the retry hint and benchmarks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_node.engine import Engine, KVCache, Rows

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher was closed (the replica is shutting down)."""


@dataclass
class Pass:
    """What a call learns about the pass(es) that served it."""

    queue_s: float = 0.0  # from submission to the start of its first pass
    run_s: float = 0.0  # wall time of the passes it took part in
    passes: int = 0
    sessions: int = 0  # most sessions that shared one of its passes


@dataclass
class _Job:
    cache: KVCache
    ids: list[int]
    keep: int
    prefill: bool
    submitted: float = field(default_factory=time.perf_counter)
    offset: int = 0
    started: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None
    info: Pass = field(default_factory=Pass)


@dataclass
class BatchStats:
    passes: int = 0
    rows: int = 0
    session_slots: int = 0  # sum over passes of the sessions in each
    last_pass_s: float = 0.0
    pass_s_ewma: float = 0.0

    @property
    def mean_sessions(self) -> float:
        return self.session_slots / self.passes if self.passes else 0.0


class Batcher:
    """Serializes the engine's passes and packs concurrent calls into them."""

    def __init__(self, engine: Engine, *, max_rows: int = 128, window_ms: float = 5.0) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        self.engine = engine
        self.max_rows = max_rows
        self.window_s = window_ms / 1000.0
        self._rounds: deque[_Job] = deque()
        self._prefills: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._last_rounds = 0
        self._stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name="tandem-batcher", daemon=True)
        self._thread.start()

    # --- callers --------------------------------------------------------------------------

    def run(self, cache: KVCache, ids: Sequence[int], keep: int, *, prefill: bool = False) -> tuple[np.ndarray, Pass]:
        """Append `ids` to `cache` in the next pass(es); the last `keep` logits rows and the pass info."""
        job = _Job(cache, [int(t) for t in ids], keep, prefill)
        if not job.ids:
            return np.zeros((0, self.engine.vocab_size), np.float32), Pass()
        with self._cv:
            if self._closed:
                raise BatcherClosed("the verifier is shutting down")
            (self._prefills if prefill else self._rounds).append(job)
            self._cv.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.logits is not None
        return job.logits, job.info

    def stats(self) -> BatchStats:
        with self._cv:
            return BatchStats(**self._stats.__dict__)

    def queued(self) -> tuple[int, int]:
        """(rounds, prefill rows) waiting now."""
        with self._cv:
            return len(self._rounds), sum(len(j.ids) - j.offset for j in self._prefills)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending = [*self._rounds, *self._prefills]
            self._rounds.clear()
            self._prefills.clear()
            self._cv.notify_all()
        for job in pending:
            job.error = BatcherClosed("the verifier is shutting down")
            job.done.set()

    # --- the worker -----------------------------------------------------------------------

    def _take(self) -> list[tuple[_Job, int, int]] | None:
        """Under the lock: the next pass as (job, start, end) slices; None when closed."""
        while not self._closed and not self._rounds and not self._prefills:
            self._cv.wait()
        if self._closed:
            return None
        if self.window_s and 0 < len(self._rounds) < self._last_rounds:
            deadline = time.perf_counter() + self.window_s
            while len(self._rounds) < self._last_rounds and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
        budget = self.max_rows
        batch: list[tuple[_Job, int, int]] = []
        while self._rounds and (not batch or len(self._rounds[0].ids) <= budget):
            job = self._rounds.popleft()
            batch.append((job, 0, len(job.ids)))
            budget -= len(job.ids)
        self._last_rounds = len(batch)
        for job in list(self._prefills):
            if budget <= 0:
                break
            left = len(job.ids) - job.offset
            take = left if left <= budget else min(budget, left - job.keep)
            if take <= 0:
                break
            batch.append((job, job.offset, job.offset + take))
            budget -= take
            if job.offset + take == len(job.ids):
                self._prefills.remove(job)
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                batch = self._take()
            if batch is None:
                return
            now = time.perf_counter()
            rows = []
            for job, start, end in batch:
                if job.started is None:
                    job.started = now
                    job.info.queue_s = now - job.submitted
                last = end == len(job.ids)
                rows.append(Rows(job.cache, job.ids[start:end], job.keep if last else 0))
            try:
                outs: list[Any] = self.engine.forward(rows)
                error: BaseException | None = None
            except BaseException as exc:
                log.exception("forward pass of %d rows failed", sum(len(r.ids) for r in rows))
                outs, error = [None] * len(batch), exc
            took = time.perf_counter() - now
            sessions = len(batch)
            with self._cv:
                s = self._stats
                s.passes += 1
                s.rows += sum(len(r.ids) for r in rows)
                s.session_slots += sessions
                s.last_pass_s = took
                s.pass_s_ewma = took if s.passes == 1 else 0.8 * s.pass_s_ewma + 0.2 * took
            for (job, _, end), out in zip(batch, outs, strict=True):
                job.info.run_s += took
                job.info.passes += 1
                job.info.sessions = max(job.info.sessions, sessions)
                if error is not None:
                    job.error = error
                    with self._cv:
                        if job in self._prefills:
                            self._prefills.remove(job)
                    job.done.set()
                elif end == len(job.ids):
                    job.logits = out
                    job.done.set()
                else:
                    job.offset = end
