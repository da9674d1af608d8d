"""Retries of UNAVAILABLE, declared as a gRPC service config instead of written as loops.

Guarantees:
- `RetryPolicy` validates the client's retry arguments (a `ValueError` naming the argument) and
  turns them into the channel's `grpc.service_config`: a `retryPolicy` for every method of
  `tandem.v1.Orchestrator` that retries UNAVAILABLE only, at most `retries` times, with
  exponential backoff. gRPC itself applies the jitter (each wait is uniform in [0, backoff)),
  keeps every attempt inside the call's one deadline, and commits a call, never retrying it
  again, once response headers arrive. A Python servicer sends its headers with its first
  message, so a stream is retried only before its first message: retrying later would repeat
  tokens. Other codes (INVALID_ARGUMENT, DEADLINE_EXCEEDED, CANCELLED, ...) are never retried.
- `channel_options` is the full option list of a channel: the retry settings first, replaced by
  any of the caller's own options with the same key.

Example:
    >>> options = channel_options(RetryPolicy(retries=2, backoff_s=0.05), [("grpc.primary_user_agent", "app")])
    >>> [key for key, _ in options]
    ['grpc.enable_retries', 'grpc.service_config', 'grpc.primary_user_agent']
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from protos.tandem.v1 import orchestrator_pb2

# "tandem.v1.Orchestrator", read from the proto so that a rename cannot leave retries behind.
SERVICE = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
MAX_RETRIES = 4  # gRPC makes at most 5 attempts (it lowers a larger maxAttempts to 5)
BACKOFF_MULTIPLIER = 2.0
MAX_BACKOFF_S = 3600.0  # a longer wait outlives any call's deadline; far longer, gRPC refuses the config


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE: retry n (n >= 1) waits up to backoff_s * 2**(n-1), capped."""

    retries: int = 3  # extra attempts after the first (0 disables retrying)
    backoff_s: float = 0.1  # the bound of the first wait
    max_backoff_s: float = 2.0  # no wait bound grows past this

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(f"retries: must be an integer from 0 to {MAX_RETRIES} (got {self.retries!r})")
        for name in ("backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_BACKOFF_S:
                raise ValueError(f"{name}: must be a number of seconds > 0 and <= {MAX_BACKOFF_S:g} (got {value!r})")
        if not self.backoff_s <= self.max_backoff_s:
            raise ValueError(f"max_backoff_s: must be >= backoff_s (got {self.max_backoff_s!r} < {self.backoff_s!r})")

    def method_config(self) -> dict[str, Any]:
        """The `methodConfig` entry for the Orchestrator service (no `retryPolicy` when retries == 0)."""
        config: dict[str, Any] = {"name": [{"service": SERVICE}]}
        if self.retries > 0:
            config["retryPolicy"] = {
                "maxAttempts": self.retries + 1,
                "initialBackoff": _duration(self.backoff_s),
                "maxBackoff": _duration(self.max_backoff_s),
                "backoffMultiplier": BACKOFF_MULTIPLIER,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return config

    def service_config(self) -> str:
        """The JSON value of the channel option `grpc.service_config`."""
        return json.dumps({"methodConfig": [self.method_config()]})


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.100000000s"); gRPC rejects a zero backoff, so at least 1 ns."""
    return f"{max(seconds, 1e-9):.9f}s"


def channel_options(policy: RetryPolicy, extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The retry options for `policy`, then `extra`; a key in `extra` replaces the retry option."""
    options: dict[str, Any] = {"grpc.enable_retries": 1, "grpc.service_config": policy.service_config()}
    options.update(dict(extra))
    return list(options.items())
