"""The cloud node's one frozen configuration (flags, `TANDEM_CLOUD_*` variables, defaults).

Guarantees: every value is validated in `__post_init__`; a bad one raises ValueError naming the
field. `tandem.config.load` fills it from flag > environment > default; the protocol limits and
their defaults are those of `tandem.limits`, and no limit may exceed them. The batcher's knobs
are checked by `check_batching`, which the deployment spec (`tandem.deploy.spec`) shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.limits import MAX_CONTEXT, MAX_DRAFT_LEN, MAX_NEW_TOKENS, ROUND_DEADLINE_MS, SESSION_IDLE_S
from tandem_core.tree import MAX_TREE_NODES

ENV_PREFIX = "TANDEM_CLOUD_"
MAX_SESSION_IDLE_S = 86_400.0  # a day: longer is no limit at all
DTYPES = ("bf16", "fp32")


def _f(default: Any, text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": text, **extra})


@dataclass(frozen=True)
class CloudConfig:
    """Everything `tandem serve cloud` needs; one instance per process."""

    model_dir: Path = field(metadata={"help": "target model folder (default: the fetched target)"})
    address: str | None = _f(None, "Ray cluster to join (default: start a local instance)")
    serve_port: int = _f(0, "gRPC port of Serve's proxy, internal: the gateway (--port) forwards to it; 0 picks a "
                            "free one")
    replicas: int = _f(1, "number of replicas")
    replica_cpus: float = _f(1.0, "Ray CPUs reserved per replica")
    threads: int = _f(0, "torch threads per replica; 0 = the CPUs the replica may use (affinity and cgroup "
                         "quota, never the host's core count; Ray alone would pin 1)")
    dtype: str = _f("bf16", f"target weights dtype, one of {DTYPES}")
    max_sessions: int = _f(32, "hard cap on concurrent sessions per replica (admission is by kv_budget_mb)")
    max_context: int = _f(MAX_CONTEXT, "prompt + generated tokens")
    max_draft_len: int = _f(MAX_DRAFT_LEN, "drafts per round")
    max_tree_nodes: int = _f(MAX_TREE_NODES, f"drafts a tree round may hold (at most {MAX_TREE_NODES}); 0: this "
                                             "replica verifies chains only")
    max_new_tokens: int = _f(MAX_NEW_TOKENS, "per request")
    kv_budget_mb: int = _f(2048, "KV cache budget per replica (open sessions and the prefix cache)")
    max_batch_rows: int = _f(64, "rows a pass fills with prefill chunks after its rounds (rounds are never "
                                 "split or held back)")
    batch_window_ms: float = _f(20.0, "longest wait of a pass for sessions expected back within it")
    session_idle_s: float = _f(SESSION_IDLE_S, "a Verify stream with no request for this long ends (UNAVAILABLE) and "
                                               f"frees its session slot; at most {MAX_SESSION_IDLE_S:g}")
    metrics_port: int | None = _f(None, "Prometheus port of Ray's metrics exporter on a local Ray instance (every "
                                        "replica's tandem_* metrics, prefixed ray_), printed in the ready line; 0 "
                                        "picks a free one; unset: Ray's choice. A cluster (--address) uses its "
                                        "nodes' --metrics-export-port")

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").exists():
            raise ValueError(f"model_dir: no model at {self.model_dir} (no config.json); run `tandem models fetch`")
        for name in ("serve_port", "metrics_port"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name}: must be in [0, 65535], got {getattr(self, name)}")
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
        if not 0 <= self.max_tree_nodes <= MAX_TREE_NODES:
            raise ValueError(f"max_tree_nodes: must be in [0, {MAX_TREE_NODES}] (the protocol's limit), "
                             f"got {self.max_tree_nodes}")
        if not 0 < self.session_idle_s <= MAX_SESSION_IDLE_S:  # NaN fails too
            raise ValueError(f"session_idle_s: must be > 0 and <= {MAX_SESSION_IDLE_S:g}, got {self.session_idle_s}")
        check_batching(self.max_batch_rows, self.batch_window_ms, self.max_draft_len)

    def limits(self) -> Any:  # -> cloud_node.verifier.Limits
        from cloud_node.verifier import Limits

        return Limits(max_sessions=self.max_sessions, max_context=self.max_context,
                      max_draft_len=self.max_draft_len, max_new_tokens=self.max_new_tokens,
                      kv_budget_bytes=self.kv_budget_mb << 20, max_batch_rows=self.max_batch_rows,
                      batch_window_ms=self.batch_window_ms, max_tree_nodes=self.max_tree_nodes,
                      idle_s=self.session_idle_s)


def check_batching(max_batch_rows: int, batch_window_ms: float, max_draft_len: int) -> None:
    """The batcher's knobs as every config checks them (`CloudConfig`, the deployment spec);
    ValueError names the field."""
    if max_batch_rows < max_draft_len + 1:
        raise ValueError(f"max_batch_rows: must be >= max_draft_len + 1 = {max_draft_len + 1} (a round, the last "
                         f"token and its drafts, is never split across passes), got {max_batch_rows}")
    if not 0 <= batch_window_ms < ROUND_DEADLINE_MS:
        raise ValueError(f"batch_window_ms: must be in [0, {ROUND_DEADLINE_MS}) (a pass may wait this long for "
                         f"rounds; the edge's round deadline is {ROUND_DEADLINE_MS} ms), got {batch_window_ms}")


@dataclass(frozen=True)
class GatewayConfig:
    """The cloud's front door (`cloud_node.gateway`): where edges connect, TLS and tokens.

    `tandem serve cloud` runs one in front of its Serve proxy (upstream filled in); `python -m
    cloud_node gateway` runs one alone (a KubeRay sidecar), forwarding to `--upstream`.
    """

    upstream: str | None = _f(None, "Serve's gRPC proxy HOST:PORT (only for `cloud_node gateway`)")
    host: str = _f("127.0.0.1", "address edges connect to; beyond loopback it needs TLS and --tokens-file "
                                "(or --insecure)")
    port: int = _f(0, "port edges connect to; 0 picks a free one")
    tls_cert: Path | None = _f(None, "server certificate chain (PEM); with --tls-key turns TLS on")
    tls_key: Path | None = _f(None, "the certificate's private key (PEM)")
    tls_client_ca: Path | None = _f(None, "CA of device certificates: mutual TLS, a device without one signed "
                                          "by it cannot connect")
    tokens_file: Path | None = _f(None, "per-device token store (`tandem tokens`); every call then needs a valid, "
                                        "unrevoked token")
    gateway_secret_file: Path | None = _f(None, "file with the secret the gateway shows the replicas (mode 0600); "
                                                "default: a fresh one per start", secret_env="")
    insecure: bool = _f(False, "allow a non-loopback --host without TLS and tokens (INSECURE: anyone who reaches "
                               "it can run the target)")

    def __post_init__(self) -> None:
        if self.upstream is not None and ":" not in self.upstream:
            raise ValueError(f"upstream: must be HOST:PORT, got {self.upstream!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "gateway_secret_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no file at {path}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert, tls_key: TLS needs both the certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: mutual TLS needs the server's --tls-cert and --tls-key")
