"""The cloud verifier on a plain grpcio server: transport only; the protocol is `cloud_node.protocol`.

Guarantees:
- Requests arrive as bytes and are parsed by `protocol.parse`, so an undecodable message is
  INVALID_ARGUMENT (grpcio would answer INTERNAL). Every failure's status comes from
  `cloud_node.status.status_for`: the client gets a one-line message and a request id, the log
  gets the details; an unexpected exception is INTERNAL with a generic message.
- A Verify stream's session is closed when the stream ends for any reason: finished, failed,
  cancelled or abandoned by the client, including while its open is still running. A Generate
  call's session likewise.
- `create_server` registers the CloudVerifier service, `grpc.health.v1` health (SERVING for ""
  and the service name) and server reflection; it never starts the server. Beyond
  `max_sessions + 8` concurrent calls the server answers RESOURCE_EXHAUSTED instead of queueing.
- Drain (`CloudServer.drain`, run by SIGTERM handlers): health turns NOT_SERVING at once; new
  sessions get UNAVAILABLE "draining"; each open stream finishes the round in flight, then ends
  with UNAVAILABLE "draining" (idle streams at once), so the edge resumes on another replica
  with its committed tokens; `drain` returns when no session is left or the drain period ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from cloud_node.errors import Draining
from cloud_node.protocol import (
    DRAINING,
    MAX_MESSAGE_BYTES,
    Admission,
    VerifyStream,
    chunk_to_proto,
    close_generate,
    idle,
    open_generate,
)
from cloud_node.status import new_request_id, status_for
from cloud_node.verifier import VerifierCore
from protos.tandem.v1 import cloud_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = cloud_pb2.DESCRIPTOR.services_by_name["CloudVerifier"].full_name
_END, _DRAIN = object(), object()


def add_cloud_verifier_bytes_to_server(servicer: Any, server: Any) -> None:
    """Register CloudVerifier with requests left as serialized bytes (the servicer parses them).

    Used by the plain server and by Serve's proxy (`cloud_node.serve_app`), whose replicas
    parse the forwarded bytes. Importing this module puts the descriptors in the pool for
    reflection.
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


class _Inbox:
    """A stream's requests, read on their own thread into a queue, so the servicer can also be
    woken by a drain while it waits for the client's next round."""

    def __init__(self, requests: Iterator[bytes]) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        threading.Thread(target=self._read, args=(requests,), daemon=True, name="cloud-inbox").start()

    def _read(self, requests: Iterator[bytes]) -> None:
        try:
            for request in requests:
                self._queue.put(request)
        except grpc.RpcError:  # the client cancelled, or the call ended
            pass
        finally:
            self._queue.put(_END)

    def get(self, timeout_s: float) -> object:
        """The next request, _END or _DRAIN; raises SessionIdle after `timeout_s` with none."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            raise idle(timeout_s) from None

    def wake_for_drain(self) -> None:
        self._queue.put(_DRAIN)


def _abort(context: grpc.ServicerContext, exc: Exception, request_id: str) -> None:
    status = status_for(exc, request_id)
    context.abort(status.code, status.details)


class CloudVerifierServicer:
    """Translates CloudVerifier calls (bytes in) into `cloud_node.protocol` calls."""

    def __init__(self, core: VerifierCore, admission: Admission | None = None) -> None:
        self.core = core
        self.admission = admission or Admission()
        self._inboxes: set[_Inbox] = set()
        self._lock = threading.Lock()

    def Verify(self, request_iterator: Iterator[bytes],
               context: grpc.ServicerContext) -> Iterator[cloud_pb2.VerifyResponse]:
        request_id, stream = new_request_id(), VerifyStream(self.core, self.admission)
        context.add_callback(stream.close)  # also on cancellation while a call is running
        inbox = self._track(_Inbox(request_iterator))
        try:
            while (data := inbox.get(self.core.limits.idle_s)) is not _END:
                if data is _DRAIN or self.admission.draining.is_set():
                    raise Draining(DRAINING)
                yield from stream.responses(data)
                if stream.finished:
                    return
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, here
            _abort(context, exc, request_id)
        finally:
            self._untrack(inbox)
            stream.close()

    def Generate(self, request: bytes, context: grpc.ServicerContext) -> Iterator[cloud_pb2.GenerateResponse]:
        request_id, chunks = new_request_id(), None
        try:
            chunks = open_generate(self.core, self.admission, request, cancelled=lambda: not context.is_active())
            if not context.add_callback(chunks.close):  # cancelled while it opened
                return
            for chunk in chunks:
                yield chunk_to_proto(chunk)
                if self.admission.draining.is_set() and not chunk.finished:
                    raise Draining(DRAINING)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, here
            _abort(context, exc, request_id)
        finally:
            if chunks is not None:
                close_generate(self.core, chunks)

    def wake_streams_for_drain(self) -> None:
        with self._lock:
            inboxes = list(self._inboxes)
        for inbox in inboxes:
            inbox.wake_for_drain()

    def _track(self, inbox: _Inbox) -> _Inbox:
        with self._lock:
            self._inboxes.add(inbox)
        return inbox

    def _untrack(self, inbox: _Inbox) -> None:
        with self._lock:
            self._inboxes.discard(inbox)


@dataclass
class CloudServer:
    """A plain grpcio cloud server (not started) and what draining it needs."""

    server: grpc.Server
    port: int
    servicer: CloudVerifierServicer
    health: Any  # grpc_health.v1.health.HealthServicer

    def drain(self, timeout_s: float) -> float:
        """Stop admitting, let rounds in flight finish, end every stream with UNAVAILABLE.

        Returns the seconds it took until no session was left (or `timeout_s`)."""
        t0 = time.monotonic()
        self.servicer.admission.draining.set()
        self.health.enter_graceful_shutdown()
        log.info("draining: %d open sessions", len(self.servicer.core.store))
        self.servicer.wake_streams_for_drain()
        while len(self.servicer.core.store) and time.monotonic() - t0 < timeout_s:
            time.sleep(0.01)
        left = len(self.servicer.core.store)
        if left:
            log.warning("drain period of %.1fs over with %d sessions open; they end now", timeout_s, left)
        return time.monotonic() - t0

    def drain_and_stop(self, timeout_s: float) -> float:
        """`drain`, then stop the server (streams still open are cut); returns the drain's seconds."""
        took = self.drain(timeout_s)
        self.server.stop(max(0.0, timeout_s - took)).wait()
        return took


def add_standard_services(server: grpc.Server, service_names: list[str]) -> Any:
    """grpc.health.v1 (SERVING for "" and every name) and server reflection; returns the health servicer."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    health_servicer = health.HealthServicer()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    return health_servicer


def build_server(core: VerifierCore, address: str = "127.0.0.1:0", max_workers: int | None = None,
                 interceptors: Sequence[grpc.ServerInterceptor] = ()) -> CloudServer:
    """A grpcio server (not started) with the servicer, health and reflection."""
    # One worker per stream: more workers than sessions, so the session limit answers first.
    workers = max_workers or core.limits.max_sessions + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloud-grpc"),
                         interceptors=list(interceptors), maximum_concurrent_rpcs=workers,
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    servicer = CloudVerifierServicer(core)
    add_cloud_verifier_bytes_to_server(servicer, server)
    health = add_standard_services(server, [SERVICE_NAME])
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return CloudServer(server, port, servicer, health)


def create_server(core: VerifierCore, address: str = "127.0.0.1:0", max_workers: int | None = None,
                  interceptors: Sequence[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, int]:
    """A grpcio server (not started, as every node's) with the servicer, health and reflection; (server, port)."""
    built = build_server(core, address, max_workers, interceptors)
    return built.server, built.port

