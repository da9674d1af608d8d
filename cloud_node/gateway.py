"""The cloud's front door: TLS, per-device tokens and per-device session limits, before Serve.

Ray Serve's gRPC proxy (Serve 2.60) has no TLS option and listens on every interface. The
gateway is what edges connect to; it forwards each call, as bytes, to Serve's proxy.

Guarantees:
- TLS when given a certificate and key (TLS 1.2+, gRPC's defaults); mutual TLS when given a
  client CA: a device without a certificate signed by it cannot finish the handshake.
- With a token store, every CloudVerifier call needs `authorization: Bearer TOKEN`. Before
  anything is forwarded (so no session opens and no prefill runs): no or a wrong token ->
  UNAUTHENTICATED, a revoked one -> PERMISSION_DENIED, a device at its `max_sessions` open
  streams -> RESOURCE_EXHAUSTED. Health checks need no token (probes and load balancers).
- A revocation reaches the gateway within `tokens.RELOAD_S` (store re-read) and also ends the
  device's open streams with PERMISSION_DENIED within `2 * RELOAD_S`.
- Upstream, the token is removed and replaced by the gateway's secret (`tandem-gateway`
  metadata) and the token's public id (`tandem-device`). Each replica refuses a call without the
  secret (UNAUTHENTICATED, before opening a session), so Serve's own port is useless to anyone
  who bypasses the gateway.
- Statuses, details and trailing metadata from upstream pass through unchanged; a client that
  cancels cancels the upstream call. That holds when upstream ends a call while a request is
  still being forwarded: grpc.aio then replaces upstream's status with its own INTERNAL
  "Internal error from Core" (a write that failed), so the gateway keeps the status upstream
  sent first (`_FirstStatus`). A call that upstream broke off without any status is UNAVAILABLE
  with a request id. A fault in the gateway itself is INTERNAL with a request
  id (the traceback in its log), never the exception's text.
- A refused call (no or a bad token, a revoked one, a device at its session limit) gets its
  status before anything is forwarded, with a request id like every other status.
- No token, key or secret is logged or put in a status message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from cloud_node import metrics
from cloud_node.servicer import SERVICE_NAME
from cloud_node.status import new_request_id, with_id
from cloud_node.tokens import RELOAD_S, TokenChecker, TokenError, Verdict, load_records
from protos.tandem.v1 import cloud_pb2
from tandem.security import (
    AUTH_HEADER,
    HEALTH_PREFIX,
    SecurityError,
    ServerTls,
    add_port,
    bearer_from,
    check_bind,
    is_loopback,
    read_secret,
)

log = logging.getLogger(__name__)

GATEWAY_HEADER = "tandem-gateway"
DEVICE_HEADER = "tandem-device"
_DROP = {AUTH_HEADER, GATEWAY_HEADER, DEVICE_HEADER, "user-agent"}
_HEALTH = {"Check": (False, False), "Watch": (False, True)}
# What grpc.aio's client puts in place of the peer's status when writing a request fails because the
# peer has ended the call (grpc/aio/_call.py: `_write` -> `set_internal_error`).
_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")
_PEER_STATUS_S = 0.5  # how long the gateway waits for upstream's own status after that one


def secret_digest(secret: str) -> str:
    """What a replica keeps to check the gateway's secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _methods() -> dict[str, tuple[bool, bool]]:
    """Full method name -> (client streaming, server streaming), for the services forwarded."""
    service = cloud_pb2.DESCRIPTOR.services_by_name["CloudVerifier"]
    out = {f"/{SERVICE_NAME}/{m.name}": (m.client_streaming, m.server_streaming) for m in service.methods}
    out.update({f"{HEALTH_PREFIX}{name}": kind for name, kind in _HEALTH.items()})
    for version in ("v1", "v1alpha"):  # Serve's proxy serves reflection itself (a token is needed, as for any call)
        out[f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"] = (True, True)
    return out


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _settled(coroutine: Any) -> Any:
    """The value of a grpc.aio accessor whose answer is already there (it returns without
    suspending once the call has a status); None where it would have to wait."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    return None


class _FirstStatus:
    """The status upstream ended a call with: a failed write's INTERNAL may come before it (and
    is skipped) or after it (and replaces it in the call, not here)."""

    def __init__(self, call: Any) -> None:
        self.status: tuple[grpc.StatusCode, str, Any] | None = None
        call.add_done_callback(self._done)

    def _done(self, call: Any) -> None:  # run at each status set (grpc 1.85), or at the first only
        if self.status is None:
            code = _settled(call.code())
            details = _settled(call.details()) or ""
            if code is not None and (code, details) != _WRITE_FAILED:  # the peer's may still come
                self.status = (code, details, _settled(call.trailing_metadata()))

    async def peer(self, call: Any, within_s: float = _PEER_STATUS_S) -> tuple[grpc.StatusCode, str, Any] | None:
        """The status upstream sent, waiting up to `within_s` for it where the failed write's came
        first; None if none came."""
        deadline = asyncio.get_running_loop().time() + within_s
        while self.status is None:
            code, details = await call.code(), await call.details()
            if (code, details) != _WRITE_FAILED:  # set again since (where callbacks run once)
                return code, details, await call.trailing_metadata()
            if asyncio.get_running_loop().time() >= deadline:
                return None
            await asyncio.sleep(0.01)
        return self.status


@dataclass(eq=False)  # each lease is its own: hashed by identity
class _Lease:
    device: str | None
    call: Any = None
    first: _FirstStatus | None = None
    revoked: bool = False
    released: bool = field(default=False)


class Gateway:
    """Forwards CloudVerifier, Health and reflection calls to `upstream`, checking tokens first."""

    def __init__(self, upstream: str | None, *, secret: str, checker: TokenChecker | None = None,
                 tls: ServerTls | None = None) -> None:
        """`upstream` may be filled in later, before `start` (the cloud builds its gateway, and so
        checks its settings, before Serve's proxy has a port)."""
        self.upstream, self._secret, self.checker, self.tls = upstream, secret, checker, tls
        self.secret_digest = secret_digest(secret)  # what the replicas are told
        self._methods = _methods()
        self._open: Counter[str] = Counter()
        self._leases: set[_Lease] = set()
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.denied: Counter[str] = Counter()  # by status code name, for tests and status pages

    async def start(self, address: str) -> int:
        """Listen on `address` (HOST:PORT, port 0 picks one); returns the port."""
        if self.upstream is None:
            raise ValueError("the gateway's upstream is not set")
        self._channel = grpc.aio.insecure_channel(self.upstream, options=[("grpc.use_local_subchannel_pool", 1)])
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        self._server.add_generic_rpc_handlers((_Handler(self),))
        port = add_port(self._server, address, self.tls)
        if port == 0:
            raise OSError(f"cannot bind {address}")
        await self._server.start()
        if self.checker is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_revocations())
        log.info("gateway on %s (%s, %s) -> %s", address.rsplit(":", 1)[0] + f":{port}",
                 "TLS" if self.tls else "plaintext", "tokens" if self.checker else "no tokens", self.upstream)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._channel is not None:
            await self._channel.close()

    def open_streams(self, device: str) -> int:
        return self._open[device]

    async def _watch_revocations(self) -> None:
        assert self.checker is not None
        while True:
            await asyncio.sleep(RELOAD_S)
            for lease in list(self._leases):
                if lease.device is not None and self.checker.revoked(lease.device) and not lease.revoked:
                    lease.revoked = True
                    if lease.call is not None:
                        lease.call.cancel()

    def _admit(self, method: str, metadata: Any) -> _Lease:
        """The call's lease; raises _Denied before anything is forwarded."""
        if self.checker is None or method.startswith(HEALTH_PREFIX):
            return _Lease(None)
        token = bearer_from(metadata)
        if token is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED,
                          "missing credential: send this device's token as 'authorization: Bearer TOKEN'")
        verdict, record = self.checker.check(token)
        if verdict is Verdict.UNKNOWN or record is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        if verdict is Verdict.REVOKED:
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED, f"token {record.id} ({record.name}) was revoked")
        if self._open[record.id] >= record.max_sessions:
            raise _Denied(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"token {record.id} has {self._open[record.id]} sessions open, its limit; close one first")
        self._open[record.id] += 1
        lease = _Lease(record.id)
        self._leases.add(lease)
        return lease

    def _release(self, lease: _Lease) -> None:
        if lease.device is not None and not lease.released:
            lease.released = True
            self._open[lease.device] -= 1
            if self._open[lease.device] <= 0:
                del self._open[lease.device]
            self._leases.discard(lease)

    def _upstream_metadata(self, metadata: Any, lease: _Lease) -> tuple[tuple[str, Any], ...]:
        kept = tuple((k, v) for k, v in (metadata or ()) if k.lower() not in _DROP and not k.startswith((":", "grpc-")))
        extra = ((GATEWAY_HEADER, self._secret),) + (((DEVICE_HEADER, lease.device),) if lease.device else ())
        return kept + extra

    def handle(self, method: str) -> Any:
        kind = self._methods.get(method)
        if kind is None:
            return None
        client_streaming, server_streaming = kind
        maker = getattr(grpc, f"{'stream' if client_streaming else 'unary'}_"
                              f"{'stream' if server_streaming else 'unary'}_rpc_method_handler")
        if server_streaming:
            return maker(_guarded_stream(self._streaming(method, client_streaming)))
        return maker(_guarded_unary(self._unary(method, client_streaming)))

    def _open_call(self, method: str, client_streaming: bool, server_streaming: bool, request: Any,
                   context: grpc.aio.ServicerContext, lease: _Lease) -> Any:
        assert self._channel is not None
        kind = f"{'stream' if client_streaming else 'unary'}_{'stream' if server_streaming else 'unary'}"
        factory: Callable[..., Any] = getattr(self._channel, kind)(method)
        remaining = context.time_remaining()
        call = factory(request, metadata=self._upstream_metadata(context.invocation_metadata(), lease),
                       timeout=remaining if remaining is not None and remaining < 1e6 else None)
        lease.call, lease.first = call, _FirstStatus(call)
        return call

    async def _finish(self, context: grpc.aio.ServicerContext, call: Any, lease: _Lease,
                      error: grpc.aio.AioRpcError | None) -> None:
        if lease.revoked:
            self.denied["PERMISSION_DENIED"] += 1
            metrics.record_gateway_refusal("PERMISSION_DENIED")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"token {lease.device} was revoked")
        if error is not None:
            code, details, trailing = error.code(), error.details() or "", error.trailing_metadata()
            if (code, details) == _WRITE_FAILED:
                first = await lease.first.peer(call) if lease.first is not None else None
                if first is None:
                    request_id = new_request_id()
                    log.warning("request %s: the verifier ended a call while a request was being forwarded, "
                                "without a status", request_id)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, with_id(
                        "the verifier ended the call while a request was being forwarded; open a new stream",
                        request_id))
                code, details, trailing = first
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            if code != grpc.StatusCode.OK:
                await context.abort(code, details)
            return
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(tuple(trailing))

    def _denied(self, exc: _Denied) -> str:
        """Count and log a refusal; its client-facing details, with a request id as every status has."""
        self.denied[exc.code.name] += 1
        metrics.record_gateway_refusal(exc.code.name)
        request_id = new_request_id()
        log.info("refused a call: %s (request id %s)", exc.code.name, request_id)
        return with_id(exc.message, request_id)

    def _streaming(self, method: str, client_streaming: bool) -> Callable[..., AsyncIterator[Any]]:
        async def forward(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                lease = self._admit(method, context.invocation_metadata())
            except _Denied as exc:
                await context.abort(exc.code, self._denied(exc))
            call, error = None, None
            try:
                call = self._open_call(method, client_streaming, True, request, context, lease)
                try:
                    async for reply in call:
                        yield reply
                except grpc.aio.AioRpcError as exc:
                    error = exc
                except asyncio.CancelledError:
                    if not lease.revoked:  # the client went away: nothing to answer
                        raise
                await self._finish(context, call, lease, error)
            finally:
                if call is not None and not call.done():
                    call.cancel()
                self._release(lease)

        return forward

    def _unary(self, method: str, client_streaming: bool) -> Callable[..., Any]:
        async def forward(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                lease = self._admit(method, context.invocation_metadata())
            except _Denied as exc:
                await context.abort(exc.code, self._denied(exc))
            call, error, reply = None, None, None
            try:
                call = self._open_call(method, client_streaming, False, request, context, lease)
                try:
                    reply = await call
                except grpc.aio.AioRpcError as exc:
                    error = exc
                except asyncio.CancelledError:
                    if not lease.revoked:
                        raise
                await self._finish(context, call, lease, error)
                return reply
            finally:
                if call is not None and not call.done():
                    call.cancel()
                self._release(lease)

        return forward


async def _internal(context: grpc.aio.ServicerContext) -> None:
    request_id = new_request_id()
    log.error("request %s: internal error in the gateway", request_id, exc_info=True)
    await context.abort(grpc.StatusCode.INTERNAL, with_id("internal error in the cloud's gateway", request_id))


def _guarded_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """A gateway fault is INTERNAL with a request id (its traceback in the log), never its text."""
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - see the docstring
            await _internal(context)

    return call


def _guarded_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - see _guarded_stream
            await _internal(context)

    return call


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def service(self, handler_call_details: Any) -> Any:
        return self._gateway.handle(handler_call_details.method)


def replica_refusal(metadata: Any, digest: str | None) -> str | None:
    """For a replica: None when the call came through the gateway (or no gateway is configured),
    else the message of its UNAUTHENTICATED status."""
    if digest is None:
        return None
    for key, value in metadata or ():
        if str(key).lower() == GATEWAY_HEADER:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if hmac.compare_digest(secret_digest(text), digest):
                return None
    return "this address is the cloud's internal port; connect through the cloud's gateway"


def build(config: Any, upstream: str | None, secret: str) -> Gateway:  # config: cloud_node.config.GatewayConfig
    """A Gateway from its config; SecurityError (exit 2 in the CLIs) for an unsafe or broken setting."""
    tls = ServerTls.from_flags("cloud gateway", config.tls_cert, config.tls_key, config.tls_client_ca)
    check_bind("cloud gateway", config.host, tls=tls is not None, credential=config.tokens_file is not None,
               insecure=config.insecure)
    checker = None
    if config.tokens_file is not None:
        try:
            load_records(config.tokens_file)
        except TokenError as exc:
            raise SecurityError(str(exc)) from None
        checker = TokenChecker(config.tokens_file)
    if config.insecure and not is_loopback(config.host):
        log.warning("the gateway listens on %s %s: INSECURE, as --insecure asked", config.host,
                    "without TLS" if tls is None else "without tokens" if checker is None else "")
    return Gateway(upstream, secret=secret, checker=checker, tls=tls)


def gateway_secret(config: Any) -> str:
    """The secret from --gateway-secret-file, else a fresh random one."""
    text = read_secret(file=config.gateway_secret_file, what="gateway_secret_file")
    return text if text is not None else secrets.token_urlsafe(32)


class InThread:
    """A gateway on its own event loop thread (for `tandem serve cloud`, whose main thread runs Ray)."""

    def __init__(self, gateway: Gateway, address: str) -> None:
        self.gateway = gateway
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cloud-gateway", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(gateway.start(address), self._loop).result(timeout=30)

    def stop(self, grace_s: float | None = 1.0) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.gateway.stop(grace_s), self._loop).result(timeout=(grace_s or 0) + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
