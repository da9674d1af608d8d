"""A gRPC server on 127.0.0.1 (port 0) for a test's own Orchestrator servicer (a fake)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from protos.tandem.v1 import orchestrator_pb2_grpc


@contextlib.contextmanager
def orchestrator_server(servicer: Any, workers: int = 4) -> Iterator[str]:
    """Serve `servicer` as tandem.v1.Orchestrator; yields its address, stops it on exit."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
