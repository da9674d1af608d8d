"""The SDK's exceptions: one per gRPC status an application can act on.

Guarantees: every failed call raises a `TandemError` (or a subclass) carrying the gRPC status:
`.code` is the `grpc.StatusCode`, `.details` the server's message, and `str(err)` reads
"CODE: details", e.g. "INVALID_ARGUMENT: options.max_new_tokens: must be <= 4096". Arguments
the SDK can reject before sending raise `ValueError` naming the argument instead. A call on a
client after its `close()` raises `ClientClosed` (code CANCELLED) and sends nothing.

Example:
    >>> try:
    ...     client.complete(prompt="hi", max_new_tokens=10**6)
    ... except tandem_sdk.InvalidArgument as err:
    ...     print(err.details)
"""

from __future__ import annotations

import grpc


class TandemError(Exception):
    """A call failed with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(TandemError):
    """The server rejected the request; `details` names the field."""


class Unavailable(TandemError):
    """The orchestrator (or a peer behind it) cannot serve now; retried before raising."""


class DeadlineExceeded(TandemError):
    """The call's deadline passed before it completed."""


class NotFound(TandemError):
    """An unknown id, e.g. a document that does not exist."""


class ResourceExhausted(TandemError):
    """The orchestrator is busy (too many requests at once); try again later, after
    `retry_after_s` seconds when the orchestrator said (None when it did not)."""

    retry_after_s: float | None = None


class AuthenticationError(TandemError):
    """The orchestrator wants an API key and got none or a wrong one (UNAUTHENTICATED): pass
    `api_key=` to the client. `details` says which, never the key."""


class FailedPrecondition(TandemError):
    """The request contradicts the orchestrator's state (e.g. an idempotency key reused for
    another document, or personal documents turned off)."""


class ClientClosed(TandemError):
    """A call on a client after its `close()` (or after its `with` block); nothing was sent. The
    code is CANCELLED, as for a stream that `close()` cut short."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.CANCELLED, "the client is closed; open a new one")


_BY_CODE: dict[grpc.StatusCode, type[TandemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
}


def error_for(code: grpc.StatusCode, details: str) -> TandemError:
    """The exception class that matches `code`, built with `details`."""
    return _BY_CODE.get(code, TandemError)(code, details)


def from_rpc_error(err: grpc.RpcError) -> TandemError:
    """Translate a grpc (sync or aio) `RpcError` into a `TandemError`."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    error = error_for(code, details or str(err) or code.name.lower())
    if isinstance(error, ResourceExhausted):
        error.retry_after_s = _pushback_s(err)
    return error


def _pushback_s(err: grpc.RpcError) -> float | None:
    """The server's retry hint (the `grpc-retry-pushback-ms` trailer), in seconds."""
    trailing = getattr(err, "trailing_metadata", None)
    try:
        pairs = trailing() if callable(trailing) else None
    except Exception:  # noqa: BLE001 - an error without metadata has no hint
        return None
    for key, value in pairs or ():
        if key == "grpc-retry-pushback-ms":
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            return int(text) / 1000.0 if text.isascii() and text.isdigit() else None
    return None
