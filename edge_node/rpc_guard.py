"""Error hygiene for every RPC of a grpcio server: what a client may see in a status.

Guarantees, for every service on a server built with `RpcGuard()` among its interceptors
(the edge node's service, health and reflection alike):
- Request bytes that do not decode as the method's message are answered INVALID_ARGUMENT
  ("request: ..."), never grpcio's INTERNAL "Exception deserializing request!": the guard's
  deserializer never raises, and the handler refuses what it could not decode.
- An exception a handler did not turn into a status itself is logged with its traceback and a
  request id, and the client gets INTERNAL "internal error (request id ID)" and nothing more:
  no exception text, traceback, path, pid or address (grpcio would answer UNKNOWN with the
  exception's text). `fault` does the same for server-side failures a servicer maps itself.
- The request id also travels in the trailing metadata (`tandem-request-id`).
A status a handler set with `context.abort` passes through unchanged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "tandem-request-id"


class _Undecodable:
    """What the guard's deserializer returns for bytes that are not the method's message."""


_UNDECODABLE = _Undecodable()


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def fault(context: grpc.ServicerContext, code: grpc.StatusCode, public: str, exc: BaseException | None) -> NoReturn:
    """End the RPC with `code` and `public` plus a fresh request id; the details go to the log."""
    rid = new_request_id()
    log.error("%s (request id %s)", public, rid, exc_info=exc)
    context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
    context.abort(code, f"{public} (request id {rid})")
    raise AssertionError("unreachable: abort raises")


def _refuse(context: grpc.ServicerContext, method: str) -> NoReturn:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid protobuf message for {method}")
    raise AssertionError("unreachable: abort raises")


def _unexpected(context: grpc.ServicerContext, method: str, exc: Exception) -> NoReturn:
    if context.code() is not None:  # the handler aborted: its status stands
        raise exc
    fault(context, grpc.StatusCode.INTERNAL, "internal error", exc)


def _total(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any failure to decode is the client's bad bytes
            return _UNDECODABLE
    return decode


def _guard_iter(responses: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
    try:
        yield from responses
    except Exception as exc:  # noqa: BLE001 - becomes a clean status
        _unexpected(context, method, exc)


def _guard_requests(requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
    for request in requests:
        if request is _UNDECODABLE:
            _refuse(context, method)
        yield request


def _guard(behavior: Callable[..., Any], method: str, *, request_streaming: bool) -> Callable[..., Any]:
    def guarded(request: Any, context: grpc.ServicerContext, *rest: Any) -> Any:
        if request_streaming:
            request = _guard_requests(request, context, method)
        elif request is _UNDECODABLE:
            _refuse(context, method)
        try:
            result = behavior(request, context, *rest)
        except Exception as exc:  # noqa: BLE001 - becomes a clean status
            _unexpected(context, method, exc)
        return _guard_iter(result, context, method) if isinstance(result, Iterator) else result

    # health's Watch runs non-blocking (a third argument, the send callback): keep that.
    if getattr(behavior, "experimental_non_blocking", False):
        guarded.experimental_non_blocking = True  # type: ignore[attr-defined]
    return guarded


class RpcGuard(grpc.ServerInterceptor):
    """See the module docstring."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method, des, ser = details.method, _total(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_guard(handler.unary_unary, method, request_streaming=False),
                                                       des, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_guard(handler.unary_stream, method, request_streaming=False),
                                                        des, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_guard(handler.stream_unary, method, request_streaming=True),
                                                        des, ser)
        return grpc.stream_stream_rpc_method_handler(_guard(handler.stream_stream, method, request_streaming=True),
                                                     des, ser)
