"""The Serve replica's wait for a Verify stream's next request (`serve_app._next_request`), on a
fake request stream (pure asyncio logic; the Ray path itself runs in test_cloud_ray): a silent
client is cut at the idle limit, a drain ends the wait, and a request in time is returned."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from cloud_node.errors import Draining, SessionIdle
from cloud_node.protocol import Admission
from cloud_node.serve_app import _next_request


async def _after(delay_s: float, item: bytes = b"round") -> AsyncIterator[bytes]:
    await asyncio.sleep(delay_s)
    yield item


def test_a_silent_stream_raises_session_idle_at_the_limit() -> None:
    t0 = time.monotonic()
    with pytest.raises(SessionIdle, match="no request for 0.3 s"):
        asyncio.run(_next_request(_after(60), Admission(), idle_s=0.3))
    assert 0.3 <= time.monotonic() - t0 < 1.0


def test_a_request_within_the_limit_is_returned() -> None:
    assert asyncio.run(_next_request(_after(0.1), Admission(), idle_s=0.5)) == b"round"


def test_a_drain_ends_the_wait_before_the_idle_limit() -> None:
    admission = Admission()
    admission.draining.set()
    t0 = time.monotonic()
    with pytest.raises(Draining):
        asyncio.run(_next_request(_after(60), admission, idle_s=30))
    assert time.monotonic() - t0 < 1.0
