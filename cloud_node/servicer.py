"""gRPC transport for the cloud verifier: proto <-> `VerifierCore` translation, nothing else.

Guarantees:
- A Verify stream's first message must be `open` (answered by `opened`); each later `round` gets
  exactly one `verdict`, in order. The stream ends after a finished verdict, and the session is
  closed (its KV cache freed) when the stream ends for any reason.
- `BadRequest` (including a round sent before open) ends the stream with INVALID_ARGUMENT and
  `ResourceExhausted` with RESOURCE_EXHAUSTED, each with the core's message naming the field;
  the server keeps serving other and new streams.
- `create_server` registers the CloudVerifier service, `grpc.health.v1` health (SERVING for ""
  and the service name) and server reflection on a plain grpcio server.
- `VerifyStream` holds the per-stream protocol state, so the Ray Serve deployment
  (`cloud_node.serve_app`) speaks exactly the same protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc

from cloud_node.verifier import (
    BadRequest,
    DraftRound,
    GenerateChunk,
    Opened,
    ResourceExhausted,
    RoundVerdict,
    SessionSpec,
    Timing,
    VerifierCore,
)
from protos.enums import finish_to_proto
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = cloud_pb2.DESCRIPTOR.services_by_name["CloudVerifier"].full_name


# --- proto <-> core ------------------------------------------------------------------------

def spec_from_proto(msg: cloud_pb2.SessionSpec) -> SessionSpec:
    s = msg.sampling
    return SessionSpec(
        session_id=msg.session_id, model=msg.model, prompt_tokens=tuple(msg.prompt_tokens),
        messages=tuple((m.role, m.content) for m in msg.messages), temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0, seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=msg.max_new_tokens, generated_tokens=tuple(msg.generated_tokens))


def round_from_proto(msg: cloud_pb2.DraftRound) -> DraftRound:
    return DraftRound(msg.round, tuple(msg.draft_tokens), tuple((r.ids, r.probs) for r in msg.q_rows))


def timing_to_proto(t: Timing) -> cloud_pb2.ServerTiming:
    return cloud_pb2.ServerTiming(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, verify_ms=t.verify_ms)


def opened_to_proto(o: Opened) -> cloud_pb2.VerifyResponse:
    return cloud_pb2.VerifyResponse(opened=cloud_pb2.SessionOpened(
        model=o.model, prompt_len=o.prompt_len, max_draft_len=o.max_draft_len, max_context=o.max_context,
        replica=o.replica, timing=timing_to_proto(o.timing)))


def verdict_to_proto(v: RoundVerdict) -> cloud_pb2.VerifyResponse:
    return cloud_pb2.VerifyResponse(verdict=cloud_pb2.Verdict(
        round=v.round, accepted=v.accepted, tokens=v.tokens, finished=v.finished,
        finish_reason=finish_to_proto(v.finish_reason), timing=timing_to_proto(v.timing)))


def chunk_to_proto(c: GenerateChunk) -> cloud_pb2.GenerateResponse:
    return cloud_pb2.GenerateResponse(tokens=c.tokens, finished=c.finished,
                                      finish_reason=finish_to_proto(c.finish_reason), timing=timing_to_proto(c.timing))


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for a client-caused error, or None for a server fault."""
    if isinstance(exc, BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    return None


class VerifyStream:
    """Protocol state of one Verify stream: `open` first, then rounds."""

    def __init__(self, core: VerifierCore) -> None:
        self.core = core
        self.session: str | None = None
        self.finished = False

    def handle(self, request: cloud_pb2.VerifyRequest) -> cloud_pb2.VerifyResponse:
        kind = request.WhichOneof("kind")
        if kind == "open":
            if self.session is not None:
                raise BadRequest("open: this stream already has an open session; send rounds")
            opened = self.core.open(spec_from_proto(request.open))
            self.session = opened.session
            return opened_to_proto(opened)
        if kind == "round":
            if self.session is None:
                raise BadRequest("round: sent before the session was opened (the first message must be open)")
            verdict = self.core.verify(self.session, round_from_proto(request.round))
            self.finished = verdict.finished
            return verdict_to_proto(verdict)
        raise BadRequest("request: empty VerifyRequest (set open or round)")

    def close(self) -> None:
        if self.session is not None:
            self.core.close(self.session)


# --- the grpcio servicer -----------------------------------------------------------------------

_CLIENT_ERRORS = (BadRequest, ResourceExhausted)  # anything else is a server fault (grpc: UNKNOWN)


def _abort_for(context: grpc.ServicerContext, exc: BaseException) -> None:
    status = status_for(exc)
    assert status is not None
    context.abort(*status)


class CloudVerifierServicer(cloud_pb2_grpc.CloudVerifierServicer):
    """Translates CloudVerifier RPCs into VerifierCore calls."""

    def __init__(self, core: VerifierCore) -> None:
        self.core = core

    def Verify(self, request_iterator: Iterator[cloud_pb2.VerifyRequest],
               context: grpc.ServicerContext) -> Iterator[cloud_pb2.VerifyResponse]:
        stream = VerifyStream(self.core)
        context.add_callback(stream.close)  # also on cancellation while blocked reading
        try:
            for request in request_iterator:
                try:
                    response = stream.handle(request)
                except _CLIENT_ERRORS as exc:
                    _abort_for(context, exc)
                yield response
                if stream.finished:
                    return
        finally:
            stream.close()

    def Generate(self, request: cloud_pb2.GenerateRequest,
                 context: grpc.ServicerContext) -> Iterator[cloud_pb2.GenerateResponse]:
        try:
            chunks = self.core.generate(spec_from_proto(request.session))
        except _CLIENT_ERRORS as exc:
            _abort_for(context, exc)
        try:
            for chunk in chunks:
                yield chunk_to_proto(chunk)
        finally:
            chunks.close()


def add_standard_services(server: grpc.Server, service_names: list[str]) -> None:
    """grpc.health.v1 (SERVING for "" and every name) and server reflection."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    health_servicer = health.HealthServicer()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)


def create_server(core: VerifierCore, address: str = "127.0.0.1:0", max_workers: int | None = None,
                  interceptors: Sequence[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, int]:
    """A grpcio server (not started, as every node's) with the servicer, health and reflection; (server, port)."""
    # One worker per stream: more workers than sessions, so the session limit answers first.
    workers = max_workers or core.limits.max_sessions + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloud-grpc"),
                         interceptors=list(interceptors))
    cloud_pb2_grpc.add_CloudVerifierServicer_to_server(CloudVerifierServicer(core), server)
    add_standard_services(server, [SERVICE_NAME])
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port
