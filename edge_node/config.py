"""The edge node's one frozen configuration (flags, `TANDEM_EDGE_*` variables, defaults).

Guarantees: every value is validated in `__post_init__`; a bad one raises ValueError naming the
field. `tandem.config.load` fills it from flag > environment > default, and the defaults are the
shared ones of `tandem.limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tandem.limits import (
    DEFAULT_DRAFT_LEN,
    DRAIN_S,
    MAX_CONCURRENT_GENERATIONS,
    MAX_DEADLINE_MS,
    MAX_DRAFT_LEN,
    MAX_DRAIN_S,
    OPEN_DEADLINE_MS,
    ROUND_DEADLINE_MS,
)
from tandem_core.branching import DEFAULT_TREE_NODES
from tandem_core.deadline import FLOOR_MS
from tandem_core.tree import MAX_TREE_NODES

ENV_PREFIX = "TANDEM_EDGE_"


@dataclass(frozen=True)
class EdgeConfig:
    cloud_address: str | None = field(default=None, metadata={
        "flag": "--cloud", "help": "cloud verifier HOST:PORT (speculative and cloud routes)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "gRPC port; 0 picks a free one"})
    drafter: Path | None = field(default=None, metadata={"help": "ONNX drafter folder (default: the fetched one)"})
    draft_len: int = field(default=DEFAULT_DRAFT_LEN, metadata={
        "help": "drafts per round; 0: chosen each round from the measured acceptance and timings (0 to 16)"})
    lookup: bool = field(default=True, metadata={
        "help": "retrieval drafts: continuations of the prompt and the answer so far, checked by the drafter "
                "in one batched pass or sent as they are (tandem_core.lookup); also self-speculation on the "
                "local route"})
    pipeline: bool = field(default=True, metadata={
        "help": "round 1 goes out with the open and no drafts (the first token comes from the cloud's "
                "prefill; unless retrieval can copy from the prompt's end), and each next round is drafted "
                "and sent while the verdict is in flight, on the guess that every draft is accepted "
                "(tandem_core.loop); off: one round after the other"})
    tree_nodes: int = field(default=DEFAULT_TREE_NODES, metadata={
        "help": f"draft trees: the most drafts a round may hold when the drafter's next choices are added "
                f"as siblings where they pay (tandem_core.branching), within the cloud's own bound "
                f"(at most {MAX_TREE_NODES}); 0: chains only"})
    round_deadline_ms: int = field(default=ROUND_DEADLINE_MS, metadata={
        "help": "a verdict later than this resumes the stream (or continues on the device); with "
                "--adaptive-deadline the ceiling of the learnt deadline"})
    adaptive_deadline: bool = field(default=True, metadata={
        "help": "each round's deadline follows the rounds measured on the link: the slowest recent "
                "verification pass and link part, each times a factor, plus a margin (tandem_core.deadline), "
                "between --round-deadline-floor-ms and --round-deadline-ms; while a round waits (after 100 ms, then "
                "every 100 ms, one check out at a time), the edge checks the link (a call the cloud's gateway answers at "
                "once): unanswered, the round is given up at once; off: every round waits --round-deadline-ms"})
    round_deadline_floor_ms: int = field(default=FLOOR_MS, metadata={
        "help": "the learnt round deadline is never shorter than this (unless --round-deadline-ms is)"})
    open_deadline_ms: int = field(default=OPEN_DEADLINE_MS, metadata={
        "help": "deadline for opening a cloud session, prefill included"})
    max_concurrent: int = field(default=MAX_CONCURRENT_GENERATIONS, metadata={"help": "generations at once"})
    max_resumes: int = field(default=3, metadata={"help": "cloud stream re-opens per request"})
    drain_s: float = field(default=DRAIN_S, metadata={
        "help": "on SIGTERM, how long running generations may take to finish before the node stops"})
    # The hop to the cloud. The token itself comes from --cloud-token-file or TANDEM_EDGE_CLOUD_TOKEN.
    cloud_tls: bool = field(default=False, metadata={
        "help": "reach the cloud over TLS (the system's CAs unless --cloud-ca-cert)"})
    cloud_ca_cert: Path | None = field(default=None, metadata={"help": "CA of the cloud's certificate (PEM); "
                                                                       "implies --cloud-tls"})
    cloud_client_cert: Path | None = field(default=None, metadata={"help": "this device's certificate, for a cloud "
                                                                           "that asks for mutual TLS"})
    cloud_client_key: Path | None = field(default=None, metadata={"help": "the device certificate's key"})
    cloud_server_name: str | None = field(default=None, metadata={
        "help": "name to check in the cloud's certificate when it differs from --cloud's host"})
    cloud_token_file: Path | None = field(default=None, metadata={
        "help": "file with this device's cloud token (or set TANDEM_EDGE_CLOUD_TOKEN)",
        "secret_env": "TANDEM_EDGE_CLOUD_TOKEN"})
    # This node's own endpoint. Its key comes from --api-key-file or TANDEM_EDGE_API_KEY.
    tls_cert: Path | None = field(default=None, metadata={"help": "serve over TLS with this certificate (PEM)"})
    tls_key: Path | None = field(default=None, metadata={"help": "the certificate's private key (PEM)"})
    api_key_file: Path | None = field(default=None, metadata={
        "help": "file with the key callers must send (or set TANDEM_EDGE_API_KEY)", "secret_env": "TANDEM_EDGE_API_KEY"})
    metrics_port: int | None = field(default=None, metadata={
        "help": "serve Prometheus /metrics on this port (0 picks a free one; -1 or unset: none); it takes "
                "this node's TLS and API key"})
    metrics_host: str = field(default="127.0.0.1", metadata={
        "help": "address of the /metrics endpoint; beyond loopback it needs TLS and a key, or --insecure"})
    insecure: bool = field(default=False, metadata={
        "help": "allow a non-loopback --host without TLS and a key (INSECURE: anyone who reaches it can use it)"})

    def __post_init__(self) -> None:
        if self.cloud_address is not None and ":" not in self.cloud_address:
            raise ValueError(f"cloud_address: must be HOST:PORT, got {self.cloud_address!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535], got {self.port}")
        if not 0 <= self.tree_nodes <= MAX_TREE_NODES:
            raise ValueError(f"tree_nodes: must be in [0, {MAX_TREE_NODES}] (0: chains only), got {self.tree_nodes}")
        if not 0 <= self.draft_len <= MAX_DRAFT_LEN:
            raise ValueError(f"draft_len: must be in [0, {MAX_DRAFT_LEN}] (0: adaptive), got {self.draft_len}")
        for name in ("round_deadline_ms", "open_deadline_ms", "round_deadline_floor_ms"):
            if not 1 <= getattr(self, name) <= MAX_DEADLINE_MS:
                raise ValueError(f"{name}: must be in [1, {MAX_DEADLINE_MS}], got {getattr(self, name)}")
        if self.metrics_port is not None and self.metrics_port < 0:
            object.__setattr__(self, "metrics_port", None)  # -1 on the command line: no endpoint
        if self.metrics_port is not None and self.metrics_port > 65535:
            raise ValueError(f"metrics_port: must be in [0, 65535] (or -1: none), got {self.metrics_port}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be >= 1, got {self.max_concurrent}")
        if self.max_resumes < 0:
            raise ValueError(f"max_resumes: must be >= 0, got {self.max_resumes}")
        if not 0 <= self.drain_s <= MAX_DRAIN_S:
            raise ValueError(f"drain_s: must be in [0, {MAX_DRAIN_S:g}], got {self.drain_s}")

    @property
    def drafter_name(self) -> str:
        return self.drafter.name if self.drafter is not None else ""
