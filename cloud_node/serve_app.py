"""Ray Serve hosting of the cloud verifier, with Serve's own gRPC proxy as the ingress.

Guarantees:
- The target runs in a Serve deployment (`CloudVerifierDeployment`) with a configurable number
  of replicas; each replica owns a `VerifierCore` (one model whose batcher packs every open
  session's rounds into shared forward passes, its own KV budget and prefix cache).
- A Verify stream is one Serve request: the proxy forwards the whole bidirectional stream to ONE
  replica (the method receives a `gRPCInputStream`), so every round of a session reaches the
  replica that holds its KV cache (stickiness by construction). The stream's end, for any
  reason (client close, cancel, error, a cancel while the session opens), closes the session.
- If a replica dies, its streams fail (UNAVAILABLE) and the client resumes on a new stream
  carrying its committed tokens; any replica can re-prefill them.
- Status codes: the replica parses the forwarded bytes itself (`cloud_node.protocol.parse`) and
  maps every failure with `cloud_node.status.status_for`, setting the code and a one-line
  message with a request id on Serve's gRPC context; the proxy passes them on. What Serve itself
  would answer with exception text (a dead replica's traceback, with its pid, address and actor
  id) is rewritten in the proxy by `cloud_node.serve_proxy`. `SessionOpened.replica` is Serve's
  opaque replica tag; the replica's log line `replica TAG is ... pid=...` maps it.
- Idle: a Verify stream whose client sends nothing for `Limits.idle_s` ends with UNAVAILABLE
  (`cloud_node.protocol.idle`) and its session closes, so silent clients cannot hold the
  replica's session slots.
- Health: `grpc.health.v1.Health/Check` is routed to a replica and answers SERVING for "" and
  the service (an unknown service gets NOT_FOUND), NOT_SERVING once the replica drains; Serve's
  proxy serves reflection itself.
- Drain: once told (the drain switch of `cloud_node.serve_drain`, which `python -m cloud_node`
  flips on SIGTERM, or the deployment's `user_config` `{"draining": true}` in a config deploy),
  a replica answers health NOT_SERVING, refuses new sessions with UNAVAILABLE, finishes the
  round in flight on each stream, then ends the stream with UNAVAILABLE "draining" (an idle
  stream within `_DRAIN_POLL_S`), so edges resume elsewhere. Serve gives a replica no signal
  when the controller alone stops it (scale-down, upgrade, `serve delete`): then Serve waits up
  to `graceful_shutdown_timeout_s` for the streams to end by themselves (checking every
  `graceful_shutdown_wait_loop_s`), and cuts those still open; the edge resumes them. No token
  is lost either way.
- Pinning (benchmarks): with `REPLICA_CPUS_ENV` set, a replica pins all its threads to those
  CPUs before loading the model (`threads` sets torch's thread count).
- `max_ongoing_requests` exceeds `max_sessions`, so the core's limit (RESOURCE_EXHAUSTED)
  answers before Serve would queue a stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import gRPCInputStream

from cloud_node.cpus import available_cpus
from cloud_node.errors import Draining, SessionGone, Unauthenticated, echo
from cloud_node.gateway import replica_refusal
from cloud_node.protocol import (
    DRAINING,
    Admission,
    VerifyStream,
    chunk_to_proto,
    close_generate,
    idle,
    open_generate,
)
from cloud_node.serve_drain import watch as watch_drain_switch
from cloud_node.serve_proxy import install_status_scrubber
from cloud_node.servicer import SERVICE_NAME
from cloud_node.servicer import add_cloud_verifier_bytes_to_server as _register
from cloud_node.status import new_request_id, status_for
from cloud_node.verifier import Limits, VerifierCore
from protos.tandem.v1 import cloud_pb2

log = logging.getLogger(__name__)

APP_NAME = "tandem-cloud"
SERVICER_FUNCTIONS = [
    "cloud_node.serve_app.add_cloud_verifier_bytes_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0  # `python -m cloud_node`'s drain period (deploy/ sets its own)
GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 0.5
_DRAIN_POLL_S = 0.25  # an idle stream notices a drain within this
# CPUs ("1", "2,3") every thread of each replica is pinned to before the model loads: what
# `tandem bench --split-cores` gives the cloud. Ray's workers inherit the node process's
# environment; Ray's helper processes never read it.
REPLICA_CPUS_ENV = "TANDEM_REPLICA_CPUS"
# The ends of streams are None, never an `object()` sentinel: Serve may pickle the deployment
# class by value, and a copied sentinel is not the module's own.


def add_cloud_verifier_bytes_to_server(servicer: Any, server: Any) -> None:
    """Register CloudVerifier on Serve's proxy: requests forwarded as bytes (cheaper than pickled
    messages through Ray, and parsed by the replica's own status mapping), and the statuses Serve
    writes itself scrubbed of exception text (`cloud_node.serve_proxy`)."""
    install_status_scrubber(server, SERVICE_NAME)
    _register(servicer, server)


def _log_to_stderr() -> None:
    """Our INFO logs (model load, kernel choice, evictions) into the replica's worker log."""
    logger = logging.getLogger("cloud_node")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _pin_from_env() -> None:
    """Pin every thread of this replica process to the CPUs in REPLICA_CPUS_ENV, when set (a
    thread's affinity is its own in Linux; threads started later inherit their creator's)."""
    text = os.environ.get(REPLICA_CPUS_ENV, "").strip()
    if not text:
        return
    cpus = {int(c) for c in text.split(",")}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    log.info("replica pid=%d pinned to CPUs %s", os.getpid(), sorted(cpus))


def _fail(grpc_context: Any, exc: Exception, request_id: str) -> NoReturn:
    """Put the client-facing status on the Serve context and end the call."""
    status = status_for(exc, request_id)
    grpc_context.set_code(status.code)
    grpc_context.set_details(status.details)
    raise RuntimeError(status.details) from None


def _close_when_opened(opening: Future[Any], core: VerifierCore) -> None:
    """Close what `opening` opens, now or once it has (a cancelled await leaves it running)."""
    def close(_: Any = None) -> None:
        if not opening.cancelled() and opening.exception() is None:
            close_generate(core, opening.result())

    opening.add_done_callback(close)


async def _next_request(requests: AsyncIterator[Any], admission: Admission, idle_s: float) -> Any:
    """The next request (bytes), or None at the end; raises Draining if the replica drains while it
    waits, SessionIdle if none comes within `idle_s`.

    Serve forwards the client's end of stream as one more item (grpc.aio's EOF sentinel, a bare
    object after pickling): anything but bytes or a message is the end. A stream that breaks
    under us (the proxy gone) is SessionGone, not a server fault."""
    waiting = asyncio.ensure_future(anext(requests, None))
    deadline = time.monotonic() + idle_s
    try:
        while True:
            if (left := deadline - time.monotonic()) <= 0:
                raise idle(idle_s)
            done, _ = await asyncio.wait({waiting}, timeout=min(_DRAIN_POLL_S, left))
            if done:
                try:
                    item = waiting.result()
                except Exception as exc:  # noqa: BLE001 - e.g. ActorDiedError of the proxy
                    raise SessionGone(f"request stream: broke ({type(exc).__name__})") from None
                return item if isinstance(item, bytes | bytearray | memoryview | Message) else None
            if admission.draining.is_set():
                raise Draining(DRAINING)
    finally:
        if not waiting.done():
            waiting.cancel()


@serve.deployment(name="CloudVerifier", user_config={"draining": False},
                  graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
                  graceful_shutdown_wait_loop_s=GRACEFUL_SHUTDOWN_WAIT_LOOP_S)
class CloudVerifierDeployment:
    """One replica: a VerifierCore, its CPU work on a thread pool off the replica's event loop."""

    def __init__(self, model_dir: str, dtype: str, limits: Limits, model_name: str | None = None,
                 threads: int = 0, gateway_digest: str | None = None) -> None:
        _log_to_stderr()
        _pin_from_env()  # before torch sizes its thread pool
        self._gateway_digest = gateway_digest
        import torch

        # Ray pins OMP_NUM_THREADS to the actor's num_cpus (1 by default); the target's matmuls
        # want the node's cores. threads == 0 means all this process may use: its affinity and
        # its cgroup's CPU quota (a pod's limit), never the host's core count.
        torch.set_num_threads(threads or available_cpus())
        context = serve.get_replica_context()
        replica = context.replica_tag  # opaque; the log line below maps it to the process
        self.core = VerifierCore.load(model_dir, dtype=dtype, limits=limits, model_name=model_name,
                                      replica=replica)
        self.admission = Admission()
        self._pool = ThreadPoolExecutor(max_workers=limits.max_sessions + 2, thread_name_prefix="verifier")
        log.info("replica %s is %s pid=%d, ready (torch threads %d)", replica,
                 context.replica_id.to_full_id_str(), os.getpid(), torch.get_num_threads())
        watch_drain_switch(self.drain)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config: `{"draining": true}` starts the drain (it is never undone)."""
        if config.get("draining"):
            self.drain()

    def drain(self) -> None:
        if not self.admission.draining.is_set():
            log.info("replica %s draining: %d open sessions", self.core.replica, len(self.core.store))
            self.admission.draining.set()

    def _through_gateway(self, grpc_context: Any) -> None:
        """Raises Unauthenticated for a call that bypassed the gateway (before any session opens)."""
        refusal = replica_refusal(grpc_context.invocation_metadata(), self._gateway_digest)
        if refusal is not None:
            raise Unauthenticated(refusal)

    async def Verify(self, requests: gRPCInputStream,
                     grpc_context: Any) -> AsyncIterator[cloud_pb2.VerifyResponse]:
        request_id, stream = new_request_id(), VerifyStream(self.core, self.admission)
        try:
            self._through_gateway(grpc_context)
            while (data := await _next_request(requests, self.admission, self.core.limits.idle_s)) is not None:
                if self.admission.draining.is_set():
                    raise Draining(DRAINING)
                for response in await asyncio.wrap_future(self._pool.submit(stream.responses, data)):
                    yield response
                if stream.finished:
                    return
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, here
            _fail(grpc_context, exc, request_id)
        finally:
            stream.close()  # safe while a step still runs: the session closes once it exists

    async def Generate(self, request: Any, grpc_context: Any) -> AsyncIterator[cloud_pb2.GenerateResponse]:
        request_id = new_request_id()
        try:
            self._through_gateway(grpc_context)
        except Unauthenticated as exc:
            _fail(grpc_context, exc, request_id)
        gone = threading.Event()  # the call has ended: a prefill still running stops
        opening = self._pool.submit(open_generate, self.core, self.admission, request, gone.is_set)
        try:
            chunks = await asyncio.wrap_future(opening)
            while (chunk := await asyncio.wrap_future(self._pool.submit(next, chunks, None))) is not None:
                yield chunk_to_proto(chunk)
                if self.admission.draining.is_set() and not chunk.finished:
                    raise Draining(DRAINING)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, here
            _fail(grpc_context, exc, request_id)
        finally:
            gone.set()
            _close_when_opened(opening, self.core)

    async def Check(self, request: Any, grpc_context: Any) -> Any:
        from grpc_health.v1 import health_pb2

        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {echo(request.service)}")
            raise KeyError("unknown service")
        serving = not self.admission.draining.is_set()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Watch(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        """Reports the current status once (a replica streams no status changes)."""
        yield await self.Check(request, grpc_context)


def build_app(model_dir: str | Path, *, dtype: str, limits: Limits, replicas: int = 1,
              num_cpus: float = 1.0, model_name: str | None = None, threads: int = 0,
              gateway_digest: str | None = None) -> Any:
    """The Serve application (bound deployment); with `gateway_digest` (`gateway.secret_digest` of
    the gateway's secret) each replica refuses calls that did not come through the gateway."""
    return CloudVerifierDeployment.options(  # type: ignore[attr-defined]
        num_replicas=replicas,
        max_ongoing_requests=limits.max_sessions + 4,  # a few health checks on top of the sessions
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(str(model_dir), dtype, limits, model_name, threads, gateway_digest)


def start(model_dir: str | Path, *, grpc_port: int, http_port: int, dtype: str, limits: Limits,
          replicas: int = 1, num_cpus: float = 1.0, model_name: str | None = None, threads: int = 0,
          gateway_digest: str | None = None) -> None:
    """Start Serve (gRPC proxy on grpc_port) in the connected Ray cluster and deploy the app.

    Returns when the application is running. Ray must already be initialized.
    """
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS),
    )
    app = build_app(model_dir, dtype=dtype, limits=limits, replicas=replicas, num_cpus=num_cpus,
                    model_name=model_name, threads=threads, gateway_digest=gateway_digest)
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
