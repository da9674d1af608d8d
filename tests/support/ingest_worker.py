"""Processes that ingest documents into a personal store, for the SIGKILL tests.

`python -m tests.support.ingest_worker --serve [--fake-dim D]` loads the embedder once (the real
one with one torch thread and no inference, or with `--fake-dim` a `HashEmbedder(D)`: no torch),
prints `serving`, then reads one job per stdin line (the worker arguments below, as a JSON list).
For each job it forks a child, prints `pid N`, waits for the child and prints
`exited N SIGNAL CODE` (SIGNAL 0 when it exited normally, CODE -1 when killed). Forking saves
the seconds that importing torch and loading the model take per job; the parent never runs the
model, so the child starts with no thread pool to inherit.

A child (or `python -m tests.support.ingest_worker STORE --chunks N ...` run directly, which
loads its embedder itself) opens its own store, prints `ready` and
`pragmas synchronous=S journal_mode=M` (read on the store's own connection), then adds
"doc 0".."doc M-1" (each `document_text(i, N)`). It prints one line per step, flushed before the
step goes on: `start i`, `begin i` (the store's BEGIN is about to run), `commit i` (its COMMIT is
about to run), `done i`, `wal i commits=C pending=P` (`wal_frames` of the WAL file then), and
`exit` at the end.

Kill points in document D (`--kill-doc`, default 0), numbered from 1 in the order they occur:
- `before:K`: the statement trace is about to run the K-th SQL statement of the add. SQLite
  traces every statement `add` runs, each row of its executemany, the trigger programs and FTS5's
  own statements on its shadow tables, so these points fall between statements and inside them;
- `after:J`: the J-th call of `add` into SQLite has just returned (each `execute`, each row of
  `executemany`); the last one is COMMIT.
`--trace` prints every point of document D as `point before:K SQL` or `point after:J SQL` (the
first 60 characters). With `--kill-at POINT` the child prints `kill POINT wal=BYTES` (the WAL
file's size at that moment) and SIGKILLs itself there. `--cache-pages N` sets
`PRAGMA cache_size = N` on the store's connection: with a tiny cache the pages of a transaction
spill into the WAL before its COMMIT. `--key` gives document i the idempotency key `key i`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import struct
import sys
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def document_text(i: int, chunks: int) -> str:
    """Distinct sentences for document `i`, in paragraphs: about `chunks` chunks."""
    sentences, size, j = [], 0, 0
    while size < chunks * 560:
        s = (f"Document {i} sentence {j} notes topic {(j * 7) % 23} "
             f"with the value {(j * 7919 + i) % 1009}.")
        sentences.append(s)
        size += len(s) + 1
        j += 1
        if j % 9 == 0:
            sentences.append("\n\n")
    return " ".join(sentences)


class HashEmbedder:
    """Unit vectors seeded by each text's sha256: the same in every process, no model."""

    name = "hash"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] /= np.linalg.norm(out[i])
        return out


def wal_frames(wal: Path) -> tuple[int, int]:
    """(commit frames, frames after the last commit frame) in a WAL file.

    Counts the whole frames whose salts match the header's, as SQLite's recovery reads them
    (less the checksums). Frames after the last commit frame belong to a transaction that never
    committed: recovery ignores them."""
    data = wal.read_bytes() if wal.exists() else b""
    if len(data) < 32:
        return 0, 0
    page_size, _, salt1, salt2 = struct.unpack(">4I", data[8:24])
    commits = pending = 0
    for offset in range(32, len(data) - (24 + page_size) + 1, 24 + page_size):
        _, db_pages, s1, s2 = struct.unpack(">4I", data[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            break
        pending += 1
        if db_pages:  # a commit frame: the database's size in pages after the commit
            commits, pending = commits + 1, 0
    return commits, pending


class KillPoints:
    """Numbers the kill points of document `kill_doc`'s add and SIGKILLs at `kill_at`."""

    def __init__(self, wal: Path, kill_at: str | None, kill_doc: int, trace: bool) -> None:
        self.wal, self.kill_at, self.kill_doc, self.trace = wal, kill_at, kill_doc, trace
        self.doc: int | None = None  # the document being added, None outside `add`
        self.seen = {"before": 0, "after": 0}

    def statement(self, sql: str) -> None:
        """The statement trace: `sql` is about to run."""
        if self.doc is None:
            return
        head = sql.lstrip().upper()
        if head.startswith("BEGIN"):
            _say(f"begin {self.doc}")
        elif head.startswith("COMMIT"):
            _say(f"commit {self.doc}")
        self._point("before", sql)

    def returned(self, sql: str) -> None:
        if self.doc is not None:
            self._point("after", sql)

    def rows(self, sql: str, rows: Iterable[Any]) -> Iterator[Any]:
        """`rows` for executemany, noting each row's return (executemany asks for the next)."""
        for row in rows:
            yield row
            self.returned(sql)

    def _point(self, kind: str, sql: str) -> None:
        if self.doc != self.kill_doc:
            return
        self.seen[kind] += 1
        point = f"{kind}:{self.seen[kind]}"
        if self.trace:
            _say(f"point {point} {' '.join(sql.split())[:60]}")
        if point == self.kill_at:
            _say(f"kill {point} wal={self.wal.stat().st_size if self.wal.exists() else 0}")
            os.kill(os.getpid(), signal.SIGKILL)


class KillConnection(sqlite3.Connection):
    """A connection that reports each `execute` and each executemany row when it returns."""

    points: KillPoints

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        cursor = super().execute(sql, parameters)
        self.points.returned(sql)
        return cursor

    def executemany(self, sql: str, rows: Iterable[Any], /) -> sqlite3.Cursor:
        return super().executemany(sql, self.points.rows(sql, rows))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("store", type=Path)
    p.add_argument("--chunks", type=int, required=True)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--kill-at", default=None, help="before:K or after:J")
    p.add_argument("--kill-doc", type=int, default=0)
    p.add_argument("--trace", action="store_true", help="print every kill point of --kill-doc")
    p.add_argument("--cache-pages", type=int, default=None, help="PRAGMA cache_size")
    p.add_argument("--key", action="store_true", help="add with idempotency keys")
    p.add_argument("--fake-dim", type=int, default=None, help="a HashEmbedder, no model")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    return p


def run_worker(argv: list[str], embedder: Any = None) -> int:
    args = _parser().parse_args(argv)
    from orchestrator.store import PersonalStore

    if embedder is None and args.fake_dim:
        embedder = HashEmbedder(args.fake_dim)
    elif embedder is None:
        from orchestrator.embedder import default_embedder

        embedder = default_embedder(num_threads=args.threads)
    wal = Path(f"{args.store}-wal")
    KillConnection.points = points = KillPoints(wal, args.kill_at, args.kill_doc, args.trace)
    connect, opened = sqlite3.connect, []

    def traced_connect(*a: Any, **kw: Any) -> sqlite3.Connection:
        conn = connect(*a, factory=KillConnection, **kw)
        if args.cache_pages is not None:
            conn.execute(f"PRAGMA cache_size = {args.cache_pages}")
        conn.set_trace_callback(points.statement)
        opened.append(conn)
        return conn

    sqlite3.connect = traced_connect  # type: ignore[assignment]
    store = PersonalStore(args.store, embedder)
    store.embedder.embed(["warm up"])  # the first call is slower; keep it out of the timings
    _say("ready")
    sync, mode = (opened[0].execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "journal_mode"))
    _say(f"pragmas synchronous={sync} journal_mode={mode}")
    for i in range(args.docs):
        points.doc = i
        _say(f"start {i}")
        store.add(f"doc {i}", document_text(i, args.chunks), idempotency_key=f"key {i}" if args.key else "")
        points.doc = None
        _say(f"done {i}")
        commits, pending = wal_frames(wal)
        _say(f"wal {i} commits={commits} pending={pending}")
    store.close()
    _say("exit")
    return 0


def serve(argv: list[str]) -> int:
    import orchestrator.store  # noqa: F401 - imported once, before forking

    fake = argv[argv.index("--fake-dim") + 1] if "--fake-dim" in argv else None
    if fake is not None:
        embedder: Any = HashEmbedder(int(fake))
    else:
        from orchestrator.embedder import default_embedder

        # One torch thread: loading then runs no OpenMP region, so forked children inherit no
        # thread pool (libgomp is not fork-safe once its pool exists). Nothing is run here.
        embedder = default_embedder(num_threads=1)
    _say("serving")
    for line in sys.stdin:
        if not line.strip():
            continue
        pid = os.fork()
        if pid == 0:
            try:
                code = run_worker(json.loads(line), embedder)
            except BaseException:  # noqa: BLE001 - shown on stderr, then the child exits
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        _say(f"exited {pid} {sig} {code}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve(sys.argv[2:]))
    sys.exit(run_worker(sys.argv[1:]))
