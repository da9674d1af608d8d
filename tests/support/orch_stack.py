"""A whole local stack in one test process: cloud verifier, link shaper, edge node, orchestrator.

Real gRPC servers on 127.0.0.1 (port 0) with the tiny models; the shaper sits between the edge
(and the orchestrator's health probes) and the cloud, so tests can cut, black-hole, slow or flap
the link. `TrafficRecorder` keeps every message the cloud node received, serialized, so a test can
check what left the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
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


class TrafficRecorder(grpc.ServerInterceptor):
    """Records every request message of every call the cloud node serves (health included)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._lock = threading.Lock()

    def _keep(self, message: Any) -> None:
        with self._lock:
            self.messages.append(message)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                def recorded() -> Iterator[Any]:
                    for r in requests:
                        self._keep(r)
                        yield r
                return inner_ss(recorded(), context)
            return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
                self._keep(request)
                return inner_us(request, context)
            return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                self._keep(request)
                return inner_uu(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
        return handler

    def token_lists(self) -> list[list[int]]:
        """Every token-id list the cloud received: session prompts, committed tokens, drafts."""
        out: list[list[int]] = []
        for m in self.messages:
            for spec in _specs(m):
                out += [list(spec.prompt_tokens), list(spec.generated_tokens)]
            if m.DESCRIPTOR.name == "VerifyRequest" and m.WhichOneof("kind") == "round":
                out.append(list(m.round.draft_tokens))
        return out

    def raw(self) -> bytes:
        return b"".join(m.SerializeToString() for m in self.messages)


def _specs(m: Any) -> list[Any]:
    name = m.DESCRIPTOR.name
    if name == "VerifyRequest" and m.WhichOneof("kind") == "open":
        return [m.open]
    if name == "GenerateRequest":
        return [m.session]
    return []


@dataclass
class Stack:
    shaper: LinkShaper
    drafter: DrafterModel
    orchestrator: InThread
    recorder: TrafficRecorder
    edge_address: str

    @property
    def stub(self) -> orchestrator_pb2_grpc.OrchestratorStub:
        return orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def status(self) -> opb.StatusResponse:
        return self.stub.Status(opb.StatusRequest(), timeout=10)

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
                store_path: Path | None = None, **config: Any) -> Iterator[Stack]:
    recorder = TrafficRecorder()
    cloud, cloud_port = create_cloud_server(VerifierCore.load(target_hf, dtype="fp32"), "127.0.0.1:0",
                                            interceptors=[recorder])
    cloud.start()
    with contextlib.ExitStack() as stack:
        stack.callback(cloud.stop, None)
        shaper = stack.enter_context(LinkShaper(f"127.0.0.1:{cloud_port}"))
        link = f"{shaper.address[0]}:{shaper.address[1]}"
        drafter = DrafterModel(drafter_onnx)
        edge, edge_port = create_edge_server(drafter, EdgeConfig(cloud_address=link, drafter=drafter_onnx),
                                             "127.0.0.1:0")
        edge.start()
        stack.callback(edge.stop, None)
        orch = InThread(OrchestratorConfig(
            edge_address=f"127.0.0.1:{edge_port}", cloud_address=link, grpc_port=0, http_port=0,
            round_deadline_ms=round_deadline_ms, health_interval_s=0.2, probe_timeout_s=0.5, circuit_open_s=0.5,
            personal=store_path is not None, store_path=store_path, **config))
        stack.callback(orch.stop)
        channel = grpc.insecure_channel(orch.grpc_address)
        stack.callback(channel.close)
        s = Stack(shaper, drafter, orch, recorder, f"127.0.0.1:{edge_port}")
        s._channel = channel  # type: ignore[attr-defined]
        s.wait_link("up")
        yield s
