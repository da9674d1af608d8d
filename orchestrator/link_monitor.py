"""Watches the cloud link: periodic gRPC health probes, an RTT estimate and a circuit breaker.

Guarantees:
- One probe at a time, every `interval_s`, each bounded by `timeout_s`; a probe is a
  `grpc.health.v1.Health/Check` to the cloud address the edge node uses (through the same link),
  so its round-trip time is the link's RTT plus a trivial server step.
- A failed probe opens the circuit at once (threshold 1): with the link down, new requests route
  `local` within one probe interval. While open no probe is sent; once the open period ends the
  circuit is half-open and the next probe decides (success closes it, failure re-opens it with
  a doubled period). Requests that saw the link fail mid-answer report it (`report_failure`).
- `view()` is the routing policy's `LinkView`; `snapshot()` is what Status reports.
- With `tls` the probes go over TLS (`tandem.security.ClientTls`: the CA that signed the cloud's
  certificate); they carry no key, since every node exempts health from its API key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.security import RECONNECT_OPTIONS, ClientTls, secure_channel
from tandem_core.link_health import CIRCUIT_CLOSED, CircuitBreaker, RttEstimator
from tandem_core.routing import LinkView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkSnapshot:
    state: str                 # "up", "down" or "unknown"
    circuit: str
    rtt_ms: float | None
    jitter_ms: float | None
    consecutive_failures: int
    last_probe_age_s: float | None
    address: str | None


class LinkMonitor:
    def __init__(self, address: str | None, *, interval_s: float = 1.0, timeout_s: float = 1.0,
                 open_s: float = 5.0, tls: ClientTls | None = None) -> None:
        self.address = address
        self.tls = tls
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.breaker = CircuitBreaker(failure_threshold=1, open_s=open_s)
        self.rtt = RttEstimator()
        self._last_probe: float | None = None
        self._last_ok: bool | None = None
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self.probes = 0

    def start(self) -> None:
        if self.address is None or self._task is not None:
            return
        self._channel = secure_channel(self.address, self.tls, None, aio=True, options=RECONNECT_OPTIONS)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="link-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            if self.breaker.allow_probe(now):
                await self.probe_once()
                await asyncio.sleep(self.interval_s)
            else:
                await asyncio.sleep(min(self.interval_s, max(self.breaker.seconds_until_half_open(now), 0.01)))

    async def probe_once(self) -> bool:
        """One health check; updates the RTT estimate and the breaker. Returns success."""
        assert self._channel is not None
        stub = health_pb2_grpc.HealthStub(self._channel)
        t0 = time.monotonic()
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s, wait_for_ready=False)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except (TimeoutError, grpc.RpcError) as exc:
            ok = False
            log.debug("cloud probe failed: %s", exc)
        now = time.monotonic()
        self.probes += 1
        self._last_probe, self._last_ok = now, ok
        if ok:
            self.rtt.observe(1000 * (now - t0))
            was = self.breaker.state(now)
            self.breaker.record_success(now)
            if was != CIRCUIT_CLOSED:
                log.info("cloud link is back (rtt %.0f ms); circuit closed", 1000 * (now - t0))
        else:
            if self.breaker.state(now) == CIRCUIT_CLOSED:
                log.warning("cloud link probe failed; circuit open")
            self.breaker.record_failure(now)
        return ok

    def report_failure(self, why: str) -> None:
        """A request saw the link fail mid-answer: count it like a failed probe."""
        log.warning("link failure reported by a request: %s", why)
        self.breaker.record_failure(time.monotonic())

    def view(self) -> LinkView:
        now = time.monotonic()
        return LinkView(circuit=self.breaker.state(now), rtt_ms=self.rtt.rtt_ms, jitter_ms=self.rtt.jitter_ms,
                        configured=self.address is not None)

    def snapshot(self) -> LinkSnapshot:
        now = time.monotonic()
        circuit = self.breaker.state(now)
        if self.address is None or self._last_ok is None:
            state = "unknown" if self.address is not None else "down"
        else:
            state = "up" if self._last_ok and circuit == CIRCUIT_CLOSED else "down"
        return LinkSnapshot(state=state, circuit=circuit, rtt_ms=self.rtt.rtt_ms, jitter_ms=self.rtt.jitter_ms,
                            consecutive_failures=self.breaker.consecutive_failures,
                            last_probe_age_s=None if self._last_probe is None else now - self._last_probe,
                            address=self.address)
