"""After an outage, the edge's channel to the cloud is used again within about 2 s of the link's
return, however long the outage (`tandem.security.RECONNECT_OPTIONS`).

gRPC's own reconnect backoff grows x1.6 from 1 s (up to 120 s): after a 20 s outage its next
attempt came 4-7 s after the link was back (after a minute's outage, tens of seconds: a probe saw
the orchestrator's circuit stay open 45 s after a 30 s cut had ended). Here a real health server
sits behind the link shaper, reached through the edge's own `cloud_channel`; the link is down
for 20 s, then up, and the time to the first answered call is measured.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edge_node.config import EdgeConfig
from edge_node.servicer import cloud_channel
from netshape.shaper import LinkShaper

OUTAGE_S = 20.0
BOUND_S = 3.5  # an attempt at least every 2 s (RECONNECT_OPTIONS), plus a call's time and slack


@pytest.fixture()
def shaper() -> Iterator[LinkShaper]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with LinkShaper(f"127.0.0.1:{port}") as s:
            yield s
    finally:
        server.stop(None)


def _check(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        return True
    except grpc.RpcError:
        return False


def test_the_cloud_channel_is_used_again_soon_after_an_outage(shaper: LinkShaper) -> None:
    host, port = shaper.address
    channel = cloud_channel(EdgeConfig(cloud_address=f"{host}:{port}"))
    assert channel is not None
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert _check(stub)
        shaper.set_conditions(mode="down")
        shaper.drop_connections()
        end = time.monotonic() + OUTAGE_S
        while time.monotonic() < end:  # calls meanwhile, as the edge's answers would make
            assert not _check(stub)
            time.sleep(0.5)
        shaper.set_conditions(mode="up")
        back = time.monotonic()
        while not _check(stub):
            assert time.monotonic() - back < 30, "never reconnected"
            time.sleep(0.05)
        took = time.monotonic() - back
    print(f"reconnected {took:.2f} s after a {OUTAGE_S:.0f} s outage")
    assert took < BOUND_S, f"{took:.2f} s after the link came back"
