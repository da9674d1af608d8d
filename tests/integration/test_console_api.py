"""The web console's HTTP side, without a browser: its static files, its JSON routes (documents,
status, the shaper's link control), the API key on every route, and the per-chunk `tandem`
extension of the OpenAI stream (checked with the official client, so compatibility holds).

The real orchestrator over the fake edge node (`fake_edge_stack`: a real SQLite store with the
hash embedder), with an API key, and a real link shaper whose control endpoint it is given.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from netshape.shaper import LinkShaper
from orchestrator.config import OrchestratorConfig
from orchestrator.console_api import CSP, ConsoleBackend
from orchestrator.http_api import create_http_app, start_http
from protos.tandem.v1 import orchestrator_pb2 as opb
from protos.tandem.v1 import orchestrator_pb2_grpc
from tandem.security import write_secret
from tests.support.orch_stack import FakeStack, fake_edge_stack

KEY = "console-test-key-0123456789"


@pytest.fixture(scope="module")
def shaper() -> Iterator[LinkShaper]:
    with LinkShaper("127.0.0.1:9", control=("127.0.0.1", 0)) as s:  # upstream unused: only its conditions
        yield s


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, shaper: LinkShaper) -> Iterator[FakeStack]:
    folder = tmp_path_factory.mktemp("console")
    key_file = write_secret(folder / "api-key", KEY + "\n")
    control = f"127.0.0.1:{shaper.control_address[1]}"  # type: ignore[index]
    with fake_edge_stack(folder / "store.sqlite3", api_key_file=key_file, shaper_control=control) as s:
        yield s


def _request(port: int, method: str, path: str, body: Any = None, *, key: str | None = KEY,
             raw: bytes | None = None) -> tuple[int, Any, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return resp.status, json.loads(payload) if ctype.startswith("application/json") else payload, resp.headers
    finally:
        conn.close()


def _call(stack: FakeStack, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    status, reply, _ = _request(stack.orchestrator.running.http_port, method, path, body, **kw)  # type: ignore[arg-type]
    return status, reply


# --- static files and the key ---


@pytest.mark.parametrize("path, ctype", [("/", "text/html"), ("/console/app.js", "text/javascript"),
                                         ("/console/style.css", "text/css")])
def test_the_console_s_static_files_load_without_the_key(stack: FakeStack, path: str, ctype: str) -> None:
    status, body, headers = _request(stack.orchestrator.running.http_port, "GET", path, key=None)  # type: ignore[arg-type]
    assert status == 200 and headers["Content-Type"].startswith(ctype)
    assert headers["Content-Security-Policy"] == CSP and "'unsafe-inline'" not in CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert len(body) > 500


def test_the_page_s_script_never_writes_markup() -> None:
    from importlib.resources import files

    script = (files("orchestrator") / "console" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script.replace("never innerHTML", ""), sink


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/tandem/status", None), ("GET", "/v1/tandem/documents", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "x"}), ("PATCH", "/v1/tandem/documents/d1",
                                                                     {"privacy": "shareable"}),
    ("DELETE", "/v1/tandem/documents/d1", None), ("GET", "/v1/tandem/link", None),
    ("POST", "/v1/tandem/link", {"action": "cut"}), ("GET", "/console/other.js", None), ("POST", "/", {}),
])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_every_console_route_needs_the_key(stack: FakeStack, shaper: LinkShaper, method: str, path: str, body: Any,
                                           key: str | None) -> None:
    before = shaper.conditions
    status, reply, headers = _request(stack.orchestrator.running.http_port, method, path, body, key=key)  # type: ignore[arg-type]
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert reply["error"]["code"] == "invalid_api_key" and list(reply["error"]) == ["message", "type", "param", "code"]
    assert shaper.conditions == before


# --- documents ---


def test_documents_add_list_relabel_and_remove(stack: FakeStack) -> None:
    status, doc = _call(stack, "POST", "/v1/tandem/documents",
                        {"title": "Gym <b>locker</b>", "text": "My gym locker code is 4312.", "kind": "note"})
    assert status == 201
    assert doc["privacy"] == "private" and doc["kind"] == "note" and doc["title"] == "Gym <b>locker</b>"
    assert set(doc) == {"id", "title", "kind", "privacy", "chunks", "bytes", "created_unix_ms", "source", "truncated"}
    status, page = _call(stack, "GET", "/v1/tandem/documents")
    assert status == 200 and doc["id"] in [d["id"] for d in page["documents"]] and page["next_page_token"] == ""
    status, relabelled = _call(stack, "PATCH", f"/v1/tandem/documents/{doc['id']}", {"privacy": "shareable"})
    assert status == 200 and relabelled["privacy"] == "shareable" and relabelled["id"] == doc["id"]
    # The gRPC API sees the same store.
    stub = orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(stack.orchestrator.grpc_address))
    listed = stub.ListDocuments(opb.ListDocumentsRequest(), metadata=[("authorization", f"Bearer {KEY}")], timeout=10)
    assert {d.id: d.privacy for d in listed.documents}[doc["id"]] == opb.PRIVACY_SHAREABLE
    assert _call(stack, "DELETE", f"/v1/tandem/documents/{doc['id']}") == (200, {"deleted": True})
    assert _call(stack, "DELETE", f"/v1/tandem/documents/{doc['id']}") == (200, {"deleted": False})


def test_documents_page_through_the_store(stack: FakeStack) -> None:
    ids = [_call(stack, "POST", "/v1/tandem/documents", {"title": f"p{i}", "text": f"page text {i}"})[1]["id"]
           for i in range(3)]
    seen, token = [], ""
    while True:
        status, page = _call(stack, "GET", "/v1/tandem/documents?page_size=2" + (f"&page_token={token}" if token else ""))
        assert status == 200 and len(page["documents"]) <= 2
        seen += [d["id"] for d in page["documents"]]
        token = page["next_page_token"]
        if not token:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    for doc_id in ids:
        _call(stack, "DELETE", f"/v1/tandem/documents/{doc_id}")


@pytest.mark.parametrize("method, path, body, status, param, code", [
    ("POST", "/v1/tandem/documents", {"title": "t" * 301, "text": "x"}, 400, "title", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "x", "privacy": "public"}, 400, "privacy", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": 5}, 400, "text", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "x", "colour": "red"}, 400, "colour", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "x", "idempotency_key": "a b"}, 400, "idempotency_key",
     None),
    ("POST", "/v1/tandem/documents", [1], 400, None, None),
    ("PATCH", "/v1/tandem/documents/no-such-doc", {"privacy": "shareable"}, 404, None, "not_found"),
    ("PATCH", "/v1/tandem/documents/x", {}, 400, "privacy", None),
    ("DELETE", "/v1/tandem/documents/" + "i" * 65, None, 400, "id", None),
    ("GET", "/v1/tandem/documents?page_token=garbage!", None, 400, "page_token", None),
    ("GET", "/v1/tandem/documents?page_size=-1", None, 400, "page_size", None),
    ("GET", "/v1/tandem/documents?page_size=%C2%B2", None, 400, "page_size", None),  # "²" passes isdigit()
    ("GET", "/v1/tandem/documents?page_size=%D9%A3", None, 400, "page_size", None),  # an Arabic-Indic 3
    ("GET", "/v1/tandem/documents?page_size=%EF%BC%91", None, 400, "page_size", None),  # a full-width 1
    ("POST", "/v1/tandem/documents", {"title": "\udc00", "text": "x"}, 400, "title", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "a \ud800 b"}, 400, "text", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "x", "source": "\ud800"}, 400, "source", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "x", "kind": "\ud800"}, 400, "kind", None),
    ("POST", "/v1/tandem/documents", {"title": "t", "text": "x", "idempotency_key": "\ud800"}, 400,
     "idempotency_key", None),
    ("PATCH", "/v1/tandem/documents/x", {"privacy": "\ud800"}, 400, "privacy", None),
])
def test_document_errors_have_openai_s_shape_and_name_the_field(stack: FakeStack, method: str, path: str, body: Any,
                                                                 status: int, param: str | None, code: str | None
                                                                 ) -> None:
    got, reply = _call(stack, method, path, body)
    assert got == status, reply
    assert list(reply) == ["error"] and reply["error"]["param"] == param and reply["error"]["code"] == code
    if param:
        assert reply["error"]["message"].startswith(f"{param}: ")


def test_the_page_size_must_be_ascii_digits(stack: FakeStack) -> None:
    got, reply = _call(stack, "GET", "/v1/tandem/documents?page_size=%C2%B2")
    assert got == 400 and reply["error"]["message"] == "page_size: must be a whole number"
    assert _call(stack, "GET", "/v1/tandem/documents?page_size=2")[0] == 200


def test_a_document_with_a_lone_surrogate_is_not_stored(stack: FakeStack) -> None:
    before = _call(stack, "GET", "/v1/tandem/status")[1]["documents"]
    got, reply = _call(stack, "POST", "/v1/tandem/documents", {"title": "t", "text": "x \ud800"})
    assert got == 400 and "surrogate" in reply["error"]["message"], reply
    assert _call(stack, "GET", "/v1/tandem/status")[1]["documents"] == before


def test_a_bad_document_gets_the_same_message_as_over_grpc(stack: FakeStack) -> None:
    _, reply = _call(stack, "POST", "/v1/tandem/documents", {"title": "t" * 301, "text": "x"})
    stub = orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(stack.orchestrator.grpc_address))
    with pytest.raises(grpc.RpcError) as err:
        stub.AddDocument(opb.AddDocumentRequest(title="t" * 301, text="x"),
                         metadata=[("authorization", f"Bearer {KEY}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == reply["error"]["message"]


# --- status and link control ---


def test_status_reports_the_link_and_the_controls(stack: FakeStack, shaper: LinkShaper) -> None:
    status, s = _call(stack, "GET", "/v1/tandem/status")
    assert status == 200
    assert s["link"]["state"] == "up" and s["link"]["circuit"] == "closed" and s["link"]["rtt_ms"] >= 0
    assert s["edge_healthy"] is True and s["personal"] is True and isinstance(s["documents"], int)
    assert s["link_control"] is True and s["conditions"]["mode"] == shaper.conditions.mode


def test_link_control_cuts_blackholes_slows_and_restores_the_shaper(stack: FakeStack, shaper: LinkShaper) -> None:
    shaper.set_conditions(rtt_ms=20, mode="up")
    try:
        for action, mode, rtt in (("cut", "down", 20), ("blackhole", "blackhole", 20), ("slow", "up", 300),
                                  ("restore", "up", 20)):
            status, reply = _call(stack, "POST", "/v1/tandem/link", {"action": action})
            assert status == 200 and reply["conditions"]["mode"] == mode and reply["conditions"]["rtt_ms"] == rtt
            assert shaper.conditions.mode == mode and shaper.conditions.rtt_ms == rtt
        assert _call(stack, "POST", "/v1/tandem/link", {"action": "slow", "rtt_ms": 1250})[1]["conditions"]["rtt_ms"] == 1250
        assert shaper.conditions.rtt_ms == 1250
        assert _call(stack, "GET", "/v1/tandem/link") == (200, {"conditions": json.loads(json.dumps(
            {"rtt_ms": 1250.0, "jitter_ms": 0.0, "bandwidth_kbps": 0.0, "mode": "up"}))})
    finally:
        shaper.set_conditions(rtt_ms=0, mode="up")


@pytest.mark.parametrize("body, param", [
    ({"action": "melt"}, "action"), ({}, "action"), ({"action": "cut", "rtt_ms": 5}, "rtt_ms"),
    ({"action": "slow", "rtt_ms": -1}, "rtt_ms"), ({"action": "slow", "rtt_ms": "fast"}, "rtt_ms"),
    ({"action": "slow", "rtt_ms": True}, "rtt_ms"), ({"action": "cut", "mode": "down"}, "mode"),
])
def test_bad_link_actions_are_400_naming_the_field(stack: FakeStack, shaper: LinkShaper, body: Any, param: str) -> None:
    before = shaper.conditions
    status, reply = _call(stack, "POST", "/v1/tandem/link", body)
    assert status == 400 and reply["error"]["param"] == param
    assert shaper.conditions == before


def test_without_a_shaper_the_link_routes_say_so_and_an_absent_shaper_is_503(stack: FakeStack) -> None:
    core = stack.core

    async def serve(control: str | None) -> tuple[Any, int]:
        app = create_http_app(core, console=ConsoleBackend(core, control))
        return await start_http(app, "127.0.0.1", 0)

    for control, status, code in ((None, 400, "disabled"), ("127.0.0.1:1", 503, "service_unavailable")):
        runner, port = stack.call(serve(control))
        try:
            got, reply, _ = _request(port, "POST", "/v1/tandem/link", {"action": "cut"}, key=None)
            assert (got, reply["error"]["code"]) == (status, code), reply
            got, s, _ = _request(port, "GET", "/v1/tandem/status", key=None)
            assert got == 200 and s["link_control"] is (control is not None) and s["conditions"] is None
        finally:
            stack.call(runner.cleanup())


@pytest.mark.parametrize("value", ["10.0.0.5:9000", "example.com:80", "127.0.0.1", "127.0.0.1:0", "localhost:x"])
def test_shaper_control_must_be_a_loopback_address(value: str) -> None:
    with pytest.raises(ValueError, match="shaper_control"):
        OrchestratorConfig(edge_address="127.0.0.1:1", shaper_control=value)
    assert OrchestratorConfig(edge_address="127.0.0.1:1", shaper_control="[::1]:7").shaper_control == "[::1]:7"


# --- prompt errors, over HTTP and gRPC ---


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", {"prompt": ""}, "prompt", "prompt: must not be empty"),
    ("/v1/completions", {"prompt": "a\x00b"}, "prompt", "prompt: must not contain NUL characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\x00b"}]}, "messages[0].content",
     "messages[0].content: must not contain NUL characters"),
    ("/v1/completions", {"prompt": "x\udc00"}, "prompt", "prompt: "),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800 there"}]},
     "messages[0].content", "messages[0].content: "),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text", "messages[0].content[0].text: "),
])
def test_a_bad_prompt_is_400_naming_the_field_it_was_sent_in(stack: FakeStack, path: str, body: Any, param: str,
                                                              message: str) -> None:
    got, reply = _call(stack, "POST", path, {"model": "tandem", "max_tokens": 4, **body})
    assert got == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"].startswith(message), reply
    assert reply["error"]["message"].count(f"{param}:") == 1


@pytest.mark.parametrize("request_, message", [
    (opb.GenerateTextRequest(prompt=""), "prompt: must not be empty"),
    (opb.GenerateTextRequest(prompt="a\x00b"), "prompt: must not contain NUL characters"),
    (opb.GenerateTextRequest(messages=[{"role": "user", "content": "a\x00b"}]),
     "messages[0].content: must not contain NUL characters"),
])
def test_a_bad_prompt_over_grpc_names_the_field_it_was_sent_in(stack: FakeStack, request_: opb.GenerateTextRequest,
                                                                message: str) -> None:
    stub = orchestrator_pb2_grpc.OrchestratorStub(grpc.insecure_channel(stack.orchestrator.grpc_address))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, metadata=[("authorization", f"Bearer {KEY}")], timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(message), err.value.details()


# --- the stream's extension, through the official client ---


def test_streamed_chunks_carry_route_and_token_sources_and_the_client_still_parses(stack: FakeStack) -> None:
    client = openai.OpenAI(base_url=f"http://{stack.orchestrator.http_address}/v1", api_key=KEY, max_retries=0)
    chunks = list(client.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True,
                                                 extra_body={"tandem": {"route": "speculative"}}))
    opening, *texts, last = chunks
    assert opening.choices[0].delta.role == "assistant"
    assert opening.model_extra["tandem"]["route"] == "speculative" and opening.model_extra["tandem"]["reason"]
    assert "".join(c.choices[0].delta.content or "" for c in texts) == "w0 w1 w2 w3 "
    assert [c.model_extra["tandem"] for c in texts] == [{"source": "verified", "tokens": 1}] * 4
    assert last.choices[0].finish_reason == "length" and last.model_extra["tandem"]["verified_tokens"] == 4
    local = list(client.chat.completions.create(model="tandem-local", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, stream=True))
    assert [c.model_extra["tandem"]["source"] for c in local[1:-1]] == ["local", "local"]


def test_a_non_streamed_answer_is_unchanged(stack: FakeStack) -> None:
    client = openai.OpenAI(base_url=f"http://{stack.orchestrator.http_address}/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(model="tandem-local", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2)
    assert resp.choices[0].message.content == "w0 w1 " and resp.model_extra["tandem"]["local_tokens"] == 2


def test_the_wheel_ships_the_console(tmp_path: Path) -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["orchestrator"]
    console = Path(__file__).parents[2] / "orchestrator" / "console"
    shipped = {p.name for pattern in patterns for p in console.parent.glob(pattern)}
    assert shipped == {p.name for p in console.iterdir() if p.is_file()} >= {"index.html", "app.js", "style.css"}
