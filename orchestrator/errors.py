"""Errors the orchestrator raises, and the one table that maps them to gRPC and HTTP statuses.

Guarantees:
- Every error names what went wrong in one line of at most `MAX_MESSAGE_CHARS` characters
  (longer messages are cut): a client's own input quoted back (`shown`) is never long enough to
  break a status trailer. Messages carry no traceback, file path, process id or address.
- `BadRequest` names the request field and its message starts with it.
- `STATUSES` is the only place a status is chosen: gRPC code name, HTTP status, and OpenAI's
  error `type` and `code`, per error class (the most specific class that matches wins):

  | error              | gRPC                | HTTP | meaning                                         |
  |--------------------|---------------------|------|-------------------------------------------------|
  | BadRequest         | INVALID_ARGUMENT    | 400  | a bad field (named)                             |
  | ContextTooLong     | INVALID_ARGUMENT    | 400  | prompt + answer exceed the route's context      |
  | NotFound           | NOT_FOUND           | 404  | an unknown document id                          |
  | Conflict           | FAILED_PRECONDITION | 409  | an idempotency key reused for another document  |
  | Disabled           | FAILED_PRECONDITION | 400  | a feature turned off on this orchestrator       |
  | Busy               | RESOURCE_EXHAUSTED  | 429  | too many requests at once                       |
  | Unavailable        | UNAVAILABLE         | 503  | the edge node or the store cannot serve now     |
  | DeadlineExceeded   | DEADLINE_EXCEEDED   | 504  | past the request's deadline                     |
  | anything else      | INTERNAL            | 500  | a bug: generic message + a request id, logged   |

- `Busy` carries when to try again (`retry_after_s`): HTTP answers it as `Retry-After` (whole
  seconds, at least 1), gRPC as the `grpc-retry-pushback-ms` trailer (the SDK reads it into
  `ResourceExhausted.retry_after_s`).
- `internal_error` logs an unexpected exception with its traceback under a fresh request id
  and returns the generic message the client gets, which quotes only that id.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 500  # a status message (gRPC details, OpenAI error message)
SHOWN_CHARS = 40  # a client's value quoted back in a message


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client's value for an error message: its repr, at most `limit` characters."""
    return clip(repr(value), limit)


class OrchestratorError(Exception):
    """Base class; `str(err)` is the message for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(message))


class BadRequest(OrchestratorError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ContextTooLong(BadRequest):
    """The prompt plus the answer's budget do not fit the context of the route asked for."""


class Unavailable(OrchestratorError):
    pass


class NotFound(OrchestratorError):
    pass


class Conflict(OrchestratorError):
    """The request contradicts what is stored (an idempotency key reused for another document)."""


class Disabled(OrchestratorError):
    """A feature this orchestrator was started without (e.g. personal documents)."""


BUSY_RETRY_S = 1.0  # the hint a refusal for load carries when nothing better is known


class Busy(OrchestratorError):
    """Too much at once; `retry_after_s` says when a retry is likely to be admitted."""

    def __init__(self, message: str, retry_after_s: float = BUSY_RETRY_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def retry_after_s(exc: BaseException) -> float | None:
    """When to try again after `exc`; None when it is not a refusal for load."""
    return exc.retry_after_s if isinstance(exc, Busy) else None


class DeadlineExceeded(OrchestratorError):
    pass


@dataclass(frozen=True)
class Status:
    """How one kind of error travels: gRPC code name, HTTP status, OpenAI type and code."""

    grpc: str  # a grpc.StatusCode name
    http: int
    type: str = "invalid_request_error"
    code: str | None = None


# Most specific first: the first class the error is an instance of decides.
STATUSES: tuple[tuple[type[OrchestratorError], Status], ...] = (
    (ContextTooLong, Status("INVALID_ARGUMENT", 400, code="context_length_exceeded")),
    (BadRequest, Status("INVALID_ARGUMENT", 400)),
    (NotFound, Status("NOT_FOUND", 404, code="not_found")),
    (Conflict, Status("FAILED_PRECONDITION", 409, code="conflict")),
    (Disabled, Status("FAILED_PRECONDITION", 400, code="disabled")),
    (Busy, Status("RESOURCE_EXHAUSTED", 429, "rate_limit_error", "rate_limit_exceeded")),
    (Unavailable, Status("UNAVAILABLE", 503, "server_error", "service_unavailable")),
    (DeadlineExceeded, Status("DEADLINE_EXCEEDED", 504, "server_error", "deadline_exceeded")),
)
INTERNAL = Status("INTERNAL", 500, "server_error", "internal_error")


def status_of(exc: BaseException) -> Status:
    """The status for `exc`; INTERNAL for anything that is not an `OrchestratorError` above."""
    return next((status for kind, status in STATUSES if isinstance(exc, kind)), INTERNAL)


def internal_error(exc: BaseException, where: str) -> str:
    """Log `exc` (a bug) with its traceback under a new request id; the message for the client."""
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error in %s (request id %s)", where, request_id, exc_info=exc)
    return f"internal error (request id {request_id}); the orchestrator's log has the details"


def public_message(exc: BaseException, where: str) -> str:
    """What the client is told about `exc`: its own message when it is an expected error, else
    the generic one from `internal_error`."""
    if status_of(exc) is INTERNAL:
        return internal_error(exc, where)
    return str(exc)
