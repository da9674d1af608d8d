"""The orchestrator's gRPC service (grpc.aio): translation between protos and `Orchestrator`.

Guarantees:
- The service is registered with a generic handler that receives each request as raw bytes and
  parses it here: bytes that are not a valid message of the method's type (truncated or garbled
  protobuf, invalid UTF-8 in a string field) get INVALID_ARGUMENT "request: ...", never UNKNOWN
  or INTERNAL. Unknown fields are ignored (proto3).
- Every error becomes a status through `errors.status_of` (the one table): the message of an
  expected error as is; anything unexpected is logged with a request id and answered INTERNAL
  with a generic message quoting that id (no traceback, path or address reaches the client).
- A client that cancels a Generate (or whose deadline passes) cancels the edge call under it and
  frees its generation slot.
- At most `MAX_CONCURRENT_RPCS` calls run at once; more get RESOURCE_EXHAUSTED from gRPC.
- Health (grpc.health.v1, "" and the Orchestrator service) and reflection are registered.
- With `tls` the port speaks TLS only (`tandem.security.add_port`); an API key is checked by the
  caller's interceptor (`tandem.security.AioKeyInterceptor`: every call but health).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.core import Orchestrator
from orchestrator.errors import BadRequest, Disabled, public_message, retry_after_s, status_of
from orchestrator.personal import Personal
from orchestrator.validation import check_id
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem.security import ServerTls, add_port

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)

SERVICE_NAME = opb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
MAX_RECEIVE_BYTES = 8 << 20  # the largest request message accepted
MAX_CONCURRENT_RPCS = 256
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # a RESOURCE_EXHAUSTED's retry hint, in ms


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call with the status `exc` maps to (see the module docstring)."""
    wait_s = retry_after_s(exc)
    if wait_s is not None:  # gRPC's own name for a server's retry hint
        context.set_trailing_metadata(((PUSHBACK_KEY, str(max(0, round(wait_s * 1000)))),))
    await context.abort(grpc.StatusCode[status_of(exc).grpc], public_message(exc, method))


def _decode(kind: type[M], raw: bytes) -> M:
    try:
        return kind.FromString(raw)
    except (DecodeError, ValueError):
        raise BadRequest("request", f"is not a valid {kind.DESCRIPTOR.full_name} message "
                                    "(truncated or garbled protobuf, or a string that is not UTF-8)") from None


class OrchestratorServicer:
    """The Orchestrator methods over decoded requests; `handler()` registers them."""

    def __init__(self, core: Orchestrator) -> None:
        self.core = core

    async def Generate(self, request: opb.GenerateTextRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[opb.GenerateTextResponse]:
        async for item in self.core.generate(request):
            yield item

    async def AddDocument(self, request: opb.AddDocumentRequest, context: grpc.aio.ServicerContext) -> opb.Document:
        return await self._personal().add(request)

    async def DeleteDocument(self, request: opb.DeleteDocumentRequest, context: grpc.aio.ServicerContext
                             ) -> opb.DeleteDocumentResponse:
        doc_id = check_id("id", request.id)
        return opb.DeleteDocumentResponse(deleted=await self._personal().delete(doc_id))

    async def ListDocuments(self, request: opb.ListDocumentsRequest, context: grpc.aio.ServicerContext
                            ) -> opb.ListDocumentsResponse:
        return await self._personal().list_page(request)

    async def SetDocumentPrivacy(self, request: opb.SetDocumentPrivacyRequest, context: grpc.aio.ServicerContext
                                 ) -> opb.Document:
        return await self._personal().set_privacy(check_id("id", request.id), request.privacy)

    async def Status(self, request: opb.StatusRequest, context: grpc.aio.ServicerContext) -> opb.StatusResponse:
        core = self.core
        link = core.monitor.snapshot()
        info = await core.edge_status()
        edge_ok = info is not None
        personal = core.personal
        models = [opb.ModelInfo(role="drafter", name=info.drafter if info else "", where="edge", loaded=edge_ok),
                  opb.ModelInfo(role="target", name=core.config.target_name, where="cloud", loaded=link.state == "up")]
        if personal is not None:
            models.append(opb.ModelInfo(role="embedder", name=personal.embedder_name, where="orchestrator",
                                        loaded=personal.loaded))
        return opb.StatusResponse(
            link=opb.LinkStatus(state=link.state, circuit=link.circuit, rtt_ms=link.rtt_ms or 0.0,
                                rtt_jitter_ms=link.jitter_ms or 0.0, consecutive_failures=link.consecutive_failures,
                                last_probe_age_s=link.last_probe_age_s or 0.0, cloud_address=link.address or ""),
            recent_acceptance=core.acceptance.overall() or 0.0, acceptance_by_category=core.acceptance.snapshot(),
            models=models, edge_address=core.config.edge_address,
            documents=await personal.count() if personal is not None else 0, edge_healthy=edge_ok)

    def _personal(self) -> Personal:
        if self.core.personal is None:
            raise Disabled("personal documents are disabled on this orchestrator (--no-personal)")
        return self.core.personal

    def handler(self) -> grpc.GenericRpcHandler:
        """The service as raw-bytes handlers: each parses its request itself (module docstring)."""
        def unary(name: str, kind: type[Message], reply: type[Message]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                _unary(getattr(self, name), kind, name), request_deserializer=None,
                response_serializer=reply.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                _stream(self.Generate, opb.GenerateTextRequest, "Generate"), request_deserializer=None,
                response_serializer=opb.GenerateTextResponse.SerializeToString),
            "AddDocument": unary("AddDocument", opb.AddDocumentRequest, opb.Document),
            "DeleteDocument": unary("DeleteDocument", opb.DeleteDocumentRequest, opb.DeleteDocumentResponse),
            "ListDocuments": unary("ListDocuments", opb.ListDocumentsRequest, opb.ListDocumentsResponse),
            "SetDocumentPrivacy": unary("SetDocumentPrivacy", opb.SetDocumentPrivacyRequest, opb.Document),
            "Status": unary("Status", opb.StatusRequest, opb.StatusResponse),
        })


def _unary(method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[T]], kind: type[Message], name: str
           ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[T]]:
    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(_decode(kind, raw), context)
        except Exception as exc:  # every error becomes a status (abort raises)
            await _abort(context, exc, name)
            raise
    return call


def _stream(method: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[T]], kind: type[Message], name: str
            ) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[T]]:
    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        stream: AsyncIterator[T] | None = None
        try:
            stream = method(_decode(kind, raw), context)
            async for item in stream:
                yield item
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await _abort(context, exc, name)
        finally:
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]
    return call


def create_server(core: Orchestrator, address: str, *, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                  tls: ServerTls | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) with the Orchestrator service, health and reflection;
    over TLS when `tls` is given."""
    server = grpc.aio.server(interceptors=list(interceptors), maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
                             options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
    server.add_generic_rpc_handlers((OrchestratorServicer(core).handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_port(server, address, tls)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.health = health_servicer  # type: ignore[attr-defined]
    return server, port


async def mark_serving(server: grpc.aio.Server) -> None:
    for name in ("", SERVICE_NAME):
        await server.health.set(name, health_pb2.HealthCheckResponse.SERVING)  # type: ignore[attr-defined]
