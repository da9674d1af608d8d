"""SIGKILL at every write point of `PersonalStore.add`: each document is whole or absent.

Real processes, real SQLite files, real SIGKILL; a `HashEmbedder` stands in for the model (the
store's writes do not depend on it). Each job is a child forked by the server in
tests/support/ingest_worker.py; it adds "doc 0", then "doc 1" (with idempotency keys, so the
key lookups run too), and is killed in doc 1's add:
- at every kill point: before each SQL statement SQLite runs (the statement trace: each
  statement of `add`, each row of its executemany, the FTS trigger and FTS5's own statements on
  its shadow tables, so also inside a statement), and right after each call into SQLite
  returns, the last one being COMMIT;
- with a one-page cache, so the transaction's pages spill into the WAL long before COMMIT: the
  test reads the WAL file the kill left and requires frames of the uncommitted transaction in
  it (the kill lands in the middle of the write), and with the default cache as a control
  (nothing reaches the WAL before COMMIT);
- by strace, on entry of chosen write calls of the COMMIT itself (a torn frame included) and of
  the WAL sync after it (strace, which scripts/test.sh installs).
Then it opens the store without a model: `check_consistency` finds nothing, doc 0 is whole, and
doc 1 is whole (rows, text, vectors, FTS rows) exactly when the kill came after its COMMIT
returned or after the commit frame reached the WAL, absent otherwise. A clean run shows one
transaction per document: one BEGIN IMMEDIATE and one COMMIT around every write, one commit
frame in the WAL, the WAL synced before `add` returns, and `synchronous=FULL` on WAL.
"""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.retrieval import chunk_text
from orchestrator.store import PersonalStore
from tests.support.ingest_jobs import ROOT, ForkServer, Job
from tests.support.ingest_worker import HashEmbedder, document_text, wal_frames

DIM = 384  # MiniLM's: realistic row sizes
CHUNKS = 2  # per document: every kill point of an add is a few dozen jobs
JOB = ("--fake-dim", str(DIM), "--chunks", str(CHUNKS), "--docs", "2", "--kill-doc", "1", "--key")
TINY_CACHE = ("--cache-pages", "1")
WRITES = ("INSERT", "REPLACE", "UPDATE", "DELETE", "-- INSERT", "-- REPLACE", "-- UPDATE", "-- DELETE")
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    s = ForkServer(tmp_path_factory.mktemp("server") / "server.log", "--fake-dim", str(DIM))
    try:
        assert s.next_line()[1] == "serving"
        yield s
    finally:
        s.close()


def _doc_1_state(path: Path) -> str:
    """'absent' or 'whole' for doc 1 after a kill, failing on anything else; doc 0 must be whole."""
    with PersonalStore(path, None) as store:
        assert store.check_consistency() == []
        titles = [d.title for d in store.list()]
        assert titles in (["doc 0"], ["doc 0", "doc 1"]), titles
        for i in range(len(titles)):
            _assert_whole(store, path, i)
    return "whole" if len(titles) == 2 else "absent"


def _assert_whole(store: PersonalStore, path: Path, i: int) -> None:
    """Doc i's row, chunk texts in order, their vectors and FTS rows are all exactly there."""
    chunks = chunk_text(document_text(i, CHUNKS))
    raw = sqlite3.connect(path)
    try:
        doc_id, count, key = raw.execute("SELECT id, chunk_count, idempotency_key FROM documents "
                                         "WHERE title = ?", (f"doc {i}",)).fetchone()
        rows = raw.execute("SELECT c.id, c.text, c.embedding, f.text FROM chunks c LEFT JOIN chunks_fts f "
                           "ON f.rowid = c.id WHERE c.doc_id = ? ORDER BY c.idx", (doc_id,)).fetchall()
    finally:
        raw.close()
    assert (count, key) == (len(chunks), f"key {i}")
    assert [r[1] for r in rows] == chunks == [r[3] for r in rows]
    assert [r[2] for r in rows] == [v.tobytes() for v in HashEmbedder(DIM).embed(chunks)]
    assert set(store.keyword_search(f'"document {i}"', 100)) == {r[0] for r in rows}


def _clean_run(server: ForkServer, tmp_path: Path, *cache: str) -> Job:
    """A job that adds both documents, printing every kill point of doc 1's add."""
    job = server.run(str(tmp_path / "clean" / "store.sqlite3"), *JOB, *cache, "--trace")
    assert job.signal == 0 and "exit" in job.lines, job.lines
    return job


def _points(job: Job, kind: str) -> list[tuple[str, str]]:
    """(point, statement) for every kill point of `kind` ("before" or "after") in a clean run."""
    return [(m[1], m[2]) for line in job.lines if (m := re.fullmatch(rf"point ({kind}:\d+) (.*)", line))]


def test_a_clean_add_is_one_transaction_and_synchronous_full(server: ForkServer, tmp_path: Path) -> None:
    job = _clean_run(server, tmp_path)
    assert job.field("pragmas ") == "synchronous=2 journal_mode=wal"  # 2 is FULL
    # One commit frame in the WAL per document (the store's creation is the first), none pending.
    assert [job.field(f"wal {i} ") for i in (0, 1)] == ["commits=2 pending=0", "commits=3 pending=0"]
    statements = [sql.upper() for _, sql in _points(job, "before")]
    control = [s.split()[0] for s in statements if s.startswith(TRANSACTION_CONTROL)]
    assert control == ["BEGIN", "COMMIT"], statements
    begin, commit = statements.index("BEGIN IMMEDIATE"), statements.index("COMMIT")
    writes = [n for n, s in enumerate(statements) if s.startswith(WRITES)]
    assert commit == len(statements) - 1 and writes and begin < min(writes) and max(writes) < commit
    assert sum(s.startswith("-- INSERT INTO 'MAIN'.'CHUNKS_FTS_CONTENT'") for s in statements) == CHUNKS


def _kill(server: ForkServer, tmp_path: Path, point: str, *cache: str) -> tuple[str, int, int]:
    """Run a job killed at `point`; (doc 1's state, then the commit frames it added to the WAL and
    the frames it left pending there: the WAL as the kill left it, read before recovery)."""
    path = tmp_path / point.replace(":", "") / "store.sqlite3"
    job = server.run(str(path), *JOB, *cache, "--kill-at", point)
    assert job.signal == signal.SIGKILL and job.lines[-2].startswith(f"kill {point} "), job.lines
    commits, pending = wal_frames(Path(f"{path}-wal"))
    before = int(job.field("wal 0 commits=").split()[0])
    return _doc_1_state(path), commits - before, pending


@pytest.mark.parametrize("cache", [TINY_CACHE, ()], ids=["one-page-cache", "default-cache"])
def test_sigkill_before_every_statement_of_add(server: ForkServer, tmp_path: Path,
                                               cache: tuple[str, ...]) -> None:
    points = _points(_clean_run(server, tmp_path, *cache), "before")
    pending_at = []
    for point, sql in points:
        state, commits, pending = _kill(server, tmp_path, point, *cache)
        assert (state, commits) == ("absent", 0), (point, sql)  # killed before COMMIT ran
        pending_at.append(pending)
    assert points[-1][1] == "COMMIT" and len(points) > 4 * CHUNKS, points
    begin = next(n for n, (_, sql) in enumerate(points) if sql.startswith("BEGIN"))
    assert pending_at[:begin + 1] == [0] * (begin + 1)  # nothing written before the transaction
    assert pending_at == sorted(pending_at), pending_at
    if cache == TINY_CACHE:  # the pages were in the log when the kill came: a kill mid-write
        assert pending_at[-1] >= 2 * CHUNKS, pending_at
        inside = sum(p > 0 for (_, sql), p in zip(points, pending_at) if not sql.startswith(("INSERT", "COMMIT")))
        assert inside >= CHUNKS, pending_at  # also inside statements, between FTS5's own writes
    else:  # the control: every page stays in memory until COMMIT
        assert pending_at[-1] == 0, pending_at


def test_sigkill_after_every_call_of_add_returns(server: ForkServer, tmp_path: Path) -> None:
    points = _points(_clean_run(server, tmp_path, *TINY_CACHE), "after")
    pending_at = []
    for n, (point, sql) in enumerate(points):
        state, commits, pending = _kill(server, tmp_path, point, *TINY_CACHE)
        last = n == len(points) - 1  # only a returned COMMIT, the last call, commits
        assert (state, commits) == (("whole", 1) if last else ("absent", 0)), (point, sql)
        pending_at.append(pending)
    assert [sql.split()[0] for _, sql in points] == (["SELECT", "BEGIN", "SELECT", "INSERT"]
                                                     + ["INSERT"] * CHUNKS + ["COMMIT"]), points
    assert pending_at[:2] == [0, 0] and pending_at[:-1] == sorted(pending_at[:-1]), pending_at
    assert pending_at[-2] >= 2 * CHUNKS and pending_at[-1] == 0, pending_at  # spilled, then committed


# --- kills during the WAL writes of COMMIT (strace injects SIGKILL on a syscall's entry) -------

def _strace(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """The worker in a fresh process under strace, seeing the WAL's writes, syncs and our reads."""
    command = ["strace", "-qq", "-o", f"{path}.strace", "-P", f"{path}-wal", *options,
               sys.executable, "-m", "tests.support.ingest_worker", str(path), *JOB]
    path.parent.mkdir(parents=True)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@dataclass(frozen=True)
class CommitSyscalls:
    """A clean run's syscalls on the WAL, around doc 1's add."""

    writes_before: int  # pwrite64 calls before doc 1's add
    syncs_before: int  # fdatasync or fsync calls before it
    calls: list[str]  # the syscall names during doc 1's add, in order

    @classmethod
    def read(cls, path: Path) -> CommitSyscalls:
        """The worker reads the WAL (`wal_frames`, O_RDONLY) after each document: those bound it."""
        calls = [line.split("(")[0] for line in Path(f"{path}.strace").read_text().splitlines()
                 if not line.startswith("openat") or "O_RDONLY" in line]
        reads = [n for n, call in enumerate(calls) if call == "openat"]
        assert len(reads) == 2, calls
        head = calls[:reads[0]]
        return cls(head.count("pwrite64"), sum(c in ("fdatasync", "fsync") for c in head),
                   calls[reads[0] + 1:reads[1]])


@pytest.fixture(scope="module")
def commit_syscalls(tmp_path_factory: pytest.TempPathFactory) -> CommitSyscalls:
    if shutil.which("strace") is None:  # scripts/test.sh installs it
        pytest.fail("strace is required by the log-write kill tests; scripts/test.sh installs it")
    path = tmp_path_factory.mktemp("strace") / "clean" / "store.sqlite3"
    done = _strace(path, "-e", "trace=pwrite64,fdatasync,fsync,openat")
    if done.returncode != 0 or not Path(f"{path}.strace").exists():
        pytest.fail(f"strace cannot trace here: {done.stderr[-500:]}")
    return CommitSyscalls.read(path)


def test_a_clean_commit_syncs_the_wal_before_add_returns(commit_syscalls: CommitSyscalls) -> None:
    calls = commit_syscalls.calls
    writes = calls.count("pwrite64")
    assert writes >= 4 and calls[:writes] == ["pwrite64"] * writes, calls
    assert len(calls) == writes + 1 and calls[-1] in ("fdatasync", "fsync"), calls


def test_sigkill_during_the_wal_writes_of_commit(commit_syscalls: CommitSyscalls, tmp_path: Path) -> None:
    """Killed on entry of a write, which then never happens: of the first frame, a middle one and
    the commit frame (the last), its header or its page (a torn frame: the header without its
    page); and on entry of the sync after the last write (the commit frame is in the file)."""
    before, calls = commit_syscalls.writes_before, commit_syscalls.calls
    writes = calls.count("pwrite64")  # frames as (24-byte header, page) pairs; the commit frame last
    middle = writes // 2 | 1  # a header; the writes of every frame but the last are alike
    chosen = sorted({1, 2, middle, middle + 1, writes - 1, writes})
    kills = [*((f"write{nth}", "pwrite64", nth) for nth in chosen), ("sync", calls[-1], 0)]
    for name, call, nth in kills:
        path = tmp_path / name / "store.sqlite3"
        when = before + nth if call == "pwrite64" else commit_syscalls.syncs_before + 1
        done = _strace(path, "-e", f"trace={call}", "-e", f"inject={call}:signal=KILL:when={when}")
        assert done.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (name, done.returncode, done.stderr[-2000:])
        assert "start 1" in done.stdout and "done 1" not in done.stdout, (name, done.stdout)
        commits, pending = wal_frames(Path(f"{path}-wal"))  # whole frames written before the kill
        commits -= int(re.findall(r"^wal 0 commits=(\d+)", done.stdout, re.M)[0])
        assert (commits, pending) == ((1, 0) if name == "sync" else (0, (nth - 1) // 2)), (name, commits, pending)
        assert _doc_1_state(path) == ("whole" if name == "sync" else "absent"), name
