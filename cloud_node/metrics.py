"""The cloud's Prometheus metrics: `ray.serve.metrics` in a Serve replica, prometheus-client elsewhere.

Guarantees:
- The instruments are those `tandem.metric_defs` defines for the cloud. In a Ray worker (a
  Serve replica, or the `tandem serve cloud` driver that runs the gateway) they are Ray metrics,
  which Ray's Prometheus exporter serves on each node's metrics-export port with a `ray_` prefix
  and, in a replica, the deployment/replica/application tags. Outside Ray (the plain grpcio
  server, in-process tests) they go to this module's `REGISTRY` (prometheus-client), which
  nothing serves by itself. The backend is chosen once, at the first use in the process.
- Figures come from where they are final: the timing a session's open or round reports
  (`cloud_node.verifier.Timing`, the same figures as the ServerTiming the edge receives), the
  session store's own counters and sizes (`record_store`, after each open and round), the status
  map (sheds) and the gateway's refusals. No label holds a session, device or request.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any

from tandem.metric_defs import CLOUD, MetricDef, for_node, prometheus_instruments

_LOCK = threading.Lock()
_SEEN: dict[int, dict[str, int]] = {}  # id(store) -> the store's cumulative counters last counted


class _Prom:
    """prometheus-client instruments in `REGISTRY`."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self.m: dict[str, Any] = prometheus_instruments(CLOUD, self.registry)

    def _get(self, name: str, labels: dict[str, str]) -> Any:
        metric = self.m[name]
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, value: float, labels: dict[str, str]) -> None:
        self._get(name, labels).inc(value)

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        self._get(name, labels).observe(value)

    def set(self, name: str, value: float, labels: dict[str, str]) -> None:
        self._get(name, labels).set(value)


class _Ray:
    """`ray.serve.metrics` instruments (Serve's replica tags are added when in a replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics as serve_metrics

        self.m: dict[str, Any] = {}
        for d in for_node(CLOUD):
            tags = d.labels or None
            if d.kind == "counter":
                self.m[d.name] = serve_metrics.Counter(d.base_name, description=d.help, tag_keys=tags)
            elif d.kind == "gauge":
                self.m[d.name] = serve_metrics.Gauge(d.name, description=d.help, tag_keys=tags)
            else:
                self.m[d.name] = serve_metrics.Histogram(d.name, description=d.help, boundaries=list(d.buckets),
                                                         tag_keys=tags)

    def inc(self, name: str, value: float, labels: dict[str, str]) -> None:
        if value > 0:  # Ray refuses 0
            self.m[name].inc(value, tags=labels or None)

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.m[name].observe(value, tags=labels or None)

    def set(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.m[name].set(value, tags=labels or None)


def _in_ray() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


@functools.cache
def backend() -> _Prom | _Ray:
    return _Ray() if _in_ray() else _Prom()


def registry() -> Any:
    """The prometheus-client registry outside Ray (tests read it); None in a Ray worker."""
    b = backend()
    return b.registry if isinstance(b, _Prom) else None


def _ms(*values: float) -> float:
    return sum(values) / 1000


def record_open(timing: Any) -> None:
    """A session opened (`cloud_node.verifier.Timing` of its open)."""
    b = backend()
    b.inc("tandem_cloud_sessions_opened_total", 1, {})
    b.observe("tandem_cloud_session_open_seconds", _ms(timing.queue_ms, timing.prefill_ms), {})
    b.observe("tandem_cloud_queue_seconds", _ms(timing.queue_ms), {})
    _prefill(b, timing)


def record_round(timing: Any) -> None:
    """A round verified (its Timing: queueing, any re-prefill after an eviction, the pass)."""
    b = backend()
    b.observe("tandem_cloud_verify_round_seconds", _ms(timing.queue_ms, timing.prefill_ms, timing.verify_ms), {})
    b.observe("tandem_cloud_queue_seconds", _ms(timing.queue_ms), {})
    if timing.batch_sessions:
        b.observe("tandem_cloud_batch_sessions", timing.batch_sessions, {})
    _prefill(b, timing)


def _prefill(b: _Prom | _Ray, timing: Any) -> None:
    b.inc("tandem_cloud_prefill_tokens_total", timing.prefill_tokens, {})
    b.inc("tandem_cloud_reused_tokens_total", timing.reused_tokens, {})


def record_store(store: Any) -> None:
    """The session store's sizes now, and its cumulative counters' growth since the last call."""
    b = backend()
    b.set("tandem_cloud_active_sessions", len(store), {})
    b.set("tandem_cloud_kv_used_bytes", store.resident_bytes(), {})
    b.set("tandem_cloud_kv_budget_bytes", store.kv_budget_bytes, {})
    now = {"hits": store.hits, "misses": store.misses, "prefix": store.evicted_prefixes,
           "session": store.evicted_sessions}
    with _LOCK:
        last = _SEEN.get(id(store), dict.fromkeys(now, 0))
        _SEEN[id(store)] = now
    grew = {k: max(0, v - last[k]) for k, v in now.items()}
    b.inc("tandem_cloud_prefix_cache_hits_total", grew["hits"], {})
    b.inc("tandem_cloud_prefix_cache_misses_total", grew["misses"], {})
    for kind in ("session", "prefix"):
        b.inc("tandem_cloud_kv_evictions_total", grew[kind], {"kind": kind})


def record_shed() -> None:
    backend().inc("tandem_cloud_sheds_total", 1, {})


def record_gateway_refusal(code: str) -> None:
    backend().inc("tandem_gateway_refusals_total", 1, {"code": code})


def defined() -> tuple[MetricDef, ...]:
    return for_node(CLOUD)
