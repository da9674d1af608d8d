"""deploy/README.md against what the spec renders and what Ray 2.60 exports.

The README is written by hand, so these tests pin the facts it shares with the generated files:
the minimum KubeRay version, the commands that need token auth, the nodes' environment, the
drain time, the Secrets and files of the Security section (each Secret the manifest mounts has
its `kubectl create secret` line with the keys the pods read), the edge's flags, and the
Prometheus names (each must be a metric that Ray Serve registers, with the
suffix Ray's exporter gives its kind: `_total` for counters, `_bucket`/`_sum`/`_count` for
histograms, none for gauges).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from tandem.deploy import gen as deploy_gen
from tandem.deploy.gen import AUTH_ENV, DeploySpec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
README = (DEPLOY / "README.md").read_text()
SECURITY = README.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]


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
    commands = [next(c for c in cluster[key] if "/ray start " in c)
                for key in ("head_start_ray_commands", "worker_start_ray_commands")]
    for line, command in zip(starts, commands):
        assert line.startswith(f"{env} RAY_AUTH_MODE=token ray start ")
        flags = set(line.split(" ray start ")[1].split())
        assert flags <= set(command.split()), flags - set(command.split())


def test_the_drain_time_and_threads_the_readme_states() -> None:
    spec = DeploySpec()
    assert f"`rayClusterDeletionDelaySeconds` ({spec.drain_s} s" in README
    assert f"`terminationGracePeriodSeconds` ({spec.drain_s} s)" in README
    assert f"`threads` = its `num_cpus` ({spec.replica_threads})" in README


def _secret_volumes(spec: DeploySpec) -> dict[str, set[str]]:
    """Secret -> the keys the rendered pods read from it."""
    rayservice = next(yaml.safe_load_all(deploy_gen.render(spec)[deploy_gen.RAYSERVICE]))
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {v["secret"]["secretName"]: {item["key"] for item in v["secret"]["items"]}
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for v in group["template"]["spec"].get("volumes", [])}


def create_secret_problems(section: str, volumes: dict[str, set[str]]) -> list[str]:
    """Each mounted Secret needs a `kubectl create secret` line that gives it the keys the pods read."""
    lines = [line.split() for line in section.splitlines() if line.startswith("kubectl create secret ")]
    problems = [f"{' '.join(words)}: puts the secret on a command line" for words in lines
                if any(w.startswith("--from-literal") for w in words)]
    for secret, keys in volumes.items():
        given = [{"tls.crt", "tls.key"} if words[3] == "tls" else set(re.findall(r"--from-file=([^=\s]+)=", " ".join(words)))
                 for words in lines if words[4] == secret]
        if not given:
            problems.append(f"{secret}: no `kubectl create secret ... {secret}` line")
        elif not any(keys <= g for g in given):
            problems.append(f"{secret}: no line gives the keys {sorted(keys)}")
    return problems


def test_the_security_section_creates_every_secret_the_manifest_mounts() -> None:
    (mutual,) = re.findall(r"--set client_ca_secret=([a-z0-9-]+)", SECURITY)
    for spec in (DeploySpec(), dataclasses.replace(DeploySpec(), client_ca_secret=mutual)):
        volumes = _secret_volumes(spec)
        assert create_secret_problems(SECURITY, volumes) == []
    assert len(_secret_volumes(DeploySpec())) == 3


def test_a_missing_or_wrong_secret_line_is_caught() -> None:
    volumes = _secret_volumes(DeploySpec())
    section = SECURITY.replace("--from-file=secret=gateway.secret", "--from-file=gateway.secret")
    assert create_secret_problems(section, volumes) == ["tandem-gateway: no line gives the keys ['secret']"]
    section = SECURITY.replace("kubectl create secret generic tandem-cloud-tokens", "kubectl create secret generic tokens")
    assert create_secret_problems(section, volumes) == ["tandem-cloud-tokens: no `kubectl create secret ... "
                                                        "tandem-cloud-tokens` line"]
    section = SECURITY + "\nkubectl create secret generic tandem-gateway --from-literal=secret=x\n"
    assert create_secret_problems(section, volumes) == [
        "kubectl create secret generic tandem-gateway --from-literal=secret=x: puts the secret on a command line"]


def test_the_security_section_states_the_rendered_facts() -> None:
    spec = DeploySpec()
    rayservice = next(yaml.safe_load_all(deploy_gen.render(spec)[deploy_gen.RAYSERVICE]))
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    for mount in head["containers"][1]["volumeMounts"]:
        assert mount["mountPath"] in SECURITY, mount
    launcher = deploy_gen.launcher_secure_dir(spec)
    for text in (f"{launcher}/tls.crt", f"{launcher}/cloud-tokens.json", deploy_gen.LAUNCHER_SECRET,
                 spec.gateway_secret_file, deploy_gen.GATEWAY_UNIT, f"`defaultMode: {deploy_gen.SECRET_MODE}`",
                 f"`fsGroup: {spec.image_uid}`", f"port {spec.gateway_port}", f"{spec.cluster_name}-gateway",
                 f"`{deploy_gen.GATEWAY_LABEL}: {spec.cluster_name}`", "`syncFrequency`", "`tcpSocket`",
                 "BENCHMARKS.md"):
        assert text in SECURITY, text


def test_the_edge_flags_the_security_section_names_exist() -> None:
    from edge_node.config import EdgeConfig
    from tandem.config import flag_name

    flags = {flag_name(f) for f in dataclasses.fields(EdgeConfig)}
    named = set(re.findall(r"(--cloud[a-z-]*)", SECURITY))
    assert {"--cloud", "--cloud-ca-cert", "--cloud-token-file", "--cloud-client-cert", "--cloud-client-key"} <= named
    assert named <= flags, named - flags
    assert "TANDEM_EDGE_CLOUD_TOKEN" in SECURITY
