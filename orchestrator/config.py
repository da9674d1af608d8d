"""The orchestrator's one frozen configuration.

Guarantees: every value is validated in `__post_init__` and a bad one raises `ValueError`
naming the field. Sources, in order of precedence: CLI flag, then `TANDEM_ORCH_*` environment
variable, then the default (`tandem.config.load`); the defaults shared with the
edge come from `tandem.limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.limits import (
    DRAIN_S,
    MAX_CONCURRENT_GENERATIONS,
    MAX_CONTEXT,
    MAX_DEADLINE_MS,
    MAX_DRAIN_S,
    MAX_NEW_TOKENS,
    OPEN_DEADLINE_MS,
    ROUND_DEADLINE_MS,
)

ENV_PREFIX = "TANDEM_ORCH_"
MAX_CONTEXT_CHUNKS = 16


def _f(default: Any, text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": text, **extra})


@dataclass(frozen=True)
class OrchestratorConfig:
    edge_address: str = field(metadata={"flag": "--edge", "help": "the edge node's gRPC HOST:PORT (on this device)"})
    cloud_address: str | None = _f(None, "the cloud address the edge uses (HOST:PORT), probed for link health",
                                   flag="--cloud")
    host: str = _f("127.0.0.1", "address to listen on")
    grpc_port: int = _f(7070, "gRPC port; 0 picks a free one", flag="--port")
    http_port: int | None = _f(7080, "OpenAI-compatible HTTP port; 0 picks a free one, -1 turns it off")
    round_deadline_ms: int = _f(ROUND_DEADLINE_MS, "a verification round later than this continues on the device")
    open_deadline_ms: int = _f(OPEN_DEADLINE_MS, "opening a cloud session, prefill included")
    health_interval_s: float = _f(1.0, "cloud health probe period")
    probe_timeout_s: float = _f(1.0, "deadline of one health probe")
    circuit_open_s: float = _f(5.0, "first open period of the circuit breaker")
    default_max_new_tokens: int = _f(256, "answer length when a request sets none", flag="--max-new-tokens")
    context_chunks: int = _f(4, "personal chunks retrieved per request by default")
    max_prompt_chars: int = _f(200_000, "longest prompt accepted")
    cloud_max_context: int = _f(MAX_CONTEXT, "prompt + answer tokens the cloud keeps (its --max-context); the "
                                             "speculative and cloud routes are held to it, the local route to "
                                             "the edge's context")
    max_concurrent: int = _f(MAX_CONCURRENT_GENERATIONS, "generations at once; more get RESOURCE_EXHAUSTED "
                                                         "before anything is streamed")
    store_path: Path | None = _f(None, "personal store file (default TANDEM_HOME/personal/store.sqlite3)",
                                 flag="--store")
    personal: bool = _f(True, "load the embedder and the personal store")
    target_name: str = _f("qwen2.5-coder-1.5b-instruct", "the model name the OpenAI endpoint reports")
    edge_timeout_s: float = _f(3600.0, "a generation's hard limit when the request sets none")
    drain_s: float = _f(DRAIN_S, "on SIGTERM, how long the answers in flight may take to finish before the process stops")

    def __post_init__(self) -> None:
        if self.http_port is not None and self.http_port < 0:
            object.__setattr__(self, "http_port", None)  # -1 on the command line: no HTTP endpoint
        if not self.edge_address or ":" not in self.edge_address:
            raise ValueError(f"edge_address must be HOST:PORT, got {self.edge_address!r}")
        if self.cloud_address is not None and ":" not in self.cloud_address:
            raise ValueError(f"cloud_address must be HOST:PORT, got {self.cloud_address!r}")
        for name in ("grpc_port",):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        for name in ("round_deadline_ms", "open_deadline_ms"):
            if not 1 <= getattr(self, name) <= MAX_DEADLINE_MS:
                raise ValueError(f"{name} must be in [1, {MAX_DEADLINE_MS}], got {getattr(self, name)}")
        for name in ("max_concurrent", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("health_interval_s", "probe_timeout_s", "circuit_open_s", "edge_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 1 <= self.default_max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"default_max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if not 2 <= self.cloud_max_context <= MAX_CONTEXT:
            raise ValueError(f"cloud_max_context must be in [2, {MAX_CONTEXT}], got {self.cloud_max_context}")
        if not 0 <= self.drain_s <= MAX_DRAIN_S:
            raise ValueError(f"drain_s must be in [0, {MAX_DRAIN_S:g}], got {self.drain_s}")
        if not 0 <= self.context_chunks <= MAX_CONTEXT_CHUNKS:
            raise ValueError(f"context_chunks must be in [0, {MAX_CONTEXT_CHUNKS}]")
