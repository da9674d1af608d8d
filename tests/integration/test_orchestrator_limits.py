"""Every field of the orchestrator's API has a documented limit, enforced with INVALID_ARGUMENT
naming the field (HTTP 400 with `param`), and the context a request may use is the one of the
route that serves it.

The orchestrator is the real one (core, gRPC servicer, HTTP endpoint, SQLite store) over a fake
edge node (`tests/support/orch_stack.FakeEdge`: 4 characters a token, context 32768) that also
answers the link's health probes, so every route is open. The cloud's context is the default
`cloud_max_context` (4096, `tandem.limits.MAX_CONTEXT`).
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

import grpc
import pytest

from orchestrator import validation
from orchestrator.config import MAX_CONTEXT_CHUNKS
from protos.tandem.v1 import common_pb2, orchestrator_pb2_grpc
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem.limits import MAX_CONTEXT, MAX_DEADLINE_MS, MAX_NEW_TOKENS
from tests.support.orch_stack import FakeStack, fake_edge_stack

PROTO = Path(__file__).resolve().parents[2] / "protos" / "tandem" / "v1" / "orchestrator.proto"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with fake_edge_stack(tmp_path_factory.mktemp("limits") / "store.sqlite3") as s:
        yield s


@pytest.fixture(scope="module")
def stub(stack: FakeStack):
    with grpc.insecure_channel(stack.orchestrator.grpc_address) as channel:
        yield orchestrator_pb2_grpc.OrchestratorStub(channel)


def test_the_proto_documents_the_limits_the_code_enforces() -> None:
    text = PROTO.read_text()

    def comment(field: str) -> str:
        """Every line declaring `field` (in any message), joined."""
        return "\n".join(ln for ln in text.splitlines() if re.search(rf"\b{field} = \d+;", ln))

    assert f"at most {validation.MAX_TITLE_CHARS} characters" in comment("title")
    assert f"at most {validation.MAX_DOCUMENT_BYTES} UTF-8 bytes" in comment("text")
    assert f"at most {validation.MAX_SOURCE_CHARS} characters" in comment("source")
    assert f"At most {validation.MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII" in text
    assert f"at most {validation.MAX_ID_CHARS} characters" in comment("id")
    assert f"at most {validation.MAX_MESSAGES}" in comment("messages")
    assert f"at most {validation.MAX_CATEGORY_CHARS} characters" in comment("category")
    assert f"at most {MAX_NEW_TOKENS}" in comment("max_new_tokens")
    assert f"at most {MAX_CONTEXT_CHUNKS}" in comment("context_chunks")
    assert f"at most {MAX_DEADLINE_MS}" in comment("deadline_ms")
    assert f"0 = {validation.DEFAULT_PAGE_SIZE}; more than {validation.MAX_PAGE_SIZE}" in comment("page_size")
    assert f"at most {validation.MAX_PAGE_TOKEN_CHARS} characters" in comment("page_token")
    assert f"{MAX_CONTEXT} tokens by default" in text


def _refused(call, field: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not hasattr(result, "SerializeToString"):
            list(result)
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    assert details.startswith(f"{field}: ") or code != grpc.StatusCode.INVALID_ARGUMENT, details
    assert len(details) <= 500
    return details


@pytest.mark.parametrize(("request_", "field"), [
    (opb.AddDocumentRequest(title="t" * 3_000_000, text="body"), "title"),
    (opb.AddDocumentRequest(title="t", text="body", source="s" * 4097), "source"),
    (opb.AddDocumentRequest(title="t", text="body", kind="k" * 100_000), "kind"),
    (opb.AddDocumentRequest(title="t", text="x" * 2_000_001), "text"),
    (opb.AddDocumentRequest(title="t", text="  \n"), "text"),
    (opb.AddDocumentRequest(title="t", text="body", idempotency_key="k" * 129), "idempotency_key"),
    (opb.AddDocumentRequest(title="t", text="body", idempotency_key="has space"), "idempotency_key"),
    (opb.AddDocumentRequest(title="t", text="body", privacy=7), "privacy"),
])
def test_add_document_limits(stub, request_: opb.AddDocumentRequest, field: str) -> None:
    _refused(lambda: stub.AddDocument(request_, timeout=30), field)


def test_id_and_page_limits(stub) -> None:
    _refused(lambda: stub.DeleteDocument(opb.DeleteDocumentRequest(id=""), timeout=10), "id")
    _refused(lambda: stub.DeleteDocument(opb.DeleteDocumentRequest(id="i" * 65), timeout=10), "id")
    _refused(lambda: stub.SetDocumentPrivacy(opb.SetDocumentPrivacyRequest(id="i" * 3_000_000, privacy=1),
                                             timeout=10), "id")
    _refused(lambda: stub.ListDocuments(opb.ListDocumentsRequest(page_token="x" * 257), timeout=10), "page_token")
    _refused(lambda: stub.ListDocuments(opb.ListDocumentsRequest(page_token="not a token!"), timeout=10),
             "page_token")
    assert stub.DeleteDocument(opb.DeleteDocumentRequest(id="i" * 64), timeout=10).deleted is False


@pytest.mark.parametrize(("request_", "field"), [
    (opb.GenerateTextRequest(messages=[common_pb2.ChatMessage(role="user", content="x")] * 513), "messages"),
    (opb.GenerateTextRequest(messages=[common_pb2.ChatMessage(role="r" * 100_000, content="x")]), "messages[0].role"),
    (opb.GenerateTextRequest(prompt="x", options=opb.GenerateOptions(category="c" * 65)), "options.category"),
    (opb.GenerateTextRequest(prompt="x", options=opb.GenerateOptions(deadline_ms=MAX_DEADLINE_MS + 1)),
     "options.deadline_ms"),
    (opb.GenerateTextRequest(prompt="x", options=opb.GenerateOptions(ttft_budget_ms=2**32 - 1)),
     "options.ttft_budget_ms"),
    (opb.GenerateTextRequest(prompt="x", options=opb.GenerateOptions(
        sampling=common_pb2.SamplingParams(temperature=float("nan")))), "options.sampling"),
    (opb.GenerateTextRequest(prompt="x" * 200_001), "prompt"),
])
def test_generate_limits(stub, request_: opb.GenerateTextRequest, field: str) -> None:
    details = _refused(lambda: stub.Generate(request_, timeout=30), field)
    assert "r" * 100 not in details  # a client's value is quoted back short


def _prompt_of(tokens: int) -> str:
    return "x" * (4 * tokens)  # the fake edge counts 4 characters a token


def _generate(stub, prompt: str, route: int, max_new_tokens: int = 8) -> list[opb.GenerateTextResponse]:
    request = opb.GenerateTextRequest(prompt=prompt, options=opb.GenerateOptions(route=route,
                                                                              max_new_tokens=max_new_tokens))
    return list(stub.Generate(request, timeout=30))


def test_context_is_the_route_s(stack: FakeStack, stub) -> None:
    """Fits the cloud: any route. Fits only the device: auto goes local (the reason says why), a
    forced cloud route is refused naming the cloud's limit. Fits nowhere: refused naming the
    device's limit."""
    short = _prompt_of(MAX_CONTEXT - 100)
    for route, name in ((opb.ROUTE_CLOUD, "cloud"), (opb.ROUTE_SPECULATIVE, "speculative")):
        assert _generate(stub, short, route)[0].started.route == name
    long = _prompt_of(MAX_CONTEXT + 1000)
    started = _generate(stub, long, opb.ROUTE_AUTO)[0].started
    assert started.route == "local" and f"{MAX_CONTEXT} tokens" in started.reason
    assert "fit only the device" in started.reason
    for route in (opb.ROUTE_CLOUD, opb.ROUTE_SPECULATIVE):
        details = _refused(lambda r=route: _generate(stub, long, r), "prompt")
        assert f"context length of {MAX_CONTEXT} tokens" in details
    assert _generate(stub, long, opb.ROUTE_LOCAL)[0].started.route == "local"
    huge = _prompt_of(stack.edge.context_length)
    details = _refused(lambda: _generate(stub, huge, opb.ROUTE_AUTO), "prompt")
    assert f"context length of {stack.edge.context_length} tokens" in details
    # The answer's budget counts too: just under the cloud's context with the prompt alone.
    edge_prompt = _prompt_of(MAX_CONTEXT - 50)
    assert _generate(stub, edge_prompt, opb.ROUTE_AUTO, max_new_tokens=200)[0].started.route == "local"
    assert stack.core.active_generations == 0


def _http(stack: FakeStack, body: dict) -> tuple[int, dict]:
    host, port = stack.orchestrator.http_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_http_context_and_limits_name_the_param(stack: FakeStack) -> None:
    messages = [{"role": "user", "content": _prompt_of(MAX_CONTEXT + 1000)}]
    status, body = _http(stack, {"model": "tandem-cloud", "messages": messages, "max_tokens": 8})
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "messages"
    assert body["error"]["message"].startswith("messages: ")
    status, body = _http(stack, {"model": "tandem", "messages": messages, "max_tokens": 8})
    assert status == 200 and body["tandem"]["route"] == "local"
    status, body = _http(stack, {"model": "tandem", "messages": [{"role": "user", "content": "x" * 200_001}]})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _http(stack, {"model": "tandem", "messages": messages[:1], "stop": ["s" * 257]})
    assert status == 400 and body["error"]["param"] == "stop[0]"


def test_an_unexpected_error_is_internal_with_a_request_id_only(stack: FakeStack, stub, caplog) -> None:
    """A bug (here: Status's edge lookup raising) is INTERNAL with a generic message quoting a request
    id; the details, path and all, are in the log under that id, not in the reply."""
    core = stack.core
    original = core.edge_status

    async def broken() -> None:
        raise RuntimeError("boom at /secret/path/store.sqlite3 from 10.1.2.3 pid 4242")

    core.edge_status = broken
    try:
        with caplog.at_level("ERROR", logger="orchestrator.errors"):
            details = _refused(lambda: stub.Status(opb.StatusRequest(), timeout=10), "", grpc.StatusCode.INTERNAL)
    finally:
        core.edge_status = original
    assert "request id" in details and "/secret" not in details and "10.1.2.3" not in details and "boom" not in details
    request_id = re.search(r"request id (\w+)", details).group(1)
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)
    assert stub.Status(opb.StatusRequest(), timeout=10).edge_healthy
