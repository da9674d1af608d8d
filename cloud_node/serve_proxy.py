"""Runs in Serve's gRPC proxy: the statuses Serve writes itself leave it without exception text.

Serve's proxy answers some failures on its own, with the exception's text as the details: a
replica that died mid-stream gives INTERNAL and Ray's error message (the actor id, the pid, the
node's address); a timeout, a disconnect or backpressure give Serve's own sentences.

Guarantees:
- For the CloudVerifier methods, a status set by our replica (its details end with
  `(request id ID)`, see `cloud_node.status`) passes unchanged.
- Any other non-OK status gets a fixed message for its code and a fresh request id; the
  original details go to the proxy's log with that id. INTERNAL or UNKNOWN caused by a replica
  that died or became unreachable becomes UNAVAILABLE, so the edge resumes on another replica.
- It wraps Serve's handler factory (`gRPCGenericServer.service_handler_factory`, Serve 2.60). If a
  Serve version lacks it, registration still works and a warning says the scrubbing is off.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from cloud_node.status import new_request_id, with_id

log = logging.getLogger(__name__)

_OURS = re.compile(r"\(request id [0-9a-f]{16}\)$")
_REPLICA_GONE = re.compile(r"actor.*(died|unavailable|dead)|ActorDiedError|ActorUnavailableError|RayActorError",
                           re.IGNORECASE | re.DOTALL)
_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the cloud replica serving this call is unavailable; resume on a new stream",
    grpc.StatusCode.INTERNAL: "internal error in the cloud's proxy",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the cloud's proxy timed out the call",
    grpc.StatusCode.CANCELLED: "the call was cancelled",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the cloud is at capacity; try again later",
}
_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _code(raw: Any) -> grpc.StatusCode | None:
    if isinstance(raw, grpc.StatusCode) or raw is None:
        return raw
    return _BY_VALUE.get(int(raw))


def scrub(context: Any) -> None:
    """Rewrite the call's status details unless our replica wrote them (see the module doc)."""
    code = _code(context.code())
    raw = context.details()
    details = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
    if code in (None, grpc.StatusCode.OK) or _OURS.search(details):
        return
    request_id = new_request_id()
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and _REPLICA_GONE.search(details):
        code = grpc.StatusCode.UNAVAILABLE
    log.warning("request %s: Serve answered %s: %s", request_id, code.name, details)
    context.set_code(code)
    context.set_details(with_id(_MESSAGES.get(code, f"the cloud's proxy answered {code.name}"), request_id))


def _scrubbed(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(arg: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in handler(arg, context):
                yield item
        finally:
            scrub(context)

    return call


def install_status_scrubber(server: Any, service_name: str) -> None:
    """Make Serve's proxy `server` scrub the statuses of `service_name`'s streaming methods."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        log.warning("Serve's gRPC server has no service_handler_factory; status scrubbing is off")
        return

    def scrubbing_factory(service_method: str, streaming_type: Any) -> Any:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if service_method.startswith(f"/{service_name}/") and inspect.isasyncgenfunction(handler):
            return _scrubbed(handler)
        return handler

    server.service_handler_factory = scrubbing_factory
