"""The cloud node's one frozen configuration (flags, `TANDEM_CLOUD_*` variables, defaults).

Guarantees: every value is validated in `__post_init__`; a bad one raises ValueError naming the
field. `tandem.config.load` fills it from flag > environment > default; the protocol limits and
their defaults are those of `tandem.limits`, and no limit may exceed them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.limits import MAX_CONTEXT, MAX_DRAFT_LEN, MAX_NEW_TOKENS

ENV_PREFIX = "TANDEM_CLOUD_"
DTYPES = ("bf16", "fp32")


def _f(default: Any, text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": text, **extra})


@dataclass(frozen=True)
class CloudConfig:
    """Everything `tandem serve cloud` needs; one instance per process."""

    model_dir: Path = field(metadata={"help": "target model folder (default: the fetched target)"})
    address: str | None = _f(None, "Ray cluster to join (default: start a local instance)")
    port: int = _f(0, "gRPC port of Serve's proxy; 0 picks a free one")
    replicas: int = _f(1, "number of replicas")
    replica_cpus: float = _f(1.0, "Ray CPUs reserved per replica")
    threads: int = _f(0, "torch threads per replica; 0 = the CPUs the replica may use (affinity and cgroup "
                         "quota, never the host's core count; Ray alone would pin 1)")
    dtype: str = _f("bf16", f"target weights dtype, one of {DTYPES}")
    max_sessions: int = _f(16, "concurrent sessions per replica")
    max_context: int = _f(MAX_CONTEXT, "prompt + generated tokens")
    max_draft_len: int = _f(MAX_DRAFT_LEN, "drafts per round")
    max_new_tokens: int = _f(MAX_NEW_TOKENS, "per request")
    kv_budget_mb: int = _f(2048, "KV cache budget per replica")

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").exists():
            raise ValueError(f"model_dir: no model at {self.model_dir} (no config.json); run `tandem models fetch`")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0, got {self.threads}")
        if self.replica_cpus < 0:
            raise ValueError(f"replica_cpus: must be >= 0, got {self.replica_cpus}")
        if self.kv_budget_mb < 0:
            raise ValueError(f"kv_budget_mb: must be >= 0, got {self.kv_budget_mb}")
        for name in ("replicas", "max_sessions", "max_context", "max_draft_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name, most in (("max_draft_len", MAX_DRAFT_LEN), ("max_new_tokens", MAX_NEW_TOKENS)):
            if getattr(self, name) > most:
                raise ValueError(f"{name}: must be <= {most} (the protocol's limit), got {getattr(self, name)}")

    def limits(self) -> Any:  # -> cloud_node.verifier.Limits
        from cloud_node.verifier import Limits

        return Limits(max_sessions=self.max_sessions, max_context=self.max_context,
                      max_draft_len=self.max_draft_len, max_new_tokens=self.max_new_tokens,
                      kv_budget_bytes=self.kv_budget_mb << 20)
