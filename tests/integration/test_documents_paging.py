"""ListDocuments pages, so no reply outgrows gRPC's 4 MiB default, whatever the store holds.

The bug this guards: titles of 3 MB, accepted before the limits existed, made one ListDocuments
reply larger than 4 MiB, and `tandem docs list` failed with RESOURCE_EXHAUSTED from then on. Here
such rows are written straight into the SQLite file (as an old orchestrator would have), next to
normal documents; the SDK and the CLI list them all, cut to the limits and marked `truncated`,
in pages of at most `page_size` documents and about 1 MiB, and the user can delete them.

The orchestrator is the real one over a fake edge node and a real store with a hash embedder.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from orchestrator.validation import DEFAULT_PAGE_SIZE, MAX_PAGE_BYTES, MAX_PAGE_SIZE, MAX_SOURCE_CHARS, MAX_TITLE_CHARS
from protos.tandem.v1 import orchestrator_pb2 as opb
from protos.tandem.v1 import orchestrator_pb2_grpc
from tandem_sdk import AsyncClient, Client
from tests.support.orch_stack import FakeStack, fake_edge_stack

HUGE = 6  # rows with a 3 MB title and a 1 MB source: 24 MB of titles and sources
NORMAL = 240


def _insert_raw(path: Path, n: int, title_chars: int, source_chars: int, t0: int) -> list[str]:
    """Rows written directly, as a store without limits would have kept them (no chunks)."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO documents (id, title, kind, privacy, source, bytes, created_unix_ms, chunk_count) "
            "VALUES (?, ?, 'note', 'private', ?, 1, ?, 0)",
            [(doc_id, f"{i}" + "T" * title_chars, "S" * source_chars, t0 + i) for i, doc_id in enumerate(ids)])
    return ids


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("paging") / "store.sqlite3"
    with fake_edge_stack(path) as s:
        with Client(s.orchestrator.grpc_address, timeout_s=30) as client:
            client.add_document("a first document, added through the API", title="first")  # creates the store
        s.huge_ids = _insert_raw(path, HUGE, 3_000_000, 1_000_000, t0=1_000)  # type: ignore[attr-defined]
        s.normal_ids = _insert_raw(path, NORMAL, 20, 10, t0=2_000)  # type: ignore[attr-defined]
        yield s


def _pages(stack: FakeStack, page_size: int = 0) -> list[opb.ListDocumentsResponse]:
    with grpc.insecure_channel(stack.orchestrator.grpc_address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        pages, token = [], ""
        while True:
            page = stub.ListDocuments(opb.ListDocumentsRequest(page_size=page_size, page_token=token), timeout=30)
            pages.append(page)
            token = page.next_page_token
            if not token:
                return pages


def test_a_store_with_oversized_rows_lists_in_bounded_pages(stack: FakeStack) -> None:
    pages = _pages(stack)
    docs = [d for p in pages for d in p.documents]
    assert len(docs) == HUGE + NORMAL + 1 and len({d.id for d in docs}) == len(docs)
    assert [d.created_unix_ms for d in docs] == sorted(d.created_unix_ms for d in docs)  # oldest first
    assert all(len(p.documents) <= DEFAULT_PAGE_SIZE for p in pages)
    assert max(p.ByteSize() for p in pages) <= MAX_PAGE_BYTES + (64 << 10) < (4 << 20)
    huge = [d for d in docs if d.id in stack.huge_ids]  # type: ignore[attr-defined]
    assert len(huge) == HUGE and all(d.truncated for d in huge)
    assert all(len(d.title) == MAX_TITLE_CHARS and len(d.source) == MAX_SOURCE_CHARS for d in huge)
    assert not any(d.truncated for d in docs if d.id not in stack.huge_ids)  # type: ignore[attr-defined]


@pytest.mark.parametrize("page_size", [1, 7, MAX_PAGE_SIZE, 10 * MAX_PAGE_SIZE])
def test_page_size_bounds_each_page_and_every_document_comes_once(stack: FakeStack, page_size: int) -> None:
    pages = _pages(stack, page_size)
    assert all(len(p.documents) <= min(page_size, MAX_PAGE_SIZE) for p in pages)
    ids = [d.id for p in pages for d in p.documents]
    assert len(ids) == len(set(ids)) == HUGE + NORMAL + 1
    if page_size == 7:
        assert [len(p.documents) for p in pages[:-1]] == [7] * (len(pages) - 1)


def test_a_page_never_grows_past_the_byte_budget(stack: FakeStack) -> None:
    """Even with page_size 1000 the pages stop at about 1 MiB: the truncated rows are 17 KB each."""
    for page in _pages(stack, MAX_PAGE_SIZE):
        assert page.ByteSize() <= MAX_PAGE_BYTES + (64 << 10)


def test_sdk_lists_every_page_sync_and_async(stack: FakeStack) -> None:
    import asyncio

    with Client(stack.orchestrator.grpc_address, timeout_s=30) as client:
        docs = client.list_documents()
        assert len(docs) == HUGE + NORMAL + 1 and sum(d.truncated for d in docs) == HUGE
        assert [d.id for d in client.iter_documents(page_size=13)] == [d.id for d in docs]

    async def listed() -> list[str]:
        async with AsyncClient(stack.orchestrator.grpc_address, timeout_s=30) as aclient:
            return [d.id async for d in aclient.iter_documents(page_size=50)]

    assert asyncio.run(listed()) == [d.id for d in docs]
    with pytest.raises(ValueError, match="^page_size"):
        Client(stack.orchestrator.grpc_address).list_documents(page_size=0)


def test_cli_lists_and_the_user_can_remove_an_oversized_document(stack: FakeStack) -> None:
    env = {**os.environ, "TANDEM_ADDRESS": stack.orchestrator.grpc_address}
    env.pop("PYTHONUNBUFFERED", None)
    out = subprocess.run([sys.executable, "-m", "tandem", "docs", "list"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 + HUGE + NORMAL + 1  # the header, then one line per document
    assert sum(line.endswith("…") for line in lines) == HUGE and max(map(len, lines)) < 1000
    victim = stack.huge_ids[0]  # type: ignore[attr-defined]
    rm = subprocess.run([sys.executable, "-m", "tandem", "docs", "rm", victim], capture_output=True, text=True,
                        timeout=120, env=env)
    assert rm.returncode == 0, rm.stderr
    with Client(stack.orchestrator.grpc_address, timeout_s=30) as client:
        assert victim not in {d.id for d in client.list_documents()}
        stack.huge_ids.remove(victim)  # type: ignore[attr-defined]
        client.add_document("one more", title="again")  # the store is consistent and writable
    stack.normal_ids.append("added")  # type: ignore[attr-defined]


def test_paging_is_stable_while_documents_are_added(stack: FakeStack) -> None:
    with Client(stack.orchestrator.grpc_address, timeout_s=30) as client:
        before = [d.id for d in client.list_documents()]
        seen, added = [], []
        for i, doc in enumerate(client.iter_documents(page_size=20)):
            seen.append(doc.id)
            if i % 50 == 0 and i < len(before) - 20:  # not on the last page: they must come after it
                added.append(client.add_document(f"added while paging {i}", title=f"p{i}").id)
        assert seen == before + added  # new documents come last, nothing twice, nothing skipped
