"""The link model, pure: the conditions, the delay model and addresses. No sockets, no clock.

Guarantees (the delay model that `netshape.shaper` applies, per direction):
- A piece of n bytes read at `now` finishes serializing at `tx_done`: `now` when the bandwidth is
  unlimited, else when the direction's `Serializer` has sent the bytes before it and these, at
  `bandwidth_kbps * 1000` bit/s.
- `DelayLine.schedule` delivers it at max(tx_done + max(0, rtt/2 + U(-jitter, +jitter)), the
  previous piece's delivery time): never earlier than sent, never reordered.
- `LinkConditions` rejects, naming the field, a value that is not a finite number >= 0 or a mode
  that is not one of `MODES`.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

MODES = ("up", "down", "blackhole")
MAX_PIECE = 64 * 1024  # largest read and largest piece, bytes
_PIECE_S = 0.02  # under a bandwidth limit a piece is about this much serialization time
_MIN_PIECE = 1024  # bytes

Address = tuple[str, int]


@dataclass(frozen=True)
class LinkConditions:
    rtt_ms: float = 0.0  # round-trip time added; each direction gets rtt/2
    jitter_ms: float = 0.0  # per-piece one-way delay varies uniformly in [-jitter, +jitter]
    bandwidth_kbps: float = 0.0  # per direction, 1 kbps = 1000 bit/s; 0 = unlimited
    mode: str = "up"  # "up", "down" or "blackhole"

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "jitter_ms", "bandwidth_kbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a number, got {value!r}")  # noqa: TRY004 - one error type for bad input
            if not 0 <= value <= sys.float_info.max:  # NaN, inf and ints past float range too
                raise ValueError(f"{name}: must be finite and >= 0, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class LinkStats:
    bytes_up: int  # delivered client -> upstream
    bytes_down: int  # delivered upstream -> client
    bytes_blackholed: int  # read in blackhole mode and discarded, both directions
    connections_accepted: int  # every accepted client connection, refused ones included
    connections_active: int  # live proxied connections now
    connections_dropped: int  # reset by drop_connections, by "down" or by leaving blackhole
    connections_refused: int  # accepted and reset at once because the mode was "down"


def parse_address(text: str) -> Address:
    """'HOST:PORT' or '[V6HOST]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def piece_size(bandwidth_kbps: float) -> int:
    if bandwidth_kbps <= 0:
        return MAX_PIECE
    return max(_MIN_PIECE, min(MAX_PIECE, int(bandwidth_kbps * 1000 / 8 * _PIECE_S)))


class Serializer:
    """One direction of the link: when each piece has finished going onto the wire."""

    def __init__(self) -> None:
        self.free_at = 0.0  # loop time at which the link is idle again

    def transmit(self, nbytes: int, now: float, bandwidth_kbps: float) -> float:
        if bandwidth_kbps <= 0:
            return now
        self.free_at = max(self.free_at, now) + nbytes * 8 / (bandwidth_kbps * 1000)
        return self.free_at

    def backlog(self, now: float) -> float:
        return max(0.0, self.free_at - now)


class DelayLine:
    """Delivery times for one direction of one connection; pure, the caller passes `now`."""

    def __init__(self, serializer: Serializer, rng: random.Random) -> None:
        self.serializer = serializer
        self._rng = rng
        self._last = 0.0  # delivery time of the previous piece

    def schedule(self, nbytes: int, now: float, conditions: LinkConditions) -> float:
        tx_done = self.serializer.transmit(nbytes, now, conditions.bandwidth_kbps)
        jitter = self._rng.uniform(-conditions.jitter_ms, conditions.jitter_ms)
        one_way = max(0.0, (conditions.rtt_ms / 2 + jitter) / 1000)
        self._last = max(tx_done + one_way, self._last)
        return self._last
