"""A whole local stack in one test process: cloud verifier, link shaper, edge node, orchestrator.

Real gRPC servers on 127.0.0.1 (port 0) with the tiny models; the shaper sits between the edge
(and the orchestrator's health probes) and the cloud, so tests can cut, black-hole, slow or flap
the link. The cloud node's `recorder` (`tests.support.recorder.CloudRecorder`, also importable here
as `TrafficRecorder`) keeps every call and request message it received, and `tap`, a byte-level
proxy between the shaper and the cloud node, every byte; so a test can check what left the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cloud_node.servicer import create_server as create_cloud_server
from cloud_node.verifier import VerifierCore
from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel
from edge_node.servicer import create_server as create_edge_server
from netshape.shaper import LinkShaper
from orchestrator.app import Running
from orchestrator.config import OrchestratorConfig
from orchestrator.personal import Personal
from protos.tandem.v1 import orchestrator_pb2 as opb
from protos.tandem.v1 import orchestrator_pb2_grpc
from tests.support.recorder import CloudRecorder, LinkTap

TrafficRecorder = CloudRecorder  # the name the stack's recorder had before


@dataclass
class Stack:
    shaper: LinkShaper
    drafter: DrafterModel
    orchestrator: InThread
    recorder: CloudRecorder
    edge_address: str
    tap: LinkTap | None = None  # every byte between the shaper and the cloud node

    @property
    def stub(self) -> orchestrator_pb2_grpc.OrchestratorStub:
        return orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def status(self) -> opb.StatusResponse:
        return self.stub.Status(opb.StatusRequest(), timeout=10)

    @contextlib.contextmanager
    def healthy_link(self, rtt_ms: float = 0) -> Iterator[LinkShaper]:
        """The link up (at `rtt_ms`) on entry, and up again on exit, whatever the test did to it
        (a cut opens the circuit for a while): for each test's fixture."""
        self.shaper.set_conditions(rtt_ms=rtt_ms, mode="up")
        self.wait_link("up")
        yield self.shaper
        self.shaper.set_conditions(rtt_ms=0, mode="up")
        self.wait_link("up")

    def wait_link(self, state: str, timeout_s: float = 15.0) -> opb.StatusResponse:
        """Poll Status until the link is `state` ("up" or "down"); bounded."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.status()
            if s.link.state == state:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"link still {s.link.state!r} after {timeout_s} s, wanted {state!r}")
            time.sleep(0.05)



class InThread:
    """The orchestrator on a background event loop; `stop()` joins it."""

    def __init__(self, config: OrchestratorConfig, personal: Personal | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.running = Running(config, personal=personal)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="orchestrator-loop")
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.running.start(), self.loop).result(timeout=60)
        except BaseException:
            self.stop()
            raise

    @property
    def grpc_address(self) -> str:
        return f"{self.running.config.host}:{self.running.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"{self.running.config.host}:{self.running.http_port}"

    def stop(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.running.stop(), self.loop).result(timeout=30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()

@contextlib.contextmanager
def local_stack(target_hf: Path, drafter_onnx: Path, *, round_deadline_ms: int = 1000,
                store_path: Path | None = None, personal: Personal | None = None, **config: Any) -> Iterator[Stack]:
    recorder = CloudRecorder()
    cloud, cloud_port = create_cloud_server(VerifierCore.load(target_hf, dtype="fp32"), "127.0.0.1:0",
                                            interceptors=[recorder])
    cloud.start()
    with contextlib.ExitStack() as stack:
        stack.callback(cloud.stop, None)
        tap = stack.enter_context(LinkTap(f"127.0.0.1:{cloud_port}"))
        shaper = stack.enter_context(LinkShaper(tap.address, control=("127.0.0.1", 0)))  # the console's demo buttons
        link = f"{shaper.address[0]}:{shaper.address[1]}"
        drafter = DrafterModel(drafter_onnx)
        edge, edge_port = create_edge_server(drafter, EdgeConfig(cloud_address=link, drafter=drafter_onnx),
                                             "127.0.0.1:0")
        edge.start()
        stack.callback(edge.stop, None)
        orch = InThread(OrchestratorConfig(
            edge_address=f"127.0.0.1:{edge_port}", cloud_address=link, grpc_port=0, http_port=0,
            round_deadline_ms=round_deadline_ms, health_interval_s=0.2, probe_timeout_s=0.5, circuit_open_s=0.5,
            personal=store_path is not None, store_path=store_path,
            shaper_control=f"127.0.0.1:{shaper.control_address[1]}", **config), personal=personal)
        stack.callback(orch.stop)
        channel = grpc.insecure_channel(orch.grpc_address)
        stack.callback(channel.close)
        s = Stack(shaper, drafter, orch, recorder, f"127.0.0.1:{edge_port}", tap)
        s._channel = channel  # type: ignore[attr-defined]
        s.wait_link("up")
        yield s


# --- a fake edge node: the real orchestrator (core, servicers, store) with no models ----------


class HashEmbedder:
    """A deterministic stand-in for MiniLM: unit vectors from hashed words (no model, no torch)."""

    name = "hash-embedder"
    dim = 32

    def embed(self, texts: Any) -> Any:
        import zlib

        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in str(text).lower().split()[:256]:
                out[i, zlib.crc32(word.encode("utf-8", "replace")) % self.dim] += 1.0
            out[i, 0] += 1e-3
            out[i] /= np.linalg.norm(out[i])
        return out


class FakeEdge:
    """An edge node (grpc.aio) without a model: CountTokens counts 4 characters a token plus 4 per
    message, Generate streams `deltas` one-token deltas `delay_s` apart then the statistics, and
    Info reports `context_length`. It also serves health, so it can stand in for the cloud that
    the orchestrator probes. `active` counts Generate calls in progress, `opened` all of them."""

    def __init__(self, context_length: int = 32768, deltas: int = 8, delay_s: float = 0.0) -> None:
        self.context_length, self.deltas, self.delay_s = context_length, deltas, delay_s
        self.active = 0
        self.opened = 0

    @staticmethod
    def count(request: Any) -> int:
        text = request.prompt + "".join(m.content for m in request.messages)
        return (len(text) + 3) // 4 + 4 * len(request.messages)

    async def Info(self, request: Any, context: Any) -> Any:
        from protos.tandem.v1 import edge_pb2

        return edge_pb2.EdgeInfo(drafter="fake-drafter", context_length=self.context_length, default_draft_len=4)

    async def CountTokens(self, request: Any, context: Any) -> Any:
        from protos.tandem.v1 import edge_pb2

        if any("\x00" in m.content for m in request.messages):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "messages: must not contain NUL characters")
        return edge_pb2.TokenCount(prompt_tokens=self.count(request))

    async def Generate(self, request: Any, context: Any) -> Any:
        from protos.tandem.v1 import common_pb2, edge_pb2

        route = {edge_pb2.EDGE_MODE_SPECULATIVE: "speculative", edge_pb2.EDGE_MODE_CLOUD: "cloud"}.get(
            request.mode, "local")
        n = min(request.max_new_tokens, self.deltas)
        self.opened += 1
        self.active += 1
        try:
            for i in range(n):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield edge_pb2.EdgeGenerateResponse(delta=edge_pb2.TokenDelta(
                    tokens=[100 + i], text=f"w{i} ", source="local" if route == "local" else "verified"))
            yield edge_pb2.EdgeGenerateResponse(stats=common_pb2.GenerationStats(
                route=route, generated_tokens=n, ttft_ms=1.0, tokens_per_s=100.0,
                finish_reason=common_pb2.FINISH_REASON_LENGTH,
                local_tokens=n if route == "local" else 0, verified_tokens=0 if route == "local" else n))
        finally:
            self.active -= 1


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` runs a coroutine on it and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


async def _serve_fake_edge(edge: FakeEdge) -> tuple[grpc.aio.Server, int]:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from protos.tandem.v1 import edge_pb2_grpc

    server = grpc.aio.server()
    edge_pb2_grpc.add_EdgeNodeServicer_to_server(edge, server)  # type: ignore[arg-type]
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


@dataclass
class FakeStack:
    """The real orchestrator over a `FakeEdge` (which also answers the link's health probes)."""

    edge: FakeEdge
    edge_loop: LoopThread
    orchestrator: InThread
    edge_address: str

    @property
    def core(self) -> Any:
        return self.orchestrator.running.core

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run `coro` on the orchestrator's loop (e.g. a second HTTP listener over its core)."""
        return asyncio.run_coroutine_threadsafe(coro, self.orchestrator.loop).result(timeout=timeout)


def hash_store_personal(store_path: Path) -> Personal:
    """`Personal` over a real SQLite store at `store_path` with the `HashEmbedder`."""
    from orchestrator.store import PersonalStore

    return Personal(store_path, opener=lambda path: PersonalStore(path or store_path, HashEmbedder()))


@contextlib.contextmanager
def fake_edge_stack(store_path: Path | None = None, *, link: bool = True, context_length: int = 32768,
                    deltas: int = 8, delay_s: float = 0.0, **config: Any) -> Iterator[FakeStack]:
    """The orchestrator (gRPC and HTTP on 127.0.0.1 port 0) over a `FakeEdge`; with `store_path`, a
    real personal store with the `HashEmbedder`; with `link`, the fake edge is the probed cloud
    too, so the link is up and every route is open."""
    edge = FakeEdge(context_length=context_length, deltas=deltas, delay_s=delay_s)
    edge_loop = LoopThread("fake-edge-loop")
    with contextlib.ExitStack() as stack:
        stack.callback(edge_loop.stop)
        server, port = edge_loop.run(_serve_fake_edge(edge))
        stack.callback(lambda: edge_loop.run(server.stop(None)))
        address = f"127.0.0.1:{port}"
        personal = hash_store_personal(store_path) if store_path is not None else None
        orch = InThread(OrchestratorConfig(
            edge_address=address, cloud_address=address if link else None, grpc_port=0, http_port=0,
            health_interval_s=0.2, probe_timeout_s=0.5, circuit_open_s=0.5, personal=store_path is not None,
            store_path=store_path, **config), personal=personal)
        stack.callback(orch.stop)
        s = FakeStack(edge, edge_loop, orch, address)
        deadline = time.monotonic() + 15
        while link and s.core.monitor.snapshot().state != "up":
            if time.monotonic() > deadline:
                raise AssertionError("the fake link did not come up")
            time.sleep(0.02)
        yield s
