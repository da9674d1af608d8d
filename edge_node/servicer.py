"""The edge node's gRPC service: on-device or speculative generation, streamed as token deltas.

Guarantees:
- The servicer only translates: it validates the request (INVALID_ARGUMENT naming the field),
  runs `edge_node.generation` in a worker thread and streams each committed piece as a
  `TokenDelta` whose text, concatenated, is the answer; the last message carries the statistics.
- A client that goes away stops its generation; a cloud that stays unreachable past the resume
  budget ends the stream with UNAVAILABLE; the server keeps serving either way.
- At most `max_concurrent` generations run at once; beyond it RESOURCE_EXHAUSTED.
- Health checking (grpc.health.v1) and server reflection are registered.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_node.cloud_link import CloudLink, CloudRejected, LinkError, SessionRequest
from edge_node.drafter import DrafterModel
from edge_node.generation import EdgeResult, generate_cloud, generate_local, generate_speculative
from edge_node.text import TextStream
from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from tandem_core.sampling import SamplingParams, resolve_seed

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 4096
MAX_DRAFT_LEN = 16
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
_DONE = object()


@dataclass(frozen=True)
class EdgeSettings:
    cloud_address: str | None
    draft_len: int = 4
    round_deadline_ms: int = 5000
    open_deadline_ms: int = 60000
    max_concurrent: int = 4
    max_resumes: int = 3
    drafter_name: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.draft_len <= MAX_DRAFT_LEN:
            raise ValueError(f"draft_len must be in [1, {MAX_DRAFT_LEN}], got {self.draft_len}")
        if self.round_deadline_ms < 1 or self.open_deadline_ms < 1 or self.max_concurrent < 1 or self.max_resumes < 0:
            raise ValueError("round_deadline_ms, open_deadline_ms and max_concurrent must be >= 1, max_resumes >= 0")


class _Cancelled(Exception):
    pass


class EdgeServicer(edge_pb2_grpc.EdgeNodeServicer):
    def __init__(self, drafter: DrafterModel, settings: EdgeSettings) -> None:
        self._drafter = drafter
        self._settings = settings
        self._slots = threading.BoundedSemaphore(settings.max_concurrent)
        self._channel = grpc.insecure_channel(settings.cloud_address) if settings.cloud_address else None

    def _encode(self, request: edge_pb2.EdgeGenerateRequest) -> list[int]:
        given = [bool(request.prompt), bool(request.messages), bool(request.prompt_tokens)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_tokens")
        if request.prompt_tokens:
            ids = list(request.prompt_tokens)
            vocab = self._drafter.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt_tokens: ids must be in [0, {vocab})")
            return ids
        for i, m in enumerate(request.messages):
            if m.role not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}].role must be system, user or assistant, got {m.role!r}")
        if request.messages:
            try:
                return self._drafter.encode(messages=[{"role": m.role, "content": m.content} for m in request.messages])
            except RuntimeError as exc:  # onnxruntime-genai: e.g. the model folder has no chat template
                raise ValueError(f"messages: cannot apply the drafter's chat template: {exc}") from None
        return self._drafter.encode(prompt=request.prompt)

    def CountTokens(self, request: edge_pb2.EdgeGenerateRequest, context: grpc.ServicerContext) -> edge_pb2.TokenCount:
        try:
            return edge_pb2.TokenCount(prompt_tokens=len(self._encode(request)))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def Info(self, request: edge_pb2.EdgeInfoRequest, context: grpc.ServicerContext) -> edge_pb2.EdgeInfo:
        s = self._settings
        return edge_pb2.EdgeInfo(drafter=s.drafter_name, context_length=self._drafter.context_length,
                                 cloud_address=s.cloud_address or "", default_draft_len=s.draft_len,
                                 round_deadline_ms=s.round_deadline_ms)

    def _parse(self, request: edge_pb2.EdgeGenerateRequest) -> tuple[list[int], SamplingParams, str, int]:
        ids = self._encode(request)
        s = request.sampling
        params = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0,
                                seed=s.seed if s.HasField("seed") else None)
        if not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {request.max_new_tokens}")
        if request.draft_len > MAX_DRAFT_LEN:
            raise ValueError(f"draft_len must be at most {MAX_DRAFT_LEN}, got {request.draft_len}")
        if len(ids) + request.max_new_tokens >= self._drafter.context_length:
            raise ValueError(f"prompt of {len(ids)} tokens plus max_new_tokens exceeds the context "
                             f"length {self._drafter.context_length}")
        mode = request.mode
        if mode == edge_pb2.EDGE_MODE_UNSPECIFIED:
            mode = edge_pb2.EDGE_MODE_SPECULATIVE if self._channel else edge_pb2.EDGE_MODE_LOCAL
        routes = {edge_pb2.EDGE_MODE_LOCAL: "local", edge_pb2.EDGE_MODE_SPECULATIVE: "speculative",
                  edge_pb2.EDGE_MODE_CLOUD: "cloud"}
        if mode not in routes:
            raise ValueError(f"mode: unknown value {mode}")
        route = routes[mode]
        if route != "local" and self._channel is None:
            raise ValueError(f"mode: {route} needs a cloud address, and this edge node has none")
        return ids, params, route, request.draft_len or self._settings.draft_len

    def Generate(self, request: edge_pb2.EdgeGenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[edge_pb2.EdgeGenerateResponse]:
        try:
            ids, params, route, draft_len = self._parse(request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the edge node already runs {self._settings.max_concurrent} generations")
        try:
            yield from self._stream(request, context, ids, params, route, draft_len)
        finally:
            self._slots.release()

    def _run(self, ids: list[int], params: SamplingParams, route: str, draft_len: int, request: edge_pb2.EdgeGenerateRequest,
             on_tokens) -> EdgeResult:
        seed = resolve_seed(params.seed)
        if route == "local":
            return generate_local(self._drafter, ids, params, seed, max_new_tokens=request.max_new_tokens,
                                  on_tokens=on_tokens)
        round_s = (request.round_deadline_ms or self._settings.round_deadline_ms) / 1000
        open_s = (request.open_deadline_ms or self._settings.open_deadline_ms) / 1000
        if route == "cloud":
            return generate_cloud(self._drafter, self._channel, ids, params, seed,
                                  max_new_tokens=request.max_new_tokens, on_tokens=on_tokens, first_timeout_s=open_s,
                                  gap_timeout_s=round_s, max_resumes=self._settings.max_resumes,
                                  fallback_local=request.fallback_local)
        link = CloudLink(self._channel, SessionRequest(uuid.uuid4().hex, tuple(ids), params, seed,
                                                       request.max_new_tokens),
                         round_timeout_s=round_s, open_timeout_s=open_s)
        return generate_speculative(self._drafter, link, ids, params, seed, draft_len=draft_len,
                                    max_new_tokens=request.max_new_tokens, on_tokens=on_tokens,
                                    max_resumes=self._settings.max_resumes, fallback_local=request.fallback_local)

    def _stream(self, request, context, ids, params, route, draft_len) -> Iterator[edge_pb2.EdgeGenerateResponse]:
        out: queue.Queue = queue.Queue()
        text = TextStream(self._drafter.decode)
        last_source = [route if route == "local" else "verified"]

        def on_tokens(tokens, source: str) -> None:
            if not context.is_active():
                raise _Cancelled()
            last_source[0] = source
            out.put(edge_pb2.EdgeGenerateResponse(delta=edge_pb2.TokenDelta(
                tokens=list(tokens), text=text.push(tokens), source=source)))

        def work() -> None:
            try:
                out.put(self._run(ids, params, route, draft_len, request, on_tokens))
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
            elif isinstance(item, CloudRejected):
                context.abort(item.code, str(item))
            elif isinstance(item, LinkError):
                context.abort(grpc.StatusCode.UNAVAILABLE, f"cloud verifier unreachable: {item}")
            else:
                log.exception("generation failed", exc_info=item)
                context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {item}")


def stats_to_proto(r: EdgeResult) -> common_pb2.GenerationStats:
    s = r.stats
    n = len(r.tokens)
    return common_pb2.GenerationStats(
        route=r.route, generated_tokens=n, ttft_ms=1000 * r.ttft_s, tokens_per_s=n / r.wall_s if r.wall_s else 0.0,
        rounds=s.rounds, drafted=s.drafted, accepted=s.accepted, acceptance_rate=s.acceptance_rate or 0.0,
        mean_accepted_len=s.mean_accepted_len or 0.0, target_forwards=s.target_forwards if r.route != "local" else 0,
        bytes_up=r.bytes_up, bytes_down=r.bytes_down, edge_cpu_s=r.edge_cpu_s, resumes=r.resumes,
        finish_reason=_FINISH.get(r.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        local_tokens=r.local_tokens, verified_tokens=r.verified_tokens,
        switches=[common_pb2.RouteSwitch(at_token=w.at_token, from_route=w.from_route, to_route=w.to_route,
                                         reason=w.reason, at_ms=w.at_ms) for w in r.switches])


def create_server(drafter: DrafterModel, settings: EdgeSettings, address: str = "127.0.0.1:0",
                  max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A started-ready (not started) grpc server with the edge service, health and reflection."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="edge-rpc"))
    edge_pb2_grpc.add_EdgeNodeServicer_to_server(EdgeServicer(drafter, settings), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(edge_pb2.DESCRIPTOR.services_by_name["EdgeNode"].full_name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (edge_pb2.DESCRIPTOR.services_by_name["EdgeNode"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port
