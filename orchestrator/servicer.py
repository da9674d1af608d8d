"""The orchestrator's gRPC service (grpc.aio): translation between protos and `Orchestrator`.

Guarantees:
- Errors from the core become statuses with its message: BadRequest -> INVALID_ARGUMENT (the
  message names the field), NotFound -> NOT_FOUND, Busy -> RESOURCE_EXHAUSTED, Unavailable ->
  UNAVAILABLE, DeadlineExceeded -> DEADLINE_EXCEEDED. Anything else is logged and INTERNAL.
- A client that cancels a Generate cancels the edge call under it.
- Health (grpc.health.v1, "" and the Orchestrator service) and reflection are registered.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.core import Orchestrator
from orchestrator.errors import BadRequest, Busy, DeadlineExceeded, NotFound, OrchestratorError, Unavailable
from protos.tandem.v1 import orchestrator_pb2 as opb
from protos.tandem.v1 import orchestrator_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = opb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
_CODES = {BadRequest: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
          Busy: grpc.StatusCode.RESOURCE_EXHAUSTED, Unavailable: grpc.StatusCode.UNAVAILABLE,
          DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED}


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, OrchestratorError):
        code = next((c for kind, c in _CODES.items() if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
        await context.abort(code, str(exc))
    log.exception("orchestrator call failed", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")


async def _guarded(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    """Run a unary call; any error becomes its status (see `_abort`)."""
    try:
        return await call()
    except Exception as exc:
        await _abort(context, exc)
        raise


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, core: Orchestrator) -> None:
        self.core = core

    async def Generate(self, request: opb.GenerateTextRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[opb.GenerateTextResponse]:
        stream = self.core.generate(request)
        try:
            async for item in stream:
                yield item
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await _abort(context, exc)
        finally:
            await stream.aclose()

    async def AddDocument(self, request: opb.AddDocumentRequest, context: grpc.aio.ServicerContext) -> opb.Document:
        return await _guarded(context, lambda: self._personal().add(request))

    async def DeleteDocument(self, request: opb.DeleteDocumentRequest, context: grpc.aio.ServicerContext
                             ) -> opb.DeleteDocumentResponse:
        async def delete() -> opb.DeleteDocumentResponse:
            if not request.id:
                raise BadRequest("id", "must not be empty")
            return opb.DeleteDocumentResponse(deleted=await self._personal().delete(request.id))
        return await _guarded(context, delete)

    async def ListDocuments(self, request: opb.ListDocumentsRequest, context: grpc.aio.ServicerContext
                            ) -> opb.ListDocumentsResponse:
        async def documents() -> opb.ListDocumentsResponse:
            return opb.ListDocumentsResponse(documents=await self._personal().list())
        return await _guarded(context, documents)

    async def SetDocumentPrivacy(self, request: opb.SetDocumentPrivacyRequest, context: grpc.aio.ServicerContext
                                 ) -> opb.Document:
        async def relabel() -> opb.Document:
            if not request.id:
                raise BadRequest("id", "must not be empty")
            return await self._personal().set_privacy(request.id, request.privacy)
        return await _guarded(context, relabel)

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

    def _personal(self):  # type: ignore[no-untyped-def]
        if self.core.personal is None:
            raise Unavailable("personal documents are disabled on this orchestrator (--no-personal)")
        return self.core.personal


def create_server(core: Orchestrator, address: str) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) with the Orchestrator service, health and reflection."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.health = health_servicer  # type: ignore[attr-defined]
    return server, port


async def mark_serving(server: grpc.aio.Server) -> None:
    for name in ("", SERVICE_NAME):
        await server.health.set(name, health_pb2.HealthCheckResponse.SERVING)  # type: ignore[attr-defined]
