"""The orchestrator's one frozen configuration.

Guarantees: every value is validated in `__post_init__` and a bad one raises `ValueError`
naming the field. Sources, in order of precedence: CLI flag, then `TANDEM_ORCH_*` environment
variable, then the default (see `orchestrator.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_NEW_TOKENS = 4096
MAX_CONTEXT_CHUNKS = 16


@dataclass(frozen=True)
class OrchestratorConfig:
    edge_address: str                      # the edge node's gRPC HOST:PORT (on this device)
    cloud_address: str | None = None       # the cloud as the edge reaches it, probed for health
    host: str = "127.0.0.1"
    grpc_port: int = 7070                  # 0 picks a free port
    http_port: int | None = 7080           # the OpenAI-compatible endpoint; None = off
    round_deadline_ms: int = 1000          # a verdict later than this falls back to the device
    open_deadline_ms: int = 30000          # opening a cloud session (prefill included)
    health_interval_s: float = 1.0         # cloud health probe period
    probe_timeout_s: float = 1.0
    circuit_open_s: float = 5.0            # first open period of the circuit breaker
    default_max_new_tokens: int = 256
    context_chunks: int = 4                # personal chunks retrieved per request by default
    max_prompt_chars: int = 200_000
    max_concurrent: int = 4                # generations at once (the edge node's default too); more get
                                           # RESOURCE_EXHAUSTED before anything is streamed
    store_path: Path | None = None         # None = TANDEM_HOME/personal/store.sqlite3
    personal: bool = True                  # load the embedder and the personal store
    target_name: str = "qwen2.5-coder-1.5b-instruct"
    edge_timeout_s: float = 3600.0         # a generation's hard limit when the request sets none

    def __post_init__(self) -> None:
        if not self.edge_address or ":" not in self.edge_address:
            raise ValueError(f"edge_address must be HOST:PORT, got {self.edge_address!r}")
        if self.cloud_address is not None and ":" not in self.cloud_address:
            raise ValueError(f"cloud_address must be HOST:PORT, got {self.cloud_address!r}")
        for name in ("grpc_port",):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        for name in ("round_deadline_ms", "open_deadline_ms", "max_concurrent", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("health_interval_s", "probe_timeout_s", "circuit_open_s", "edge_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 1 <= self.default_max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"default_max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if not 0 <= self.context_chunks <= MAX_CONTEXT_CHUNKS:
            raise ValueError(f"context_chunks must be in [0, {MAX_CONTEXT_CHUNKS}]")
