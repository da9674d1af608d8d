"""The edge node's gRPC service: translates protos to `edge_node.core` and streams token deltas.

Guarantees:
- The servicer only translates: request fields -> `EdgeCore.encode/prepare` (INVALID_ARGUMENT
  naming the field), the generation runs in a worker thread, and each committed piece is
  streamed as a `TokenDelta` whose text, concatenated, is the answer; the last message carries
  the statistics.
- A client that goes away stops its generation; a cloud that stays unreachable past the resume
  budget ends the stream with UNAVAILABLE; the server keeps serving either way.
- At most `max_concurrent` generations run at once; beyond it RESOURCE_EXHAUSTED.
- Health checking (grpc.health.v1) and server reflection are registered. `create_server`
  returns the server not started, as every node's does.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_node.cloud_link import CloudRejected, LinkError
from edge_node.config import EdgeConfig
from edge_node.core import Busy, EdgeCore, EdgeJob
from edge_node.drafter import DrafterModel
from edge_node.generation import EdgeResult
from edge_node.text import TextStream
from protos.enums import cause_to_proto, edge_mode_to_route, finish_to_proto
from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from tandem_core.sampling import SamplingParams

log = logging.getLogger(__name__)

SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeNode"].full_name
_DONE = object()


class _Cancelled(Exception):
    pass


def _encode(core: EdgeCore, request: edge_pb2.EdgeGenerateRequest) -> list[int]:
    return core.encode(request.prompt, [(m.role, m.content) for m in request.messages], list(request.prompt_tokens))


def _job(core: EdgeCore, request: edge_pb2.EdgeGenerateRequest) -> EdgeJob:
    s = request.sampling
    params = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0,
                            seed=s.seed if s.HasField("seed") else None)
    return core.prepare(_encode(core, request), params, route=edge_mode_to_route(request.mode, default=core.default_route),
                        max_new_tokens=request.max_new_tokens, draft_len=request.draft_len,
                        round_deadline_ms=request.round_deadline_ms, open_deadline_ms=request.open_deadline_ms,
                        fallback_local=request.fallback_local)


class EdgeServicer(edge_pb2_grpc.EdgeNodeServicer):
    def __init__(self, core: EdgeCore) -> None:
        self._core = core

    def CountTokens(self, request: edge_pb2.EdgeGenerateRequest, context: grpc.ServicerContext) -> edge_pb2.TokenCount:
        try:
            return edge_pb2.TokenCount(prompt_tokens=len(_encode(self._core, request)))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def Info(self, request: edge_pb2.EdgeInfoRequest, context: grpc.ServicerContext) -> edge_pb2.EdgeInfo:
        c = self._core.config
        return edge_pb2.EdgeInfo(drafter=c.drafter_name, context_length=self._core.drafter.context_length,
                                 cloud_address=c.cloud_address or "", default_draft_len=c.draft_len,
                                 round_deadline_ms=c.round_deadline_ms)

    def Generate(self, request: edge_pb2.EdgeGenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[edge_pb2.EdgeGenerateResponse]:
        try:
            job = _job(self._core, request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            with self._core.slot():
                yield from self._stream(job, context)
        except Busy as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    def _stream(self, job: EdgeJob, context: grpc.ServicerContext) -> Iterator[edge_pb2.EdgeGenerateResponse]:
        out: queue.Queue = queue.Queue()
        text = TextStream(self._core.drafter.decode)
        last_source = [job.route.value if job.route == "local" else "verified"]

        def on_tokens(tokens: Sequence[int], source: str) -> None:
            if not context.is_active():
                raise _Cancelled()
            last_source[0] = source
            out.put(edge_pb2.EdgeGenerateResponse(delta=edge_pb2.TokenDelta(
                tokens=list(tokens), text=text.push(tokens), source=source)))

        def work() -> None:
            try:
                out.put(self._core.run(job, on_tokens))
            except BaseException as exc:  # noqa: BLE001 - handed to the serving thread
                out.put(exc)
            finally:
                out.put(_DONE)

        threading.Thread(target=work, daemon=True, name="edge-generate").start()
        while (item := out.get()) is not _DONE:
            if isinstance(item, edge_pb2.EdgeGenerateResponse):
                yield item
            elif isinstance(item, EdgeResult):
                tail = text.flush()
                if tail:
                    yield edge_pb2.EdgeGenerateResponse(delta=edge_pb2.TokenDelta(text=tail, source=last_source[0]))
                yield edge_pb2.EdgeGenerateResponse(stats=stats_to_proto(item))
            elif isinstance(item, _Cancelled):
                return
            else:
                _abort(context, item)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, CloudRejected):
        context.abort(exc.code, str(exc))
    if isinstance(exc, LinkError):
        context.abort(grpc.StatusCode.UNAVAILABLE, f"cloud verifier unreachable: {exc}")
    log.error("generation failed", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {exc}")


def stats_to_proto(r: EdgeResult) -> common_pb2.GenerationStats:
    s = r.stats
    n = len(r.tokens)
    return common_pb2.GenerationStats(
        route=r.route, generated_tokens=n, ttft_ms=1000 * r.ttft_s, tokens_per_s=n / r.wall_s if r.wall_s else 0.0,
        rounds=s.rounds, drafted=s.drafted, accepted=s.accepted, acceptance_rate=s.acceptance_rate or 0.0,
        mean_accepted_len=s.mean_accepted_len or 0.0, target_forwards=s.target_forwards if r.route != "local" else 0,
        bytes_up=r.bytes_up, bytes_down=r.bytes_down, edge_cpu_s=r.edge_cpu_s, resumes=r.resumes,
        finish_reason=finish_to_proto(r.finish_reason), local_tokens=r.local_tokens,
        verified_tokens=r.verified_tokens,
        switches=[common_pb2.RouteSwitch(at_token=w.at_token, from_route=w.from_route, to_route=w.to_route,
                                         reason=w.reason, at_ms=w.at_ms, cause=cause_to_proto(w.cause))
                  for w in r.switches])


def create_server(drafter: DrafterModel, config: EdgeConfig, address: str | None = None,
                  max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A grpc server (not started) with the edge service, health and reflection; (server, port).

    `address` defaults to the config's host and port.
    """
    channel = grpc.insecure_channel(config.cloud_address) if config.cloud_address else None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="edge-rpc"))
    edge_pb2_grpc.add_EdgeNodeServicer_to_server(EdgeServicer(EdgeCore(drafter, config, channel)), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = address or f"{config.host}:{config.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port
