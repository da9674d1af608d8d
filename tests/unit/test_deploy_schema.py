"""deploy/'s Serve config and RayService manifest against their schemas, strictly.

Ray's own models are lenient: `ServeDeploySchema` accepts unknown keys inside a deployment (a
typo'd `max_surge_percnt` passed) and takes `autoscaling_config` as a plain dict (so
`min_replicas: 9` with `max_replicas: 4` passed too). `serve_config_problems` walks the config
against the field sets of Ray's pydantic models (`ray.serve.schema` and
`ray.serve.config.AutoscalingConfig`) at every level, and checks the autoscaling bounds
(min_replicas <= initial_replicas <= max_replicas, target_ongoing_requests <= max_ongoing_requests).

No KubeRay CRD is vendored here. `KUBERAY_FIELDS` hand-lists the fields deploy/rayservice.yaml
may use, with their types, as the RayService CRD of KubeRay v1.6.0
(ray-operator/config/crd/bases/ray.io_rayservices.yaml) defines them; `rayservice_problems`
rejects any other key. `SERVICE_FIELDS` does the same for the file's second document, the
gateway's core/v1 Service. With `TANDEM_KUBERAY_CRD` naming that CRD file, the RayService is also
walked against the full CRD schema.

Each checker is shown to fail on deliberately broken copies (the negative cases below).
"""

from __future__ import annotations

import copy
import gzip
import os
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.deploy import gen as deploy_gen

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name: str) -> Any:
    """The file's first YAML document (rayservice.yaml's second is the gateway's Service)."""
    return next(yaml.safe_load_all((DEPLOY / name).read_text()))


# --- Serve ------------------------------------------------------------------------------------

def _models(annotation: Any) -> list[type]:
    """The pydantic models inside an annotation (Optional[...], List[...], Union[Dict, Model])."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _fields(model: type) -> dict[str, Any]:
    fields = getattr(model, "model_fields", None) or model.__fields__  # pydantic 2, else 1
    return {(getattr(info, "alias", None) or name): getattr(info, "annotation", None) for name, info in fields.items()}


def unknown_keys(model: type, data: dict[str, Any], where: str) -> list[str]:
    """Every key of `data`, at any depth, that `model` (or the nested model) does not define."""
    from ray.runtime_env import RuntimeEnv

    fields, problems = _fields(model), []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown key (not a field of {model.__name__})")
        elif key == "runtime_env":
            problems += [f"{where}.runtime_env.{k}: unknown key (not a runtime_env field)"
                         for k in value if k not in RuntimeEnv.known_fields]
        elif nested := _models(fields[key]):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    suffix = f"[{i}]" if isinstance(value, list) else ""
                    problems += unknown_keys(nested[0], item, f"{where}.{key}{suffix}")
    return problems


def autoscaling_problems(config: dict[str, Any]) -> list[str]:
    from ray.serve.config import AutoscalingConfig

    defaults = {name: info.default for name, info in AutoscalingConfig.model_fields.items()}
    problems = []
    for app in config.get("applications", []):
        for deployment in app.get("deployments", []):
            where = f"{app.get('name')}/{deployment.get('name')}"
            scaling = deployment.get("autoscaling_config")
            if not scaling:
                continue
            low = scaling.get("min_replicas", defaults["min_replicas"])
            high = scaling.get("max_replicas", defaults["max_replicas"])
            start = scaling.get("initial_replicas", low)
            if not low <= start <= high:
                problems.append(f"{where}: need min_replicas <= initial_replicas <= max_replicas, "
                                f"got {low} <= {start} <= {high}")
            target = scaling.get("target_ongoing_requests", defaults["target_ongoing_requests"])
            if "max_ongoing_requests" in deployment and target > deployment["max_ongoing_requests"]:
                problems.append(f"{where}: target_ongoing_requests ({target}) > max_ongoing_requests "
                                f"({deployment['max_ongoing_requests']})")
    return problems


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    """Unknown keys at every level, then the autoscaling bounds; empty when the config is sound."""
    from ray.serve.schema import ServeDeploySchema

    return unknown_keys(ServeDeploySchema, config, "config") + autoscaling_problems(config)


def test_serve_config_has_no_unknown_key_and_sound_bounds() -> None:
    from ray.serve.schema import ServeDeploySchema

    serve = _load(deploy_gen.SERVE_CONFIG)
    ServeDeploySchema.model_validate(serve)
    assert serve_config_problems(serve) == []
    assert yaml.safe_load(_load(deploy_gen.RAYSERVICE)["spec"]["serveConfigV2"]) == serve


def test_the_walk_reaches_every_model_the_config_uses() -> None:
    """Guards the walker: if Ray renamed a nested model's field, the walk must still descend."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        gRPCOptionsSchema,
    )

    top = _fields(ServeDeploySchema)
    assert _models(top["grpc_options"]) == [gRPCOptionsSchema]
    assert _models(top["http_options"]) == [HTTPOptionsSchema]
    assert _models(top["applications"]) == [ServeApplicationSchema]
    assert _models(_fields(ServeApplicationSchema)["deployments"]) == [DeploymentSchema]
    assert _models(_fields(DeploymentSchema)["autoscaling_config"]) == [AutoscalingConfig]
    assert _models(_fields(DeploymentSchema)["ray_actor_options"]) == [RayActorOptionsSchema]


@pytest.mark.parametrize("path", [
    ("proxy_locaton",),
    ("grpc_options", "prot"),
    ("http_options", "hots"),
    ("applications", 0, "import_pth"),
    ("applications", 0, "runtime_env", "env_var"),
    ("applications", 0, "deployments", 0, "max_surge_percnt"),
    ("applications", 0, "deployments", 0, "autoscaling_config", "upscale_dealy_s"),
    ("applications", 0, "deployments", 0, "ray_actor_options", "num_cpu"),
])
def test_a_typo_at_any_level_is_reported_by_path(path: tuple) -> None:
    broken = copy.deepcopy(_load(deploy_gen.SERVE_CONFIG))
    node = broken
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = 1
    problems = serve_config_problems(broken)
    assert len(problems) == 1 and problems[0].startswith("config.") and f".{path[-1]}: unknown key" in problems[0]


def test_inverted_bounds_and_a_typo_are_both_reported() -> None:
    """The two holes Ray's schema leaves open, in one deliberately broken config."""
    broken = copy.deepcopy(_load(deploy_gen.SERVE_CONFIG))
    deployment = broken["applications"][0]["deployments"][0]
    deployment["max_surge_percnt"] = deployment.pop("max_surge_percent")
    deployment["autoscaling_config"].update(min_replicas=9, max_replicas=4)
    problems = serve_config_problems(broken)
    assert any("max_surge_percnt: unknown key" in p for p in problems)
    assert any("min_replicas <= initial_replicas <= max_replicas, got 9 <= 4 <= 4" in p for p in problems), problems
    assert len(problems) == 2


@pytest.mark.parametrize("change, message", [
    ({"initial_replicas": 5}, "got 1 <= 5 <= 4"),
    ({"initial_replicas": 0}, "got 1 <= 0 <= 4"),
    ({"target_ongoing_requests": 37.0}, "target_ongoing_requests (37.0) > max_ongoing_requests (36)"),
])
def test_autoscaling_bounds_are_checked(change: dict, message: str) -> None:
    broken = copy.deepcopy(_load(deploy_gen.SERVE_CONFIG))
    broken["applications"][0]["deployments"][0]["autoscaling_config"].update(change)
    problems = serve_config_problems(broken)
    assert len(problems) == 1 and message in problems[0], problems


# --- KubeRay ----------------------------------------------------------------------------------

MAP = "a map of strings"  # free keys, string values (rayStartParams, resources, quantities, labels)
INT_OR_STRING = "an int or a string"  # a port by number or by name
_PROBE = {"tcpSocket": {"port": INT_OR_STRING}, "initialDelaySeconds": int, "periodSeconds": int,
          "timeoutSeconds": int, "failureThreshold": int}
_CONTAINER = {
    "name": str, "image": str, "imagePullPolicy": ("Always", "IfNotPresent", "Never"),
    "command": [str], "args": [str],
    "env": [{"name": str, "value": str}],
    "ports": [{"name": str, "containerPort": int}],
    "readinessProbe": _PROBE, "livenessProbe": _PROBE,
    "resources": {"requests": MAP, "limits": MAP},
    "volumeMounts": [{"name": str, "mountPath": str, "readOnly": bool}],
}
_POD = {"metadata": {"labels": MAP}, "spec": {
    "terminationGracePeriodSeconds": int,
    "securityContext": {"runAsNonRoot": bool, "runAsUser": int, "runAsGroup": int, "fsGroup": int},
    "containers": [_CONTAINER],
    "volumes": [{"name": str, "secret": {"secretName": str, "defaultMode": int, "items": [{"key": str, "path": str}]}}],
}}
_GROUP = {"rayStartParams": MAP, "resources": MAP, "template": _POD}
KUBERAY_FIELDS = {
    "apiVersion": ("ray.io/v1",),
    "kind": ("RayService",),
    "metadata": {"name": str},
    "spec": {
        "upgradeStrategy": {"type": ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")},
        "rayClusterDeletionDelaySeconds": int,
        "serveConfigV2": str,
        "serveService": {
            "metadata": {"name": str},
            "spec": {"type": ("ClusterIP", "NodePort", "LoadBalancer"),
                     "ports": [{"name": str, "port": int, "targetPort": int, "appProtocol": str}]},
        },
        "rayClusterConfig": {
            "rayVersion": str,
            "enableInTreeAutoscaling": bool,
            "authOptions": {"mode": ("disabled", "token")},
            "headGroupSpec": _GROUP,
            "workerGroupSpecs": [{"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, **_GROUP}],
        },
    },
}


SERVICE_FIELDS = {
    "apiVersion": ("v1",),
    "kind": ("Service",),
    "metadata": {"name": str},
    "spec": {"type": ("ClusterIP", "NodePort", "LoadBalancer"), "selector": MAP,
             "ports": [{"name": str, "protocol": ("TCP",), "port": int, "targetPort": INT_OR_STRING}]},
}


def rayservice_problems(data: Any, schema: Any = KUBERAY_FIELDS, where: str = "") -> list[str]:
    """Keys the hand-listed schema does not name, wrong types, values outside an enum."""
    if isinstance(schema, dict):
        if not isinstance(data, dict):
            return [f"{where}: expected a mapping"]
        return [p for key, value in data.items()
                for p in (rayservice_problems(value, schema[key], f"{where}.{key}") if key in schema
                          else [f"{where}.{key}: unknown key"])]
    if isinstance(schema, list):
        if not isinstance(data, list):
            return [f"{where}: expected a list"]
        return [p for i, item in enumerate(data) for p in rayservice_problems(item, schema[0], f"{where}[{i}]")]
    if isinstance(schema, tuple):
        return [] if data in schema else [f"{where}: {data!r} is not one of {schema}"]
    if schema == MAP:
        ok = isinstance(data, dict) and all(isinstance(v, str) for v in data.values())
        return [] if ok else [f"{where}: expected a map of strings, got {data!r}"]
    if schema == INT_OR_STRING:
        return [] if type(data) in (int, str) else [f"{where}: expected an int or a string, got {data!r}"]
    return [] if type(data) is schema else [f"{where}: expected {schema.__name__}, got {data!r}"]


def test_rayservice_uses_only_fields_the_crd_defines() -> None:
    rayservice, service = yaml.safe_load_all((DEPLOY / deploy_gen.RAYSERVICE).read_text())
    assert rayservice_problems(rayservice) == []
    assert rayservice_problems(service, SERVICE_FIELDS) == []


def _head_pod(r: dict) -> dict:
    return r["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["spec"].update(rayClusterDeletionDelaySecond=330), ".spec.rayClusterDeletionDelaySecond: unknown key"),
    (lambda r: r["spec"]["upgradeStrategy"].update(type="BlueGreen"), "'BlueGreen' is not one of"),
    (lambda r: r["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["resources"].update(tandem_cloud=1),
     "workerGroupSpecs[0].resources: expected a map of strings"),
    (lambda r: r["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"].update(terminationGracePeriod=1),
     "headGroupSpec.template.spec.terminationGracePeriod: unknown key"),
    (lambda r: r["spec"]["serveService"]["spec"]["ports"][1].update(port="9000"), "ports[1].port: expected int"),
    (lambda r: _head_pod(r)["containers"][1]["readinessProbe"]["tcpSocket"].update(port=8443.0),
     "containers[1].readinessProbe.tcpSocket.port: expected an int or a string"),
    (lambda r: _head_pod(r)["volumes"][0]["secret"].update(defaultMode="0440"), "secret.defaultMode: expected int"),
    (lambda r: _head_pod(r)["securityContext"].update(fsGroupp=1000), "securityContext.fsGroupp: unknown key"),
])
def test_a_broken_rayservice_is_reported(edit: Any, message: str) -> None:
    broken = copy.deepcopy(_load(deploy_gen.RAYSERVICE))
    edit(broken)
    problems = rayservice_problems(broken)
    assert len(problems) == 1 and message in problems[0], problems


def test_a_broken_gateway_service_is_reported() -> None:
    _, service = yaml.safe_load_all((DEPLOY / deploy_gen.RAYSERVICE).read_text())
    service["spec"]["type"] = "Ingress"
    service["spec"]["ports"][0]["protocl"] = "TCP"
    assert sorted(rayservice_problems(service, SERVICE_FIELDS)) == [
        ".spec.ports[0].protocl: unknown key", ".spec.type: 'Ingress' is not one of ('ClusterIP', 'NodePort', 'LoadBalancer')"]


def _crd_problems(schema: dict[str, Any], data: Any, where: str = "") -> list[str]:
    """A walk of an openAPIV3Schema: unknown keys, types and enums (what `kubectl apply` rejects)."""
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(data, (int, str)) else [f"{where}: expected int or string"]
    if "enum" in schema and data not in schema["enum"]:
        return [f"{where}: {data!r} is not one of {schema['enum']}"]
    kind = schema.get("type")
    if kind == "object":
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if not isinstance(data, dict):
            return [f"{where}: expected an object"]
        if props is None and extra is None:
            return []
        return [p for key, value in data.items()
                for p in (_crd_problems(props[key] if props and key in props else extra, value, f"{where}.{key}")
                          if (props and key in props) or extra else [f"{where}.{key}: unknown key"])]
    if kind == "array":
        return [p for i, item in enumerate(data) for p in _crd_problems(schema["items"], item, f"{where}[{i}]")]
    types = {"string": str, "integer": int, "boolean": bool}
    return [] if kind not in types or type(data) is types[kind] else [f"{where}: expected {kind}"]


# A CRD-shaped schema (as KubeRay's openAPIV3Schema nests it) for the walk itself; the manifest (with
# the gateway) walks clean against KubeRay's ray.io_rayservices.yaml at v1.5.1, v1.6.0 and v1.7.0
# (test_rayservice_walks_clean_against_the_kuberay_crd; not vendored here: its text stays out).
_MINI_CRD: dict[str, Any] = {"type": "object", "properties": {
    "spec": {"type": "object", "properties": {
        "rayClusterDeletionDelaySeconds": {"type": "integer"},
        "upgradeStrategy": {"type": "object", "properties": {"type": {"type": "string",
                                                                     "enum": ["NewCluster", "None"]}}},
        "serveConfigV2": {"type": "string"},
        "rayClusterConfig": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "ports": {"type": "array", "items": {"x-kubernetes-int-or-string": True}},
    }},
}}


def test_the_crd_walk_reports_unknown_keys_types_and_enums() -> None:
    good = {"spec": {"rayClusterDeletionDelaySeconds": 330, "upgradeStrategy": {"type": "NewCluster"},
                     "serveConfigV2": "x", "rayClusterConfig": {}, "ports": [9000, "serve"]}}
    assert _crd_problems(_MINI_CRD, good) == []
    bad = copy.deepcopy(good)
    bad["spec"]["rayClusterDeletionDelaySecond"] = 1
    bad["spec"]["upgradeStrategy"]["type"] = "Incremental"
    bad["spec"]["serveConfigV2"] = 3
    bad["spec"]["ports"].append(1.5)
    assert sorted(_crd_problems(_MINI_CRD, bad)) == sorted([
        ".spec.rayClusterDeletionDelaySecond: unknown key",
        ".spec.upgradeStrategy.type: 'Incremental' is not one of ['NewCluster', 'None']",
        ".spec.serveConfigV2: expected string",
        ".spec.ports[2]: expected int or string",
    ])


# KubeRay v1.6.0's RayService CRD (ray-operator/config/crd/bases/ray.io_rayservices.yaml, Apache-2.0),
# gzipped; TANDEM_KUBERAY_CRD names another version's file to check against it instead.
KUBERAY_CRD = Path(__file__).parents[1] / "data" / "kuberay-v1.6.0-ray.io_rayservices.yaml.gz"


def test_rayservice_walks_clean_against_the_kuberay_crd() -> None:
    override = os.environ.get("TANDEM_KUBERAY_CRD")
    text = Path(override).read_text() if override else gzip.decompress(KUBERAY_CRD.read_bytes()).decode()
    crd = yaml.safe_load(text)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    rayservice = _load(deploy_gen.RAYSERVICE)
    assert _crd_problems(schema, rayservice) == []
    _head_pod(rayservice)["containers"][1]["readinessProbe"]["tcpSockett"] = {}  # the control
    assert _crd_problems(schema, rayservice) == [
        ".spec.rayClusterConfig.headGroupSpec.template.spec.containers[1].readinessProbe.tcpSockett: unknown key"]
