"""The orchestrator's handle on the personal store: loaded in the background, used from asyncio.

Guarantees:
- Loading the embedder (torch + all-MiniLM-L6-v2, a few seconds) never blocks serving: it
  starts at construction in a worker thread; calls wait for it, and a failed load turns into
  `Unavailable`: with the fix in the message when the model is not fetched, else a generic
  message (the cause, which may name files, is logged, not sent).
- Store calls run off the event loop, so it stays responsive: adds (which embed the whole
  document) on one worker thread, every other call (search, list, count, delete, privacy) on
  another, so none of them waits behind a large document's embedding; the embedder is locked
  per batch of chunks, so a search's query waits one batch at most.
- The store's own errors (`BadRequest` naming the field, `NotFound` for unknown ids, `Conflict`
  for a reused idempotency key) pass through.
- Replies are bounded: `list_page` returns at most `page_size` documents and stops before the
  page's serialized size passes `MAX_PAGE_BYTES` (at least one document per page, each at most
  a few tens of KB since titles and sources are cut to their limits), and every Document or
  Citation it builds has its title and source cut to the API's limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.errors import BadRequest, Unavailable
from orchestrator.validation import (
    MAX_PAGE_BYTES,
    MAX_SOURCE_CHARS,
    MAX_TITLE_CHARS,
    check_add,
    clip_text,
    decode_page_token,
    encode_page_token,
    page_size,
)
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
        # Adds embed a whole document (minutes for a large one on a slow device): on their own
        # thread, so searches, listings and counts never queue behind them (the store and the
        # embedder are thread-safe).
        self._ingest = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personal-ingest")
        self._store: Future = self._pool.submit(opener, store_path)
        self.embedder_name = "all-MiniLM-L6-v2"

    @property
    def loaded(self) -> bool:
        return self._store.done() and self._store.exception() is None

    async def _call(self, fn: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
        loop = asyncio.get_running_loop()
        try:
            store = await asyncio.wrap_future(self._store)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            raise _unavailable(exc) from None
        return await loop.run_in_executor(pool or self._pool, lambda: fn(store, *args))

    async def search(self, messages: list[dict[str, str]], k: int) -> list[Any]:
        """The `k` best chunks for the conversation's last user turn."""
        from orchestrator.retrieval import query_from_messages, search

        query = query_from_messages(messages)
        return await self._call(lambda store: search(store, query, k=k))

    def inject(self, messages: list[dict[str, str]], hits: Sequence[Any]) -> list[dict[str, str]]:
        from orchestrator.retrieval import inject_context

        return inject_context(messages, list(hits))

    async def add(self, request: opb.AddDocumentRequest) -> opb.Document:
        check_add(request)
        if request.privacy not in PRIVACY_FROM_PROTO:
            raise BadRequest("privacy", f"unknown value {request.privacy}")

        def add(store: Any) -> Any:
            return store.add(request.title, request.text, kind=request.kind or "document",
                             privacy=PRIVACY_FROM_PROTO[request.privacy], source=request.source,
                             idempotency_key=request.idempotency_key)
        return document_to_proto(await self._call(add, pool=self._ingest))

    async def delete(self, doc_id: str) -> bool:
        return bool(await self._call(lambda store: store.delete(doc_id)))

    async def list_page(self, request: opb.ListDocumentsRequest) -> opb.ListDocumentsResponse:
        """One page of documents, oldest first (see the module docstring for its bounds)."""
        after, limit = decode_page_token(request.page_token), page_size(request.page_size)
        rows = await self._call(lambda store: store.page(after, limit + 1))
        reply, size = opb.ListDocumentsResponse(), 0
        for d in rows[:limit]:
            doc = document_to_proto(d)
            size += doc.ByteSize() + 8  # field tag and length prefix, generously
            if reply.documents and size > MAX_PAGE_BYTES:
                break
            reply.documents.append(doc)
        if len(reply.documents) < len(rows):
            last = reply.documents[-1]
            reply.next_page_token = encode_page_token(last.created_unix_ms, last.id)
        return reply

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
        self._ingest.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _unavailable(exc: BaseException) -> Unavailable:
    from orchestrator.embedder import FETCH_COMMAND, EmbedderMissing

    if isinstance(exc, EmbedderMissing):
        return Unavailable(f"personal store unavailable: the embedder is not fetched; run `{FETCH_COMMAND}`")
    log.error("the personal store failed to open", exc_info=exc)
    return Unavailable("personal store unavailable: it failed to open (the orchestrator's log says why)")


def document_to_proto(d: Any) -> opb.Document:
    """The reply for a stored document, title and source cut to their limits."""
    title, cut_title = clip_text(d.title, MAX_TITLE_CHARS)
    source, cut_source = clip_text(d.source, MAX_SOURCE_CHARS)
    return opb.Document(id=d.id, title=title, kind=d.kind, privacy=PRIVACY_TO_PROTO.get(d.privacy, 0),
                        chunks=d.chunk_count, bytes=d.bytes, created_unix_ms=d.created_unix_ms, source=source,
                        truncated=bool(getattr(d, "truncated", False) or cut_title or cut_source))


def citations(hits: Sequence[Any]) -> list[opb.Citation]:
    return [opb.Citation(document_id=h.doc_id, title=clip_text(h.title, MAX_TITLE_CHARS)[0], chunk_index=h.chunk_index,
                         score=h.score, privacy=PRIVACY_TO_PROTO.get(h.privacy, 0)) for h in hits]
