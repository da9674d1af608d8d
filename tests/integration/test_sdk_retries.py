"""gRPC really retries the SDK's calls: only UNAVAILABLE, only before a stream's first message.

A flaky orchestrator on a real gRPC server (127.0.0.1, port 0) answers a scripted status code to
the first N attempts of a method and counts every attempt server-side, so the counts prove what
the client's channel did. Each case runs with the sync `Client` and with the `AsyncClient`. The
control case shows that a channel without the SDK's service config makes one attempt only, so
the retries come from the declared `retryPolicy` and not from anywhere else.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

import tandem_sdk
from protos.tandem.v1 import orchestrator_pb2 as pb
from protos.tandem.v1 import orchestrator_pb2_grpc as pb_grpc

KINDS = ("sync", "async")
FAST = {"timeout_s": 5.0, "backoff_s": 0.01, "max_backoff_s": 0.02}  # waits of a few ms


class FlakyOrchestrator(pb_grpc.OrchestratorServicer):
    """Answers `fail[method] = (code, n)` to the first n attempts of `method`, then serves."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.fail: dict[str, tuple[grpc.StatusCode, int]] = {}

    def _gate(self, method: str, context: grpc.ServicerContext) -> None:
        self.attempts[method] += 1
        code, n = self.fail.get(method, (grpc.StatusCode.OK, 0))
        if self.attempts[method] <= n:
            context.abort(code, f"{method} attempt {self.attempts[method]} refused")

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        self._gate("status", context)
        return pb.StatusResponse(link=pb.LinkStatus(state="up"), edge_healthy=True)

    def Generate(self, request: pb.GenerateTextRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateTextResponse]:
        self._gate("generate", context)
        yield pb.GenerateTextResponse(started=pb.GenerationStarted(route="local", reason="flaky"))
        yield pb.GenerateTextResponse(delta=pb.TextDelta(text="partial" if request.prompt == "cut" else request.prompt))
        if request.prompt == "cut":
            context.abort(grpc.StatusCode.UNAVAILABLE, "link cut after the first message")
        yield pb.GenerateTextResponse(stats=pb.OrchestratorStats(route="local", reason="flaky"))


@pytest.fixture()
def flaky() -> Iterator[tuple[FlakyOrchestrator, str]]:
    servicer = FlakyOrchestrator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_OrchestratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


Outcome = tuple[Any, tandem_sdk.TandemError | None]  # (status or the deltas' texts, the error)


def call(kind: str, address: str, method: str, prompt: str = "hello", **kwargs: Any) -> Outcome:
    """Run `method` ("status" or "generate") with a `kind` client; the error is returned, not raised."""
    options = {**FAST, **kwargs}
    if kind == "sync":
        with tandem_sdk.Client(address, **options) as client:
            return _sync_call(client, method, prompt)

    async def run() -> Outcome:
        async with tandem_sdk.AsyncClient(address, **options) as client:
            return await _async_call(client, method, prompt)

    return asyncio.run(run())


def _sync_call(client: tandem_sdk.Client, method: str, prompt: str) -> Outcome:
    texts: list[str] = []
    try:
        if method == "status":
            return client.status(), None
        for delta in client.generate(prompt=prompt):
            texts.append(delta.text)
    except tandem_sdk.TandemError as err:
        return texts, err
    return texts, None


async def _async_call(client: tandem_sdk.AsyncClient, method: str, prompt: str) -> Outcome:
    texts: list[str] = []
    try:
        if method == "status":
            return await client.status(), None
        async for delta in client.generate(prompt=prompt):
            texts.append(delta.text)
    except tandem_sdk.TandemError as err:
        return texts, err
    return texts, None


@pytest.mark.parametrize("method", ["status", "generate"])
@pytest.mark.parametrize("kind", KINDS)
def test_unavailable_is_retried_until_the_call_succeeds(flaky, kind: str, method: str) -> None:
    servicer, address = flaky
    servicer.fail[method] = (grpc.StatusCode.UNAVAILABLE, 2)
    value, err = call(kind, address, method, retries=3)
    assert err is None, err
    assert value == ["hello"] if method == "generate" else value.edge_healthy
    assert servicer.attempts[method] == 3  # two refusals, then the answer


@pytest.mark.parametrize("method", ["status", "generate"])
@pytest.mark.parametrize("kind", KINDS)
def test_retries_are_bounded_and_the_last_status_reaches_the_caller(flaky, kind: str, method: str) -> None:
    servicer, address = flaky
    servicer.fail[method] = (grpc.StatusCode.UNAVAILABLE, 100)
    _, err = call(kind, address, method, retries=2)
    assert isinstance(err, tandem_sdk.Unavailable) and err.details == f"{method} attempt 3 refused"
    assert servicer.attempts[method] == 3
    servicer.attempts.clear()
    _, err = call(kind, address, method, retries=0)
    assert isinstance(err, tandem_sdk.Unavailable) and servicer.attempts[method] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_that_delivered_a_message_is_not_retried(flaky, kind: str) -> None:
    servicer, address = flaky
    texts, err = call(kind, address, "generate", prompt="cut", retries=4)
    assert texts == ["partial"]  # the caller saw the first delta, then the error
    assert isinstance(err, tandem_sdk.Unavailable) and err.details == "link cut after the first message"
    assert servicer.attempts["generate"] == 1


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT])
@pytest.mark.parametrize("method", ["status", "generate"])
@pytest.mark.parametrize("kind", KINDS)
def test_other_codes_are_not_retried(flaky, kind: str, method: str, code: grpc.StatusCode) -> None:
    servicer, address = flaky
    servicer.fail[method] = (code, 1)  # a retry would succeed, so a retry would show
    _, err = call(kind, address, method, retries=4)
    assert err is not None and err.code == code and servicer.attempts[method] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_retries_stay_inside_the_call_deadline(flaky, kind: str) -> None:
    servicer, address = flaky
    servicer.fail["status"] = (grpc.StatusCode.UNAVAILABLE, 100)
    t0 = time.monotonic()
    _, err = call(kind, address, "status", retries=4, timeout_s=0.3, backoff_s=0.2, max_backoff_s=0.2)
    assert time.monotonic() - t0 < 2.0  # well below the 4 x 0.2 s the waits could add up to, plus setup
    assert isinstance(err, (tandem_sdk.DeadlineExceeded, tandem_sdk.Unavailable))


def test_control_a_channel_without_the_service_config_makes_one_attempt(flaky) -> None:
    servicer, address = flaky
    servicer.fail["status"] = (grpc.StatusCode.UNAVAILABLE, 1)
    with grpc.insecure_channel(address, options=[("grpc.enable_retries", 1)]) as channel, \
            pytest.raises(grpc.RpcError) as info:
        pb_grpc.OrchestratorStub(channel).Status(pb.StatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.attempts["status"] == 1
    servicer.attempts.clear()
    # the caller's own options win: retries switched off at the channel level
    _, err = call("sync", address, "status", retries=3, channel_options=[("grpc.enable_retries", 0)])
    assert isinstance(err, tandem_sdk.Unavailable) and servicer.attempts["status"] == 1
