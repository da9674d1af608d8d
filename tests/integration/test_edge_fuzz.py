"""Fuzzing the edge node's gRPC API (Generate, CountTokens, Info) with hypothesis.

An in-process edge node (127.0.0.1, port 0, the tiny ONNX drafter, no cloud) gets requests with
extreme numbers, NaN and infinities in the sampling floats, empty and huge fields (a prompt and
a token list past their limits, more messages than allowed), unknown fields appended as raw
bytes, invalid UTF-8 in string fields, truncated and garbage protobuf bytes sent raw
(`request_serializer=None`), and Generate streams cancelled at open or halfway.

Property: every reply is a documented status (INVALID_ARGUMENT, OUT_OF_RANGE,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNAUTHENTICATED) or success, never INTERNAL or
UNKNOWN; no status message holds a traceback, a file path, a pid or an IP address, or runs
past a short line (a client's bad value quoted back in full would overflow the trailers). Afterwards
no generation is left running, health says SERVING and a normal Generate succeeds.

Profiles: the quick one (the normal test command) tries `QUICK_EXAMPLES` examples per RPC,
derandomized, in well under a minute. The long one runs when TANDEM_FUZZ_EXAMPLES is set, with
that many examples per RPC and fresh randomness each run, e.g.

    TANDEM_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/integration/test_edge_fuzz.py \
        --hypothesis-show-statistics

(5000 examples per RPC took about 4 minutes on 2 cores).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_node.config import EdgeConfig
from edge_node.core import MAX_MESSAGES, MAX_PROMPT_CHARS, ROLES
from edge_node.drafter import DrafterModel
from edge_node.servicer import EdgeServer, create_node
from protos.tandem.v1 import common_pb2, edge_pb2
from tests.support.wire import varint

QUICK_EXAMPLES = 150
LONG = os.environ.get("TANDEM_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(LONG) if LONG else QUICK_EXAMPLES, deadline=None, derandomize=not LONG,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.large_base_example])
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNAUTHENTICATED}
# What must never reach a client: tracebacks, file paths, pids, IP addresses.
LEAK = re.compile(r"Traceback|File \"|\.py\b|/(?:tmp|home|usr|work)/|\bpid\b|\d+\.\d+\.\d+\.\d+|ipv[46]:", re.I)
MAX_DETAILS = 300  # a status message stays one short line, whatever the request held
METHOD = "/tandem.v1.EdgeNode/"
U32, U64 = 2**32 - 1, 2**64 - 1


@pytest.fixture(scope="module")
def node(tiny_models) -> Iterator[tuple[EdgeServer, grpc.Channel]]:
    node = create_node(DrafterModel(tiny_models.target_onnx), EdgeConfig(cloud_address=None), "127.0.0.1:0")
    node.server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}", options=[("grpc.max_send_message_length", 16 << 20)])
    yield node, channel
    channel.close()
    node.server.stop(None)


# --- strategies ----------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # protobuf strings: no surrogates


def _huge_text(limit: int) -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "🙂", " ", "\x00"]),
                     st.sampled_from([limit - 1, limit, limit + 1, 1_300_000]))  # 4-byte chars: over 4 MiB


def _field(sane: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a sane value, so that requests get past validation and generate; else anything."""
    return st.integers(0, 7).flatmap(lambda i: wild if i == 7 else sane)


def _numbers(top: int, sane_max: int) -> st.SearchStrategy[int]:
    return _field(st.integers(0, sane_max), st.sampled_from([0, 1, 511, 512, 4096, 4097, top]) | st.integers(0, top))


FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
SAMPLING = st.builds(
    lambda t, k, p, s: common_pb2.SamplingParams(temperature=t, top_k=k, **({"top_p": p} if p is not None else {}),
                                                 **({"seed": s} if s is not None else {})),
    _field(st.just(0.0) | st.floats(0, 2, width=32), FLOATS), _numbers(U32, 50),
    _field(st.none() | st.floats(0.125, 1, width=32), FLOATS), _field(st.none() | st.integers(0, 99), _numbers(U64, 0)))
ROLES_OR_TEXT = st.sampled_from(ROLES) | TEXT
ROLE = _field(st.sampled_from(ROLES), TEXT | _huge_text(5000))  # a bad value quoted back must stay short
MESSAGE = st.builds(common_pb2.ChatMessage, role=ROLE, content=TEXT | _huge_text(MAX_PROMPT_CHARS))
MESSAGES = st.one_of(st.lists(MESSAGE, min_size=1, max_size=4),
                     st.builds(lambda m, n: [m] * n, st.builds(common_pb2.ChatMessage, role=ROLES_OR_TEXT, content=TEXT),
                               st.sampled_from([MAX_MESSAGES, MAX_MESSAGES + 1])))
TOKENS = st.one_of(st.lists(st.integers(0, 511), min_size=1, max_size=8), st.lists(st.integers(-(2**31), 2**31 - 1)),
                   st.builds(lambda t, n: [t] * n, st.integers(0, 511), st.sampled_from([1, 511, 512, 200_000])))
PROMPT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40) | _huge_text(MAX_PROMPT_CHARS)
MODE = _field(st.sampled_from([edge_pb2.EDGE_MODE_UNSPECIFIED, edge_pb2.EDGE_MODE_LOCAL]),
              st.integers(-(2**31), 2**31 - 1) | st.sampled_from([edge_pb2.EDGE_MODE_SPECULATIVE, edge_pb2.EDGE_MODE_CLOUD]))


@st.composite
def generate_requests(draw: st.DrawFn) -> edge_pb2.EdgeGenerateRequest:
    """Mostly one prompt form (else none or several), every other field mostly sane, else anything."""
    form = draw(_field(st.sampled_from(["prompt", "messages", "prompt_tokens"]), st.just("any")))
    forms = draw(st.sets(st.sampled_from(["prompt", "messages", "prompt_tokens"]))) if form == "any" else {form}
    r = edge_pb2.EdgeGenerateRequest(
        sampling=draw(SAMPLING), max_new_tokens=draw(_field(st.integers(1, 12), _numbers(U32, 0))), mode=draw(MODE),
        draft_len=draw(_numbers(U32, 16)), round_deadline_ms=draw(_numbers(U32, 5000)),
        open_deadline_ms=draw(_numbers(U32, 5000)), fallback_local=draw(st.booleans()))
    if "prompt" in forms:
        r.prompt = draw(PROMPT)
    if "messages" in forms:
        r.messages.extend(draw(MESSAGES))
    if "prompt_tokens" in forms:
        r.prompt_tokens.extend(draw(TOKENS))
    return r




@st.composite
def mutated(draw: st.DrawFn, message: st.SearchStrategy) -> bytes:
    """A message's bytes, often changed: unknown fields, invalid UTF-8, truncation, garbage."""
    data = draw(message).SerializeToString()
    how = draw(st.sampled_from(["none", "none", "unknown", "utf8", "truncate", "garbage", "flip"]))
    if how == "unknown":  # a field number this schema does not define, any wire type
        field = draw(st.integers(20, 2**29 - 1))
        kind = draw(st.sampled_from([(0, varint(draw(st.integers(0, U64))))
                                     , (2, varint(3) + b"abc"), (5, b"\x01\x02\x03\x04"), (1, bytes(8))]))
        data += varint(field << 3 | kind[0]) + kind[1]
    elif how == "utf8":  # a string field (prompt, or a message's role) holding bytes that are not UTF-8
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80"]))
        data += draw(st.sampled_from([b"\x0a" + varint(len(bad)) + bad,
                                      b"\x12" + varint(len(bad) + 2) + b"\x0a" + varint(len(bad)) + bad]))
    elif how == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "garbage":
        data = draw(st.binary(max_size=64))
    elif how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    return data


# --- the property --------------------------------------------------------------------------------

def _check(code: grpc.StatusCode, details: str | None, *, cancelled: bool = False) -> None:
    allowed = DOCUMENTED | ({grpc.StatusCode.CANCELLED} if cancelled else set())
    assert code in allowed, f"{code.name}: {details}"
    assert not LEAK.search(details or ""), f"leaky status message: {details!r}"
    assert len(details or "") <= MAX_DETAILS, f"status message of {len(details or '')} characters"


def _generate(channel: grpc.Channel, data: bytes, cancel_after: int | None) -> None:
    call = channel.unary_stream(METHOD + "Generate", request_serializer=None,
                                response_deserializer=edge_pb2.EdgeGenerateResponse.FromString)(data, timeout=60)
    kinds: list[str] = []
    try:
        if cancel_after == 0:
            call.cancel()
        for msg in call:
            kinds.append(msg.WhichOneof("kind"))
            if cancel_after is not None and len(kinds) >= cancel_after:
                call.cancel()
                break
    except grpc.RpcError:
        pass
    _check(call.code(), call.details(), cancelled=cancel_after is not None)
    if call.code() == grpc.StatusCode.OK:
        assert kinds and kinds[-1] == "stats" and kinds.count("stats") == 1


def _unary(channel: grpc.Channel, name: str, data: bytes, response: type) -> None:
    call = channel.unary_unary(METHOD + name, request_serializer=None, response_deserializer=response.FromString)
    try:
        call(data, timeout=60)
    except grpc.RpcError as err:
        _check(err.code(), err.details())


@FUZZ
@given(data=mutated(generate_requests()), cancel_after=st.none() | st.none() | st.integers(0, 3))
def test_generate_answers_only_documented_statuses(node, data: bytes, cancel_after: int | None) -> None:
    _generate(node[1], data, cancel_after)


@FUZZ
@given(data=mutated(generate_requests()))
def test_count_tokens_answers_only_documented_statuses(node, data: bytes) -> None:
    _unary(node[1], "CountTokens", data, edge_pb2.TokenCount)


@FUZZ
@given(data=mutated(st.just(edge_pb2.EdgeInfoRequest())))
def test_info_answers_only_documented_statuses(node, data: bytes) -> None:
    _unary(node[1], "Info", data, edge_pb2.EdgeInfo)


def test_health_undecodable_is_invalid_argument(node) -> None:
    """The guard covers every service on the server, health's included."""
    call = node[1].unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x0a\x01\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_after_the_fuzz_the_node_is_whole(node) -> None:
    """Runs after the fuzz tests (file order): no generation left, SERVING, a normal answer."""
    server, channel = node
    deadline = time.monotonic() + 10
    while server.core.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.core.running == 0
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.EdgeNode"),
                                                      timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    request = edge_pb2.EdgeGenerateRequest(prompt="def add(a, b):", max_new_tokens=8, mode=edge_pb2.EDGE_MODE_LOCAL)
    call = channel.unary_stream(METHOD + "Generate", request_serializer=edge_pb2.EdgeGenerateRequest.SerializeToString,
                                response_deserializer=edge_pb2.EdgeGenerateResponse.FromString)
    messages = list(call(request, timeout=30))
    assert messages[-1].stats.generated_tokens >= 1
