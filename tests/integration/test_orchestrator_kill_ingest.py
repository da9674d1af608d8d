"""SIGKILL the orchestrator process in the middle of an AddDocument: the store stays consistent.

A real orchestrator process (real MiniLM, real SQLite store under tmp_path; no edge node is needed
for documents) gets a small document, then a large one whose embedding takes seconds; the test
kills the process while that request is in flight (the request must fail, proving the kill hit
mid-ingest), then opens the store: the small document is intact, the large one is absent (never
half there), and the consistency check finds nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from orchestrator.embedder import default_embedder
from orchestrator.store import PersonalStore
from tandem.ops import procs
from tandem_sdk import Client, TandemError


def _big_text(paragraphs: int = 400) -> str:
    return "\n\n".join(f"Paragraph {i}: the weekly report number {i} covers budget line {i * 7}, the review of "
                       f"project {i % 13}, and notes about meeting room {i % 5} on floor {i % 9}." * 3
                       for i in range(paragraphs))


def test_sigkill_during_add_document_leaves_the_store_consistent(tmp_path) -> None:
    store_path = tmp_path / "store.sqlite3"
    with procs.Stack(tmp_path / "logs") as stack:
        orch = stack.start("orchestrator", [sys.executable, "-m", "orchestrator", "--edge", "127.0.0.1:9", "--port",
                                            "0", "--http-port", "-1", "--store", str(store_path)], timeout_s=120)
        address = orch.fields["grpc"]
        with Client(address, timeout_s=120, retries=0) as client:
            kept = client.add_document("The spare key is under the blue flower pot.", title="key", kind="note")
            outcome: dict[str, object] = {}

            def ingest() -> None:
                try:
                    outcome["doc"] = client.add_document(_big_text(), title="big", privacy="shareable")
                except TandemError as exc:
                    outcome["error"] = exc

            worker = threading.Thread(target=ingest)
            worker.start()
            time.sleep(1.5)  # the large document takes several seconds to embed
            os.kill(orch.proc.pid, signal.SIGKILL)
            worker.join(timeout=60)
    assert "error" in outcome, "the ingest finished before the kill; the test did not test anything"
    store = PersonalStore(store_path, default_embedder())
    try:
        assert store.check_consistency() == []
        titles = {d.title: d for d in store.list()}
        assert "big" not in titles, "a half-ingested document is visible"
        assert titles["key"].id == kept.id and titles["key"].chunk_count == store.chunk_rows(kept.id) >= 1
    finally:
        store.close()
