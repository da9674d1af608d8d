"""The SDK's typed values: frozen dataclasses that mirror the orchestrator's messages.

Guarantees: every value is immutable (frozen dataclasses; sequences are tuples) and holds plain
Python types only (str, int, float, bool, tuple, dict), so it can be logged, compared, or turned
into JSON with `dataclasses.asdict`. Enumerations travel as lower-case strings: routes
"local" | "speculative" | "cloud", document privacy "private" | "shareable", finish reasons
"stop" | "length" | None.

Example:
    >>> result = client.complete(prompt="Reverse a list in Python.")
    >>> result.stats.route, result.stats.generated_tokens, result.stats.finish_reason
    ('speculative', 57, 'stop')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Route = Literal["auto", "local", "speculative", "cloud"]
PrivacyMode = Literal["strict", "cloud_quality"]
Privacy = Literal["private", "shareable"]
DocumentKind = Literal["document", "note", "profile"]

ROUTES: tuple[str, ...] = ("auto", "local", "speculative", "cloud")
PRIVACY_MODES: tuple[str, ...] = ("strict", "cloud_quality")
PRIVACIES: tuple[str, ...] = ("private", "shareable")


@dataclass(frozen=True)
class Message:
    """One chat message; `role` is "system", "user" or "assistant".

    Example:
        >>> client.complete(messages=[Message("user", "Hi!")])
    """

    role: str
    content: str


@dataclass(frozen=True)
class Delta:
    """A piece of the answer: concatenated in order, the deltas are the text."""

    text: str
    tokens: tuple[int, ...]  # the token ids this delta commits
    source: str  # "verified" (accepted drafts), "target" (the target's token ending a round), "cloud" or "local"


@dataclass(frozen=True)
class Citation:
    """A chunk of a personal document that was injected into the prompt."""

    document_id: str
    title: str
    chunk_index: int
    score: float
    privacy: str  # "private" or "shareable"


@dataclass(frozen=True)
class RouteSwitch:
    """A change of route in the middle of an answer (e.g. speculative -> local)."""

    at_token: int  # tokens already committed when it happened
    from_route: str
    to_route: str
    reason: str
    at_ms: float  # since the request started


@dataclass(frozen=True)
class Started:
    """The first message of an answer: which route was taken, why, and what was cited."""

    route: str
    reason: str
    citations: tuple[Citation, ...] = ()
    private_chunks_dropped: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class Stats:
    """The final statistics of one answer (OrchestratorStats plus its GenerationStats).

    `ttft_ms` and `tokens_per_s` are as the orchestrator saw them (retrieval included);
    `edge_ttft_ms` and `edge_tokens_per_s` are the edge node's own figures.
    """

    route: str  # the route chosen at the start
    reason: str
    category: str = ""
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    orchestrator_ms: float = 0.0
    generated_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length" or None when unknown
    acceptance_rate: float = 0.0
    mean_accepted_len: float = 0.0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    local_tokens: int = 0  # produced on the device without verification
    verified_tokens: int = 0  # committed by the cloud
    resumes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    edge_cpu_s: float = 0.0
    edge_ttft_ms: float = 0.0
    edge_tokens_per_s: float = 0.0
    cloud_prefill_tokens: int = 0  # tokens the cloud ran through the target for this answer's KV
    cloud_reused_tokens: int = 0  # tokens whose KV came from the cloud's prefix cache
    drafter_prefill_tokens: int = 0  # tokens the device's drafter prefilled
    drafter_prefill_ms: float = 0.0
    switches: tuple[RouteSwitch, ...] = ()
    citations: tuple[Citation, ...] = ()
    private_chunks_dropped: int = 0
    pipeline_tries: int = 0  # rounds drafted while their predecessor's verdict was in flight
    pipeline_hits: int = 0  # of which the verdict confirmed the guess
    draft_reasons: dict[str, int] = field(default_factory=dict)  # why each draft length: reason class -> rounds
    tree_rounds: int = 0  # rounds that sent a draft tree
    nodes: int = 0  # drafts verified over all rounds, a tree's nodes counted

    @property
    def mean_draft_len(self) -> float | None:
        """Drafts per round; None without rounds."""
        return self.drafted / self.rounds if self.rounds else None

    @property
    def tree_nodes_per_round(self) -> float | None:
        """Drafts verified per round, a tree's nodes counted; None without rounds."""
        return self.nodes / self.rounds if self.rounds else None

    @property
    def pipeline_hit_rate(self) -> float | None:
        """pipeline_hits / pipeline_tries; None when no round was drafted ahead."""
        return self.pipeline_hits / self.pipeline_tries if self.pipeline_tries else None


@dataclass(frozen=True)
class Result:
    """A whole answer, as `Client.complete` returns it."""

    text: str
    stats: Stats | None
    started: Started | None


@dataclass(frozen=True)
class Document:
    """A personal document stored (and embedded) on the device."""

    id: str
    title: str
    kind: str  # "document", "note" or "profile"
    privacy: str  # "private" or "shareable"
    chunks: int = 0
    bytes: int = 0
    created_unix_ms: int = 0
    source: str = ""
    truncated: bool = False  # title or source cut to the server's limit (stored longer, before limits)


@dataclass(frozen=True)
class LinkStatus:
    """The link to the cloud as the orchestrator sees it."""

    state: str  # "up", "down" or "unknown"
    circuit: str  # "closed", "open" or "half_open"
    rtt_ms: float = 0.0
    rtt_jitter_ms: float = 0.0
    consecutive_failures: int = 0
    last_probe_age_s: float = 0.0
    cloud_address: str = ""


@dataclass(frozen=True)
class ModelInfo:
    role: str  # "drafter", "target" or "embedder"
    name: str
    where: str  # "edge", "cloud" or "orchestrator"
    loaded: bool


@dataclass(frozen=True)
class Status:
    """The orchestrator's health: link, circuit, recent acceptance, models, documents."""

    link: LinkStatus
    recent_acceptance: float = 0.0
    acceptance_by_category: dict[str, float] = field(default_factory=dict)
    models: tuple[ModelInfo, ...] = ()
    edge_address: str = ""
    documents: int = 0
    edge_healthy: bool = False
