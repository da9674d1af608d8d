"""Property-based fuzzing (hypothesis) of the orchestrator's gRPC API: Generate, AddDocument,
DeleteDocument, ListDocuments, SetDocumentPrivacy and Status.

Inputs: well-typed requests with extreme numbers (0, 2^31, 2^32-1, 2^64-1), NaN and infinities,
unknown enum values, empty and huge strings (just under and over every limit), too many
messages; and raw bytes sent on the port with no serializer (random, truncated or bit-flipped
encodings of valid requests, invalid UTF-8 in string fields, unknown fields); and Generate streams
the client stops after a few messages.

Property: every reply is OK or a documented status (INVALID_ARGUMENT, OUT_OF_RANGE,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNAUTHENTICATED, NOT_FOUND for an unknown id, and
DEADLINE_EXCEEDED for a request that set a deadline), never INTERNAL, UNKNOWN or UNAVAILABLE; its
message is short and shows no traceback, file path or address. A Generate that succeeds is one
`started`, deltas, one `stats`. After each run health is SERVING, no generation is left running
and a normal request succeeds.

Stacks: the real orchestrator over a fake edge node with a real store (fast, most examples), and
a small run against the real stack (`tests/support/orch_stack.local_stack`, tiny models).

Profiles: the quick one runs in the normal test command (a fixed seed, `QUICK` examples per
API, about 15 s). The long one draws fresh random examples:
    TANDEM_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -s tests/integration/test_orchestrator_fuzz.py
sets every test's example count (`-s` prints the counts per API).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.validation import encode_page_token
from protos.tandem.v1 import common_pb2
from protos.tandem.v1 import orchestrator_pb2 as opb
from tests.support.orch_stack import FakeStack, fake_edge_stack, local_stack
from tests.support.wire import varint

LONG = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "0"))
QUICK = 150
SERVICE = "/tandem.v1.Orchestrator/"
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND}
TRIED: Counter[str] = Counter()


def fuzz(quick: int = QUICK) -> settings:
    return settings(max_examples=LONG or quick, deadline=None, database=None, derandomize=not LONG,
                    suppress_health_check=list(HealthCheck))


# --- strategies ----------------------------------------------------------------------------------

U32 = st.one_of(st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
U64 = st.one_of(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
ENUM = st.one_of(st.integers(0, 3), st.sampled_from([-1, 4, 2**31 - 1, -(2**31)]))
FLOAT = st.one_of(st.floats(0, 2, width=32), st.floats(width=32))  # NaN, +-inf, huge, negative
SIZES = [0, 1, 63, 64, 65, 128, 129, 300, 301, 4096, 4097, 200_001, 2_000_001]
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "\n\n", "é", "🙂" * 3]),
                 st.builds(lambda n, c: c * n, st.sampled_from(SIZES), st.sampled_from(["x", "é", "🙂 "])))
SHORT = st.one_of(st.text(max_size=12), st.sampled_from(["", "user", "system", "assistant", "robot"]))


def small(strategy: st.SearchStrategy[int], low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly values in [low, high] (fast answers), sometimes anything."""
    return st.one_of(st.integers(low, high), st.integers(low, high), strategy)


@st.composite
def generate_requests(draw: Any, max_new: tuple[int, int] = (1, 8)) -> opb.GenerateTextRequest:
    req = opb.GenerateTextRequest()
    shape = draw(st.sampled_from(["prompt", "messages", "both", "neither"]))
    if shape in ("prompt", "both"):
        req.prompt = draw(TEXT)
    if shape in ("messages", "both"):
        n = draw(st.one_of(st.integers(0, 4), st.just(513)))
        req.messages.extend(common_pb2.ChatMessage(role=draw(SHORT), content=draw(TEXT)) for _ in range(min(n, 5)))
        if n > 5:
            req.messages.extend([common_pb2.ChatMessage(role="user", content="x")] * (n - 5))
    o = req.options
    o.route, o.privacy = draw(ENUM), draw(ENUM)
    o.deadline_ms = draw(st.one_of(st.just(0), st.just(0), U32))
    o.ttft_budget_ms = draw(st.one_of(st.just(0), U32))
    o.max_new_tokens = draw(small(U32, *max_new))
    o.context_chunks = draw(small(U32, 0, 4))
    o.category = draw(st.one_of(st.just(""), TEXT))
    o.use_personal_context = draw(st.booleans())
    s = o.sampling
    s.temperature, s.top_k = draw(FLOAT), draw(small(U32, 0, 50))
    if draw(st.booleans()):
        s.top_p = draw(FLOAT)
    if draw(st.booleans()):
        s.seed = draw(U64)
    return req


def add_requests() -> st.SearchStrategy[opb.AddDocumentRequest]:
    return st.builds(opb.AddDocumentRequest, title=TEXT, text=TEXT, kind=st.one_of(SHORT, st.sampled_from(
        ["document", "note", "profile"])), privacy=ENUM, source=TEXT,
        idempotency_key=st.one_of(st.just(""), st.text(max_size=10), st.sampled_from(["k1", "k2", "k" * 129])))


IDS = st.one_of(st.text(max_size=70), st.sampled_from(["", "0" * 32, "x" * 65]))


def document_requests() -> st.SearchStrategy[tuple[str, Any]]:
    tokens = st.one_of(st.text(max_size=30), st.builds(encode_page_token, st.integers(-(2**63), 2**63 - 1), IDS),
                       st.sampled_from(["", "=", "x" * 257, "MTox"]))
    return st.one_of(
        st.tuples(st.just("AddDocument"), add_requests()),
        st.tuples(st.just("DeleteDocument"), st.builds(opb.DeleteDocumentRequest, id=IDS)),
        st.tuples(st.just("SetDocumentPrivacy"), st.builds(opb.SetDocumentPrivacyRequest, id=IDS, privacy=ENUM)),
        st.tuples(st.just("ListDocuments"), st.builds(opb.ListDocumentsRequest, page_size=small(U32, 0, 20),
                                                      page_token=tokens)),
        st.tuples(st.just("Status"), st.just(opb.StatusRequest())))




METHODS = ["Generate", "AddDocument", "DeleteDocument", "ListDocuments", "SetDocumentPrivacy", "Status"]


@st.composite
def raw_requests(draw: Any) -> tuple[str, bytes]:
    method = draw(st.sampled_from(METHODS))
    valid = (draw(generate_requests()) if method == "Generate" else draw(document_requests())[1]).SerializeToString()
    how = draw(st.sampled_from(["random", "truncated", "flipped", "bad_utf8", "unknown", "nested"]))
    if how == "random":
        return method, draw(st.binary(max_size=200))
    if how == "truncated":
        return method, valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]
    if how == "flipped":
        data = bytearray(valid or b"\x00")
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return method, bytes(data)
    if how == "bad_utf8":  # field 1 or 2, length-delimited, with bytes that are not UTF-8
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"]))
        return method, valid + bytes([draw(st.sampled_from([0x0A, 0x12]))]) + varint(len(junk)) + junk
    if how == "unknown":
        return method, valid + varint(999 << 3 | 0) + varint(draw(U64))
    depth = draw(st.integers(1, 120))  # options (field 3) nested in itself, then garbage
    return method, b"\x1a\x02\x1a\x00" * depth + draw(st.binary(max_size=20))


# --- checks --------------------------------------------------------------------------------------


def check_status(code: grpc.StatusCode, details: str, hidden: tuple[str, ...], deadline_set: bool = False) -> None:
    allowed = DOCUMENTED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if deadline_set else set())
    assert code in allowed, f"{code.name}: {details}"
    if code != grpc.StatusCode.OK:
        assert details and len(details) <= 500, details
        assert "Traceback" not in details and 'File "' not in details, details
        assert not any(h in details for h in hidden), details


def run_generate(channel: grpc.Channel, payload: bytes, hidden: tuple[str, ...], deadline_set: bool) -> None:
    call = channel.unary_stream(SERVICE + "Generate", request_serializer=None, response_deserializer=None)
    kinds = []
    try:
        kinds = [opb.GenerateTextResponse.FromString(m).WhichOneof("kind") for m in call(payload, timeout=60)]
    except grpc.RpcError as err:
        check_status(err.code(), err.details() or "", hidden, deadline_set)
        return
    assert kinds[0] == "started" and kinds[-1] == "stats" and set(kinds[1:-1]) <= {"delta"}, kinds


def run_unary(channel: grpc.Channel, method: str, payload: bytes, hidden: tuple[str, ...]) -> None:
    call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=60)
    except grpc.RpcError as err:
        check_status(err.code(), err.details() or "", hidden)


def assert_serving(address: str, core: Any, wait_s: float = 5.0) -> None:
    """Health SERVING, no generation left running, and a normal request succeeds."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tandem.v1.Orchestrator"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + wait_s
        while core.active_generations and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core.active_generations == 0
        normal = opb.GenerateTextRequest(prompt="def add(a, b):", options=opb.GenerateOptions(
            route=opb.ROUTE_LOCAL, max_new_tokens=4))
        call = channel.unary_stream(SERVICE + "Generate", request_serializer=opb.GenerateTextRequest.SerializeToString,
                                    response_deserializer=opb.GenerateTextResponse.FromString)
        assert list(call(normal, timeout=60))[-1].WhichOneof("kind") == "stats"


def report(name: str) -> None:
    print(f"fuzz examples {name}: {TRIED[name]}")


# --- the fake-edge stack -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeStack]:
    with fake_edge_stack(tmp_path_factory.mktemp("fuzz") / "store.sqlite3", delay_s=0.001) as s:
        s.hidden = (str(tmp_path_factory.getbasetemp()), s.edge_address, "127.0.0.1")  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def channel(stack: FakeStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.orchestrator.grpc_address) as c:
        yield c


def test_generate_fuzz(stack: FakeStack, channel: grpc.Channel) -> None:
    @fuzz()
    @given(generate_requests())
    def one(request: opb.GenerateTextRequest) -> None:
        TRIED["Generate"] += 1
        run_generate(channel, request.SerializeToString(), stack.hidden, request.options.deadline_ms > 0)

    one()
    report("Generate")
    assert_serving(stack.orchestrator.grpc_address, stack.core)


def test_document_and_status_fuzz(stack: FakeStack, channel: grpc.Channel) -> None:
    @fuzz(QUICK * 3)
    @given(document_requests())
    def one(case: tuple[str, Any]) -> None:
        method, request = case
        TRIED[method] += 1
        run_unary(channel, method, request.SerializeToString(), stack.hidden)

    one()
    for method in METHODS[1:]:
        report(method)
    assert_serving(stack.orchestrator.grpc_address, stack.core)


def test_raw_bytes_fuzz(stack: FakeStack, channel: grpc.Channel) -> None:
    @fuzz(QUICK * 2)
    @given(raw_requests())
    def one(case: tuple[str, bytes]) -> None:
        method, payload = case
        TRIED["raw " + method] += 1
        if method == "Generate":
            run_generate(channel, payload, stack.hidden, deadline_set=True)
        else:
            run_unary(channel, method, payload, stack.hidden)

    one()
    print("fuzz examples raw bytes:", dict(sorted((k, v) for k, v in TRIED.items() if k.startswith("raw "))))
    assert_serving(stack.orchestrator.grpc_address, stack.core)


def test_streams_stopped_halfway_free_their_slot(stack: FakeStack, channel: grpc.Channel) -> None:
    call = channel.unary_stream(SERVICE + "Generate", request_serializer=opb.GenerateTextRequest.SerializeToString,
                                response_deserializer=opb.GenerateTextResponse.FromString)

    @fuzz(QUICK // 2)
    @given(st.integers(0, 6), st.sampled_from(["cancel", "deadline"]))
    def one(read: int, how: str) -> None:
        TRIED["Generate stopped halfway"] += 1
        request = opb.GenerateTextRequest(prompt="hello", options=opb.GenerateOptions(route=opb.ROUTE_LOCAL,
                                                                                      max_new_tokens=8))
        stream = call(request, timeout=0.004 if how == "deadline" else 30)
        try:
            for _ in range(read):
                next(stream)
        except (grpc.RpcError, StopIteration):
            pass
        stream.cancel()

    one()
    report("Generate stopped halfway")
    assert_serving(stack.orchestrator.grpc_address, stack.core)
    assert stack.edge.active == 0, "every edge call under a stopped stream was cancelled"


# --- the real stack (tiny models), a small run ---------------------------------------------------


def test_real_stack_small_run(tiny_models: Any) -> None:
    import http.client
    import json

    with local_stack(tiny_models.target_hf, tiny_models.drafter_onnx) as real:
        orch = real.orchestrator
        hidden = (real.edge_address, "127.0.0.1")
        host, port = orch.http_address.split(":")
        with grpc.insecure_channel(orch.grpc_address) as channel:
            @fuzz(40)
            @given(generate_requests(max_new=(1, 4)), raw_requests(), st.dictionaries(
                st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "stop", "stream", "tandem"]),
                st.one_of(st.none(), st.booleans(), U64, st.floats(), st.text(max_size=20),
                          st.just([{"role": "user", "content": "hi"}]), st.just("tandem-local"))))
            def one(request: opb.GenerateTextRequest, raw: tuple[str, bytes], body: dict[str, Any]) -> None:
                body.setdefault("max_tokens", 2)  # an answer of the default length takes seconds here
                TRIED["real Generate"] += 1
                run_generate(channel, request.SerializeToString(), hidden, request.options.deadline_ms > 0)
                method, payload = raw
                TRIED["real raw"] += 1
                if method == "Generate":
                    run_generate(channel, payload, hidden, deadline_set=True)
                else:
                    run_unary(channel, method, payload, hidden)
                TRIED["real HTTP"] += 1
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                assert resp.status in (200, 400, 404, 429), (resp.status, data[:300])
                if resp.status != 200:
                    assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}

            one()
        for name in ("real Generate", "real raw", "real HTTP"):
            report(name)
        assert_serving(orch.grpc_address, orch.running.core)
