"""Ray Serve hosting of the cloud verifier, with Serve's own gRPC proxy as the ingress.

Guarantees:
- The target runs in a Serve deployment (`CloudVerifierDeployment`) with a configurable number
  of replicas; each replica owns a `VerifierCore` (one model, one lock, its own KV budget).
- A Verify stream is one Serve request: the proxy forwards the whole bidirectional stream to ONE
  replica (the method receives a `gRPCInputStream`), so every round of a session reaches the
  replica that holds its KV cache (stickiness by construction). The stream's end, for any
  reason (client close, cancel, error), closes the session on that replica.
- If a replica dies, its streams fail (the client sees a retryable status) and the client
  resumes on a new stream carrying its committed tokens; any replica can re-prefill them.
- Status codes: BadRequest -> INVALID_ARGUMENT, ResourceExhausted -> RESOURCE_EXHAUSTED, with
  the core's message, set on the Serve gRPC context before the error propagates.
- Health: `grpc.health.v1.Health/Check` is routed to a replica and answers SERVING for "" and
  the service (an unknown service gets NOT_FOUND); Serve's proxy serves reflection itself.
- `max_ongoing_requests` exceeds `max_sessions`, so the core's limit (RESOURCE_EXHAUSTED)
  answers before Serve would queue a stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import gRPCInputStream

from cloud_node.cpus import available_cpus
from cloud_node.servicer import (
    SERVICE_NAME,
    VerifyStream,
    chunk_to_proto,
    spec_from_proto,
    status_for,
)
from cloud_node.verifier import Limits, VerifierCore
from protos.tandem.v1 import cloud_pb2

log = logging.getLogger(__name__)

APP_NAME = "tandem-cloud"
SERVICER_FUNCTIONS = [
    "cloud_node.serve_app.add_cloud_verifier_bytes_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
_DONE = object()


def add_cloud_verifier_bytes_to_server(servicer: Any, server: Any) -> None:
    """Register CloudVerifier on Serve's proxy with requests left as serialized bytes.

    The proxy hands requests to replicas through Ray. Forwarding the serialized bytes costs less
    than pickling parsed messages, and the replica parses them itself, so a malformed message is
    answered by the replica's own status mapping rather than by the proxy. Importing this module
    also puts the descriptors in the proxy's pool for reflection.
    """
    handlers = {
        "Verify": grpc.stream_stream_rpc_method_handler(
            servicer.Verify, request_deserializer=None,
            response_serializer=cloud_pb2.VerifyResponse.SerializeToString),
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=None,
            response_serializer=cloud_pb2.GenerateResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _log_to_stderr() -> None:
    """Our INFO logs (model load, kernel choice, evictions) into the replica's worker log."""
    logger = logging.getLogger("cloud_node")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _after(step: Future[Any] | None, fn: Callable[[], Any]) -> None:
    """Run fn now, or once `step` finishes: a cancelled await leaves a pool step running, and
    closing a session (or generator) under it would race with it."""
    if step is None or step.done():
        fn()
    else:
        step.add_done_callback(lambda _: fn())


def _parse(message: Any, cls: Any) -> Any:
    return cls.FromString(message) if isinstance(message, bytes) else message


def _fail(grpc_context: Any, exc: BaseException) -> None:
    """Put the client-facing status on the Serve context; the caller re-raises."""
    status = status_for(exc)
    if status is not None:
        grpc_context.set_code(status[0])
        grpc_context.set_details(status[1])


@serve.deployment(name="CloudVerifier")
class CloudVerifierDeployment:
    """One replica: a VerifierCore, its CPU work on a thread pool off the replica's event loop."""

    def __init__(self, model_dir: str, dtype: str, limits: Limits, model_name: str | None = None,
                 threads: int = 0) -> None:
        _log_to_stderr()
        import torch

        # Ray pins OMP_NUM_THREADS to the actor's num_cpus (1 by default); the target's matmuls
        # want the node's cores. threads == 0 means all this process may use: its affinity and
        # its cgroup's CPU quota (a pod's limit), never the host's core count.
        torch.set_num_threads(threads or available_cpus())
        # The Ray actor name plus the process id: enough to find (or, in fault tests, kill) it.
        replica = f"{serve.get_replica_context().replica_id.to_full_id_str()} pid={os.getpid()}"
        self.core = VerifierCore.load(model_dir, dtype=dtype, limits=limits, model_name=model_name,
                                      replica=replica)
        self._pool = ThreadPoolExecutor(max_workers=limits.max_sessions + 2, thread_name_prefix="verifier")
        log.info("replica %s ready (torch threads %d)", replica, torch.get_num_threads())

    async def Verify(self, requests: gRPCInputStream,
                     grpc_context: Any) -> AsyncIterator[cloud_pb2.VerifyResponse]:
        stream = VerifyStream(self.core)
        step: Future[Any] | None = None
        try:
            async for request in requests:
                step = self._pool.submit(stream.handle, _parse(request, cloud_pb2.VerifyRequest))
                try:
                    response = await asyncio.wrap_future(step)
                except Exception as exc:
                    _fail(grpc_context, exc)
                    raise
                yield response
                if stream.finished:
                    return
        finally:
            _after(step, stream.close)

    async def Generate(self, request: cloud_pb2.GenerateRequest,
                       grpc_context: Any) -> AsyncIterator[cloud_pb2.GenerateResponse]:
        spec = spec_from_proto(_parse(request, cloud_pb2.GenerateRequest).session)
        opening = self._pool.submit(self.core.generate, spec)
        try:
            chunks = await asyncio.wrap_future(opening)
        except asyncio.CancelledError:  # the session may still open: close it once it has
            _after(opening, lambda: None if opening.exception() else opening.result().close())
            raise
        except Exception as exc:
            _fail(grpc_context, exc)
            raise
        step: Future[Any] | None = None
        try:
            while True:
                step = self._pool.submit(next, chunks, _DONE)
                chunk = await asyncio.wrap_future(step)
                if chunk is _DONE:
                    return
                yield chunk_to_proto(chunk)
        finally:
            _after(step, chunks.close)

    async def Check(self, request: Any, grpc_context: Any) -> Any:
        from grpc_health.v1 import health_pb2

        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            raise KeyError(request.service)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        """Reports the current status once (a replica has no status changes to stream)."""
        yield await self.Check(request, grpc_context)


def build_app(model_dir: str | Path, *, dtype: str, limits: Limits, replicas: int = 1,
              num_cpus: float = 1.0, model_name: str | None = None, threads: int = 0) -> Any:
    """The Serve application (bound deployment)."""
    return CloudVerifierDeployment.options(  # type: ignore[attr-defined]
        num_replicas=replicas,
        max_ongoing_requests=limits.max_sessions + 4,  # a few health checks on top of the sessions
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(str(model_dir), dtype, limits, model_name, threads)


def start(model_dir: str | Path, *, grpc_port: int, http_port: int, dtype: str, limits: Limits,
          replicas: int = 1, num_cpus: float = 1.0, model_name: str | None = None, threads: int = 0) -> None:
    """Start Serve (gRPC proxy on grpc_port) in the connected Ray cluster and deploy the app.

    Returns when the application is running. Ray must already be initialized.
    """
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    app = build_app(model_dir, dtype=dtype, limits=limits, replicas=replicas, num_cpus=num_cpus,
                    model_name=model_name, threads=threads)
    serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}")  # a route makes the proxies expose it
    log.info("deployed %s: %d replica(s) of %s", APP_NAME, replicas, model_dir)


def wait_healthy(address: str, timeout_s: float = 60.0) -> None:
    """Block until the gRPC health check through the proxy answers SERVING.

    Right after `serve.run` returns, the proxy may not know the application yet (NOT_FOUND) or
    may not listen yet (UNAVAILABLE); both are waited out until the deadline.
    """
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            left = deadline - time.monotonic()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=max(left, 0.1),
                                   wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE) or left <= 0:
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cloud node at {address} not serving after {timeout_s}s")
            time.sleep(0.1)
