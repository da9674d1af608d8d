"""Every Prometheus metric Tandem exports, defined once: name, kind, help, labels, buckets.

Guarantees:
- Names follow Prometheus conventions: a `tandem_` prefix, counters end in `_total`, times are
  `_seconds`, sizes `_bytes`. `exposed_name` gives the name a scraper sees: the cloud's metrics
  go through Ray's exporter (`ray.serve.metrics`), which prefixes `ray_`.
- Cardinality is bounded: every label has a closed set of values (routes, causes, status codes,
  draft positions 0..`MAX_POSITION`); nothing per request, per session or per token.
- Stdlib only at import: each node's `metrics` module builds its instruments from these
  definitions (`prometheus_instruments` for the edge, the orchestrator and the cloud outside Ray,
  which imports prometheus-client when called; `cloud_node.metrics` with `ray.serve.metrics` in
  a replica), and `tests/unit/test_metrics_dashboard.py` checks
  that the dashboard and the scrape configs query only names defined here.

Speculative-decoding terms (p = target, q = drafter; Leviathan et al. 2023, arXiv 2211.17192):
a *draft* is one round's proposal of k tokens; *accepted* tokens are drafts the target kept;
the *bonus* token is the target's own token after the accepted drafts (the correction after a
rejection, or the extra token after a fully accepted round). acceptance rate =
accepted / draft tokens; mean tokens per round = (accepted + bonus) / drafts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EDGE, ORCHESTRATOR, CLOUD = "edge", "orchestrator", "cloud"
RAY_PREFIX = "ray_"  # Ray's Prometheus exporter prefixes every application metric with this
MAX_POSITION = 16  # tandem.limits.MAX_DRAFT_LEN: draft positions are 0..15, 16 collects anything past

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_COUNTS = tuple(float(n) for n in range(0, MAX_POSITION + 2))  # 0..17: tokens per round, draft length
_BATCH = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class MetricDef:
    node: str  # EDGE, ORCHESTRATOR or CLOUD: the process that exports it
    name: str  # counters include "_total"
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only

    def __post_init__(self) -> None:
        if not self.name.startswith("tandem_"):
            raise ValueError(f"name: {self.name!r} must start with tandem_")
        if self.kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"kind: {self.kind!r}")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"name: {self.name!r}: counters, and only counters, end in _total")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"buckets: {self.name!r}: histograms, and only histograms, have buckets")

    @property
    def base_name(self) -> str:
        """The name without `_total` (what prometheus-client and Ray take)."""
        return self.name.removesuffix("_total")

    @property
    def exposed_name(self) -> str:
        return RAY_PREFIX + self.name if self.node == CLOUD else self.name

    def series(self) -> tuple[str, ...]:
        """Every series name a scrape of this metric holds (histograms: _bucket, _sum, _count)."""
        if self.kind == "histogram":
            return tuple(self.exposed_name + s for s in ("_bucket", "_sum", "_count"))
        return (self.exposed_name,)


def _d(node: str, name: str, kind: str, text: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = ()
       ) -> MetricDef:
    return MetricDef(node, name, kind, text, labels, buckets)


C, G, H = "counter", "gauge", "histogram"

METRICS: tuple[MetricDef, ...] = (
    # --- the edge: speculative decoding, as each answer's statistics report it -----------------
    _d(EDGE, "tandem_edge_requests_total", C, "Answers finished, by the route they started on and the finish reason.",
       ("route", "finish_reason")),
    _d(EDGE, "tandem_edge_generated_tokens_total", C, "Tokens committed, by source (verified, cloud, local).",
       ("source",)),
    _d(EDGE, "tandem_spec_drafts_total", C, "Speculative rounds (one draft of k tokens each)."),
    _d(EDGE, "tandem_spec_draft_tokens_total", C, "Draft tokens proposed by the drafter q."),
    _d(EDGE, "tandem_spec_accepted_tokens_total", C, "Draft tokens accepted by the target p."),
    _d(EDGE, "tandem_spec_accepted_tokens_per_position_total", C,
       "Draft tokens accepted at each draft position (0 = the first draft of a round).", ("position",)),
    _d(EDGE, "tandem_spec_bonus_tokens_total", C, "Target tokens committed after the accepted drafts (correction or bonus)."),
    _d(EDGE, "tandem_spec_retrieval_draft_tokens_total", C,
       "Draft tokens retrieval supplied (copied from the prompt or the answer, or checked in one pass)."),
    _d(EDGE, "tandem_spec_retrieval_accepted_tokens_total", C, "Retrieval-supplied draft tokens accepted."),
    _d(EDGE, "tandem_spec_tokens_per_round", H, "Tokens committed per speculative round.", buckets=_COUNTS),
    _d(EDGE, "tandem_spec_draft_length", H, "Draft length k chosen per round.", buckets=_COUNTS),
    _d(EDGE, "tandem_edge_ttft_seconds", H, "Time to the first committed token, by route.", ("route",), _LATENCY),
    _d(EDGE, "tandem_edge_inter_token_seconds", H, "Time between committed tokens, by route.", ("route",), _TOKEN_GAP),
    _d(EDGE, "tandem_edge_drafter_prefill_seconds", H, "Opening a drafter session (prefill of its KV cache).",
       buckets=_LATENCY),
    _d(EDGE, "tandem_edge_resumes_total", C, "Cloud streams re-opened with the committed tokens."),
    _d(EDGE, "tandem_edge_fallbacks_total", C, "Answers that left the cloud mid-way, by typed cause.", ("cause",)),
    _d(EDGE, "tandem_edge_link_bytes_total", C, "gRPC message bytes to and from the cloud.", ("direction",)),
    _d(EDGE, "tandem_edge_active_generations", G, "Generations running on this edge."),
    _d(EDGE, "tandem_edge_refused_total", C, "Generate calls refused before starting, by status code.", ("code",)),
    # --- the orchestrator: routing, link health, personal data --------------------------------
    _d(ORCHESTRATOR, "tandem_orch_decisions_total", C, "Routing decisions, by route and reason class.",
       ("route", "reason_class")),
    _d(ORCHESTRATOR, "tandem_orch_fallbacks_total", C, "Answers that switched route mid-way, by typed cause.", ("cause",)),
    _d(ORCHESTRATOR, "tandem_orch_resumes_total", C, "Cloud streams the edge re-opened for the orchestrator's answers."),
    _d(ORCHESTRATOR, "tandem_orch_generated_tokens_total", C, "Tokens of finished answers, by source (verified, local).",
       ("source",)),
    _d(ORCHESTRATOR, "tandem_orch_ttft_seconds", H, "Time to the first token as the orchestrator saw it, by route.",
       ("route",), _LATENCY),
    _d(ORCHESTRATOR, "tandem_orch_active_generations", G, "Generations in flight."),
    _d(ORCHESTRATOR, "tandem_orch_circuit_state", G, "The cloud link's circuit breaker: 1 for the current state.",
       ("state",)),
    _d(ORCHESTRATOR, "tandem_orch_link_rtt_seconds", G, "The link monitor's RTT estimate (NaN before any probe)."),
    _d(ORCHESTRATOR, "tandem_orch_http_auth_failures_total", C, "HTTP requests refused with 401 (missing or wrong key)."),
    _d(ORCHESTRATOR, "tandem_personal_documents", G, "Personal documents stored."),
    _d(ORCHESTRATOR, "tandem_personal_chunks", G, "Chunks of the personal documents stored."),
    _d(ORCHESTRATOR, "tandem_personal_retrievals_total", C, "Searches of the personal store."),
    _d(ORCHESTRATOR, "tandem_personal_chunks_cited_total", C, "Personal chunks put into prompts."),
    _d(ORCHESTRATOR, "tandem_personal_chunks_dropped_total", C,
       "Private chunks withheld so that the cloud could be used (privacy)."),
    # --- the cloud replicas (Ray's exporter adds the ray_ prefix and the replica tags) ----------
    _d(CLOUD, "tandem_cloud_sessions_opened_total", C, "Verify sessions opened (resumes included)."),
    _d(CLOUD, "tandem_cloud_session_open_seconds", H, "Opening a session: queueing plus prefill.", buckets=_LATENCY),
    _d(CLOUD, "tandem_cloud_verify_round_seconds", H, "One verify round on the replica: queueing plus the forward pass.",
       buckets=_LATENCY),
    _d(CLOUD, "tandem_cloud_queue_seconds", H, "Waiting for a forward pass (other sessions' passes).", buckets=_LATENCY),
    _d(CLOUD, "tandem_cloud_batch_sessions", H, "Sessions sharing one verify round's forward pass.", buckets=_BATCH),
    _d(CLOUD, "tandem_cloud_prefill_tokens_total", C, "Tokens run through the target to build KV caches."),
    _d(CLOUD, "tandem_cloud_reused_tokens_total", C, "Tokens whose KV came from the prefix cache."),
    _d(CLOUD, "tandem_cloud_prefix_cache_hits_total", C, "Prefix-cache lookups that found a prefix."),
    _d(CLOUD, "tandem_cloud_prefix_cache_misses_total", C, "Prefix-cache lookups that found nothing."),
    _d(CLOUD, "tandem_cloud_kv_evictions_total", C, "KV caches dropped for room, by kind (session, prefix).", ("kind",)),
    _d(CLOUD, "tandem_cloud_active_sessions", G, "Sessions open on the replica."),
    _d(CLOUD, "tandem_cloud_kv_used_bytes", G, "Estimated KV bytes of the resident caches."),
    _d(CLOUD, "tandem_cloud_kv_budget_bytes", G, "The replica's KV budget."),
    _d(CLOUD, "tandem_cloud_sheds_total", C, "Calls refused with RESOURCE_EXHAUSTED (session or KV limit, size)."),
    _d(CLOUD, "tandem_gateway_refusals_total", C, "Calls the gateway refused, by status (UNAUTHENTICATED, "
       "PERMISSION_DENIED: authentication failures; RESOURCE_EXHAUSTED: a device at its session limit).", ("code",)),
)

BY_NAME = {m.name: m for m in METRICS}


def for_node(node: str) -> tuple[MetricDef, ...]:
    return tuple(m for m in METRICS if m.node == node)


def exposed_series() -> frozenset[str]:
    """Every series name a scraper can see from Tandem's processes."""
    return frozenset(s for m in METRICS for s in m.series())


def prometheus_instruments(node: str, registry: Any) -> dict[str, Any]:
    """prometheus-client instruments for `node`'s definitions, registered in `registry`, by name
    (counters are registered under their name without `_total`, which the client adds back)."""
    from prometheus_client import Counter, Gauge, Histogram

    out: dict[str, Any] = {}
    for d in for_node(node):
        if d.kind == "counter":
            out[d.name] = Counter(d.base_name, d.help, d.labels, registry=registry)
        elif d.kind == "gauge":
            out[d.name] = Gauge(d.name, d.help, d.labels, registry=registry)
        else:
            buckets = d.buckets or Histogram.DEFAULT_BUCKETS  # none given: the client's defaults
            out[d.name] = Histogram(d.name, d.help, d.labels, buckets=buckets, registry=registry)
    return out
