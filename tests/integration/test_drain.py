"""Graceful drain of real node processes: `python -m edge_node` and `python -m orchestrator`.

A cloud verifier (the tiny target) runs in this process behind a link shaper that adds
`RTT_MS` per round, so a speculative answer of `N` tokens takes seconds. A seeded sampling
request is answered once undisturbed, then again with SIGTERM sent to the node mid-answer. While
it drains: health says NOT_SERVING, a new request is refused (gRPC UNAVAILABLE; the
orchestrator's HTTP endpoint 503 in OpenAI's error shape), and the running answer completes with
every token of the undisturbed one (0 lost). The process then exits 0 within its drain period.
A second SIGTERM, or the end of a short drain period, stops the edge at once.

A frozen edge (SIGSTOP) in the middle of an orchestrator's answer fails that answer with
UNAVAILABLE within the orchestrator's keepalive (a ping every KEEPALIVE_S, unanswered for as
long) instead of hanging; and an edge that is alive but sends nothing for several pings (a
cloud open that waits for its deadline) keeps its call: the edge's server takes the pings.
Run with `-s` to see the drain times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_node.servicer import create_server as create_cloud_server
from cloud_node.verifier import VerifierCore
from netshape.link import LinkConditions
from netshape.shaper import LinkShaper
from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc, orchestrator_pb2_grpc
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem.ops import procs
from tandem.security import keepalive_options

RTT_MS = 100
N = 120
DRAIN_S = 30.0
PROMPT = [5, 17, 99, 3, 44, 101, 7]
SAMPLING = common_pb2.SamplingParams(temperature=0.8, seed=1234)
EDGE_REQUEST = edge_pb2.EdgeGenerateRequest(prompt_tokens=PROMPT, max_new_tokens=N, sampling=SAMPLING,
                                            mode=edge_pb2.EDGE_MODE_SPECULATIVE)
ORCH_REQUEST = opb.GenerateTextRequest(prompt="def add(a, b):", options=opb.GenerateOptions(
    route=opb.ROUTE_SPECULATIVE, max_new_tokens=N, sampling=SAMPLING))


@pytest.fixture(scope="module")
def link(tiny_models) -> Iterator[str]:
    """The cloud verifier behind a shaper adding RTT_MS; the shaper's address."""
    cloud, port = create_cloud_server(VerifierCore.load(tiny_models.target_hf, dtype="fp32"), "127.0.0.1:0")
    cloud.start()
    try:
        with LinkShaper(f"127.0.0.1:{port}", LinkConditions(rtt_ms=RTT_MS)) as shaper:
            yield f"{shaper.address[0]}:{shaper.address[1]}"
    finally:
        cloud.stop(None)


def _start(module: str, argv: list[str], log_dir: Path) -> procs.Child:
    """`python -m module argv...`, ready once it printed `NAME grpc=...` and health is SERVING."""
    name = {"edge_node": "edge"}.get(module, module)
    child = procs.start(name, [sys.executable, "-m", module, *argv], log_dir=log_dir, timeout_s=120)
    procs.wait_healthy(child.fields["grpc"], timeout_s=60)
    return child


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[Callable[..., procs.Child]]:
    children: list[procs.Child] = []

    def started(name: str, *argv: str) -> procs.Child:
        children.append(_start(name, list(argv), tmp_path))
        return children[-1]

    yield started
    for child in reversed(children):
        procs.stop(child, grace_s=5)


def _edge(start: Callable[..., procs.Child], drafter: Path, cloud: str, drain_s: float = DRAIN_S) -> procs.Child:
    return start("edge_node", "--drafter", str(drafter), "--cloud", cloud, "--port", "0",
                 "--drain-s", str(drain_s), "--round-deadline-ms", "5000")


class Answer:
    """A streamed answer read on a thread: its token ids, final status and whether stats came."""

    def __init__(self, call: Iterator, delta_tokens: Callable[[object], list[int]]) -> None:
        self.tokens: list[int] = []
        self.code: grpc.StatusCode | None = None
        self.stats = False
        self._call, self._delta_tokens = call, delta_tokens
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                self.tokens += self._delta_tokens(msg)
                self.stats |= msg.WhichOneof("kind") == "stats"
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.code = err.code()

    def wait_tokens(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.tokens) < n and self.code is None:
            assert time.monotonic() < deadline, "the answer did not start"
            time.sleep(0.01)
        assert self.code is None, f"the answer ended early ({self.code}, {len(self.tokens)} tokens)"

    def join(self, timeout_s: float = 60) -> Answer:
        self._thread.join(timeout_s)
        return self


def _edge_tokens(msg: edge_pb2.EdgeGenerateResponse) -> list[int]:
    return list(msg.delta.tokens) if msg.WhichOneof("kind") == "delta" else []


def _orch_tokens(msg: opb.GenerateTextResponse) -> list[int]:
    return list(msg.delta.tokens) if msg.WhichOneof("kind") == "delta" else []


def _health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_not_serving(channel: grpc.Channel, services: tuple[str, ...]) -> None:
    deadline = time.monotonic() + 5
    while any(_health(channel, s) != health_pb2.HealthCheckResponse.NOT_SERVING for s in services):
        assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
        time.sleep(0.02)


def _exit_after(child: procs.Child, since: float, limit_s: float) -> float:
    """Wait for the process to exit 0 within `limit_s` of `since`; the seconds it took."""
    assert child.proc.wait(timeout=limit_s + 5) == 0, child.log_tail()
    took = time.monotonic() - since
    assert took < limit_s, f"exited after {took:.1f} s"
    return took


def test_edge_drains_the_running_answer_and_exits(tiny_models, link, start) -> None:
    edge = _edge(start, tiny_models.drafter_onnx, link)
    with grpc.insecure_channel(edge.fields["grpc"]) as channel:
        stub = edge_pb2_grpc.EdgeNodeStub(channel)
        t0 = time.monotonic()
        reference = Answer(stub.Generate(EDGE_REQUEST, timeout=120), _edge_tokens).join()
        undisturbed_s = time.monotonic() - t0
        assert reference.code == grpc.StatusCode.OK and len(reference.tokens) == N

        answer = Answer(stub.Generate(EDGE_REQUEST, timeout=120), _edge_tokens)
        answer.wait_tokens(10)
        at_signal, term = len(answer.tokens), time.monotonic()
        os.kill(edge.proc.pid, signal.SIGTERM)
        _wait_not_serving(channel, ("", "tandem.v1.EdgeNode"))
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(EDGE_REQUEST, timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        answer.join()
    took = _exit_after(edge, term, DRAIN_S)
    print(f"\nedge drain: {at_signal} of {N} tokens streamed at SIGTERM, {N - len(answer.tokens)} lost, "
          f"exit 0 after {took:.2f} s (undisturbed answer {undisturbed_s:.2f} s)")
    assert answer.code == grpc.StatusCode.OK and answer.stats
    assert answer.tokens == reference.tokens  # 0 tokens lost, none repeated


@pytest.mark.parametrize("how", ["second_signal", "period_end"])
def test_edge_stops_at_once_on_a_second_signal_or_at_the_period_end(tiny_models, link, start, how: str) -> None:
    drain_s = 1.0 if how == "period_end" else DRAIN_S
    edge = _edge(start, tiny_models.drafter_onnx, link, drain_s=drain_s)
    with grpc.insecure_channel(edge.fields["grpc"]) as channel:
        answer = Answer(edge_pb2_grpc.EdgeNodeStub(channel).Generate(EDGE_REQUEST, timeout=120), _edge_tokens)
        answer.wait_tokens(5)
        term = time.monotonic()
        os.kill(edge.proc.pid, signal.SIGTERM)
        if how == "second_signal":
            _wait_not_serving(channel, ("",))
            os.kill(edge.proc.pid, signal.SIGTERM)
        took = _exit_after(edge, term, drain_s + 3)
        answer.join()
    print(f"\nedge {how}: exit 0 after {took:.2f} s, the answer cut at {len(answer.tokens)} of {N} tokens "
          f"({answer.code.name if answer.code else None})")
    assert answer.code != grpc.StatusCode.OK and len(answer.tokens) < N


KEEPALIVE_S = 1.0  # the orchestrator's --edge-keepalive-s here (the shortest it takes)
FROZEN_SLACK_S = 3.0  # thread hand-offs and the client's own reading of the error


def test_a_frozen_edge_fails_the_orchestrators_answer_within_its_keepalive(tiny_models, link, start) -> None:
    edge = _edge(start, tiny_models.drafter_onnx, link)
    orch = _orchestrator(start, edge, link, "--http-port", "-1", "--edge-keepalive-s", str(KEEPALIVE_S))
    with grpc.insecure_channel(orch.fields["grpc"]) as channel:
        stub = _stub_with_link_up(channel)
        answer = Answer(stub.Generate(ORCH_REQUEST, timeout=120), _orch_tokens)
        answer.wait_tokens(4)
        os.kill(edge.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            answer.join(timeout_s=2 * KEEPALIVE_S + FROZEN_SLACK_S + 10)
            took = time.monotonic() - frozen
        finally:
            os.kill(edge.proc.pid, signal.SIGCONT)
    print(f"\nfrozen edge: the answer failed {took:.2f} s after SIGSTOP ({answer.code}), "
          f"{len(answer.tokens)} tokens streamed")
    assert answer.code == grpc.StatusCode.UNAVAILABLE, f"the answer did not fail ({answer.code})"
    assert took <= 2 * KEEPALIVE_S + FROZEN_SLACK_S


@contextlib.contextmanager
def _cloud_that_never_opens() -> Iterator[int]:
    """A live gRPC server (it answers the edge's link checks) whose Verify never replies: the
    edge waits for SessionOpened until the open's deadline. Its port."""
    def verify(requests, context):  # type: ignore[no-untyped-def]
        while context.is_active():
            time.sleep(0.05)
        return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "tandem.v1.CloudVerifier", {"Verify": grpc.stream_stream_rpc_method_handler(verify)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def test_an_edge_silent_for_several_pings_keeps_its_call(tiny_models, start) -> None:
    """The edge opens its cloud session on a live cloud that never answers the open, so it sends
    nothing until the open's deadline, then answers on the device. A client pinging every
    KEEPALIVE_S (the orchestrator's options) must get the whole answer: without the edge server's
    ping policy, gRPC ends the connection (too many pings) during the silence."""
    open_s = 6 * KEEPALIVE_S
    with _cloud_that_never_opens() as cloud_port:
        edge = start("edge_node", "--drafter", str(tiny_models.drafter_onnx), "--port", "0",
                     "--cloud", f"127.0.0.1:{cloud_port}")
        request = edge_pb2.EdgeGenerateRequest(prompt_tokens=PROMPT, max_new_tokens=8, mode=edge_pb2.EDGE_MODE_SPECULATIVE,
                                               fallback_local=True, open_deadline_ms=int(1000 * open_s))
        with grpc.insecure_channel(edge.fields["grpc"], options=keepalive_options(KEEPALIVE_S)) as channel:
            t0 = time.monotonic()
            first: list[float] = []
            answer = Answer(edge_pb2_grpc.EdgeNodeStub(channel).Generate(request, timeout=120),
                            lambda msg: first.append(time.monotonic()) or _edge_tokens(msg))
            answer.join(timeout_s=open_s + 30)
    silent_s = first[0] - t0 if first else None
    print(f"\nsilent edge: first message after {silent_s} s, {len(answer.tokens)} tokens ({answer.code})")
    assert silent_s is not None and silent_s >= 3 * KEEPALIVE_S, "the edge was not silent for several pings"
    assert answer.code == grpc.StatusCode.OK and len(answer.tokens) == 8


def _post_chat(http: str) -> tuple[int, dict]:
    body = json.dumps({"model": "tandem", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(f"http://{http}/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _orchestrator(start: Callable[..., procs.Child], edge: procs.Child, link: str, *argv: str) -> procs.Child:
    return start("orchestrator", "--edge", edge.fields["grpc"], "--cloud", link, "--port", "0", "--no-personal",
                 "--round-deadline-ms", "5000", *argv)


def _stub_with_link_up(channel: grpc.Channel) -> orchestrator_pb2_grpc.OrchestratorStub:
    stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
    _wait_link_up(stub)
    return stub


def _wait_link_up(stub: orchestrator_pb2_grpc.OrchestratorStub) -> None:
    deadline = time.monotonic() + 30
    while stub.Status(opb.StatusRequest(), timeout=10).link.state != "up":
        assert time.monotonic() < deadline, "the orchestrator never saw the link up"
        time.sleep(0.1)


def test_orchestrator_drains_the_running_answer_and_exits(tiny_models, link, start) -> None:
    edge = _edge(start, tiny_models.drafter_onnx, link)
    orch = _orchestrator(start, edge, link, "--http-port", "0", "--drain-s", str(DRAIN_S))
    with grpc.insecure_channel(orch.fields["grpc"]) as channel:
        stub = _stub_with_link_up(channel)
        reference = Answer(stub.Generate(ORCH_REQUEST, timeout=120), _orch_tokens).join()
        assert reference.code == grpc.StatusCode.OK and len(reference.tokens) >= 40  # sampled: it may stop at EOS

        answer = Answer(stub.Generate(ORCH_REQUEST, timeout=120), _orch_tokens)
        answer.wait_tokens(10)
        at_signal, term = len(answer.tokens), time.monotonic()
        os.kill(orch.proc.pid, signal.SIGTERM)
        _wait_not_serving(channel, ("", "tandem.v1.Orchestrator"))
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(ORCH_REQUEST, timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        status, body = _post_chat(orch.fields["http"])
        assert status == 503 and body["error"]["code"] == "service_unavailable" and body["error"]["message"]
        answer.join()
    took = _exit_after(orch, term, DRAIN_S)
    print(f"\norchestrator drain: {at_signal} of {len(reference.tokens)} tokens streamed at SIGTERM, "
          f"{len(reference.tokens) - len(answer.tokens)} lost, "
          f"exit 0 after {took:.2f} s")
    assert answer.code == grpc.StatusCode.OK and answer.stats
    assert answer.tokens == reference.tokens
