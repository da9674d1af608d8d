"""SIGKILL at timed moments of a real ingestion leaves every document fully present or absent.

Each job is a real process, forked by the server in tests/support/ingest_worker.py (which
loaded the real MiniLM embedder once), that adds documents of about CHUNKS chunks to its own
store. The test kills it from outside at fractions of the duration D that the same job took for
its first document (while embedding the second one, and around its commit). Then it opens each
store without a model and checks consistency and atomicity against the job's progress lines. No
assertion depends on where a timed kill lands, only on what the job reported before it died.

Kills at every statement of `add`, inside statements and during the WAL writes of its COMMIT
are in test_store_kill_points.py (deterministic, no model).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.retrieval import chunk_text
from orchestrator.store import PersonalStore
from tests.support.ingest_jobs import ForkServer, Job
from tests.support.ingest_worker import document_text

CHUNKS = 16  # per document: a second or two of embedding on one CPU thread
TIMED_FRACTIONS = (0.4, 0.95, 1.05, 1.2)
TIMED_DOCS = 4  # the timed kills land in document 1 or 2; the rest is margin
IN_PROGRESS = ("embedding", "in transaction", "committing")


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

    # From outside, at fractions of the duration D of this job's first document.
    for n, fraction in enumerate(TIMED_FRACTIONS):
        store = tmp_path / f"timed{n}" / "store.sqlite3"
        job = server.submit(str(store), *common, "--docs", str(TIMED_DOCS))
        _kill_timed(job, fraction)
        job.finish()
        assert job.signal == signal.SIGKILL, job.lines
        states = _verify(store, job.lines, TIMED_DOCS)
        # Documents go one after another: some done (document 0 at least: the kill came after
        # "start 1"), then the one the kill interrupted (if it did not land between two), then
        # none started.
        done = states.count("done")
        assert 1 <= done < TIMED_DOCS and states[:done] == ["done"] * done, states
        rest = states[done:]
        assert rest[0] in (*IN_PROGRESS, "not started") and set(rest[1:]) <= {"not started"}, states

    # The crashed store still takes documents: a fresh process adds one to it.
    store = tmp_path / "timed0" / "store.sqlite3"
    with PersonalStore(store, None) as opened:
        before = opened.count()
    job = server.run(str(store), *common)
    assert job.signal == 0 and job.lines[-2] == "exit", job.lines
    with PersonalStore(store, None) as opened:
        assert opened.count() == before + 1 and opened.check_consistency() == []
