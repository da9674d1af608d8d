"""A refusal for load says when to come back: HTTP 429 with `Retry-After`, gRPC
RESOURCE_EXHAUSTED with the `grpc-retry-pushback-ms` trailer, and the SDK's
`ResourceExhausted.retry_after_s`.

The orchestrator is the real one over the fake edge (`tests.support.orch_stack.FakeEdge`), whose
answers take 3 s here; with `max_concurrent` = 2 answers running, a third request is refused.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

import tandem_sdk
from orchestrator.errors import BUSY_RETRY_S
from protos.tandem.v1 import orchestrator_pb2 as opb
from protos.tandem.v1 import orchestrator_pb2_grpc
from tests.support.orch_stack import FakeStack, fake_edge_stack

REQUEST = opb.GenerateTextRequest(prompt="hello", options=opb.GenerateOptions(route=opb.ROUTE_LOCAL,
                                                                                max_new_tokens=32))


@pytest.fixture(scope="module")
def stack() -> Iterator[FakeStack]:
    with fake_edge_stack(link=False, deltas=30, delay_s=0.1, max_concurrent=2) as s:
        yield s


@pytest.fixture()
def full(stack: FakeStack) -> Iterator[None]:
    """Both answer slots taken (each answer's first message read) for the test's duration."""
    channel = grpc.insecure_channel(stack.orchestrator.grpc_address)
    stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
    calls = [stub.Generate(REQUEST, timeout=30) for _ in range(2)]
    for call in calls:
        next(call)
    try:
        yield
    finally:
        for call in calls:
            call.cancel()
        channel.close()


def test_http_429_carries_retry_after(stack: FakeStack, full: None) -> None:
    body = json.dumps({"model": "tandem", "prompt": "hi", "max_tokens": 4, "tandem": {"route": "local"}}).encode()
    request = urllib.request.Request(f"http://{stack.orchestrator.http_address}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 429
    assert info.value.headers["Retry-After"] == str(int(BUSY_RETRY_S))
    assert json.loads(info.value.read())["error"]["code"] == "rate_limit_exceeded"


def test_grpc_refusal_carries_the_pushback_trailer(stack: FakeStack, full: None) -> None:
    with grpc.insecure_channel(stack.orchestrator.grpc_address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Generate(REQUEST, timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == str(int(BUSY_RETRY_S * 1000))


def test_sdk_reads_the_hint(stack: FakeStack, full: None) -> None:
    with tandem_sdk.Client(stack.orchestrator.grpc_address, retries=0) as client, \
            pytest.raises(tandem_sdk.ResourceExhausted) as info:
        client.complete("hello", max_new_tokens=8, route="local")
    assert info.value.retry_after_s == BUSY_RETRY_S


def test_other_errors_carry_no_hint_and_answers_run_again(stack: FakeStack) -> None:
    with tandem_sdk.Client(stack.orchestrator.grpc_address, retries=0) as client:
        with pytest.raises(tandem_sdk.InvalidArgument) as info:
            client.complete("hello", max_new_tokens=10**6)
        assert not hasattr(info.value, "retry_after_s")
        assert client.complete("hello", max_new_tokens=4, route="local").text  # the slots are free again
