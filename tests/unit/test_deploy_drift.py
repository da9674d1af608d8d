"""deploy/ against its single source (`tandem.deploy.gen.DeploySpec`) and against itself.

Fails when a generated file (deploy/ and the root .dockerignore) was edited by hand or the spec
changed without regenerating (`python -m tandem.deploy.gen`), when two files disagree on a
shared setting (ports, resources, drain time, image, user, threads), or when a file is not
valid for the tool that reads it (Serve's config schema, `ray up`'s schema; the strict checks
are in test_deploy_schema.py). No cluster, no models.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.deploy import app as deploy_app
from tandem.deploy import gen as deploy_gen
from tandem.deploy.gen import (
    CLUSTER,
    DOCKERFILE_NAME,
    DOCKERIGNORE,
    FILES,
    GRPC_PORT_NAME,
    RAYSERVICE,
    SERVE_CONFIG,
    DeploySpec,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name: str) -> Any:
    """The file's first YAML document (rayservice.yaml's second is the gateway's Service)."""
    return next(yaml.safe_load_all((DEPLOY / name).read_text()))


def _groups(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _containers(rayservice: dict) -> dict[str, dict]:
    return {c["name"]: c for g in _groups(rayservice) for c in g["template"]["spec"]["containers"]}


def _ray_containers(rayservice: dict) -> list[dict]:
    """The Ray container of each group: the first, as KubeRay requires."""
    return [g["template"]["spec"]["containers"][0] for g in _groups(rayservice)]


def _ray_start(commands: list[str]) -> str:
    (command,) = [c for c in commands if "/ray start " in c]
    return command


def test_deploy_files_are_what_the_spec_renders() -> None:
    assert deploy_gen.check(DEPLOY, root=DEPLOY.parent) == [], \
        "deploy/ or .dockerignore drifted from tandem/deploy/spec.py: run `python -m tandem.deploy.gen`"
    assert (DEPLOY / "README.md").is_file()


def test_a_hand_edit_is_reported_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deploy"
    deploy_gen.write(out, root=tmp_path)
    assert deploy_gen.main(["--check", "--out", str(out)]) == 0  # the root defaults to the folder above
    text = (out / RAYSERVICE).read_text()
    (out / RAYSERVICE).write_text(text.replace("containerPort: 9000", "containerPort: 9001", 1))
    (out / DOCKERFILE_NAME).unlink()
    (tmp_path / DOCKERIGNORE).write_text("*\n")
    assert deploy_gen.check(out, root=tmp_path) == [RAYSERVICE, DOCKERFILE_NAME, DOCKERIGNORE]
    assert deploy_gen.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert RAYSERVICE in err and DOCKERFILE_NAME in err and DOCKERIGNORE in err and SERVE_CONFIG not in err


def test_the_image_reference_is_rendered_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    sets = ["image_registry=localhost:5000/team", "image_tag=3f2c1ab"]
    assert deploy_gen.main(["--print-image", *(f"--set={s}" for s in sets)]) == 0
    image = capsys.readouterr().out.strip()
    assert image == "localhost:5000/team/tandem-cloud:3f2c1ab"
    files = deploy_gen.render(deploy_gen.apply_overrides(DeploySpec(), sets))
    assert files[RAYSERVICE].count(f"image: {image}\n") == 3 and f"-t {image} ." in files[DOCKERFILE_NAME]
    containers = _containers(next(yaml.safe_load_all(files[RAYSERVICE])))
    assert sorted(containers) == ["gateway", "ray-head", "ray-worker"]
    for container in containers.values():
        assert container["imagePullPolicy"] == "IfNotPresent"
    with pytest.raises(ValueError, match="image_tag"):
        DeploySpec(image_tag="latest")
    assert DeploySpec(image_tag="latest", image_pull_policy="Always").image == "tandem-cloud:latest"
    with pytest.raises(ValueError, match="image_pull_policy"):
        DeploySpec(image_pull_policy="Sometimes")


def test_rendering_is_deterministic_and_overrides_reach_every_file() -> None:
    assert deploy_gen.render() == deploy_gen.render()
    files = deploy_gen.render(dataclasses.replace(DeploySpec(), grpc_port=9555, replica_resource="gpu_box"))
    assert all(files[name] != deploy_gen.render()[name] for name in FILES)
    assert "9555" in files[DOCKERFILE_NAME] and "gpu_box" in files[CLUSTER]


def test_rayservice_serves_exactly_the_serve_config() -> None:
    serve, rayservice = _load(SERVE_CONFIG), _load(RAYSERVICE)
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == serve


def test_shared_settings_agree_across_files() -> None:
    serve, cluster, rayservice = _load(SERVE_CONFIG), _load(CLUSTER), _load(RAYSERVICE)
    docker = (DEPLOY / DOCKERFILE_NAME).read_text()
    grpc_port = serve["grpc_options"]["port"]
    deployment = serve["applications"][0]["deployments"][0]
    (resource,) = deployment["ray_actor_options"]["resources"]
    home = serve["applications"][0]["runtime_env"]["env_vars"]["TANDEM_HOME"]

    for container in _ray_containers(rayservice):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[GRPC_PORT_NAME] == grpc_port, container["name"]
        assert {"name": "TANDEM_HOME", "value": home} in container["env"]
    service_ports = {p["name"]: p["port"] for p in rayservice["spec"]["serveService"]["spec"]["ports"]}
    assert service_ports[GRPC_PORT_NAME] == grpc_port
    assert str(grpc_port) in re.search(r"^EXPOSE (.*)$", docker, re.MULTILINE).group(1).split()
    assert f"TANDEM_HOME={home}" in docker

    worker_group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker_group["resources"] == {resource: "1"}  # group-level: KubeRay 1.5 mangles the rayStartParams string
    assert "resources" not in worker_group["rayStartParams"]
    assert cluster["available_node_types"]["cloud_worker"]["resources"] == {resource: 1}
    assert any(f'"{resource}":1' in cmd for cmd in cluster["worker_start_ray_commands"])
    assert any(f"TANDEM_HOME={home} " in cmd for cmd in cluster["setup_commands"])
    replicas = deployment["autoscaling_config"]
    assert worker_group["maxReplicas"] == cluster["available_node_types"]["cloud_worker"]["max_workers"]
    # full scale plus at least one node for the replica an upgrade starts before stopping an old one
    surge = 1 if deployment["max_surge_percent"] > 0 else 0
    head = 1 if DeploySpec().head_hosts_replica else 0
    assert worker_group["maxReplicas"] >= replicas["max_replicas"] + surge - head
    # a new cluster starts its nodes for initial_replicas at once, and takes traffic at that capacity
    assert worker_group["replicas"] == replicas.get("initial_replicas", replicas["min_replicas"]) - head


def test_drain_time_reaches_pods_and_the_old_cluster() -> None:
    serve, rayservice = _load(SERVE_CONFIG), _load(RAYSERVICE)
    drain = serve["applications"][0]["deployments"][0]["graceful_shutdown_timeout_s"]
    spec = rayservice["spec"]
    assert spec["rayClusterDeletionDelaySeconds"] > drain
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    cluster = spec["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] == spec["rayClusterDeletionDelaySeconds"]


def test_threads_come_from_the_replicas_cpus_not_the_host() -> None:
    serve, rayservice = _load(SERVE_CONFIG), _load(RAYSERVICE)
    app = serve["applications"][0]
    cpus = app["deployments"][0]["ray_actor_options"]["num_cpus"]
    assert app["args"]["threads"] == int(cpus) >= 1
    worker = _containers(rayservice)["ray-worker"]
    assert app["args"]["threads"] <= float(worker["resources"]["limits"]["cpu"])
    assert dataclasses.replace(DeploySpec(), replica_cpus=0.5).app_args()["threads"] == 1
    assert dataclasses.replace(DeploySpec(), threads=3).app_args()["threads"] == 3


def test_the_head_hosts_no_replica_and_offers_no_cpu() -> None:
    cluster, rayservice = _load(CLUSTER), _load(RAYSERVICE)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and "resources" not in head
    assert "--num-cpus=0" in _ray_start(cluster["head_start_ray_commands"])
    files = deploy_gen.render(dataclasses.replace(DeploySpec(), head_hosts_replica=True))
    head = next(yaml.safe_load_all(files[RAYSERVICE]))["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == str(DeploySpec().node_cpus) and head["resources"]


def test_the_image_user_is_the_pods_user() -> None:
    rayservice = _load(RAYSERVICE)
    cluster = rayservice["spec"]["rayClusterConfig"]
    uid = DeploySpec().image_uid
    assert f"\nUSER {uid}\n" in (DEPLOY / DOCKERFILE_NAME).read_text()
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["template"]["spec"]["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}  # fsGroup: the Secrets' group


def test_versions_match_the_pinned_install() -> None:
    rayservice = _load(RAYSERVICE)
    lock = (DEPLOY.parent / "requirements.lock").read_text()
    ray_version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    assert f"\nray=={ray_version}\n" in f"\n{lock}"
    assert ray_version == importlib.metadata.version("ray")
    assert (DEPLOY / DOCKERFILE_NAME).read_text().count(f"FROM python:{DeploySpec().python_version}-slim@sha256:") == 2


def test_serve_config_is_valid_for_serve_and_matches_the_code() -> None:
    from ray.serve.schema import ServeDeploySchema

    from cloud_node import serve_app

    serve = _load(SERVE_CONFIG)
    schema = ServeDeploySchema.model_validate(serve)
    (app,) = schema.applications
    assert app.name == serve_app.APP_NAME
    assert schema.grpc_options.grpc_servicer_functions == serve_app.SERVICER_FUNCTIONS
    assert set(app.args) == set(deploy_app.APP_ARGS)
    (deployment,) = app.deployments
    assert deployment.name == serve_app.CloudVerifierDeployment.name
    scaling = deployment.autoscaling_config
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    # the core's session limit answers before Serve would queue a stream, and the autoscaler's target
    # is below that limit (a replica never holds more, so a target at the limit would never scale up)
    assert deployment.max_ongoing_requests > app.args["max_sessions"] > scaling["target_ongoing_requests"]


def test_cluster_file_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = _load(CLUSTER)
    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["cloud_worker"]["min_workerz"] = 1
    with pytest.raises(Exception, match="min_workerz"):
        validate_config(prepare_config(broken))
    assert "PLACEHOLDER" in (DEPLOY / CLUSTER).read_text().split("provider:")[0]


def test_app_builder_args_are_checked_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_dirr"):
        deploy_app.cloud_config({"model_dirr": str(tmp_path)})
    with pytest.raises(ValueError, match="model_dir"):
        deploy_app.cloud_config({"model_dir": str(tmp_path)})  # no config.json there
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="dtype"):
        deploy_app.cloud_config({"model_dir": str(tmp_path), "dtype": "fp8"})
    config = deploy_app.cloud_config({"model_dir": str(tmp_path), "max_sessions": 3})
    assert config.max_sessions == 3 and config.limits().max_sessions == 3
    limits = deploy_app.cloud_config({"model_dir": str(tmp_path), "max_batch_rows": 40, "batch_window_ms": 0}).limits()
    assert (limits.max_batch_rows, limits.batch_window_ms) == (40, 0)
    with pytest.raises(ValueError, match="^max_batch_rows:"):
        deploy_app.cloud_config({"model_dir": str(tmp_path), "max_batch_rows": 8})


def test_the_app_args_defaults_are_the_spec_s_and_the_cloud_config_s() -> None:
    """One default per setting: the Serve app's args, the rendered files, `tandem serve cloud` and
    the core's own `Limits`."""
    from cloud_node.config import CloudConfig
    from cloud_node.verifier import Limits

    cloud = {f.name: f.default for f in dataclasses.fields(CloudConfig)}
    spec = {f.name: f.default for f in dataclasses.fields(DeploySpec)}
    for name, default in deploy_app.APP_ARGS.items():
        if name == "gateway_secret_file":  # the app alone checks nothing; a deployment names the mounted file
            assert default == "" and spec[name].startswith("/")
            continue
        assert spec[name] == default, name
        if name not in ("model_dir", "threads"):  # a path, and the replica's CPUs, resolved per deployment
            assert cloud[name] == default, name
    core = Limits()
    assert (core.max_sessions, core.max_batch_rows, core.batch_window_ms, core.kv_budget_bytes) == (
        cloud["max_sessions"], cloud["max_batch_rows"], cloud["batch_window_ms"], cloud["kv_budget_mb"] << 20)
    assert deploy_app.APP_ARGS["max_sessions"] == 32


def test_spec_and_overrides_reject_bad_values_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        DeploySpec(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        DeploySpec(max_sessions=2, target_ongoing_requests=4)
    with pytest.raises(ValueError, match="target_ongoing_requests"):  # never exceeded: never scales up
        DeploySpec(max_sessions=4, target_ongoing_requests=4)
    with pytest.raises(ValueError, match="^max_batch_rows:"):
        DeploySpec(max_batch_rows=16)  # less than one round of max_draft_len (16) drafts + 1
    with pytest.raises(ValueError, match="^batch_window_ms:"):
        deploy_gen.apply_overrides(DeploySpec(), ["batch_window_ms=-1"])
    spec = deploy_gen.apply_overrides(DeploySpec(), ["max_batch_rows=64", "batch_window_ms=2.5"])
    assert spec.app_args()["max_batch_rows"] == 64 and spec.app_args()["batch_window_ms"] == 2.5
    with pytest.raises(ValueError, match="grpc_port"):
        deploy_gen.apply_overrides(DeploySpec(), ["grpc_port=ninety"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        deploy_gen.apply_overrides(DeploySpec(), ["no_such_field=1"])
    spec = deploy_gen.apply_overrides(DeploySpec(), ["prefer_local_routing=true", "extras=cloud,ray", "max_sessions=8"])
    assert (spec.prefer_local_routing, spec.extras, spec.max_sessions) == (True, ("cloud", "ray"), 8)
    assert deploy_gen.main(["--check", "--set", "grpc_port=ninety"]) == 2
    assert "grpc_port" in capsys.readouterr().err


# --- the gateway: TLS and tokens in front of Serve's proxy ---------------------------------------

def _gateway_args(flags: list[str]) -> Any:
    """The flags as `python -m cloud_node gateway` parses them (an unknown flag exits)."""
    import argparse

    from cloud_node import cli as cloud_cli

    parser = argparse.ArgumentParser()
    cloud_cli.add_gateway_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["gateway", *flags])


def _mounted(pod: dict, container: dict) -> dict[str, str]:
    """File path -> Secret, for every Secret item the container mounts."""
    volumes = {v["name"]: v["secret"] for v in pod["volumes"]}
    return {f"{m['mountPath']}/{item['path']}": volumes[m["name"]]["secretName"]
            for m in container["volumeMounts"] for item in volumes[m["name"]]["items"]}


def test_the_head_runs_the_gateway_in_front_of_its_own_serve_proxy() -> None:
    serve, rayservice, spec = _load(SERVE_CONFIG), _load(RAYSERVICE), DeploySpec()
    head, worker = (g["template"]["spec"] for g in _groups(rayservice))
    assert [c["name"] for c in head["containers"]] == ["ray-head", "gateway"]  # KubeRay: the Ray container first
    assert [c["name"] for c in worker["containers"]] == ["ray-worker"]
    gateway = head["containers"][1]
    assert gateway["command"] == ["python", "-m", "cloud_node", "gateway"]
    args = _gateway_args(gateway["args"])
    assert args.upstream == f"127.0.0.1:{serve['grpc_options']['port']}"  # loopback: the proxy in this pod
    assert (args.host, args.port, args.insecure) == ("0.0.0.0", spec.gateway_port, None)
    assert gateway["ports"] == [{"name": deploy_gen.GATEWAY_PORT_NAME, "containerPort": spec.gateway_port}]
    files = _mounted(head, gateway)
    assert files == {str(args.tls_cert): spec.tls_secret, str(args.tls_key): spec.tls_secret,
                     str(args.tokens_file): spec.tokens_secret, str(args.gateway_secret_file): spec.gateway_secret}
    assert args.tls_client_ca is None  # mutual TLS is off by default
    assert str(args.gateway_secret_file) == serve["applications"][0]["args"]["gateway_secret_file"]
    for probe in ("readinessProbe", "livenessProbe"):  # TCP: kubelet's gRPC probe cannot speak TLS
        assert gateway[probe]["tcpSocket"] == {"port": deploy_gen.GATEWAY_PORT_NAME}
    assert gateway["resources"]["limits"] == gateway["resources"]["requests"] == {"cpu": "0.5", "memory": "256Mi"}


def test_every_ray_container_reads_the_gateway_secret_from_a_0440_secret() -> None:
    """The replicas and the app's build task (any node) read it; fsGroup lets user 1000 do so."""
    serve, rayservice, spec = _load(SERVE_CONFIG), _load(RAYSERVICE), DeploySpec()
    secret_file = serve["applications"][0]["args"]["gateway_secret_file"]
    assert secret_file == spec.gateway_secret_file
    for group in _groups(rayservice):
        pod = group["template"]["spec"]
        assert pod["securityContext"]["fsGroup"] == spec.image_uid
        assert {v["secret"]["defaultMode"] for v in pod["volumes"]} == {0o440}
        assert _mounted(pod, pod["containers"][0]) == {secret_file: spec.gateway_secret}
    assert "defaultMode: 288\n" in (DEPLOY / RAYSERVICE).read_text()  # YAML has no octal: 288 == 0o440


def test_read_secret_takes_a_0440_secret_and_refuses_the_kubernetes_default(tmp_path: Path) -> None:
    from tandem.security import SecurityError, read_secret

    path = tmp_path / "secret"
    path.write_text("s3cret\n")
    path.chmod(deploy_gen.SECRET_MODE)
    assert read_secret(file=path, what="gateway_secret_file") == "s3cret"
    path.chmod(0o644)  # a Secret volume's defaultMode when none is given
    with pytest.raises(SecurityError, match="644"):
        read_secret(file=path, what="gateway_secret_file")


def test_only_the_gateway_is_exposed() -> None:
    """The gateway's Service is the only one beyond the cluster; KubeRay's serve Service is ClusterIP
    (KubeRay overrides its selector: the active cluster's pods labelled `ray.io/serve: "true"`)."""
    spec, rayservice = DeploySpec(), _load(RAYSERVICE)
    docs = list(yaml.safe_load_all((DEPLOY / RAYSERVICE).read_text()))
    assert [d["kind"] for d in docs] == ["RayService", "Service"]
    service = docs[1]["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["ports"] == [{"name": "gateway", "protocol": "TCP", "port": spec.gateway_port,
                                 "targetPort": deploy_gen.GATEWAY_PORT_NAME}]
    serve = rayservice["spec"]["serveService"]["spec"]
    assert serve["type"] == "ClusterIP"
    assert {p["port"] for p in serve["ports"]} == {spec.http_port, spec.grpc_port}
    # the selector: the head (KubeRay's labels) of this RayService (the templates' label), never a worker
    head, worker = (g["template"]["metadata"]["labels"] for g in _groups(rayservice))
    assert service["selector"] == {**head, "ray.io/node-type": "head", "ray.io/serve": "true"}
    assert worker == head  # so only ray.io/node-type tells them apart, and KubeRay sets it


def test_mutual_tls_and_a_deployment_without_the_secret_check() -> None:
    spec = dataclasses.replace(DeploySpec(), client_ca_secret="tandem-devices-ca")
    rayservice = next(yaml.safe_load_all(deploy_gen.render(spec)[RAYSERVICE]))
    head = _groups(rayservice)[0]["template"]["spec"]
    args = _gateway_args(head["containers"][1]["args"])
    assert _mounted(head, head["containers"][1])[str(args.tls_client_ca)] == "tandem-devices-ca"
    launcher = deploy_gen.cluster_config(spec)["head_start_ray_commands"]
    assert f"--tls-client-ca {deploy_gen.launcher_secure_dir(spec)}/ca.crt" in launcher[-1]

    open_spec = dataclasses.replace(DeploySpec(), gateway_secret_file="")
    files = deploy_gen.render(open_spec)
    rayservice = next(yaml.safe_load_all(files[RAYSERVICE]))
    assert yaml.safe_load(files[SERVE_CONFIG])["applications"][0]["args"]["gateway_secret_file"] == ""
    head, worker = (g["template"]["spec"] for g in _groups(rayservice))
    assert _gateway_args(head["containers"][1]["args"]).gateway_secret_file is None  # a fresh secret per start
    assert "volumes" not in worker and "volumeMounts" not in worker["containers"][0]
    cluster = deploy_gen.cluster_config(open_spec)
    assert deploy_gen.LAUNCHER_SECRET not in cluster["file_mounts"]
    assert not any(deploy_gen.LAUNCHER_SECRET in c for c in cluster["setup_commands"])


def test_the_launcher_head_runs_the_gateway_and_every_node_gets_the_secret() -> None:
    import shlex

    spec, cluster, serve = DeploySpec(), _load(CLUSTER), _load(SERVE_CONFIG)
    secret_file = serve["applications"][0]["args"]["gateway_secret_file"]
    (run,) = [c for c in cluster["head_start_ray_commands"] if "systemd-run" in c]
    words = shlex.split(run)
    args = _gateway_args(words[words.index("gateway") + 1:])
    secure = deploy_gen.launcher_secure_dir(spec)
    assert args.upstream == f"127.0.0.1:{serve['grpc_options']['port']}" and args.port == spec.gateway_port
    assert {str(args.tls_cert), str(args.tls_key), str(args.tokens_file)} == {
        f"{secure}/tls.crt", f"{secure}/tls.key", f"{secure}/cloud-tokens.json"}
    assert str(args.gateway_secret_file) == secret_file
    assert not any("gateway" in c for c in cluster["worker_start_ray_commands"])
    assert cluster["file_mounts"][deploy_gen.LAUNCHER_SECRET] == deploy_gen.LAUNCHER_SECRET  # every node
    assert cluster["setup_commands"][-1].endswith(f"{deploy_gen.LAUNCHER_SECRET} {secret_file}")
    assert "-m 0400" in cluster["setup_commands"][-1]
    (rule,) = cluster["provider"]["security_group"]["IpPermissions"]  # the only port opened to the world
    assert rule["FromPort"] == rule["ToPort"] == spec.gateway_port


def test_gateway_settings_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match="^gateway_port:"):
        DeploySpec(gateway_port=9000)  # Serve's gRPC port
    with pytest.raises(ValueError, match="^gateway_port:"):
        DeploySpec(gateway_port=0)  # a Service needs a fixed port
    # a relative path; a folder mounted over the models, over /etc, or over the TLS folder
    for path in ("secrets/gateway", "/opt/tandem/gateway.secret", "/etc/gateway.secret", "/etc/tandem/tls/secret"):
        with pytest.raises(ValueError, match="^gateway_secret_file:"):
            DeploySpec(gateway_secret_file=path)
    assert DeploySpec(gateway_secret_file="/var/run/tandem-gateway/key").gateway_secret_file
    with pytest.raises(ValueError, match="^client_ca_secret:"):
        DeploySpec(client_ca_secret="Devices_CA")
    with pytest.raises(ValueError, match="^gateway_service_type:"):
        DeploySpec(gateway_service_type="Ingress")
