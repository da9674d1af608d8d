"""The edge's `/metrics` port with a key: the Authorization header is read as every other server
reads it (`tandem.security.bearer_from`): the scheme in any case, never a bare key."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from edge_node.metrics import MetricsServer

KEY = "k3y-for-the-metrics-port-0123456789"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = MetricsServer("127.0.0.1", 0, tls=None, key=KEY, insecure=False).start()
    yield server.port
    server.stop()


def _status(port: int, authorization: str | None) -> int:
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize(("authorization", "status"), [
    (f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"BEARER {KEY}", 200),
    (KEY, 401),  # a bare key: no scheme
    (f"Basic {KEY}", 401), (f"Bearer {KEY}x", 401), (None, 401), ("Bearer ", 401),
])
def test_the_key_is_read_as_a_bearer_token(port: int, authorization: str | None, status: int) -> None:
    assert _status(port, authorization) == status
