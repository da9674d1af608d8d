"""The orchestrator's Prometheus metrics (prometheus-client), served at `/metrics` on its HTTP port.

Guarantees:
- The instruments are those `tandem.metric_defs` defines for the orchestrator, in this node's
  own registry (`REGISTRY`), created once per process.
- `observe(item)` counts each answer from its own stream as it leaves the core: the `started`
  message gives the routing decision (route and `reason_class`, a closed set derived from the
  policy's reason sentence), the citations and the private chunks withheld; the `stats` message
  the fallbacks by typed cause, the resumes, the tokens by source and the TTFT. So the counters
  equal what the answers' statistics messages report.
- `refresh(...)` sets the gauges that describe now (circuit state, RTT, generations in flight)
  right before each scrape. The personal store's counts are set by the store itself
  (`record_store_counts`), retrievals counted where it searches.
- Counts only: no document text, title or id, no prompt, no per-request label.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from protos.enums import cause_from_proto
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem.metric_defs import ORCHESTRATOR, prometheus_instruments
from tandem_core.link_health import CIRCUIT_STATES

REGISTRY = CollectorRegistry(auto_describe=True)

# The routing policy's reason sentences (tandem_core.routing.decide) by their opening words.
REASON_CLASSES = (
    ("private context", "privacy"),
    ("requested by the client", "client_override"),
    ("no cloud link", "link_down"),
    ("the cloud link is down", "link_down"),
    ("link up", "estimate"),
    ("neither cloud route", "budget"),
    ("the ", "budget"),  # "the deadline/TTFT budget cannot be met by any route"
)


M: dict[str, Any] = prometheus_instruments(ORCHESTRATOR, REGISTRY)


def reason_class(reason: str) -> str:
    """A bounded class of a routing reason (its "route: " opening dropped); "X was requested but the
    link is down" is link_down."""
    if " was requested but " in reason:
        return "link_down"
    reason = reason.split(": ", 1)[1] if reason.split(": ", 1)[0] in ("local", "speculative", "cloud") else reason
    return next((cls for prefix, cls in REASON_CLASSES if reason.startswith(prefix)), "other")


def observe(item: opb.GenerateTextResponse) -> None:
    kind = item.WhichOneof("kind")
    if kind == "started":
        s = item.started
        M["tandem_orch_decisions_total"].labels(route=s.route, reason_class=reason_class(s.reason)).inc()
        M["tandem_personal_chunks_cited_total"].inc(len(s.citations))
        M["tandem_personal_chunks_dropped_total"].inc(s.private_chunks_dropped)
    elif kind == "stats":
        _observe_stats(item.stats)


def _observe_stats(st: opb.OrchestratorStats) -> None:
    g = st.generation
    for switch in st.switches:
        cause = cause_from_proto(switch.cause)
        M["tandem_orch_fallbacks_total"].labels(cause=str(cause) if cause is not None else "unspecified").inc()
    M["tandem_orch_resumes_total"].inc(g.resumes)
    M["tandem_orch_generated_tokens_total"].labels(source="verified").inc(g.verified_tokens)
    M["tandem_orch_generated_tokens_total"].labels(source="local").inc(g.local_tokens)
    if g.generated_tokens:
        M["tandem_orch_ttft_seconds"].labels(route=st.route).observe(st.ttft_ms / 1000)


def refresh(*, circuit: str, rtt_ms: float | None, in_flight: int) -> None:
    for state in CIRCUIT_STATES:
        M["tandem_orch_circuit_state"].labels(state=state).set(1 if state == circuit else 0)
    M["tandem_orch_link_rtt_seconds"].set(float("nan") if rtt_ms is None else rtt_ms / 1000)
    M["tandem_orch_active_generations"].set(in_flight)


def record_auth_failure() -> None:
    M["tandem_orch_http_auth_failures_total"].inc()


def record_store_counts(documents: int, chunks: int) -> None:
    M["tandem_personal_documents"].set(documents)
    M["tandem_personal_chunks"].set(chunks)


def record_retrieval() -> None:
    M["tandem_personal_retrievals_total"].inc()


def exposition() -> bytes:
    return generate_latest(REGISTRY)
