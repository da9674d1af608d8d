"""Processes that ingest documents into a personal store, for the SIGKILL test.

`python -m tests.support.ingest_worker --serve` loads the real embedder once (one torch
thread, no inference), prints `serving`, then reads one job per stdin line (the worker
arguments below, as a JSON list). For each job it forks a child, prints `pid N`, waits for the
child and prints `exited N SIGNAL CODE` (SIGNAL 0 when it exited normally, CODE -1 when
killed). Forking saves the seconds that importing torch and loading the model take per job;
the parent never runs the model, so the child starts with no thread pool to inherit.

A child (or `python -m tests.support.ingest_worker STORE --chunks N ...` run directly, which
loads the embedder itself) opens its own store, prints `ready`, then adds "doc 0".."doc M-1" (each
`document_text(i, N)`). It prints one line per step, flushed before the step goes on:
`start i`, `begin i` (the store's BEGIN is about to run), `commit i` (its COMMIT is about to
run), `done i`, and `exit` at the end. With `--kill-sql PREFIX`, it SIGKILLs itself when the
K-th statement starting with PREFIX of document D is about to run (a statement trace on the
store's connection, installed by wrapping `sqlite3.connect`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import traceback
from pathlib import Path
from typing import Any


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


class Tracer:
    def __init__(self, kill_sql: str | None, kill_nth: int, kill_doc: int) -> None:
        self.doc: int | None = None
        self.kill_sql, self.kill_nth, self.kill_doc = kill_sql, kill_nth, kill_doc
        self.seen = 0

    def __call__(self, statement: str) -> None:
        if self.doc is None:
            return
        head = statement.lstrip().upper()
        if head.startswith("BEGIN"):
            _say(f"begin {self.doc}")
        elif head.startswith("COMMIT"):
            _say(f"commit {self.doc}")
        if (self.kill_sql and self.doc == self.kill_doc
                and head.startswith(self.kill_sql.upper())):
            self.seen += 1
            if self.seen == self.kill_nth:
                os.kill(os.getpid(), signal.SIGKILL)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("store", type=Path)
    p.add_argument("--chunks", type=int, required=True)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--kill-sql", default=None)
    p.add_argument("--kill-nth", type=int, default=1)
    p.add_argument("--kill-doc", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    return p


def run_worker(argv: list[str], embedder: Any = None) -> int:
    args = _parser().parse_args(argv)
    from orchestrator.embedder import default_embedder
    from orchestrator.store import PersonalStore

    if embedder is None:
        embedder = default_embedder(num_threads=args.threads)

    tracer = Tracer(args.kill_sql, args.kill_nth, args.kill_doc)
    connect = sqlite3.connect

    def traced_connect(*a: Any, **kw: Any) -> sqlite3.Connection:
        conn = connect(*a, **kw)
        conn.set_trace_callback(tracer)
        return conn

    sqlite3.connect = traced_connect  # type: ignore[assignment]
    store = PersonalStore(args.store, embedder)
    store.embedder.embed(["warm up"])  # the first call is slower; keep it out of the timings
    _say("ready")
    for i in range(args.docs):
        tracer.doc = i
        _say(f"start {i}")
        store.add(f"doc {i}", document_text(i, args.chunks))
        _say(f"done {i}")
    store.close()
    _say("exit")
    return 0


def serve() -> int:
    import orchestrator.store  # noqa: F401 - imported once, before forking
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
    if sys.argv[1:] == ["--serve"]:
        sys.exit(serve())
    sys.exit(run_worker(sys.argv[1:]))
