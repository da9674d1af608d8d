"""The orchestrator's handle on the personal store: loaded in the background, used from asyncio.

Guarantees:
- Loading the embedder (torch + all-MiniLM-L6-v2, a few seconds) never blocks serving: it
  starts at construction in a worker thread; calls wait for it, and a failed load (model not
  fetched) turns into `Unavailable` with the fix in the message.
- Store calls run in a single worker thread (embedding is CPU-bound; SQLite writes serialize
  anyway), so the event loop stays responsive.
- The store's own errors (`BadRequest` naming the field, `NotFound` for unknown ids) pass through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.errors import BadRequest, Unavailable
from protos.tandem.v1 import orchestrator_pb2 as opb

log = logging.getLogger(__name__)
T = TypeVar("T")

PRIVACY_TO_PROTO = {"private": opb.PRIVACY_PRIVATE, "shareable": opb.PRIVACY_SHAREABLE}
PRIVACY_FROM_PROTO = {opb.PRIVACY_UNSPECIFIED: "private", opb.PRIVACY_PRIVATE: "private",
                      opb.PRIVACY_SHAREABLE: "shareable"}


def _open_store(path: Path | None) -> Any:
    from orchestrator.embedder import default_embedder
    from orchestrator.store import PersonalStore, default_store_path

    return PersonalStore(path or default_store_path(), default_embedder())


class Personal:
    def __init__(self, store_path: Path | None = None, opener: Callable[[Path | None], Any] = _open_store) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personal")
        self._store: Future = self._pool.submit(opener, store_path)
        self.embedder_name = "all-MiniLM-L6-v2"

    @property
    def loaded(self) -> bool:
        return self._store.done() and self._store.exception() is None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            store = await asyncio.wrap_future(self._store)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            raise Unavailable(f"personal store unavailable: {exc}") from None
        return await loop.run_in_executor(self._pool, lambda: fn(store, *args))

    async def search(self, messages: list[dict[str, str]], k: int) -> list[Any]:
        """The `k` best chunks for the conversation's last user turn."""
        from orchestrator.retrieval import query_from_messages, search

        query = query_from_messages(messages)
        return await self._call(lambda store: search(store, query, k=k))

    def inject(self, messages: list[dict[str, str]], hits: Sequence[Any]) -> list[dict[str, str]]:
        from orchestrator.retrieval import inject_context

        return inject_context(messages, list(hits))

    async def add(self, request: opb.AddDocumentRequest) -> opb.Document:
        if request.privacy not in PRIVACY_FROM_PROTO:
            raise BadRequest("privacy", f"unknown value {request.privacy}")

        def add(store: Any) -> Any:
            return store.add(request.title, request.text, kind=request.kind or "document",
                             privacy=PRIVACY_FROM_PROTO[request.privacy], source=request.source)
        return document_to_proto(await self._call(add))

    async def delete(self, doc_id: str) -> bool:
        return bool(await self._call(lambda store: store.delete(doc_id)))

    async def list(self) -> list[opb.Document]:
        return [document_to_proto(d) for d in await self._call(lambda store: store.list())]

    async def set_privacy(self, doc_id: str, privacy: int) -> opb.Document:
        if privacy not in (opb.PRIVACY_PRIVATE, opb.PRIVACY_SHAREABLE):
            raise BadRequest("privacy", "must be PRIVACY_PRIVATE or PRIVACY_SHAREABLE")
        # The store raises BadRequest / NotFound itself (orchestrator.errors).
        return document_to_proto(await self._call(lambda store: store.set_privacy(doc_id, PRIVACY_FROM_PROTO[privacy])))

    async def count(self) -> int:
        if not self.loaded:
            return 0
        return int(await self._call(lambda store: store.count()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def document_to_proto(d: Any) -> opb.Document:
    return opb.Document(id=d.id, title=d.title, kind=d.kind, privacy=PRIVACY_TO_PROTO.get(d.privacy, 0),
                        chunks=d.chunk_count, bytes=d.bytes, created_unix_ms=d.created_unix_ms, source=d.source)


def citations(hits: Sequence[Any]) -> list[opb.Citation]:
    return [opb.Citation(document_id=h.doc_id, title=h.title, chunk_index=h.chunk_index, score=h.score,
                         privacy=PRIVACY_TO_PROTO.get(h.privacy, 0)) for h in hits]
