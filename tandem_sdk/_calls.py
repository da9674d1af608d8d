"""What the sync and asyncio clients share: the retry policy and the answer's stream state.

Guarantees:
- Only UNAVAILABLE is retried, at most `retries` times, with exponential backoff and jitter,
  and never past the call's deadline (the deadline covers every attempt together).
- A stream is retried only before its first message arrives; once a message has arrived the
  error is raised (retrying would repeat tokens). The clients enforce this; `StreamState`
  records whether any message arrived.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from protos.tandem.v1 import orchestrator_pb2
from tandem_sdk import _convert
from tandem_sdk._types import Delta, Result, Started, Stats

log = logging.getLogger(__name__)

# The transport deadline of a stream exceeds the answer's deadline by this much, so that a
# server that stops generating right at its deadline can still send the final stats.
DEADLINE_GRACE_S = 0.5


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE: attempt n (n >= 1) waits about backoff_s * 2**(n-1), capped."""

    retries: int = 3  # extra attempts after the first
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries: must be an integer >= 0 (got {self.retries!r})")
        if not self.backoff_s >= 0 or not self.max_backoff_s >= self.backoff_s:
            raise ValueError("backoff_s: must satisfy 0 <= backoff_s <= max_backoff_s")

    def delay_s(self, attempt: int, code: grpc.StatusCode | None, deadline: float) -> float | None:
        """Seconds to wait before retrying after failed `attempt`, or None to give up."""
        if code != grpc.StatusCode.UNAVAILABLE or attempt > self.retries:
            return None
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        delay = cap / 2 + random.uniform(0.0, cap / 2)  # "equal jitter"
        if time.monotonic() + delay >= deadline:
            return None
        log.info("UNAVAILABLE on attempt %d; retrying in %.3f s", attempt, delay)
        return delay


def rpc_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    code_fn = getattr(err, "code", None)
    return code_fn() if callable(code_fn) else None


def remaining_s(deadline: float) -> float:
    """Time left before `deadline` (a `time.monotonic()` instant), never below 1 ms."""
    return max(deadline - time.monotonic(), 0.001)


def check_timeout(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: must be a number of seconds > 0 (got {value!r})")
    return float(value)


def stream_timeout_s(deadline_s: float | None, default_s: float) -> float:
    """The transport deadline of one answer: the request's deadline plus grace, else the default."""
    return deadline_s + DEADLINE_GRACE_S if deadline_s else default_s


@dataclass
class StreamState:
    """What an answer's messages told so far: the start, the text, the final stats."""

    started: Started | None = None
    stats: Stats | None = None
    parts: list[str] = field(default_factory=list)
    received: int = 0  # messages received; retrying is allowed only while this is 0
    done: bool = False

    def absorb(self, message: orchestrator_pb2.GenerateTextResponse) -> Delta | None:
        """Record one message; the Delta when it carries text, else None."""
        self.received += 1
        kind = message.WhichOneof("kind")
        if kind == "started":
            self.started = _convert.started(message.started)
        elif kind == "stats":
            self.stats = _convert.stats(message.stats)
        elif kind == "delta":
            delta = _convert.delta(message.delta)
            self.parts.append(delta.text)
            return delta
        return None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def result(self) -> Result:
        return Result(text=self.text, stats=self.stats, started=self.started)

