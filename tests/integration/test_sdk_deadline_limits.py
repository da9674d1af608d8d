"""The SDK's largest timeouts work against a real gRPC server, and what lies beyond them does not.

gRPC turns a timeout into an absolute deadline in nanoseconds; one far enough in the future does
not fit and the call fails at once with DEADLINE_EXCEEDED. The control below shows that failure
with the raw stub, so the SDK's refusal of such values (see `_calls.check_timeout`) guards a real
limit. The server is a minimal fake orchestrator on port 0, in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import tandem_sdk
from protos.tandem.v1 import orchestrator_pb2 as pb
from protos.tandem.v1 import orchestrator_pb2_grpc as pb_grpc
from tandem_sdk import _calls

WIRE_MAX_DEADLINE_S = (2**32 - 1) / 1000  # GenerateOptions.deadline_ms is a uint32


class TinyOrchestrator(pb_grpc.OrchestratorServicer):
    def Generate(self, request, context):
        yield pb.GenerateTextResponse(started=pb.GenerationStarted(route="local"))
        yield pb.GenerateTextResponse(delta=pb.TextDelta(text="ok"))

    def Status(self, request, context):
        return pb.StatusResponse(link=pb.LinkStatus(state="up"))


@pytest.fixture()
def address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_OrchestratorServicer_to_server(TinyOrchestrator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_control_a_timeout_past_what_grpc_can_carry_fails_at_once(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        assert stub.Status(pb.StatusRequest(), timeout=_calls.MAX_TIMEOUT_S).link.state == "up"
        for timeout in (1e12, float("inf")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Status(pb.StatusRequest(), timeout=timeout)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_largest_timeouts_reach_a_real_server(address: str) -> None:
    with tandem_sdk.Client(address, timeout_s=_calls.MAX_TIMEOUT_S, generate_timeout_s=_calls.MAX_TIMEOUT_S) as client:
        assert client.status().link.state == "up"
        assert client.complete(prompt="hi").text == "ok"
        assert client.complete(prompt="hi", deadline_s=WIRE_MAX_DEADLINE_S).text == "ok"


def test_the_largest_timeouts_reach_a_real_server_from_asyncio(address: str) -> None:
    async def run() -> tuple[str, str]:
        async with tandem_sdk.AsyncClient(address, timeout_s=_calls.MAX_TIMEOUT_S,
                                          generate_timeout_s=_calls.MAX_TIMEOUT_S) as client:
            state = (await client.status()).link.state
            text = (await client.complete(prompt="hi", deadline_s=WIRE_MAX_DEADLINE_S)).text
        return state, text

    assert asyncio.run(run()) == ("up", "ok")


def test_an_infinite_timeout_is_refused_before_any_call(address: str) -> None:
    with pytest.raises(ValueError, match="^timeout_s: "):
        tandem_sdk.Client(address, timeout_s=float("inf"))
    with pytest.raises(ValueError, match="^generate_timeout_s: "):
        tandem_sdk.Client(address, generate_timeout_s=float("inf"))
