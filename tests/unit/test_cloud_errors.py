"""The cloud's error hygiene and bounds without a model: the status map, the proxy's scrubbing of
Serve's own statuses, parsing bytes, and the checks of `cloud_node.validation`."""

from __future__ import annotations

import math
import re

import grpc
import numpy as np
import pytest

from cloud_node.errors import BadRequest, Draining, ResourceExhausted, SessionGone, echo
from cloud_node.protocol import MAX_MESSAGE_BYTES, parse
from cloud_node.serve_proxy import scrub
from cloud_node.status import INTERNAL_MESSAGE, status_for
from cloud_node.validation import MAX_ID_CHARS, MAX_MESSAGES, Checker, DraftRound, SessionSpec
from protos.tandem.v1 import cloud_pb2
from tandem_core.sampling import SamplingParams

ID = re.compile(r" \(request id ([0-9a-f]{16})\)$")
CHECK = Checker(vocab=100, max_context=32, max_draft_len=4, max_new_tokens=16, eos_ids=frozenset({2}),
                model_name="tiny")


@pytest.mark.parametrize(("exc", "code"), [
    (BadRequest("prompt_tokens: bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining("draining: bye"), grpc.StatusCode.UNAVAILABLE),
    (SessionGone("gone"), grpc.StatusCode.CANCELLED),
])
def test_client_errors_keep_their_message_and_carry_a_request_id(exc: Exception, code: grpc.StatusCode) -> None:
    status = status_for(exc, "0123456789abcdef")
    assert status.code == code and status.details == f"{exc} (request id 0123456789abcdef)"


def test_a_server_fault_is_internal_with_a_generic_message_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    exc = KeyError("/srv/app/cloud.py pid=77 10.0.0.3")
    status = status_for(exc, "feedfacefeedface")
    assert status.code == grpc.StatusCode.INTERNAL
    assert status.details == f"{INTERNAL_MESSAGE} (request id feedfacefeedface)"
    assert any("feedfacefeedface" in r.getMessage() and r.exc_info for r in caplog.records)


class FakeContext:
    def __init__(self, code: object, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> object:
        return self._code

    def details(self) -> str:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details


DEAD_REPLICA = ("ray::ServeReplica:tandem-cloud:CloudVerifier.handle_request() (pid=4242, ip=10.1.2.3, "
                "actor_id=c70bbb7c30b152f4efe0a48301000000)\nThe actor died unexpectedly before finishing this task.")


def test_the_proxy_turns_a_dead_replica_into_unavailable_without_its_details() -> None:
    context = FakeContext(grpc.StatusCode.INTERNAL.value[0], DEAD_REPLICA)
    scrub(context)
    assert context.code() == grpc.StatusCode.UNAVAILABLE
    assert ID.search(context.details()) and "4242" not in context.details() and "10.1.2.3" not in context.details()


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN])
def test_the_proxy_rewrites_every_status_serve_wrote(code: grpc.StatusCode) -> None:
    context = FakeContext(code, "Traceback (most recent call last):\n  File \"/x.py\", line 1 ... pid=9")
    scrub(context)
    assert context.code() == code and ID.search(context.details()) and "Traceback" not in context.details()


def test_the_proxy_keeps_statuses_our_replica_wrote_and_ok() -> None:
    ours = FakeContext(grpc.StatusCode.INVALID_ARGUMENT, "draft_tokens: bad (request id 0123456789abcdef)")
    scrub(ours)
    assert ours.details() == "draft_tokens: bad (request id 0123456789abcdef)"
    ok = FakeContext(grpc.StatusCode.OK, "")
    scrub(ok)
    assert ok.code() == grpc.StatusCode.OK and ok.details() == ""


def test_parse_refuses_every_bad_input_as_a_client_error() -> None:
    with pytest.raises(BadRequest, match="not a valid"):
        parse(b"\x0a\x05ab", cloud_pb2.VerifyRequest)
    with pytest.raises(BadRequest, match="not a valid"):
        parse(b"\x0a\x05\x0a\x03\xff\xfe\xfd", cloud_pb2.VerifyRequest)  # invalid UTF-8 in session_id
    with pytest.raises(BadRequest, match="expected a serialized"):
        parse(object(), cloud_pb2.VerifyRequest)
    with pytest.raises(ResourceExhausted):
        parse(b"\x00" * (MAX_MESSAGE_BYTES + 1), cloud_pb2.VerifyRequest)
    assert parse(b"", cloud_pb2.VerifyRequest).WhichOneof("kind") is None
    unknown = cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(round=3)).SerializeToString() + b"\xf8\x07\x01"
    assert parse(unknown, cloud_pb2.VerifyRequest).round.round == 3


def test_echo_quotes_only_short_plain_names() -> None:
    assert echo("gpt-9") == "'gpt-9'"
    assert echo("Traceback /x.py") == "<15 characters>" and echo("a" * 41) == "<41 characters>"


@pytest.mark.parametrize(("spec", "field"), [
    (SessionSpec(session_id="x" * (MAX_ID_CHARS + 1), prompt_tokens=(5,), max_new_tokens=4), "session_id"),
    (SessionSpec(session_id="a b", prompt_tokens=(5,), max_new_tokens=4), "session_id"),
    (SessionSpec(session_id="a\n", prompt_tokens=(5,), max_new_tokens=4), "session_id"),
    (SessionSpec(model="m" * 200, prompt_tokens=(5,), max_new_tokens=4), "model"),
    (SessionSpec(messages=(("user", "hi"),) * (MAX_MESSAGES + 1), max_new_tokens=4), "messages"),
    (SessionSpec(messages=(("user", "x" * 64 * 32 + "x"),), max_new_tokens=4), "messages"),
    (SessionSpec(messages=(("r" * (MAX_ID_CHARS + 1), "hi"),), max_new_tokens=4), "messages"),
    (SessionSpec(prompt_tokens=(5,) * 32, max_new_tokens=4), "max_context"),
    (SessionSpec(prompt_tokens=(5,), max_new_tokens=4, temperature=math.inf), "temperature"),
    (SessionSpec(prompt_tokens=(5,), max_new_tokens=4, temperature=1.0, top_p=math.nan), "top_p"),
    (SessionSpec(prompt_tokens=(5,), max_new_tokens=4, seed=2**63), "seed"),
    (SessionSpec(prompt_tokens=(5,), max_new_tokens=2**32 - 1), "max_new_tokens"),
    (SessionSpec(prompt_tokens=(5,), max_new_tokens=4, generated_tokens=(5,) * 10**6), "generated_tokens"),
])
def test_every_bound_of_a_spec_is_a_bad_request_naming_its_field(spec: SessionSpec, field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        CHECK.spec(spec)


def test_a_round_drops_drafts_past_max_draft_len_and_the_context_and_refuses_past_the_protocol() -> None:
    greedy = SamplingParams()
    tokens, q = CHECK.round(DraftRound(0, (5, 6, 7, 8, 9, 10)), greedy, position=10)
    assert tokens == [5, 6, 7, 8] and q is None  # max_draft_len 4
    tokens, _ = CHECK.round(DraftRound(0, (5, 6, 7)), greedy, position=30)
    assert tokens == [5]  # max_context 32: room for one draft and the target's token
    with pytest.raises(BadRequest, match="max_draft_len"):
        CHECK.round(DraftRound(0, (5,) * 17), greedy, position=1)
    sampled = SamplingParams(temperature=1.0)
    rows = (((5, 6), (0.5, 0.5)), ((6,), (1.0,)), ((7, 8), (0.25, 0.75)))
    tokens, q = CHECK.round(DraftRound(0, (5, 6, 7), rows), sampled, position=29)
    assert tokens == [5, 6] and q is not None and q.shape == (2, 100) and np.allclose(q.sum(axis=1), 1)
    for bad in ((((5,), (math.inf,)),), (((5, 5), (0.5, 0.5)),), (((5,), ()),), (((6,), (1.0,)),),
                (((5, 1000), (0.5, 0.5)),)):
        with pytest.raises(BadRequest, match=r"q_rows\[0\]"):
            CHECK.round(DraftRound(0, (5,), bad), sampled, position=1)
