"""A retried AddDocument stores one document: the SDK's idempotency key, the store's check, and
the migration that gives existing stores the key column.

The failure injected: a server interceptor lets the first AddDocument attempt run to the end (the
document is committed) and then answers UNAVAILABLE instead of the reply, as a reply lost on the
way back would look. gRPC's retryPolicy (the SDK's service config) re-sends the same request
bytes, key included; the orchestrator returns the document stored under the key. The control
sends two requests without a key and gets two documents, so the key is what makes it work.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator import store_schema
from orchestrator.config import OrchestratorConfig
from orchestrator.core import Orchestrator
from orchestrator.link_monitor import LinkMonitor
from orchestrator.servicer import create_server
from orchestrator.store import PersonalStore
from protos.tandem.v1 import orchestrator_pb2 as opb
from protos.tandem.v1 import orchestrator_pb2_grpc
from tandem_sdk import AsyncClient, Client, FailedPrecondition
from tests.support.orch_stack import HashEmbedder, LoopThread, hash_store_personal

FAST = {"timeout_s": 30.0, "backoff_s": 0.01, "max_backoff_s": 0.02}


class LoseFirstReply(grpc.aio.ServerInterceptor):
    """Runs AddDocument, then replaces the reply of its first `lose` attempts with UNAVAILABLE."""

    def __init__(self, lose: int = 1) -> None:
        self.lose = lose
        self.attempts: Counter[str] = Counter()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if not details.method.endswith("/AddDocument"):
            return handler
        inner = handler.unary_unary

        async def lossy(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            reply = await inner(request, context)  # committed
            self.attempts["AddDocument"] += 1
            if self.attempts["AddDocument"] <= self.lose:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "reply lost on the way back")
            return reply

        return grpc.unary_unary_rpc_method_handler(lossy, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class Served:
    def __init__(self, store_path: Path, interceptor: LoseFirstReply) -> None:
        self.loop = LoopThread("idempotency-orchestrator")
        self.personal = hash_store_personal(store_path)
        config = OrchestratorConfig(edge_address="127.0.0.1:9", grpc_port=0, http_port=-1, personal=True,
                                    store_path=store_path)

        async def start() -> tuple[grpc.aio.Server, int]:
            core = Orchestrator(config, grpc.aio.insecure_channel(config.edge_address), LinkMonitor(None),
                                self.personal)
            server, port = create_server(core, "127.0.0.1:0", interceptors=[interceptor])
            await server.start()
            return server, port

        self.server, port = self.loop.run(start())
        self.address = f"127.0.0.1:{port}"

    def close(self) -> None:
        self.loop.run(self.server.stop(None))
        self.personal.close()
        self.loop.stop()


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[Served, LoseFirstReply]]:
    interceptor = LoseFirstReply()
    s = Served(tmp_path / "store.sqlite3", interceptor)
    yield s, interceptor
    s.close()


def _titles(address: str) -> list[str]:
    with Client(address, timeout_s=30) as client:
        return [d.title for d in client.list_documents()]


def test_sync_sdk_retry_after_a_lost_reply_stores_one_document(served) -> None:
    s, interceptor = served
    with Client(s.address, **FAST) as client:
        doc = client.add_document("I live in Lyon.", title="home", kind="profile")
    assert interceptor.attempts["AddDocument"] == 2, "the first reply was lost, gRPC retried once"
    assert _titles(s.address) == ["home"]
    assert doc.title == "home"


def test_async_sdk_retry_after_a_lost_reply_stores_one_document(served) -> None:
    s, interceptor = served

    async def add() -> str:
        async with AsyncClient(s.address, **FAST) as client:
            return (await client.add_document("Allergic to peanuts.", title="health")).id

    doc_id = asyncio.run(add())
    assert interceptor.attempts["AddDocument"] == 2
    with Client(s.address, timeout_s=30) as client:
        assert [d.id for d in client.list_documents()] == [doc_id]


def test_two_logical_calls_store_two_documents(served) -> None:
    s, interceptor = served
    interceptor.lose = 0
    with Client(s.address, **FAST) as client:
        client.add_document("same text", title="same")
        client.add_document("same text", title="same")
    assert _titles(s.address) == ["same", "same"]


def test_control_without_a_key_a_resend_stores_twice(served) -> None:
    """The raw stub sends no key: the same lost-reply retry stores the document twice."""
    s, interceptor = served
    with grpc.insecure_channel(s.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        request = opb.AddDocumentRequest(title="twice", text="no key here")
        with pytest.raises(grpc.RpcError) as info:
            stub.AddDocument(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        stub.AddDocument(request, timeout=30)
    assert _titles(s.address) == ["twice", "twice"]


def test_a_key_reused_for_another_document_is_failed_precondition(served) -> None:
    s, interceptor = served
    interceptor.lose = 0
    with grpc.insecure_channel(s.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        first = stub.AddDocument(opb.AddDocumentRequest(title="a", text="one", idempotency_key="k-1"), timeout=30)
        again = stub.AddDocument(opb.AddDocumentRequest(title="a", text="one", idempotency_key="k-1"), timeout=30)
        assert again == first
        with pytest.raises(grpc.RpcError) as info:
            stub.AddDocument(opb.AddDocumentRequest(title="a", text="two", idempotency_key="k-1"), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details().startswith("idempotency_key: ")
        stub.DeleteDocument(opb.DeleteDocumentRequest(id=first.id), timeout=30)
        stub.AddDocument(opb.AddDocumentRequest(title="a", text="two", idempotency_key="k-1"), timeout=30)
    with Client(s.address, timeout_s=30) as client, pytest.raises(FailedPrecondition):
        client._unary(_with_key(client, "k-1"))  # the SDK's error class for the status


def _with_key(client: Client, key: str) -> Any:
    from tandem_sdk import _calls, _convert

    request = _convert.add_document_request("three", title="a", idempotency_key=key)
    return _calls.Unary("AddDocument", request, _convert.document)


def test_concurrent_adds_with_one_key_store_one_document(tmp_path: Path) -> None:
    with PersonalStore(tmp_path / "store.sqlite3", HashEmbedder()) as store:
        results: list[str] = []

        def add() -> None:
            results.append(store.add("t", "the same text", idempotency_key="shared").id)

        threads = [threading.Thread(target=add) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(results)) == 1 and store.count() == 1 and store.check_consistency() == []


def test_a_version_1_store_is_migrated_and_keeps_its_documents(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    store_schema.create(conn, HashEmbedder.name, HashEmbedder.dim)
    conn.execute("INSERT INTO documents VALUES ('old1', 'Old note', 'note', 'private', '', 3, 5, 0)")
    conn.execute("COMMIT")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    with PersonalStore(path, None) as bare:  # a model-less open (the CLI's) migrates too
        assert [d.id for d in bare.list()] == ["old1"]
    with PersonalStore(path, HashEmbedder()) as store:
        new = store.add("New", "new text", idempotency_key="k")
        assert store.add("New", "new text", idempotency_key="k") == new
        assert [d.id for d in store.list()] == ["old1", new.id] and store.check_consistency() == []
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == store_schema.SCHEMA_VERSION == 2
    assert raw.execute("SELECT idempotency_key FROM documents WHERE id = 'old1'").fetchone() == (None,)
    raw.close()


def test_the_cli_adding_the_same_file_again_returns_the_stored_document(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A user who re-runs `tandem docs add` (say after a timeout while a large file embedded) gets
    the document already stored, not a second copy; another title is another document."""
    from tandem.cli.main import main

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    note = tmp_path / "note.txt"
    note.write_text("I live in Lyon.")
    s = Served(tmp_path / "store.sqlite3", LoseFirstReply(lose=0))
    try:
        printed = []
        for extra in ([], [], ["--title", "another"]):
            assert main(["docs", "add", str(note), "--address", s.address, *extra]) == 0
            printed.append(capsys.readouterr().out.split("\t")[0])
        titles = _titles(s.address)
    finally:
        s.close()
    assert printed[0] == printed[1] != printed[2]
    assert sorted(titles) == ["another", "note.txt"]
