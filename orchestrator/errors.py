"""Errors the orchestrator's core raises; the gRPC and HTTP adapters translate them.

Guarantees: every error names what went wrong in one line. `BadRequest` names the request field
(gRPC INVALID_ARGUMENT, HTTP 400); `Unavailable` means a peer (edge node or cloud) cannot serve
now (gRPC UNAVAILABLE, HTTP 503); `NotFound` is an unknown document id (NOT_FOUND, HTTP 404);
`Busy` means too many requests at once (RESOURCE_EXHAUSTED, HTTP 429); `DeadlineExceeded` is a
request past its deadline (DEADLINE_EXCEEDED, HTTP 504).
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class; `str(err)` is the message for the client."""


class BadRequest(OrchestratorError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unavailable(OrchestratorError):
    pass


class NotFound(OrchestratorError):
    pass


class Busy(OrchestratorError):
    pass


class DeadlineExceeded(OrchestratorError):
    pass
