"""One thread runs the engine; sessions' rounds and prefill chunks share its forward passes.

Guarantees:
- `Batcher.run(cache, ids, keep)` blocks until `ids` are appended to `cache` and returns the last
  `keep` rows of logits; callers on any number of threads are served together: every pass takes
  all queued rounds (oldest first, up to `ROUND_ROWS_CAP` rows) and fills the rest of its
  `max_rows` budget with prefill chunks of newly opened sessions (oldest first; at least
  `PREFILL_SHARE` rows even when rounds fill the budget, so prefills never starve). A long prompt
  thus adds at most `max_rows` rows to the running sessions' passes (chunked prefill, as vLLM
  and SARATHI do). A round is never split; a prompt is cut into chunks, its `keep` rows in the
  last one.
- Draft trees: `run(..., parents=...)` makes a round a tree (`cloud_node.engine.Rows`; `ids` is
  the root and the n nodes, so it counts n + 1 rows). A tree is a round like any other: it goes
  whole into one pass, counted as its n + 1 rows against `ROUND_ROWS_CAP`, and waits for the next
  pass when it does not fit beside the rounds queued before it. A round bigger than the cap
  alone (none is: a tree has at most 1 + `tandem_core.tree.MAX_TREE_NODES` = 65 rows) still
  runs whole, as the only round of its pass. `max_rows` bounds prefill only, so a tree of more
  rows than `max_rows` runs whole too, with the prefill share beside it.
- Batching window: the worker learns, per session, how long it takes to come back with its next
  round after a verdict (the gap: verification, the network, the client). Before a pass, it
  waits for the sessions of the last passes that are not queued yet and whose gap says they
  will be back within the window: `window_ms`, or `WAIT_SHARE` of the recent pass time when
  that is longer (a session waited for saves a whole pass of its own), at most `MAX_WAIT_S`.
  Sessions that come back later (an edge that drafts for longer) are never waited for, and one
  session alone never waits. So
  sessions that can share passes fall into step instead of alternating.
- By the engine's batch invariance, what a call gets does not depend on what it was batched
  with. An engine error fails every call of that pass (their caches may be half-written; callers
  drop them and re-prefill) and the worker goes on with the next pass.
- Cancelled prefills: `run(..., cancelled=f)` on a prefill asks `f()` before each of its chunks
  (outside the batcher's lock); once it is true the prefill takes no further pass and the call
  raises `SessionGone`. A client that opens a long prompt and goes away thus costs the replica
  at most one more chunk, not the whole prompt.
- `close()` fails queued and future calls with `BatcherClosed`; the worker thread exits.
- `stats()` reports passes, rows, mean sessions per pass and the last pass's wall time, for
  status reports, the retry hint and benchmarks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_node.engine import Engine, KVCache, Rows
from cloud_node.errors import SessionGone

log = logging.getLogger(__name__)


ROUND_ROWS_CAP = 512  # rows of rounds in one pass at most (about 30 sessions' full rounds)
PREFILL_SHARE = 16  # prefill rows a pass takes even when rounds fill max_rows
WAIT_SHARE = 0.3  # a pass may wait this share of the recent pass time for sessions about to come back
MAX_WAIT_S = 0.2


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
    parents: tuple[int, ...] | None = None  # a round over a tree (`Rows.parents`)
    cancelled: Callable[[], bool] | None = None  # a prefill's caller has gone when this says so
    submitted: float = field(default_factory=time.perf_counter)
    offset: int = 0
    started: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None
    info: Pass = field(default_factory=Pass)


@dataclass
class _Seen:
    """What the worker knows of one session's rhythm (keyed by its cache)."""

    last_pass: int = 0  # the last pass it had a round in
    done_at: float | None = None  # when its last round's logits were delivered
    gap_s: float | None = None  # EWMA of delivery -> next round


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

    def __init__(self, engine: Engine, *, max_rows: int = 64, window_ms: float = 20.0) -> None:
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
        self._seen: dict[int, _Seen] = {}  # id(cache) -> rhythm, for sessions of recent passes
        self._stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name="tandem-batcher", daemon=True)
        self._thread.start()

    # --- callers --------------------------------------------------------------------------

    def run(self, cache: KVCache, ids: Sequence[int], keep: int, *, prefill: bool = False,
            parents: Sequence[int] | None = None,
            cancelled: Callable[[], bool] | None = None) -> tuple[np.ndarray, Pass]:
        """Append `ids` to `cache` in the next pass(es); the last `keep` logits rows and the pass info.
        `parents` (a round only): the rows are a tree, in one pass (see `cloud_node.engine.Rows`).
        `cancelled` (a prefill only): asked before each chunk; once true, SessionGone is raised and
        `cache` holds a part of the prompt (the caller drops it)."""
        tree = None if parents is None else tuple(int(a) for a in parents)
        if tree is not None and (prefill or len(tree) != len(ids) or any(not -1 <= a < i for i, a in enumerate(tree))):
            raise ValueError("parents: a tree is a round (not a prefill), one parent per id, each -1 or an earlier row")
        if getattr(cache, "tree", None) is not None:  # checked here: in the pass it would fail every caller
            raise ValueError("the cache holds a tree not yet accepted or cropped; it takes no pass")
        job = _Job(cache, [int(t) for t in ids], keep, prefill, tree, cancelled if prefill else None)
        if not job.ids:
            return np.zeros((0, self.engine.vocab_size), np.float32), Pass()
        with self._cv:
            if self._closed:
                raise BatcherClosed("the verifier is shutting down")
            if not prefill:
                seen = self._seen.get(id(cache))
                if seen is not None and seen.done_at is not None:
                    gap = job.submitted - seen.done_at
                    seen.gap_s = gap if seen.gap_s is None else 0.7 * seen.gap_s + 0.3 * gap
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

    def forget(self, cache: KVCache) -> None:
        """The session that owns `cache` sends no more rounds: never wait for it."""
        with self._cv:
            self._seen.pop(id(cache), None)

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
        self._wait_for_stragglers()
        batch: list[tuple[_Job, int, int]] = []
        taken = 0
        while self._rounds and (not batch or taken + len(self._rounds[0].ids) <= ROUND_ROWS_CAP):
            job = self._rounds.popleft()
            batch.append((job, 0, len(job.ids)))
            taken += len(job.ids)
        # Prefill fills the pass up to max_rows, and always gets a share, so that new sessions
        # progress however busy the running ones keep the replica.
        budget = max(self.max_rows - taken, min(PREFILL_SHARE, self.max_rows))
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

    def _drop_cancelled(self) -> None:
        """Fail the queued prefills whose callers have gone (their predicates run outside the lock)."""
        with self._cv:
            watched = [job for job in self._prefills if job.cancelled is not None]
        gone = [job for job in watched if _asks_to_stop(job)]
        if not gone:
            return
        with self._cv:
            dropped = [job for job in gone if _remove(self._prefills, job)]
        for job in dropped:
            log.info("prefill dropped after %d of %d tokens: its caller has gone", job.offset, len(job.ids))
            job.error = SessionGone("the session was closed while its prompt was prefilled")
            job.done.set()

    def _wait_for_stragglers(self) -> None:
        """Under the lock: wait (at most the window) for recent sessions expected back soon."""
        if not self.window_s or not self._rounds:
            return
        now = time.perf_counter()
        # Waiting w ms for a session saves it a whole pass of its own: worth it up to a share of
        # the pass time (a slow, loaded replica waits longer; a fast one stays at window_ms).
        window = min(max(self.window_s, WAIT_SHARE * self._stats.pass_s_ewma), MAX_WAIT_S)
        recent = self._stats.passes - 2
        for key in [k for k, s in self._seen.items() if s.last_pass < recent - 8]:
            del self._seen[key]  # gone quiet: closed, finished or drafting slowly
        queued = {id(j.cache) for j in self._rounds}
        due = {k: s.done_at + s.gap_s for k, s in self._seen.items()
               if k not in queued and s.last_pass >= recent and s.done_at is not None
               and s.gap_s is not None and s.gap_s <= window
               and s.done_at + s.gap_s > now - window}  # long overdue: gone or slowed down
        if not due:
            return
        deadline = min(now + window, max(due.values()) + 0.002)
        waiting = set(due)
        while not self._closed:
            left = deadline - time.perf_counter()
            if left <= 0 or waiting <= {id(j.cache) for j in self._rounds}:
                return
            self._cv.wait(left)

    def _loop(self) -> None:
        while True:
            self._drop_cancelled()
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
                rows.append(Rows(job.cache, job.ids[start:end], job.keep if last else 0, job.parents))
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
            done_at = time.perf_counter()
            with self._cv:
                for job, _, end in batch:
                    if not job.prefill and end == len(job.ids):
                        seen = self._seen.setdefault(id(job.cache), _Seen())
                        seen.last_pass, seen.done_at = self._stats.passes, done_at
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


def _asks_to_stop(job: _Job) -> bool:
    assert job.cancelled is not None
    try:
        return bool(job.cancelled())
    except Exception:  # a broken predicate must not stop the worker
        log.exception("a prefill's cancel check failed; the prefill goes on")
        return False


def _remove(jobs: deque[_Job], job: _Job) -> bool:
    """Remove `job` (by identity) if it is still queued."""
    for i, queued in enumerate(jobs):
        if queued is job:
            del jobs[i]
            return True
    return False
