"""What an answer teaches the link monitor (`Orchestrator._learn`), seen through Status.

A stream that broke mid-answer opens the circuit at once, before any health probe runs, so the
next request routes local. A late round does not: it may be one slow verdict or a tight TTFT
budget, and must not cut every request off the cloud (the probes catch a link that stays silent).
The orchestrator here is real, with a real `LinkMonitor` that is never started (so no probe runs);
the edge node is a fake that is never called, and Status hears from it that it is down.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.config import OrchestratorConfig
from orchestrator.core import Orchestrator
from orchestrator.link_monitor import LinkMonitor
from orchestrator.servicer import OrchestratorServicer
from protos.tandem.v1 import common_pb2
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem_core.routing import RouteRequest, decide, link_problem


class _UnusedEdgeChannel:
    """A fake edge channel: the orchestrator builds its stubs on it and never calls them."""

    def unary_unary(self, *args: Any, **kwargs: Any) -> None:
        return None

    unary_stream = stream_unary = stream_stream = unary_unary


def _orchestrator_with_fake_edge() -> Orchestrator:
    config = OrchestratorConfig(edge_address="127.0.0.1:1", cloud_address="127.0.0.1:2")
    core = Orchestrator(config, _UnusedEdgeChannel(), LinkMonitor(config.cloud_address), None)

    async def edge_down() -> None:
        return None

    core.edge_status = edge_down  # type: ignore[method-assign]
    return core


def _status(core: Orchestrator) -> opb.LinkStatus:
    return asyncio.run(OrchestratorServicer(core).Status(opb.StatusRequest(), None)).link


def _answer_that_fell_back(cause: int, reason: str) -> common_pb2.GenerationStats:
    switch = common_pb2.RouteSwitch(at_token=6, from_route="speculative", to_route="local", reason=reason,
                                    cause=cause)  # type: ignore[arg-type]
    return common_pb2.GenerationStats(route="speculative", generated_tokens=32, local_tokens=26,
                                      verified_tokens=6, switches=[switch])


def test_a_cut_shows_the_circuit_open_in_status_before_any_probe_with_a_fake_edge() -> None:
    core = _orchestrator_with_fake_edge()
    assert _status(core).circuit == "closed"
    core._learn("code", _answer_that_fell_back(common_pb2.SWITCH_CAUSE_BROKEN_STREAM, "the cloud link failed"), 50)
    link = _status(core)
    assert (link.circuit, link.consecutive_failures) == ("open", 1)
    assert core.monitor.probes == 0, "the circuit must open from the report, not from a probe"
    after = decide(RouteRequest(prompt_tokens=50, max_new_tokens=64), core.monitor.view(), core.costs)
    assert after.route == "local" and "circuit open" in after.reason


def test_one_late_round_leaves_the_circuit_closed_with_a_fake_edge() -> None:
    core = _orchestrator_with_fake_edge()
    core._learn("code", _answer_that_fell_back(common_pb2.SWITCH_CAUSE_LATE_VERDICT, "no reply within 500 ms"), 50)
    link = _status(core)
    assert (link.circuit, link.consecutive_failures) == ("closed", 0)
    assert link_problem(core.monitor.view()) is None, "one late round cut every request off the cloud"
