"""The OpenAI-compatible endpoint, served by the real aiohttp app over a FAKE generation core.

The fake core is a scripted async generator (started, deltas, stats) that records the requests
it receives; the client is the official `openai` package (raw HTTP where the client cannot send
the input). The server runs on 127.0.0.1 port 0 in a background thread with its own loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from orchestrator import errors
from orchestrator.http_api import create_http_app, start_http
from protos.tandem.v1 import common_pb2, orchestrator_pb2

MODELS = ["tandem", "tandem-local", "tandem-speculative", "tandem-cloud"]
DELTAS = ["Hel", "lo, w", "orld", "!"]
TEXT = "".join(DELTAS)
MAX_BODY = 64 << 10


def _started() -> orchestrator_pb2.GenerateTextResponse:
    return orchestrator_pb2.GenerateTextResponse(started=orchestrator_pb2.GenerationStarted(
        route="speculative", reason="fake policy: link up", prompt_tokens=7,
        citations=[orchestrator_pb2.Citation(document_id="d1", title="Notes", chunk_index=2,
                                             score=0.5, privacy=orchestrator_pb2.PRIVACY_SHAREABLE)]))


def _delta(i: int) -> orchestrator_pb2.GenerateTextResponse:
    return orchestrator_pb2.GenerateTextResponse(delta=orchestrator_pb2.TextDelta(
        text=DELTAS[i], tokens=[100 + i], source="verified"))


def _stats(finish: int) -> orchestrator_pb2.GenerateTextResponse:
    gen = common_pb2.GenerationStats(
        route="speculative", generated_tokens=len(DELTAS), acceptance_rate=0.75, local_tokens=1,
        verified_tokens=3, finish_reason=finish)
    return orchestrator_pb2.GenerateTextResponse(stats=orchestrator_pb2.OrchestratorStats(
        route="speculative", reason="fake policy: link up", generation=gen, ttft_ms=12.5,
        tokens_per_s=40.0, category="code",
        switches=[common_pb2.RouteSwitch(at_token=3, from_route="speculative", to_route="local",
                                         reason="link cut", at_ms=80.0)]))


class FakeCore:
    """A scripted GenerationCore: `mode` picks the script for the next requests."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mode = "ok"
        self.finish = common_pb2.FINISH_REASON_STOP
        self.requests: list[orchestrator_pb2.GenerateTextRequest] = []
        self.yielded = 0
        self.closed = threading.Event()

    def model_ids(self) -> list[str]:
        return list(MODELS)

    async def generate(self, request: orchestrator_pb2.GenerateTextRequest
                       ) -> AsyncIterator[orchestrator_pb2.GenerateTextResponse]:
        self.requests.append(request)
        try:
            if self.mode == "bad_request":
                raise errors.BadRequest("options.max_new_tokens", "over the server's limit")
            if self.mode in ("unavailable", "busy", "crash"):
                raise {"unavailable": errors.Unavailable("edge node unreachable"),
                       "busy": errors.Busy("too many requests"),
                       "crash": RuntimeError("fake bug")}[self.mode]
            yield _started()
            for i in range(len(DELTAS)):
                if self.mode == "fail_mid_stream" and i == 2:
                    raise errors.Unavailable("cloud link down")
                if self.mode == "block" and i == 1:
                    await asyncio.Event().wait()  # a cloud that never answers
                self.yielded += 1
                yield _delta(i)
            yield _stats(self.finish)
        finally:
            self.closed.set()


@dataclass
class Server:
    core: FakeCore
    port: int

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused",
                             max_retries=0, timeout=30)

    def raw(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def server_module() -> Iterator[Server]:
    core = FakeCore()
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            app = create_http_app(core, max_body_bytes=MAX_BODY)
            started["runner"], started["port"] = loop.run_until_complete(
                start_http(app, "127.0.0.1", 0))
        finally:
            ready.set()
        loop.run_forever()
        loop.run_until_complete(started["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="fake-core-http", daemon=True)
    thread.start()
    assert ready.wait(30) and "port" in started, "the HTTP app did not start"
    yield Server(core, started["port"])
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


@pytest.fixture
def server(server_module: Server) -> Server:
    server_module.core.reset()
    return server_module


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("model", "tandem")
    kwargs.setdefault("messages", [{"role": "user", "content": "Say hello"}])
    return client.chat.completions.create(**kwargs)


def test_models_list_and_retrieve_fake_core(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list()] == MODELS
    assert client.models.retrieve("tandem-cloud").id == "tandem-cloud"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.code == "model_not_found"


def test_chat_non_stream_fake_core(server: Server) -> None:
    resp = _chat(server.client(), messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "Hi?"},
        {"role": "user", "content": "Again"}],
        max_completion_tokens=32, temperature=0.0, top_p=0.9, seed=1234)
    assert resp.choices[0].message.content == TEXT
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "tandem" and resp.id.startswith("chatcmpl-")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        7, 4, 11)
    tandem = resp.model_extra["tandem"]
    assert tandem["route"] == "speculative" and tandem["reason"] == "fake policy: link up"
    assert tandem["ttft_ms"] == 12.5 and tandem["tokens_per_s"] == 40.0
    assert (tandem["acceptance_rate"], tandem["local_tokens"], tandem["verified_tokens"]) == (
        0.75, 1, 3)
    assert tandem["switches"] == [{"at_token": 3, "from_route": "speculative", "to_route": "local",
                                   "reason": "link cut", "at_ms": 80.0}]
    assert tandem["citations"][0]["document_id"] == "d1"
    assert tandem["citations"][0]["privacy"] == "shareable"

    (req,) = server.core.requests
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "Be brief."), ("user", "Say\nhi"), ("assistant", "Hi?"), ("user", "Again")]
    opts = req.options
    assert opts.max_new_tokens == 32 and opts.route == orchestrator_pb2.ROUTE_AUTO
    assert opts.sampling.temperature == 0.0 and opts.sampling.HasField("top_p")
    assert opts.sampling.top_p == pytest.approx(0.9) and opts.sampling.seed == 1234
    assert server.core.closed.is_set()


def test_chat_defaults_follow_openai_fake_core(server: Server) -> None:
    _chat(server.client())
    sampling = server.core.requests[0].options.sampling
    assert sampling.temperature == 1.0
    assert not sampling.HasField("top_p") and not sampling.HasField("seed")
    assert server.core.requests[0].options.max_new_tokens == 0


def test_chat_stream_with_usage_fake_core(server: Server) -> None:
    server.core.finish = common_pb2.FINISH_REASON_LENGTH
    chunks = list(_chat(server.client(), stream=True, stream_options={"include_usage": True},
                        max_tokens=4))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["tandem"]["verified_tokens"] == 3
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.prompt_tokens == 7 and last.model_extra["tandem"]["route"] == "speculative"
    assert all(c.usage is None for c in chunks[:-1])
    assert server.core.requests[0].options.max_new_tokens == 4


def test_chat_stream_without_usage_fake_core(server: Server) -> None:
    chunks = list(_chat(server.client(), stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT


def test_completions_non_stream_and_stream_fake_core(server: Server) -> None:
    client = server.client()
    resp = client.completions.create(model="tandem-local", prompt="def f():", max_tokens=8)
    assert resp.choices[0].text == TEXT and resp.choices[0].finish_reason == "stop"
    assert resp.usage.total_tokens == 11 and resp.model_extra["tandem"]["category"] == "code"
    chunks = list(client.completions.create(model="tandem", prompt=["def g():"], stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    assert chunks[-1].usage.completion_tokens == 4
    first, second = server.core.requests
    assert (first.prompt, second.prompt) == ("def f():", "def g():")
    assert not first.messages and first.options.route == orchestrator_pb2.ROUTE_LOCAL


def test_extra_body_tandem_options_reach_fake_core(server: Server) -> None:
    _chat(server.client(), extra_body={"tandem": {
        "route": "cloud", "privacy": "cloud_quality", "use_personal_context": True,
        "deadline_ms": 5000, "ttft_budget_ms": 300, "category": "email"}})
    opts = server.core.requests[0].options
    assert opts.route == orchestrator_pb2.ROUTE_CLOUD
    assert opts.privacy == orchestrator_pb2.PRIVACY_MODE_CLOUD_QUALITY
    assert opts.use_personal_context and opts.category == "email"
    assert (opts.deadline_ms, opts.ttft_budget_ms) == (5000, 300)


def test_openapi_json_describes_the_endpoint_fake_core(server: Server) -> None:
    status, doc = server.raw("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    for path, name in (("/v1/chat/completions", "ChatCompletionRequest"),
                       ("/v1/completions", "CompletionRequest")):
        post = doc["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"} and "model" in schemas[name]["required"]
        assert set(post["responses"]) >= {"200", "400", "404"}
    assert schemas["ChatCompletionRequest"]["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    assert server.core.requests == []


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": 3.0}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"model": "tandem-local", "extra_body": {"tandem": {"route": "cloud"}}}, "tandem.route"),
    ({"extra_body": {"tandem": {"privacy": "public"}}}, "tandem.privacy"),
    ({"extra_body": {"tandem": {"deadline_ms": 1.5}}}, "tandem.deadline_ms"),
    ({"extra_body": {"tandem": {"rout": "cloud"}}}, "tandem.rout"),
])
def test_bad_params_get_400_naming_the_field_fake_core(
        server: Server, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(server.client(), **kwargs)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.body["type"] == "invalid_request_error" and param in info.value.message
    assert server.core.requests == []


def test_unknown_model_is_404_model_not_found_fake_core(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        _chat(server.client(), model="gpt-4o")
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert server.core.requests == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": NaN}', b"\xff\xfe",
                                  b'"just a string"', b""])
def test_malformed_bodies_get_400_fake_core(server: Server, body: bytes) -> None:
    status, payload = server.raw("POST", "/v1/chat/completions", body)
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] is None and payload["error"]["code"] is None
    assert payload["error"]["message"]


def test_oversized_unknown_route_and_wrong_method_fake_core(server: Server) -> None:
    big = json.dumps({"model": "tandem", "prompt": "x" * MAX_BODY}).encode()
    status, payload = server.raw("POST", "/v1/completions", big)
    assert status == 413 and str(MAX_BODY) in payload["error"]["message"]
    status, payload = server.raw("POST", "/v1/embeddings", b"{}")
    assert status == 404 and set(payload["error"]) == {"message", "type", "param", "code"}
    status, payload = server.raw("GET", "/v1/chat/completions")
    assert status == 405 and "error" in payload
    assert server.core.requests == []
    assert [m.id for m in server.client().models.list()] == MODELS  # still serving


def test_core_errors_map_to_statuses_fake_core(server: Server) -> None:
    client = server.client()
    server.core.mode = "bad_request"
    with pytest.raises(openai.BadRequestError) as bad:
        _chat(client, stream=True)
    # The core's field, in the OpenAI request's terms; the message starts with it.
    assert bad.value.param == "max_tokens" and bad.value.body["message"].startswith("max_tokens: over the server")
    server.core.mode = "unavailable"
    with pytest.raises(openai.InternalServerError) as unavailable:
        _chat(client)
    assert unavailable.value.status_code == 503 and "unreachable" in unavailable.value.message
    server.core.mode = "busy"
    with pytest.raises(openai.RateLimitError):
        _chat(client)
    server.core.mode = "crash"
    with pytest.raises(openai.InternalServerError) as crash:
        client.completions.create(model="tandem", prompt="x")
    assert crash.value.status_code == 500 and "fake bug" not in crash.value.message
    assert "request id" in crash.value.message and "Traceback" not in crash.value.message
    server.core.mode = "ok"
    assert _chat(client).choices[0].message.content == TEXT


def test_error_after_stream_started_is_an_sse_event_fake_core(server: Server) -> None:
    server.core.mode = "fail_mid_stream"
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in _chat(server.client(), stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "cloud link down" in info.value.message
    assert "".join(received) == "".join(DELTAS[:2])
    assert server.core.closed.is_set()


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_text_and_closes_fake_core(server: Server, stream: bool) -> None:
    client = server.client()
    stop = ["o, wo", "zzz"]  # spans the second and third deltas
    if stream:
        chunks = list(_chat(client, stream=True, stop=stop))
        pieces = [c.choices[0].delta.content or "" for c in chunks]
        assert all("o" not in p for p in pieces[1:]), pieces  # no piece of the stop leaks out
        text, finish = "".join(pieces), chunks[-1].choices[0].finish_reason
        assert chunks[-1].model_extra["tandem"]["stopped_by_sequence"] is True
    else:
        resp = _chat(client, stop=stop[0])
        text, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
        assert resp.usage.completion_tokens == 3 and resp.model_extra["tandem"]["ttft_ms"] is None
    assert (text, finish) == ("Hell", "stop")
    assert server.core.closed.is_set() and server.core.yielded == 3  # stats never produced


def test_client_disconnect_closes_fake_core_generator(server: Server) -> None:
    server.core.mode = "block"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": "tandem", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    sock = conn.sock
    resp = conn.getresponse()
    assert resp.status == 200
    seen = b""
    while DELTAS[0].encode() not in seen:
        seen += resp.fp.readline()
    assert not server.core.closed.is_set()
    sock.shutdown(socket.SHUT_RDWR)  # the client goes away while the core waits on the cloud
    resp.close()
    conn.close()
    assert server.core.closed.wait(20), "the core's generator was not closed"
    server.core.mode = "ok"
    assert _chat(server.client()).choices[0].message.content == TEXT
