"""deploy/README.md against what the spec renders and what Ray 2.60 exports.

The README is written by hand, so these tests pin the facts it shares with the generated files:
the minimum KubeRay version, the commands that need token auth, the nodes' environment, the
drain time, and the Prometheus names (each must be a metric that Ray Serve registers, with the
suffix Ray's exporter gives its kind: `_total` for counters, `_bucket`/`_sum`/`_count` for
histograms, none for gauges).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tandem.deploy import gen as deploy_gen
from tandem.deploy.gen import AUTH_ENV, DeploySpec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
README = (DEPLOY / "README.md").read_text()


def _ray_serve_metrics() -> dict[str, str]:
    """Metric name (without Ray's `ray_` prefix) -> Counter, Gauge or Histogram, from Ray's source."""
    import ray

    pattern = re.compile(r'metrics\.(Counter|Gauge|Histogram)\(\s*(?:name=)?f?"([a-z_{}]+)"')
    found = {}
    for path in (Path(ray.__file__).parent / "serve").rglob("*.py"):
        for kind, name in pattern.findall(path.read_text()):
            for protocol in ("http", "grpc"):  # RequestIngressMetrics: f"serve_num_{protocol_name}_requests"
                found[name.replace("{protocol_name}", protocol)] = kind
    return found


def exported_name_problem(name: str, metrics: dict[str, str]) -> str | None:
    """None when `name` is what Ray 2.60 exports for one of its Serve metrics, else why not."""
    if not name.startswith("ray_"):
        return f"{name}: Ray prefixes every metric with ray_"
    base = name.removeprefix("ray_")
    kind = metrics.get(base)
    if kind == "Counter" and not base.endswith("_total"):
        return f"{name}: a counter is exported as {name}_total"
    if kind == "Histogram":
        return f"{name}: a histogram is exported as {name}_bucket, _sum and _count"
    if kind is not None:
        return None  # a gauge, or a counter whose name already ends in _total
    for suffix, wanted in (("_total", "Counter"), ("_bucket", "Histogram"), ("_sum", "Histogram"), ("_count", "Histogram")):
        if base.endswith(suffix) and metrics.get(base.removesuffix(suffix)) == wanted:
            return None
    return f"{name}: no Serve metric is exported under this name"


def test_every_metric_the_readme_names_is_exported_so() -> None:
    metrics = _ray_serve_metrics()
    names = sorted(set(re.findall(r"\bray_serve_[a-z_]+", README)))
    assert len(names) >= 10 and "ray_serve_num_grpc_requests_total" in names
    assert [p for name in names if (p := exported_name_problem(name, metrics))] == []


@pytest.mark.parametrize("name, problem", [
    ("ray_serve_deployment_request_counter", "exported as ray_serve_deployment_request_counter_total"),
    ("serve_num_grpc_requests_total", "prefixes every metric with ray_"),
    ("ray_serve_deployment_processing_latency_ms", "_bucket"),
    ("ray_serve_num_grpc_request_total", "no Serve metric"),
    ("ray_serve_replica_processing_queries_total", "no Serve metric"),
])
def test_a_wrong_metric_name_is_caught(name: str, problem: str) -> None:
    assert problem in (exported_name_problem(name, _ray_serve_metrics()) or "")


def test_the_kuberay_version_is_the_specs_everywhere() -> None:
    version = DeploySpec().kuberay_version
    texts = [README, *deploy_gen.render().values()]
    named = {v for text in texts for v in re.findall(r"KubeRay >= ([0-9.]+)", text)}
    assert named == {version}
    assert f"from v{version} on (KubeRay PR #4558)" in README


def test_every_command_against_the_cluster_carries_the_token() -> None:
    assert deploy_gen.launcher_deploy_command() in README
    assert deploy_gen.launcher_deploy_command() in deploy_gen.render()[deploy_gen.CLUSTER]
    for line in README.splitlines():
        if line.startswith("ray exec "):
            assert AUTH_ENV in line, line
    for variable in ("export RAY_AUTH_MODE=token", "export RAY_AUTH_TOKEN_PATH=", "export RAY_DASHBOARD_ADDRESS="):
        assert variable in README
    assert "serve shutdown -y" in README and "pip install boto3" in README


def test_the_nodes_start_as_the_launcher_starts_them() -> None:
    cluster = deploy_gen.cluster_config(DeploySpec())
    env = deploy_gen._env_prefix(DeploySpec())
    starts = [line for line in README.splitlines() if " ray start " in line]
    assert len(starts) == 2
    for line, command in zip(starts, [cluster["head_start_ray_commands"][-1], cluster["worker_start_ray_commands"][-1]]):
        assert line.startswith(f"{env} RAY_AUTH_MODE=token ray start ")
        flags = set(line.split(" ray start ")[1].split())
        assert flags <= set(command.split()), flags - set(command.split())


def test_the_drain_time_and_threads_the_readme_states() -> None:
    spec = DeploySpec()
    assert f"`rayClusterDeletionDelaySeconds` ({spec.drain_s} s" in README
    assert f"`terminationGracePeriodSeconds` ({spec.drain_s} s)" in README
    assert f"`threads` = its `num_cpus` ({spec.replica_threads})" in README
