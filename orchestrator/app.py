"""The orchestrator process: gRPC service, OpenAI-compatible HTTP endpoint and link monitor in
one asyncio loop.

Guarantees: `Running.start()` returns once both listeners are bound (ports known) and health
says SERVING; `Running.stop()` closes them, the monitor and the edge channel, whatever state
they are in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.core import Orchestrator
from orchestrator.link_monitor import LinkMonitor
from orchestrator.personal import Personal
from orchestrator.servicer import create_server, mark_serving

log = logging.getLogger(__name__)


@dataclass
class Running:
    config: OrchestratorConfig
    personal: Personal | None = None
    core: Orchestrator | None = None
    grpc_port: int = 0
    http_port: int | None = None
    _server: grpc.aio.Server | None = None
    _http: Any = None
    _edge_channel: grpc.aio.Channel | None = None
    _monitor: LinkMonitor | None = field(default=None)

    async def start(self) -> Running:
        c = self.config
        self._edge_channel = grpc.aio.insecure_channel(c.edge_address)
        self._monitor = LinkMonitor(c.cloud_address, interval_s=c.health_interval_s, timeout_s=c.probe_timeout_s,
                                    open_s=c.circuit_open_s)
        if c.personal and self.personal is None:
            self.personal = Personal(c.store_path)
        self.core = Orchestrator(c, self._edge_channel, self._monitor, self.personal)
        self._server, self.grpc_port = create_server(self.core, f"{c.host}:{c.grpc_port}")
        await self._server.start()
        if c.http_port is not None:
            from orchestrator.http_api import create_http_app, start_http

            self._http, self.http_port = await start_http(create_http_app(self.core), c.host, c.http_port)
        self._monitor.start()
        await mark_serving(self._server)
        return self

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
