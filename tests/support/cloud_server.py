"""An in-process cloud verifier on a real gRPC server (loopback, port 0), for integration tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from cloud_node.servicer import create_server


@contextlib.contextmanager
def serving(core: Any) -> Iterator[str]:
    """Serve `core` (a `cloud_node.verifier.VerifierCore`) on 127.0.0.1; yields its address."""
    server, port = create_server(core, "127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
