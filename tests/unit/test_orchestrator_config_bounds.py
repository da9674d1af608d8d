"""The orchestrator's settings that a typo could make dangerous: a keepalive below what the
edge's server takes, a timeout gRPC cannot carry (inf fails every call at once), a port written
in other digits than ASCII ("²" made int() raise; "٣" read as 3) are refused naming the field."""

from __future__ import annotations

import math

import pytest

from orchestrator.config import OrchestratorConfig
from tandem.limits import KEEPALIVE_S, MIN_PING_S


def _config(**fields: object) -> OrchestratorConfig:
    return OrchestratorConfig(edge_address="127.0.0.1:1", personal=False, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.0, MIN_PING_S / 2, -1.0, math.nan, math.inf, 1e9])
def test_an_edge_keepalive_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="edge_keepalive_s"):
        _config(edge_keepalive_s=value)


@pytest.mark.parametrize("name", ["edge_timeout_s", "health_interval_s", "probe_timeout_s", "circuit_open_s"])
@pytest.mark.parametrize("value", [0.0, math.inf, math.nan])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        _config(**{name: value})


def test_the_defaults_and_the_shortest_keepalive_are_taken() -> None:
    assert _config().edge_keepalive_s == KEEPALIVE_S
    assert _config(edge_keepalive_s=MIN_PING_S).edge_keepalive_s == MIN_PING_S


@pytest.mark.parametrize("port", ["\u00b2", "\u0663", "-1", "70000"])
def test_a_shaper_control_port_that_is_not_ascii_digits_in_range_is_refused(port: str) -> None:
    with pytest.raises(ValueError, match="shaper_control"):
        _config(shaper_control=f"127.0.0.1:{port}")
