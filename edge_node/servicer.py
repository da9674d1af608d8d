"""The edge node's gRPC service: translates protos to `edge_node.core` and streams token deltas.

Guarantees:
- The servicer only translates: request fields -> `EdgeCore.encode/prepare`, the core's
  `Piece`s -> `TokenDelta`s whose text, concatenated, is the answer, and its `EdgeResult` ->
  the last message's statistics.
- One status map (`_status`): a bad field is INVALID_ARGUMENT naming it; all slots taken is
  RESOURCE_EXHAUSTED; a draining node is UNAVAILABLE; a cloud that stays unreachable past the
  resume budget is UNAVAILABLE and a cloud refusal keeps the cloud's code. Server-side failures
  carry a generic message and a request id, their details go to the log (`rpc_guard.fault`):
  no status message holds a traceback, a path, a pid or an address. Undecodable request bytes
  are INVALID_ARGUMENT and anything unforeseen INTERNAL, on every service of the server
  (`rpc_guard.RpcGuard`).
- A client that goes away stops its generation at the next token and frees its slot; the
  server keeps serving either way.
- `create_node` returns an `EdgeServer` (not started) with health checking and reflection
  registered, and with `config.metrics_port` its `/metrics` endpoint (`edge_node.metrics`: the
  node's TLS and API key, loopback by default; every answer is counted there as it ends);
  `EdgeServer.drain` reports NOT_SERVING, refuses new generations and waits for the running ones.
  `create_server` returns the bare (server, port), as every node's does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_node import metrics
from edge_node.cloud_link import CloudRejected, CredentialRefused, LinkError
from edge_node.config import EdgeConfig
from edge_node.core import Busy, Draining, EdgeCore, EdgeJob, Piece
from edge_node.drafter import DrafterModel
from edge_node.generation import EdgeResult
from edge_node.rpc_guard import RpcGuard, fault
from protos.enums import cause_to_proto, edge_mode_to_route, finish_to_proto
from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from tandem.security import (
    PING_SERVER_OPTIONS,
    RECONNECT_OPTIONS,
    KeyInterceptor,
    SecurityError,
    ServerTls,
    add_port,
    check_bind,
    client_tls,
    is_loopback,
    read_secret,
    secure_channel,
)
from tandem_core.loop import SwitchCause
from tandem_core.sampling import SamplingParams

log = logging.getLogger(__name__)

SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeNode"].full_name


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


def _status(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    """The one map from the core's errors to statuses; server-side failures via `fault`."""
    if isinstance(exc, ValueError):  # BadRequest, or the sampling params / mode naming their field
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, Busy):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, Draining):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    _failure(context, exc)


_CLOUD_REASON_CHARS = 400  # the most of a cloud's refusal passed on
# What a caller without fallback_local is told when the cloud path gives up, by the last cause.
_LINK_FAILURES = {
    SwitchCause.LATE_VERDICT: "the cloud verifier did not answer within the round deadline (round_deadline_ms)",
    SwitchCause.CLOUD_REFUSED: "the cloud verifier is at capacity or draining",
    SwitchCause.BAD_VERDICT: "the cloud verifier's replies broke the protocol",
}


def _failure(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """A running generation failed. No detail of the node's own leaves it; the cloud's reason for
    refusing the request as invalid (a prompt past its context, say) does, since the caller can
    act on it: the cloud writes its statuses for clients (`cloud_node.status`), one line each."""
    if isinstance(exc, CloudRejected):
        reason = ""
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.details:
            reason = ": " + exc.details.replace("(request id ", "(cloud request id ")[:_CLOUD_REASON_CHARS]
        fault(context, exc.code, f"the cloud verifier refused the request ({exc.code.name}){reason}", exc)
    if isinstance(exc, CredentialRefused):  # the operator's to fix: not UNAVAILABLE, which clients retry
        fault(context, grpc.StatusCode.FAILED_PRECONDITION,
              f"the cloud refused this edge node's token ({exc.code.name}); see its --cloud-token-file", exc)
    if isinstance(exc, LinkError):
        fault(context, grpc.StatusCode.UNAVAILABLE, _LINK_FAILURES.get(exc.cause, "the cloud verifier is unreachable"),
              exc)
    fault(context, grpc.StatusCode.INTERNAL, "generation failed", exc)


def _to_proto(item: Piece | EdgeResult) -> edge_pb2.EdgeGenerateResponse:
    if isinstance(item, Piece):
        return edge_pb2.EdgeGenerateResponse(delta=edge_pb2.TokenDelta(tokens=item.tokens, text=item.text,
                                                                       source=item.source))
    return edge_pb2.EdgeGenerateResponse(stats=stats_to_proto(item))


class EdgeServicer(edge_pb2_grpc.EdgeNodeServicer):
    def __init__(self, core: EdgeCore) -> None:
        self._core = core

    def CountTokens(self, request: edge_pb2.EdgeGenerateRequest, context: grpc.ServicerContext) -> edge_pb2.TokenCount:
        try:
            return edge_pb2.TokenCount(prompt_tokens=len(_encode(self._core, request)))
        except ValueError as exc:
            _status(context, exc)

    def Info(self, request: edge_pb2.EdgeInfoRequest, context: grpc.ServicerContext) -> edge_pb2.EdgeInfo:
        c = self._core.config
        return edge_pb2.EdgeInfo(drafter=c.drafter_name, context_length=self._core.drafter.context_length,
                                 cloud_address=c.cloud_address or "", default_draft_len=c.draft_len,
                                 round_deadline_ms=c.round_deadline_ms)

    def Generate(self, request: edge_pb2.EdgeGenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[edge_pb2.EdgeGenerateResponse]:
        try:
            generation = self._core.start(_job(self._core, request))
        except (ValueError, Busy, Draining) as exc:
            metrics.record_refused(next(code for kind, code in _REFUSED if isinstance(exc, kind)))
            _status(context, exc)
        if not context.add_callback(generation.cancel):  # the client left already
            generation.cancel()
        try:
            for item in _measured(generation):
                yield _to_proto(item)
        except Exception as exc:  # noqa: BLE001 - the worker's error, mapped in _failure
            _failure(context, exc)
        finally:
            generation.cancel()


_REFUSED = ((Busy, "RESOURCE_EXHAUSTED"), (Draining, "UNAVAILABLE"), (ValueError, "INVALID_ARGUMENT"))


def _measured(items: Iterator[Piece | EdgeResult]) -> Iterator[Piece | EdgeResult]:
    """The items, timed and counted in `edge_node.metrics` as they pass (the result: when final)."""
    gaps = metrics.TokenGaps()
    for item in items:
        if isinstance(item, Piece):
            gaps.tokens(len(item.tokens))
        else:
            metrics.record_result(item)
            gaps.record(item.route)
        yield item


def stats_to_proto(r: EdgeResult) -> common_pb2.GenerationStats:
    s = r.stats
    n = len(r.tokens)
    return common_pb2.GenerationStats(
        route=r.route, generated_tokens=n, ttft_ms=1000 * r.ttft_s, tokens_per_s=n / r.wall_s if r.wall_s else 0.0,
        rounds=s.rounds, drafted=s.drafted, accepted=s.accepted, acceptance_rate=s.acceptance_rate or 0.0,
        mean_accepted_len=s.mean_accepted_len or 0.0, target_forwards=s.target_forwards if r.route != "local" else 0,
        bytes_up=r.bytes_up, bytes_down=r.bytes_down, edge_cpu_s=r.edge_cpu_s, resumes=r.resumes,
        finish_reason=finish_to_proto(r.finish_reason), local_tokens=r.local_tokens,
        verified_tokens=r.verified_tokens, cloud_prefill_tokens=s.cloud_prefill_tokens,
        cloud_reused_tokens=s.cloud_reused_tokens, drafter_prefill_tokens=s.drafter_prefill_tokens,
        drafter_prefill_ms=1000 * r.drafter_prefill_s, retrieval_drafted=s.retrieval_drafted,
        retrieval_accepted=s.retrieval_accepted, pipeline_tries=s.pipeline_tries, pipeline_hits=s.pipeline_hits,
        draft_reasons=s.draft_reasons, tree_rounds=s.tree_rounds, nodes=s.nodes,
        switches=[common_pb2.RouteSwitch(at_token=w.at_token, from_route=w.from_route, to_route=w.to_route,
                                         reason=w.reason, at_ms=w.at_ms, cause=cause_to_proto(w.cause))
                  for w in r.switches])


@dataclass
class EdgeServer:
    """A built edge node: the grpc server, its port, the core and the health service."""

    server: grpc.Server
    port: int
    core: EdgeCore
    health: health.HealthServicer
    metrics: metrics.MetricsServer | None = None  # `/metrics` on config.metrics_port (not started)

    def drain(self, period_s: float, hurry: threading.Event | None = None) -> bool:
        """Health NOT_SERVING ("" and the service), new Generate UNAVAILABLE, then wait for the
        running generations: True once none runs, False when `period_s` passed or `hurry` was set."""
        self.health.enter_graceful_shutdown()
        self.core.drain()
        return self.core.wait_idle(period_s, hurry)


def cloud_channel(config: EdgeConfig) -> grpc.Channel | None:
    """The channel to the cloud: TLS and the device's token as configured; SecurityError when unsafe."""
    if not config.cloud_address:
        return None
    tls = client_tls("edge -> cloud", tls=config.cloud_tls, ca=config.cloud_ca_cert, cert=config.cloud_client_cert,
                     key=config.cloud_client_key, server_name=config.cloud_server_name)
    token = read_secret(file=config.cloud_token_file, env="TANDEM_EDGE_CLOUD_TOKEN", what="cloud token")
    host = config.cloud_address.rsplit(":", 1)[0]
    if token is not None and tls is None and not is_loopback(host):
        raise SecurityError(f"edge -> cloud: refusing to send the token in clear text to {host}; give --cloud-tls "
                            "or --cloud-ca-cert")
    return secure_channel(config.cloud_address, tls, token, options=RECONNECT_OPTIONS)


def create_node(drafter: DrafterModel, config: EdgeConfig, address: str | None = None,
                max_workers: int = 16) -> EdgeServer:
    """The edge node's server (not started); `address` defaults to the config's host and port.
    SecurityError for an unsafe setting: a non-loopback bind without TLS and a key (unless
    --insecure), an unreadable secret, a token about to travel in clear text beyond loopback."""
    address = address or f"{config.host}:{config.port}"
    tls = ServerTls.from_flags("edge", config.tls_cert, config.tls_key)
    key = read_secret(file=config.api_key_file, env="TANDEM_EDGE_API_KEY", what="edge api key")
    check_bind("edge", address.rsplit(":", 1)[0], tls=tls is not None, credential=key is not None,
               insecure=config.insecure)
    core = EdgeCore(drafter, config, cloud_channel(config))
    metrics.track_running(lambda: core.running)
    interceptors: list[grpc.ServerInterceptor] = [RpcGuard()] + ([KeyInterceptor(key)] if key else [])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="edge-rpc"),
                         interceptors=interceptors, options=PING_SERVER_OPTIONS)
    edge_pb2_grpc.add_EdgeNodeServicer_to_server(EdgeServicer(core), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_port(server, address, tls)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    scrape = None if config.metrics_port is None else metrics.MetricsServer(
        config.metrics_host, config.metrics_port, tls=tls, key=key, insecure=config.insecure)
    return EdgeServer(server, port, core, health_servicer, scrape)


def create_server(drafter: DrafterModel, config: EdgeConfig, address: str | None = None,
                  max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A grpc server (not started) with the edge service, health and reflection; (server, port)."""
    node = create_node(drafter, config, address, max_workers)
    return node.server, node.port
