"""Draining a cloud replica (plain grpcio server) mid-answer loses no token.

Two in-process clouds, A and B (tiny fp32 target), behind one link shaper (netshape) that the
edge's channel points at. Mid-answer, the shaper's upstream is switched to B (new connections
go there) and A drains: health NOT_SERVING at once, new sessions refused with UNAVAILABLE
"draining", the round in flight finished, the stream ended with UNAVAILABLE, the server
stopped. The edge's link resumes on B with its committed tokens; the answer must equal an
undisturbed run token for token (greedy and seeded sampling, speculative and cloud routes).
The drain time (SIGTERM-to-last-session) is printed in a `drain:` line (run with -s).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from cloud_node.servicer import SERVICE_NAME, CloudServer, build_server
from cloud_node.verifier import Limits, VerifierCore
from edge_node.cloud_link import CloudLink, SessionRequest
from edge_node.drafter import DrafterModel
from edge_node.generation import EdgeResult, generate_cloud, generate_speculative
from netshape.shaper import LinkShaper
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc
from tandem_core.sampling import SamplingParams

PROMPT = [5, 17, 99, 3, 44, 101, 7]
N = 48
DRAIN_PERIOD_S = 10.0
LIMITS = Limits(max_sessions=8, max_context=256, max_draft_len=8, max_new_tokens=128)
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=5)
SEED = 4  # the session's seed: the sampled answers run to N tokens (no early end of sequence)


@dataclass
class Cloud:
    core: VerifierCore
    server: CloudServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="module")
def target(tiny_models) -> VerifierCore:
    return VerifierCore.load(tiny_models.target_hf, dtype="fp32", limits=LIMITS, model_name="tiny")


def _cloud(target: VerifierCore, name: str) -> Cloud:
    core = VerifierCore(target.target, eos_ids=target.eos_ids, limits=LIMITS, bytes_per_token=target.store.bytes_per_token,
                        model_name="tiny", replica=name)
    server = build_server(core)
    server.server.start()
    return Cloud(core, server)


@pytest.fixture()
def clouds(target: VerifierCore) -> Iterator[tuple[Cloud, Cloud]]:
    a, b = _cloud(target, "a"), _cloud(target, "b")
    yield a, b
    for cloud in (a, b):
        cloud.server.server.stop(None)


@pytest.fixture(scope="module")
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.drafter_onnx)


def _speculative(drafter: DrafterModel, address: str, params: SamplingParams, on_tokens=None) -> EdgeResult:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(address) as channel:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), params, SEED, N), round_timeout_s=10)
        return generate_speculative(drafter, link, PROMPT, params, SEED, draft_len=4, max_new_tokens=N,
                                    on_tokens=on_tokens, max_resumes=8, backoff_s=0.05)


def _cloud_route(drafter: DrafterModel, address: str, params: SamplingParams, on_tokens=None) -> EdgeResult:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(address) as channel:
        return generate_cloud(drafter, channel, PROMPT, params, SEED, max_new_tokens=N, on_tokens=on_tokens,
                              first_timeout_s=10, gap_timeout_s=10, max_resumes=8)


class DrainMidAnswer:
    """After `at` tokens: point the shaper at B, drain A in a thread, record the drain time."""

    def __init__(self, shaper: LinkShaper, a: Cloud, b: Cloud, at: int = 12) -> None:
        self.shaper, self.a, self.b, self.at = shaper, a, b, at
        self.seen, self.drain_s, self.thread = 0, None, None  # type: ignore[var-annotated]

    def __call__(self, tokens, source: str) -> None:  # type: ignore[no-untyped-def]
        self.seen += len(tokens)
        if self.thread is None and self.seen >= self.at:
            host, port = self.b.address.rsplit(":", 1)
            self.shaper.upstream = (host, int(port))  # new connections reach B
            self.thread = threading.Thread(target=self._drain)
            self.thread.start()

    def _drain(self) -> None:
        self.drain_s = self.a.server.drain_and_stop(DRAIN_PERIOD_S)


@pytest.mark.parametrize("route", ["speculative", "cloud"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_draining_mid_answer_loses_no_token(clouds, drafter, route: str, params: SamplingParams) -> None:
    a, b = clouds
    run = _speculative if route == "speculative" else _cloud_route
    undisturbed = run(drafter, b.address, params)
    with LinkShaper(a.address) as shaper:
        host, port = shaper.address
        assert len(undisturbed.tokens) == N
        drain = DrainMidAnswer(shaper, a, b)
        t0 = time.monotonic()
        result = run(drafter, f"{host}:{port}", params, on_tokens=drain)
        wall = time.monotonic() - t0
    assert drain.thread is not None
    drain.thread.join(DRAIN_PERIOD_S + 5)
    lost = sum(x != y for x, y in zip(undisturbed.tokens, result.tokens, strict=False)) + abs(
        len(undisturbed.tokens) - len(result.tokens))
    print(f"drain: {route} {'greedy' if params.greedy else 'sampled'}: {lost} tokens lost or changed of "
          f"{len(result.tokens)}, drain took {drain.drain_s * 1000:.0f} ms, answer {wall:.2f}s, "
          f"resumes {result.resumes}, switches {len(result.switches)}")
    assert result.tokens == undisturbed.tokens and lost == 0
    assert result.resumes >= 1  # the answer did move from A to B
    assert not result.switches and result.local_tokens == 0  # all verified in the cloud, none on the device
    assert drain.drain_s is not None and drain.drain_s < DRAIN_PERIOD_S
    assert len(a.core.store) == 0


def test_a_draining_server_is_not_serving_refuses_opens_and_ends_idle_streams(clouds) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    a, _ = clouds
    with grpc.insecure_channel(a.address) as channel:
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        spec = cloud_pb2.SessionSpec(session_id="idle", prompt_tokens=PROMPT, max_new_tokens=8)
        requests: queue.Queue[object] = queue.Queue()
        idle = stub.Verify(iter(requests.get, None), timeout=30)  # opens, then sends nothing
        requests.put(cloud_pb2.VerifyRequest(open=spec))
        assert next(idle).WhichOneof("kind") == "opened"
        took = a.server.drain(DRAIN_PERIOD_S)
        assert took < 1.0 and len(a.core.store) == 0
        with pytest.raises(grpc.RpcError) as ended:
            next(idle)
        requests.put(None)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in ended.value.details()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        for call in (lambda: list(stub.Verify(iter([cloud_pb2.VerifyRequest(open=spec)]), timeout=10)),
                     lambda: list(stub.Generate(cloud_pb2.GenerateRequest(session=spec), timeout=10))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
