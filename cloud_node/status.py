"""The one map from the cloud verifier's errors to gRPC statuses, for every transport.

Guarantees:
- `status_for(exc, request_id)` answers every exception: `BadRequest` -> INVALID_ARGUMENT,
  `ResourceExhausted` -> RESOURCE_EXHAUSTED, `Draining` and `SessionIdle` -> UNAVAILABLE,
  `SessionGone` -> CANCELLED, `Unauthenticated` -> UNAUTHENTICATED, each with this package's
  one-line message; anything else is a server fault:
  INTERNAL with a generic message, never the exception's text.
- Every details string ends with `(request id ID)`; the same id is on the server's log line
  for the failure (the traceback of a server fault, at ERROR), so an operator can find it.
  A client never sees a traceback, a path, a pid, an address or a replica id.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import grpc

from cloud_node import metrics
from cloud_node.errors import BadRequest, Draining, ResourceExhausted, SessionGone, SessionIdle, Unauthenticated

log = logging.getLogger(__name__)

_CODES: dict[type[BaseException], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Draining: grpc.StatusCode.UNAVAILABLE,
    SessionIdle: grpc.StatusCode.UNAVAILABLE,
    SessionGone: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}
INTERNAL_MESSAGE = "internal error in the cloud verifier"


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    details: str


def new_request_id() -> str:
    """A short random id for one RPC: in its error status and on the server's log lines."""
    return uuid.uuid4().hex[:16]


def with_id(message: str, request_id: str) -> str:
    return f"{message} (request id {request_id})"


def status_for(exc: BaseException, request_id: str) -> Status:
    """The status a client gets for `exc`; a server fault is logged here with its traceback."""
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                metrics.record_shed()
            log.info("request %s: %s %s", request_id, code.name, exc)
            return Status(code, with_id(str(exc), request_id))
    log.error("request %s: internal error", request_id, exc_info=exc)
    return Status(grpc.StatusCode.INTERNAL, with_id(INTERNAL_MESSAGE, request_id))
