"""Property-based fuzzing of the cloud verifier's gRPC surface (hypothesis), and its error hygiene.

Requests are generated from the cloud.proto schema and sent as raw bytes on a plain grpcio
server (tiny fp32 target, a small context): extreme integers, NaN and infinities in every float
(temperature, top_p, q probabilities), empty and huge repeated fields, appended unknown fields,
invalid UTF-8 in strings, truncated and garbage bytes, every message order (round before open,
open twice, rounds after the final verdict) and streams cancelled halfway or during the open.

Property: every reply is OK or a documented status (INVALID_ARGUMENT, OUT_OF_RANGE,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNAUTHENTICATED; CANCELLED only where the test
cancelled), never INTERNAL or UNKNOWN; every error's details carry a request id and no
traceback, path, pid, address or long hex id. Afterwards health is SERVING, no session is left
and a normal session returns the target's tokens.

Profiles: the quick one runs with the normal test command (QUICK_EXAMPLES per API, derandomized
so CI is reproducible). For a release check set TANDEM_FUZZ_EXAMPLES, e.g.
`TANDEM_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/integration/test_cloud_fuzz.py`:
that many examples per API, randomized (hypothesis prints a reproducer on failure). The
strategies are shared with the smaller run through Ray Serve's proxy in test_cloud_ray.py.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_node.servicer import SERVICE_NAME, create_server
from cloud_node.verifier import Limits, VerifierCore
from protos.tandem.v1 import cloud_pb2, common_pb2
from tests.support.wire import varint

QUICK_EXAMPLES = 200
LONG = os.environ.get("TANDEM_FUZZ_EXAMPLES")
EXAMPLES = int(LONG) if LONG else QUICK_EXAMPLES
VOCAB = 512
LIMITS = Limits(max_sessions=4, max_context=64, max_draft_len=6, max_new_tokens=16)
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNAUTHENTICATED}
LEAK = re.compile(r"Traceback|File \"|\.py\b|\bpid\b|/work|/tmp|/home|\b\d{1,3}(\.\d{1,3}){3}\b|[0-9a-f]{24}|"
                  r"Exception|Error\(|actor", re.IGNORECASE)
VERIFY, GENERATE = f"/{SERVICE_NAME}/Verify", f"/{SERVICE_NAME}/Generate"

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=LONG is None, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


# --- strategies from the schema ------------------------------------------------------------

INT32 = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), st.integers(-2**31, 2**31 - 1),
                  st.sampled_from([-1, VOCAB, VOCAB + 1, 2**31 - 1, -2**31]))
UINT32 = st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
FLOAT32 = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-45, 3.4e38, float("nan"), float("inf"), -float("inf")]))
TEXT = st.one_of(st.text(max_size=20), st.text(max_size=300), st.sampled_from(["", "tiny", "t", " ", "\n", "a" * 129]))


def ids(max_small: int = 40) -> st.SearchStrategy[list[int]]:
    """Token ids: short lists, or a long run of one id (up to ~1.5 MB on the wire)."""
    return st.one_of(st.lists(INT32, max_size=max_small),
                     st.builds(lambda n, t: [t] * n, st.integers(0, 300_000), INT32))


def sampling() -> st.SearchStrategy[common_pb2.SamplingParams]:
    def build(t: float, k: int, p: float | None, seed: int | None) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(temperature=t, top_k=k)
        if p is not None:
            msg.top_p = p
        if seed is not None:
            msg.seed = seed
        return msg

    temperature = st.one_of(st.just(0.0), st.just(0.0), st.just(0.9), FLOAT32)
    top_k = st.one_of(st.just(0), st.integers(0, 600), UINT32)
    top_p = st.one_of(st.none(), st.just(0.95), FLOAT32)
    return st.builds(build, temperature, top_k, top_p, st.none() | st.integers(0, 2**64 - 1))




def mostly(common: list, rare: st.SearchStrategy, every: int = 5) -> st.SearchStrategy:  # type: ignore[type-arg]
    """One of `common` (as sampled_from), and `rare` one time in `every`."""
    return st.sampled_from(range(every)).flatmap(lambda n: rare if n == 0 else st.sampled_from(common))


SESSION_IDS = mostly(["", "s", "edge-1", "x" * 128], TEXT)


def specs() -> st.SearchStrategy[cloud_pb2.SessionSpec]:
    messages = st.lists(st.builds(common_pb2.ChatMessage, role=TEXT, content=TEXT), max_size=4)
    prompt = st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30),
                       st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30), ids(), st.just([]))
    return st.builds(cloud_pb2.SessionSpec, session_id=SESSION_IDS, model=mostly(["", "tiny"], TEXT),
                     prompt_tokens=prompt, messages=st.one_of(st.just([]), messages), sampling=sampling(),
                     max_new_tokens=st.one_of(st.integers(1, 16), st.integers(1, 16), UINT32),
                     generated_tokens=st.one_of(st.just([]), st.just([]), ids(10)))


@st.composite
def rounds(draw: st.DrawFn) -> cloud_pb2.DraftRound:
    """A round: mostly drafts in the vocabulary, q rows valid for them, or any rows at all."""
    drafts = draw(st.one_of(st.lists(st.integers(0, VOCAB - 1), max_size=8), ids(20)))
    msg = cloud_pb2.DraftRound(round=draw(UINT32), draft_tokens=drafts)
    if draw(st.booleans()) and len(drafts) <= 16:
        for token in drafts:
            other = (token + 1) % VOCAB if 0 <= token < VOCAB else 0
            mass = draw(st.one_of(st.floats(0.0625, 1.0, width=32), FLOAT32))
            msg.q_rows.append(common_pb2.SparseDist(ids=[token, other], probs=[mass, 1.0 - mass]))
    else:
        row = st.builds(common_pb2.SparseDist, ids=ids(8), probs=st.lists(FLOAT32, max_size=8))
        msg.q_rows.extend(draw(st.lists(row, max_size=8)))
    return msg




def _field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def unknown_fields() -> st.SearchStrategy[bytes]:
    number = st.builds(lambda f, v: varint(f << 3) + varint(v), st.integers(16, 2**29 - 1), st.integers(0, 2**64 - 1))
    fixed = st.builds(lambda f, v: varint(f << 3 | 1) + struct.pack("<d", v), st.integers(16, 1000), st.floats())
    blob = st.builds(_field, st.integers(16, 2**29 - 1), st.binary(max_size=64))
    return st.lists(st.one_of(number, fixed, blob), min_size=1, max_size=3).map(b"".join)


def bad_utf8_open() -> st.SearchStrategy[bytes]:
    """An open whose session_id, model or a message's role holds invalid UTF-8."""
    junk = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf0\x28\x8c\x28", b"\x80" * 5])
    where = st.sampled_from(["session_id", "model", "role"])

    def build(raw: bytes, field: str) -> bytes:
        spec = {"session_id": _field(1, raw), "model": _field(2, raw), "role": _field(4, _field(1, raw))}[field]
        return _field(1, spec + _field(3, b"\x05\x06"))  # VerifyRequest.open = SessionSpec

    return st.builds(build, junk, where)


def mutate(message: bytes) -> st.SearchStrategy[bytes]:
    """Mostly the message as is; else truncated, with unknown fields appended, or garbage."""
    cut = st.integers(0, max(len(message) - 1, 0)).map(lambda n: message[:n])
    broken = st.one_of(cut, unknown_fields().map(lambda u: message + u), st.binary(max_size=64))
    return st.sampled_from(range(12)).flatmap(lambda n: st.just(message) if n < 9 else broken)


@st.composite
def verify_streams(draw: st.DrawFn) -> tuple[list[bytes], int | None]:
    """A Verify stream's request bytes (any order of open, rounds, empty, junk), and after how
    many replies the client cancels (None: it half-closes and reads to the end; 0: during the open)."""
    first = cloud_pb2.VerifyRequest(open=draw(specs())).SerializeToString()
    start = draw(st.sampled_from(["open"] * 8 + ["bad_utf8", "none"]))
    messages = {"open": [draw(mutate(first))], "bad_utf8": [draw(bad_utf8_open())], "none": []}[start]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["round"] * 6 + ["open", "empty"]))
        msg = (cloud_pb2.VerifyRequest(round=draw(rounds())) if kind == "round"
               else cloud_pb2.VerifyRequest(open=draw(specs())) if kind == "open" else cloud_pb2.VerifyRequest())
        messages.append(draw(mutate(msg.SerializeToString())))
    return messages, draw(st.none() | st.integers(0, 2))


@st.composite
def generate_calls(draw: st.DrawFn) -> tuple[bytes, int | None]:
    start = draw(st.sampled_from(["spec"] * 8 + ["bad_utf8", "none"]))
    msg = cloud_pb2.GenerateRequest(session=draw(specs())) if start == "spec" else cloud_pb2.GenerateRequest()
    raw = draw(bad_utf8_open()) if start == "bad_utf8" else draw(mutate(msg.SerializeToString()))
    return raw, draw(st.none() | st.integers(0, 2))


# --- the property ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    code: grpc.StatusCode
    details: str
    cancelled_by_us: bool


def check_reply(reply: Reply) -> None:
    """The property: a documented status, a request id on errors, nothing leaked."""
    if reply.code == grpc.StatusCode.CANCELLED and reply.cancelled_by_us:
        return
    assert reply.code in DOCUMENTED, (reply.code, reply.details)
    if reply.code != grpc.StatusCode.OK:
        assert not LEAK.search(reply.details), reply.details
        if reply.code != grpc.StatusCode.RESOURCE_EXHAUSTED or "request id" in reply.details:
            assert re.search(r"\(request id [0-9a-f]{16}\)$", reply.details), reply.details


def _drain(call: Iterator[bytes], cancel_after: int | None) -> Reply:
    received = 0
    try:
        if cancel_after == 0:
            time.sleep(0.001)
            call.cancel()  # type: ignore[attr-defined]
        for _ in call:
            received += 1
            if cancel_after is not None and received >= cancel_after:
                call.cancel()  # type: ignore[attr-defined]
        return Reply(grpc.StatusCode.OK, "", False)
    except grpc.RpcError as exc:
        return Reply(exc.code(), exc.details() or "", cancel_after is not None)  # type: ignore[attr-defined]


def send_verify(channel: grpc.Channel, messages: list[bytes], cancel_after: int | None,
                timeout_s: float = 60) -> Reply:
    call = channel.stream_stream(VERIFY, request_serializer=None, response_deserializer=None)(
        iter(messages), timeout=timeout_s)
    return _drain(call, cancel_after)


def send_generate(channel: grpc.Channel, raw: bytes, cancel_after: int | None, timeout_s: float = 60) -> Reply:
    call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)(raw, timeout=timeout_s)
    return _drain(call, cancel_after)


def assert_still_serving(channel: grpc.Channel) -> None:
    """Health SERVING, and a normal greedy session answers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    spec = cloud_pb2.SessionSpec(session_id="after", prompt_tokens=[5, 17, 99], max_new_tokens=5)
    requests = [cloud_pb2.VerifyRequest(open=spec), cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(draft_tokens=[5]))]
    replies = list(channel.stream_stream(VERIFY, request_serializer=cloud_pb2.VerifyRequest.SerializeToString,
                                         response_deserializer=cloud_pb2.VerifyResponse.FromString)(
        iter(requests), timeout=30))
    assert replies[0].WhichOneof("kind") == "opened" and len(replies[1].verdict.tokens) >= 1


# --- the in-process server -------------------------------------------------------------------

@pytest.fixture(scope="module")
def core(tiny_models) -> VerifierCore:
    return VerifierCore.load(tiny_models.target_hf, dtype="fp32", limits=LIMITS, model_name="tiny")


@pytest.fixture(scope="module")
def channel(core: VerifierCore) -> Iterator[grpc.Channel]:
    server, port = create_server(core, "127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(None)


def _no_sessions_left(core: VerifierCore, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(core.store) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(core.store) == 0 and core.store.live_bytes() == 0


def test_fuzz_verify_streams(channel: grpc.Channel, core: VerifierCore) -> None:
    tried = []

    @FUZZ
    @given(verify_streams())
    def prop(stream: tuple[list[bytes], int | None]) -> None:
        tried.append(1)
        check_reply(send_verify(channel, *stream))

    prop()
    _no_sessions_left(core)
    assert_still_serving(channel)
    print(f"fuzz: Verify, {len(tried)} examples")


def test_fuzz_generate_calls(channel: grpc.Channel, core: VerifierCore) -> None:
    tried = []

    @FUZZ
    @given(generate_calls())
    def prop(call: tuple[bytes, int | None]) -> None:
        tried.append(1)
        check_reply(send_generate(channel, *call))

    prop()
    _no_sessions_left(core)
    assert_still_serving(channel)
    print(f"fuzz: Generate, {len(tried)} examples")


# --- error hygiene, example by example ----------------------------------------------------------

def test_undecodable_bytes_are_invalid_argument_on_both_methods(channel: grpc.Channel) -> None:
    for raw in (b"\xff\xff\xff", b"\x0a\x05ab", bad_utf8_example()):
        for reply in (send_verify(channel, [raw], None), send_generate(channel, raw, None)):
            assert reply.code == grpc.StatusCode.INVALID_ARGUMENT, reply
            assert "not a valid" in reply.details
            check_reply(reply)


def bad_utf8_example() -> bytes:
    return _field(1, _field(1, b"\xff\xfe") + _field(3, b"\x05"))


def test_an_unexpected_error_is_internal_with_a_request_id_and_the_details_only_in_the_log(
        channel: grpc.Channel, core: VerifierCore, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("secret at /srv/cloud/verifier.py pid=4242 10.1.2.3")

    monkeypatch.setattr(core, "verify", boom)
    spec = cloud_pb2.SessionSpec(session_id="boom", prompt_tokens=[5, 6], max_new_tokens=4)
    messages = [cloud_pb2.VerifyRequest(open=spec).SerializeToString(),
                cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(draft_tokens=[5])).SerializeToString()]
    with caplog.at_level(logging.ERROR, logger="cloud_node"):
        reply = send_verify(channel, messages, None)
    assert reply.code == grpc.StatusCode.INTERNAL
    assert "secret" not in reply.details and not LEAK.search(reply.details)
    request_id = re.search(r"request id ([0-9a-f]{16})", reply.details).group(1)  # type: ignore[union-attr]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "secret" in str(logged[0].exc_info[1])
    _no_sessions_left(core)


def test_opened_names_the_replica_without_process_details(channel: grpc.Channel) -> None:
    spec = cloud_pb2.SessionSpec(prompt_tokens=[5], max_new_tokens=2)
    call = channel.stream_stream(VERIFY, request_serializer=cloud_pb2.VerifyRequest.SerializeToString,
                                 response_deserializer=cloud_pb2.VerifyResponse.FromString)(
        iter([cloud_pb2.VerifyRequest(open=spec)]), timeout=30)
    opened = next(call).opened
    call.cancel()
    assert opened.replica and not LEAK.search(opened.replica) and str(os.getpid()) not in opened.replica
