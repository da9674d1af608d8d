"""A large document's embedding does not hold the personal store's other calls: with a fake
(hash-based) embedder that holds a large document's embedding until the test releases it, a
search, a listing and a count made meanwhile all answer, on a real SQLite store; then the add
completes. Before, every store call ran on one thread and queued behind the add (a 2 MB file
held the console's status for 155 s on a busy device)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from orchestrator.personal import Personal
from orchestrator.store import PersonalStore
from protos.tandem.v1 import orchestrator_pb2 as opb
from tests.support.orch_stack import HashEmbedder

ANSWER_S = 10.0  # generous: these calls take milliseconds; without the fix they wait for the release


class HeldHashEmbedder(HashEmbedder):
    """HashEmbedder that holds any call of more than one batch until `release` is set."""

    def __init__(self) -> None:
        self.embedding, self.release = threading.Event(), threading.Event()

    def embed(self, texts: Any) -> Any:
        if len(texts) > 32:
            self.embedding.set()
            self.release.wait(60)
        return super().embed(texts)


def test_a_search_list_and_count_do_not_wait_for_a_large_add(tmp_path: Path) -> None:
    embedder = HeldHashEmbedder()
    path = tmp_path / "store.sqlite3"
    personal = Personal(path, opener=lambda given: PersonalStore(given or path, embedder))

    async def run() -> opb.Document:
        await personal.add(opb.AddDocumentRequest(title="small", text="my locker code is 4312"))
        big = opb.AddDocumentRequest(title="big", text="\n\n".join(f"paragraph {i} " + "word " * 150
                                                                   for i in range(400)))
        adding = asyncio.ensure_future(personal.add(big))
        await asyncio.get_running_loop().run_in_executor(None, embedder.embedding.wait, 30)
        try:
            hits = await asyncio.wait_for(personal.search([{"role": "user", "content": "locker code"}], k=2), ANSWER_S)
            page = await asyncio.wait_for(personal.list_page(opb.ListDocumentsRequest()), ANSWER_S)
            count = await asyncio.wait_for(personal.count(), ANSWER_S)
        finally:
            embedder.release.set()
        assert hits and [d.title for d in page.documents] == ["small"] and count == 1
        return await adding

    try:
        doc = asyncio.run(run())
    finally:
        personal.close()
    assert doc.title == "big" and doc.chunks > 32
