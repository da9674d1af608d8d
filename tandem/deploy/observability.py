"""The monitoring files of `deploy/`: a Grafana dashboard and the Prometheus scrape configs.

Guarantees:
- `dashboard()` is a Grafana dashboard (schemaVersion 39, a `${datasource}` Prometheus input):
  acceptance, tokens/s, round-latency percentiles, route mix, fallbacks by cause, KV usage, sheds
  and the rest of the figures `tandem.metric_defs` defines. Every query names only metrics defined
  there, with their exposed names (the cloud's carry Ray's `ray_` prefix);
  `tests/unit/test_metrics_dashboard.py` checks that and a JSON schema.
- `prometheus_local()` scrapes the stack `tandem up` starts on its default ports: the
  orchestrator's HTTP port and the edge's metrics port over TLS with the development CA and
  their API keys (`bearer_token_file`; both require the key when one is configured), the cloud's
  Ray exporter over plain HTTP on loopback. Its file paths are relative to the file itself:
  copied into TANDEM_HOME it finds `secure/` (`tandem.ops.local_stack.prepare_secrets`). Other
  ports: `tandem status --json` lists each process's `metrics` URL.
- `pod_monitor(spec)` is a prometheus-operator PodMonitor for the KubeRay pods of
  `deploy/rayservice.yaml` (head and workers: the container port named `metrics`, Ray's exporter,
  which carries the replicas' `ray_tandem_*` metrics).
- Rendering is deterministic (fixed key order, no timestamps).
"""

from __future__ import annotations

import json
from typing import Any

from tandem.deploy.spec import DeploySpec

DASHBOARD, PROMETHEUS_LOCAL, PODMONITOR = "grafana-dashboard.json", "prometheus-local.yaml", "podmonitor.yaml"
FILES = (DASHBOARD, PROMETHEUS_LOCAL, PODMONITOR)
DASHBOARD_UID = "tandem-overview"
METRICS_PORT_NAME = "metrics"  # the Ray containers' port of Ray's exporter (gen.rayservice)
# `tandem up`'s defaults (tandem.cli.stack): orchestrator HTTP, edge metrics, cloud (Ray exporter)
LOCAL_PORTS = {"orchestrator": 7080, "edge": 7081, "cloud": 7082}
# Prometheus reads a relative path from the config file's folder: copy the file into TANDEM_HOME.
LOCAL_SECRETS = "secure"

_R = "[$__rate_interval]"

# (title, unit, [(legend, PromQL)]); one panel each, two per row.
PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Acceptance rate (accepted / draft tokens)", "percentunit", (
        ("acceptance", f"sum(rate(tandem_spec_accepted_tokens_total{_R})) / sum(rate(tandem_spec_draft_tokens_total{_R}))"),
        ("retrieval share of accepted", f"sum(rate(tandem_spec_retrieval_accepted_tokens_total{_R})) "
                                        f"/ sum(rate(tandem_spec_accepted_tokens_total{_R}))"),
    )),
    ("Mean tokens per round (accepted + bonus) / drafts", "short", (
        ("tokens per round", f"(sum(rate(tandem_spec_accepted_tokens_total{_R})) "
                             f"+ sum(rate(tandem_spec_bonus_tokens_total{_R}))) / sum(rate(tandem_spec_drafts_total{_R}))"),
    )),
    ("Acceptance by draft position", "percentunit", (
        ("position {{position}}", f"sum by (position) (rate(tandem_spec_accepted_tokens_per_position_total{_R})) "
                                  f"/ scalar(sum(rate(tandem_spec_drafts_total{_R})))"),
    )),
    ("Tokens/s by source", "short", (
        ("{{source}}", f"sum by (source) (rate(tandem_edge_generated_tokens_total{_R}))"),
    )),
    ("Verify round latency (cloud)", "s", tuple(
        (f"p{q}", f"histogram_quantile(0.{q}, sum by (le) (rate(ray_tandem_cloud_verify_round_seconds_bucket{_R})))")
        for q in (50, 95, 99))),
    ("Time to first token", "s", tuple(
        (f"{{{{route}}}} p{q}", f"histogram_quantile(0.{q}, sum by (le, route) (rate(tandem_orch_ttft_seconds_bucket{_R})))")
        for q in (50, 95))),
    ("Inter-token time p95", "s", (
        ("{{route}}", f"histogram_quantile(0.95, sum by (le, route) (rate(tandem_edge_inter_token_seconds_bucket{_R})))"),
    )),
    ("Cloud queueing and session open p95", "s", (
        ("queue", f"histogram_quantile(0.95, sum by (le) (rate(ray_tandem_cloud_queue_seconds_bucket{_R})))"),
        ("session open", f"histogram_quantile(0.95, sum by (le) (rate(ray_tandem_cloud_session_open_seconds_bucket{_R})))"),
        ("drafter prefill", f"histogram_quantile(0.95, sum by (le) (rate(tandem_edge_drafter_prefill_seconds_bucket{_R})))"),
    )),
    ("Route mix (decisions/s)", "short", (
        ("{{route}} / {{reason_class}}", f"sum by (route, reason_class) (rate(tandem_orch_decisions_total{_R}))"),
    )),
    ("Fallbacks by cause, resumes", "short", (
        ("fallback {{cause}}", f"sum by (cause) (rate(tandem_edge_fallbacks_total{_R}))"),
        ("resumes", f"sum(rate(tandem_edge_resumes_total{_R}))"),
    )),
    ("Link: circuit and RTT", "s", (
        ("circuit {{state}}", "max by (state) (tandem_orch_circuit_state)"),
        ("rtt", "max(tandem_orch_link_rtt_seconds)"),
    )),
    ("KV cache used / budget per replica", "percentunit", (
        ("{{replica}}", "max by (replica) (ray_tandem_cloud_kv_used_bytes) "
                        "/ max by (replica) (ray_tandem_cloud_kv_budget_bytes)"),
    )),
    ("Sessions and batch size", "short", (
        ("open sessions {{replica}}", "max by (replica) (ray_tandem_cloud_active_sessions)"),
        ("mean sessions per pass", f"sum(rate(ray_tandem_cloud_batch_sessions_sum{_R})) "
                                   f"/ sum(rate(ray_tandem_cloud_batch_sessions_count{_R}))"),
        ("edge generations", "sum(tandem_edge_active_generations)"),
    )),
    ("Prefix cache and evictions", "short", (
        ("hits", f"sum(rate(ray_tandem_cloud_prefix_cache_hits_total{_R}))"),
        ("misses", f"sum(rate(ray_tandem_cloud_prefix_cache_misses_total{_R}))"),
        ("evictions {{kind}}", f"sum by (kind) (rate(ray_tandem_cloud_kv_evictions_total{_R}))"),
    )),
    ("Sheds and refusals", "short", (
        ("cloud sheds", f"sum(rate(ray_tandem_cloud_sheds_total{_R}))"),
        ("gateway {{code}}", f"sum by (code) (rate(ray_tandem_gateway_refusals_total{_R}))"),
        ("edge refused {{code}}", f"sum by (code) (rate(tandem_edge_refused_total{_R}))"),
        ("orchestrator 401", f"sum(rate(tandem_orch_http_auth_failures_total{_R}))"),
    )),
    ("Personal data (counts only)", "short", (
        ("documents", "max(tandem_personal_documents)"),
        ("chunks", "max(tandem_personal_chunks)"),
        ("retrievals/s", f"sum(rate(tandem_personal_retrievals_total{_R}))"),
        ("private chunks dropped/s", f"sum(rate(tandem_personal_chunks_dropped_total{_R}))"),
    )),
)


def _panel(i: int, title: str, unit: str, queries: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for j, (legend, expr) in enumerate(queries)],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": DASHBOARD_UID,
        "title": "Tandem: speculative decoding, routing and load",
        "description": "GENERATED by `python -m tandem.deploy.gen` (tandem/deploy/observability.py): edit that, "
                       "not this file.",
        "tags": ["tandem"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def queries(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def prometheus_local() -> dict[str, Any]:
    def tls_job(name: str, key_file: str) -> dict[str, Any]:
        return {"job_name": f"tandem-{name}", "scheme": "https", "metrics_path": "/metrics",
                "bearer_token_file": f"{LOCAL_SECRETS}/{key_file}",
                "tls_config": {"ca_file": f"{LOCAL_SECRETS}/pki/ca.pem"},
                "static_configs": [{"targets": [f"127.0.0.1:{LOCAL_PORTS[name]}"], "labels": {"node": name}}]}

    return {
        "global": {"scrape_interval": "15s"},
        "scrape_configs": [
            tls_job("orchestrator", "api.key"),
            tls_job("edge", "edge-api.key"),
            {"job_name": "tandem-cloud", "metrics_path": "/metrics",
             "static_configs": [{"targets": [f"127.0.0.1:{LOCAL_PORTS['cloud']}"], "labels": {"node": "cloud"}}]},
        ],
    }


def pod_monitor(spec: DeploySpec, label: str) -> dict[str, Any]:
    """`label`: the pods' label naming the RayService (gen.GATEWAY_LABEL)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{spec.cluster_name}-ray", "labels": {"release": "prometheus"}},
        "spec": {
            "selector": {"matchLabels": {label: spec.cluster_name}},
            "podMetricsEndpoints": [{"port": METRICS_PORT_NAME, "path": "/metrics", "interval": "15s"}],
        },
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
