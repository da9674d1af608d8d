"""The one map between the core's StrEnums and the protos' enums, both ways.

Guarantees: every servicer and client converts route, privacy mode, finish reason and switch
cause here and nowhere else; a value with no meaning maps to the proto's UNSPECIFIED (to the
proto) or raises ValueError naming the field (from the proto), never a silent default.
"""

from __future__ import annotations

from protos.tandem.v1 import common_pb2, edge_pb2, orchestrator_pb2
from tandem_core.loop import SwitchCause
from tandem_core.routing import PrivacyMode, Route
from tandem_core.verify import FinishReason

_FINISH = {FinishReason.STOP: common_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH}
_CAUSE = {SwitchCause.LATE_VERDICT: common_pb2.SWITCH_CAUSE_LATE_VERDICT,
          SwitchCause.BROKEN_STREAM: common_pb2.SWITCH_CAUSE_BROKEN_STREAM,
          SwitchCause.CLOUD_REFUSED: common_pb2.SWITCH_CAUSE_CLOUD_REFUSED,
          SwitchCause.BAD_VERDICT: common_pb2.SWITCH_CAUSE_BAD_VERDICT}
_EDGE_MODE = {Route.LOCAL: edge_pb2.EDGE_MODE_LOCAL, Route.SPECULATIVE: edge_pb2.EDGE_MODE_SPECULATIVE,
              Route.CLOUD: edge_pb2.EDGE_MODE_CLOUD}
_ROUTE = {Route.LOCAL: orchestrator_pb2.ROUTE_LOCAL, Route.SPECULATIVE: orchestrator_pb2.ROUTE_SPECULATIVE,
          Route.CLOUD: orchestrator_pb2.ROUTE_CLOUD}
_PRIVACY_MODE = {PrivacyMode.STRICT: orchestrator_pb2.PRIVACY_MODE_STRICT,
                 PrivacyMode.CLOUD_QUALITY: orchestrator_pb2.PRIVACY_MODE_CLOUD_QUALITY}


def _invert(table: dict) -> dict:
    return {v: k for k, v in table.items()}


_FINISH_FROM, _CAUSE_FROM = _invert(_FINISH), _invert(_CAUSE)
_EDGE_MODE_FROM, _ROUTE_FROM, _PRIVACY_MODE_FROM = _invert(_EDGE_MODE), _invert(_ROUTE), _invert(_PRIVACY_MODE)


def finish_to_proto(reason: str | None) -> int:
    return _FINISH.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED)  # type: ignore[call-overload]


def finish_from_proto(value: int) -> FinishReason | None:
    """None for UNSPECIFIED (the answer has not finished)."""
    return _FINISH_FROM.get(value)


def cause_to_proto(cause: SwitchCause) -> int:
    return _CAUSE[cause]


def cause_from_proto(value: int) -> SwitchCause | None:
    return _CAUSE_FROM.get(value)


def route_to_edge_mode(route: Route) -> int:
    return _EDGE_MODE[route]


def edge_mode_to_route(value: int, *, default: Route) -> Route:
    """The route an edge request asks for; `default` for UNSPECIFIED."""
    if value == edge_pb2.EDGE_MODE_UNSPECIFIED:
        return default
    if value not in _EDGE_MODE_FROM:
        raise ValueError(f"mode: unknown value {value}")
    return _EDGE_MODE_FROM[value]


def route_to_proto(route: Route | None) -> int:
    return orchestrator_pb2.ROUTE_AUTO if route is None else _ROUTE[route]


def route_from_proto(value: int) -> Route | None:
    """None for ROUTE_AUTO (the routing policy decides)."""
    if value == orchestrator_pb2.ROUTE_AUTO:
        return None
    if value not in _ROUTE_FROM:
        raise ValueError(f"route: unknown value {value}")
    return _ROUTE_FROM[value]


def privacy_mode_to_proto(mode: PrivacyMode) -> int:
    return _PRIVACY_MODE[mode]


def privacy_mode_from_proto(value: int) -> PrivacyMode:
    """STRICT for UNSPECIFIED."""
    if value == orchestrator_pb2.PRIVACY_MODE_UNSPECIFIED:
        return PrivacyMode.STRICT
    if value not in _PRIVACY_MODE_FROM:
        raise ValueError(f"privacy: unknown value {value}")
    return _PRIVACY_MODE_FROM[value]
