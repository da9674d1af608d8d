"""The metric definitions, the dashboard and the scrape configs against the code (no models).

- Every query of deploy/grafana-dashboard.json names only series `tandem.metric_defs` defines
  (with the exposed names: Ray's `ray_` prefix on the cloud's), and the dashboard passes a JSON
  schema of what Grafana needs to import it; the scrape configs point where the nodes serve.
- Each node's metrics module builds exactly its definitions; the edge's `/metrics` endpoint
  serves a parseable exposition, asks for the key when it has one and refuses a non-loopback
  bind without TLS and a key.
- The routing reason classes cover every reason `tandem_core.routing.decide` gives.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tandem import metric_defs
from tandem.deploy import gen as deploy_gen
from tandem.deploy import observability as obs
from tandem.security import SecurityError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "templating": {"type": "object", "required": ["list"]},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
            "properties": {
                "id": {"type": "integer"},
                "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table"]},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"],
                            "properties": {"w": {"type": "integer", "minimum": 1, "maximum": 24},
                                           "x": {"type": "integer", "minimum": 0, "maximum": 23}}},
                "datasource": {"type": "object", "required": ["type", "uid"],
                               "properties": {"type": {"const": "prometheus"}}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr"],
                    "properties": {"expr": {"type": "string", "minLength": 1}}}},
            }}},
    },
}
_SERIES = re.compile(r"\b(?:ray_)?tandem_[a-z0-9_]+")
# What the issue asks the dashboard to show, by a series each must query.
_MUST_SHOW = {"acceptance": "tandem_spec_accepted_tokens_total", "tokens/s": "tandem_edge_generated_tokens_total",
              "round latency": "ray_tandem_cloud_verify_round_seconds_bucket", "route mix": "tandem_orch_decisions_total",
              "fallbacks": "tandem_edge_fallbacks_total", "KV usage": "ray_tandem_cloud_kv_used_bytes",
              "sheds": "ray_tandem_cloud_sheds_total"}


def test_the_monitoring_files_are_what_the_code_renders() -> None:
    files = deploy_gen.render()
    for name in obs.FILES:
        assert (DEPLOY / name).read_text() == files[name], f"{name} drifted: run `python -m tandem.deploy.gen`"


def test_the_dashboard_is_valid_and_queries_only_defined_metrics() -> None:
    board = json.loads((DEPLOY / obs.DASHBOARD).read_text())
    jsonschema.validate(board, DASHBOARD_SCHEMA)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    defined = metric_defs.exposed_series()
    queried = {name for expr in obs.queries(board) for name in _SERIES.findall(expr)}
    assert queried and queried <= defined, f"undefined metrics queried: {sorted(queried - defined)}"
    for what, series in _MUST_SHOW.items():
        assert series in queried, what


def test_a_query_of_an_undefined_metric_is_caught() -> None:
    board = obs.dashboard()
    board["panels"][0]["targets"][0]["expr"] = "rate(tandem_spec_acepted_tokens_total[5m])"
    queried = {name for expr in obs.queries(board) for name in _SERIES.findall(expr)}
    assert queried - metric_defs.exposed_series() == {"tandem_spec_acepted_tokens_total"}
    del board["panels"][0]["gridPos"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(board, DASHBOARD_SCHEMA)


def test_the_scrape_configs_point_where_the_nodes_serve() -> None:
    from tandem.cli.stack import CLOUD_METRICS_PORT, EDGE_METRICS_PORT

    local = yaml.safe_load((DEPLOY / obs.PROMETHEUS_LOCAL).read_text())
    jobs = {j["job_name"]: j for j in local["scrape_configs"]}
    assert set(jobs) == {"tandem-orchestrator", "tandem-edge", "tandem-cloud"}
    targets = {name: j["static_configs"][0]["targets"] for name, j in jobs.items()}
    assert targets["tandem-edge"] == [f"127.0.0.1:{EDGE_METRICS_PORT}"]
    assert targets["tandem-cloud"] == [f"127.0.0.1:{CLOUD_METRICS_PORT}"]
    assert targets["tandem-orchestrator"] == ["127.0.0.1:7080"]  # `tandem up --http-port`'s default
    for name in ("tandem-orchestrator", "tandem-edge"):  # TLS and the key, as a secure `tandem up` serves them
        assert jobs[name]["scheme"] == "https" and jobs[name]["bearer_token_file"].startswith("secure/")
    monitor = yaml.safe_load((DEPLOY / obs.PODMONITOR).read_text())
    assert monitor["kind"] == "PodMonitor"
    rayservice = next(yaml.safe_load_all((DEPLOY / deploy_gen.RAYSERVICE).read_text()))
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_every_definition_follows_the_conventions() -> None:
    names = [m.name for m in metric_defs.METRICS]
    assert len(names) == len(set(names))
    for m in metric_defs.METRICS:
        assert "_seconds" not in m.name or m.kind == "histogram" or m.name.endswith("_seconds"), m.name
        assert not {"request_id", "session", "session_id", "token", "device", "prompt"} & set(m.labels), m.name
    with pytest.raises(ValueError, match="_total"):
        metric_defs.MetricDef("edge", "tandem_x", "counter", "x")
    with pytest.raises(ValueError, match="tandem_"):
        metric_defs.MetricDef("edge", "x_total", "counter", "x")


def test_each_node_builds_exactly_its_definitions() -> None:
    from cloud_node import metrics as cloud_metrics
    from edge_node import metrics as edge_metrics
    from orchestrator import metrics as orch_metrics

    for module, node in ((edge_metrics, metric_defs.EDGE), (orch_metrics, metric_defs.ORCHESTRATOR)):
        families = {f.name for f in text_string_to_metric_families(module.exposition().decode())}
        assert {m.base_name for m in metric_defs.for_node(node)} <= families, node
    assert set(cloud_metrics.backend().m) == {m.name for m in metric_defs.for_node(metric_defs.CLOUD)}


def test_reason_classes_cover_every_routing_reason() -> None:
    from orchestrator.metrics import reason_class
    from tandem_core.routing import LinkView, RouteCosts, RouteRequest, decide

    up = LinkView(circuit="closed", rtt_ms=20.0, jitter_ms=1.0, configured=True)
    down = LinkView(circuit="open", rtt_ms=None, jitter_ms=None, configured=True)
    cases = {
        "privacy": (RouteRequest(prompt_tokens=10, max_new_tokens=10, private_context=True, privacy_mode="strict"), up),
        "client_override": (RouteRequest(prompt_tokens=10, max_new_tokens=10, override="speculative"), up),
        "link_down": (RouteRequest(prompt_tokens=10, max_new_tokens=10, override="cloud"), down),
        "estimate": (RouteRequest(prompt_tokens=10, max_new_tokens=10), up),
        "budget": (RouteRequest(prompt_tokens=10, max_new_tokens=10_000, deadline_ms=1), up),
    }
    for want, (request, link) in cases.items():
        reason = decide(request, link, RouteCosts()).reason
        assert reason_class(reason) == want, reason
    assert reason_class(decide(RouteRequest(prompt_tokens=1, max_new_tokens=1), LinkView("closed", None, None, False),
                               RouteCosts()).reason) == "link_down"
    assert reason_class("something new") == "other"


def _get(url: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_the_edge_metrics_endpoint_serves_parseable_text_behind_its_key() -> None:
    from edge_node.metrics import MetricsServer

    server = MetricsServer("127.0.0.1", 0, tls=None, key="k3y", insecure=False).start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert _get(f"{url}/metrics")[0] == 401
        assert _get(f"{url}/metrics", "wrong")[0] == 401
        assert _get(f"{url}/other", "k3y")[0] == 404
        status, text = _get(f"{url}/metrics", "k3y")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(text)}
        assert "tandem_spec_accepted_tokens" in names and "tandem_edge_ttft_seconds" in names
    finally:
        server.stop()
    with pytest.raises(SecurityError, match="edge metrics"):
        MetricsServer("0.0.0.0", 0, tls=None, key=None, insecure=False)


def test_status_lists_each_process_s_metrics_url() -> None:
    from tandem.cli.stack import _process_rows
    from tandem.ops.local_stack import metrics_url

    assert metrics_url("edge", {"grpc": "127.0.0.1:1", "metrics": "127.0.0.1:7081"}, secure=True) == \
        "https://127.0.0.1:7081/metrics"
    assert metrics_url("orchestrator", {"http": "127.0.0.1:7080"}, secure=False) == "http://127.0.0.1:7080/metrics"
    assert metrics_url("cloud", {"metrics": "127.0.0.1:7082"}, secure=True) == "http://127.0.0.1:7082/metrics"
    assert metrics_url("shaper", {"listen": "127.0.0.1:3"}, secure=True) == ""
    state = {"processes": [{"name": "edge", "pid": 1, "identity": "0:0", "address": "",
                            "metrics": "https://127.0.0.1:7081/metrics"}]}
    (row,) = _process_rows(state)
    assert row["metrics"] == "https://127.0.0.1:7081/metrics"


@pytest.mark.asyncio
async def test_the_orchestrator_metrics_need_its_key_when_it_has_one() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from orchestrator.http_api import create_http_app

    app = create_http_app(object(), api_key="s3cret", metrics_text=lambda: b"tandem_x 1\n")  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/metrics")).status == 401
        reply = await client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert reply.status == 200 and await reply.text() == "tandem_x 1\n"
