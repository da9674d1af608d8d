"""The orchestrator process: gRPC service, OpenAI-compatible HTTP endpoint and link monitor in
one asyncio loop.

Guarantees: `Running.start()` returns once both listeners are bound (ports known) and health
says SERVING. `Running.drain(period_s)` is the graceful part of a shutdown: health turns
NOT_SERVING ("" and the service), every new generation is refused (gRPC UNAVAILABLE, HTTP 503
in OpenAI's error shape: `errors.Unavailable`) while both listeners stay up to say so, and it
returns once the generations in flight have finished (True), or when `period_s` passed or
`hurry` was set (False). `Running.stop()` then closes the listeners, the monitor and the edge
channel, whatever state they are in; what still runs is cancelled.

Security (`config.resolve_security`, read in `start()` unless given): with a certificate both
listeners speak TLS only; with an API key every gRPC call but health (`AioKeyInterceptor`) and
every HTTP request (`http_api`) must carry it; the edge channel uses the edge's TLS and key, the
link monitor the cloud's TLS.

Metrics: every generation's items pass `orchestrator.metrics.observe` on their way out (both
transports), and `GET /metrics` on the HTTP port serves them (`Running.metrics_text`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from orchestrator import metrics
from orchestrator.config import OrchestratorConfig, Security, resolve_security
from orchestrator.core import Orchestrator
from orchestrator.errors import Unavailable
from orchestrator.link_monitor import LinkMonitor
from orchestrator.personal import Personal
from orchestrator.servicer import create_server, mark_serving
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem.security import AioKeyInterceptor, keepalive_options, secure_channel

log = logging.getLogger(__name__)


class Admission:
    """Counts the generations in flight; once closed, refuses new ones."""

    def __init__(self) -> None:
        self.open = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if not self.open:
            raise Unavailable("the orchestrator is draining (shutting down); retry on another one")
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class AdmittedOrchestrator(Orchestrator):
    """The core, with every generation passing through `admission` (both transports use this)."""

    admission: Admission

    async def generate(self, request: opb.GenerateTextRequest) -> AsyncIterator[opb.GenerateTextResponse]:
        self.admission.enter()  # before the first item: gRPC UNAVAILABLE, HTTP 503
        items = cast(AsyncGenerator[opb.GenerateTextResponse, None], super().generate(request))
        try:
            async for item in items:
                metrics.observe(item)
                yield item
        finally:
            try:
                await items.aclose()
            finally:
                self.admission.leave()


@dataclass
class Running:
    config: OrchestratorConfig
    personal: Personal | None = None
    security: Security | None = None  # None: read from the config in start()
    core: AdmittedOrchestrator | None = None
    grpc_port: int = 0
    http_port: int | None = None
    admission: Admission = field(default_factory=Admission)
    _server: grpc.aio.Server | None = None
    _http: Any = None
    _edge_channel: grpc.aio.Channel | None = None
    _monitor: LinkMonitor | None = field(default=None)

    async def start(self) -> Running:
        c = self.config
        sec = self.security = self.security if self.security is not None else resolve_security(c)
        self._edge_channel = secure_channel(c.edge_address, sec.edge_tls, sec.edge_key, aio=True,
                                            options=keepalive_options(c.edge_keepalive_s))
        self._monitor = LinkMonitor(c.cloud_address, interval_s=c.health_interval_s, timeout_s=c.probe_timeout_s,
                                    open_s=c.circuit_open_s, tls=sec.cloud_tls)
        if c.personal and self.personal is None:
            self.personal = Personal(c.store_path)
        self.core = AdmittedOrchestrator(c, self._edge_channel, self._monitor, self.personal)
        self.core.admission = self.admission
        interceptors = [AioKeyInterceptor(sec.api_key)] if sec.api_key is not None else []
        self._server, self.grpc_port = create_server(self.core, f"{c.host}:{c.grpc_port}", interceptors=interceptors,
                                                     tls=sec.server_tls)
        await self._server.start()
        if c.http_port is not None:
            from orchestrator.console_api import ConsoleBackend
            from orchestrator.http_api import create_http_app, start_http

            app = create_http_app(self.core, api_key=sec.api_key, metrics_text=self.metrics_text,
                                  console=ConsoleBackend(self.core, c.shaper_control))
            ssl_context = sec.server_tls.ssl_context() if sec.server_tls is not None else None
            self._http, self.http_port = await start_http(app, c.host, c.http_port, ssl_context=ssl_context)
        self._monitor.start()
        await mark_serving(self._server)
        return self

    def metrics_text(self) -> bytes:
        """The exposition, with the gauges of now (circuit, RTT, generations in flight) set first."""
        if self._monitor is not None:
            link = self._monitor.snapshot()
            metrics.refresh(circuit=link.circuit, rtt_ms=link.rtt_ms, in_flight=self.admission.in_flight)
        return metrics.exposition()

    async def drain(self, period_s: float, hurry: asyncio.Event | None = None) -> bool:
        """NOT_SERVING, refuse new generations, wait for those in flight (see the module docstring)."""
        if self._server is not None:
            await self._server.health.enter_graceful_shutdown()
        self.admission.open = False
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.admission.idle())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        done, pending = await asyncio.wait(waits, timeout=period_s, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[0] in done

    async def stop(self) -> None:
        if self._monitor is not None:
            await self._monitor.stop()
        if self._http is not None:
            await self._http.cleanup()
        if self._server is not None:
            await self._server.stop(grace=1)
        if self._edge_channel is not None:
            await self._edge_channel.close()
        if self.personal is not None:
            self.personal.close()
