"""`DeploySpec`: every setting the deployment files share, validated; `apply_overrides` for `--set`.

Guarantees: a spec is frozen and checked in `__post_init__` (a bad value raises ValueError naming
the field); `tandem.deploy.gen` renders every file under deploy/ from one spec and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud_node.config import check_batching
from tandem.deploy.app import APP_ARGS
from tandem.limits import SESSION_IDLE_S

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
SERVE_HEADROOM = 4  # Serve slots above max_sessions: health checks (as in serve_app.build_app)
# Serve's proxies prefer replicas on their own node; for long sessions, balance by load instead.
PREFER_LOCAL_ENV = ("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Secret's name (DNS-1123 label)
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
# Where the KubeRay gateway container mounts its Secrets (the gateway's secret: gateway_secret_file's folder).
SECRET_DIRS = {"tls": "/etc/tandem/tls", "tokens": "/etc/tandem/tokens", "client-ca": "/etc/tandem/client-ca"}


@dataclass(frozen=True)
class DeploySpec:
    """Every setting the deployment files share; defaults describe a small CPU production cluster."""

    import_path: str = "tandem.deploy.app:build"
    tandem_home: str = "/opt/tandem"  # models live under it on every node (image or setup step)
    model_dir: str = ""  # empty: the fetched target under tandem_home
    dtype: str = "bf16"
    threads: int = 0  # torch threads per replica; 0 = replica_cpus rounded down (at least 1)
    max_sessions: int = 32  # per replica, a hard cap: admission is by kv_budget_mb; RESOURCE_EXHAUSTED beyond
    max_context: int = 4096
    max_draft_len: int = 16
    max_tree_nodes: int = 64  # drafts a tree round may hold (0: chains only)
    max_new_tokens: int = 4096
    kv_budget_mb: int = 2048  # per replica: open sessions' KV and the prefix cache
    max_batch_rows: int = 64  # a pass fills up to this many rows with prefill after its rounds
    batch_window_ms: float = 20.0  # longest wait of a pass for sessions expected back within it
    session_idle_s: float = SESSION_IDLE_S  # a Verify stream silent this long ends and frees its session
    grpc_port: int = 9000
    http_port: int = 8000
    http_host: str = "0.0.0.0"
    proxy_location: str = "EveryNode"  # a load balancer in front of every node's proxy
    prefer_local_routing: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    # initial_replicas = max_replicas: a new deployment (a KubeRay upgrade's new cluster, or a
    # changed config) reports RUNNING, and takes the traffic, only at full capacity.
    start_at_max_replicas: bool = True
    # Sessions per replica before scaling up (each open stream is one ongoing request); below what
    # max_sessions and kv_budget_mb admit, since shed sessions never count as load (deploy/README.md).
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    graceful_shutdown_timeout_s: float = 300.0  # a stopping replica lets its sessions finish
    graceful_shutdown_wait_loop_s: float = 1.0  # how often a stopping replica checks for open streams
    drain_margin_s: int = 30  # added to the drain time for pods' grace and the old cluster's life
    max_surge_percent: int = 25  # an upgrade starts new replicas (at least 1) before stopping old ones
    replica_resource: str = "tandem_cloud"  # each cloud node offers 1: one replica per node
    replica_cpus: float = 6.0
    replica_memory_gb: float = 8.0  # 0 = no memory reservation
    node_cpus: int = 8
    node_memory_gb: int = 16
    head_hosts_replica: bool = False
    image_registry: str = ""  # empty: a local image name; else e.g. REGISTRY_HOST:PORT/team
    image_name: str = "tandem-cloud"
    image_tag: str = "0.1.0"  # immutable: a release version or a commit; `latest` needs Always
    image_pull_policy: str = "IfNotPresent"  # right for immutable tags
    # python:<python_version>-slim, pinned. Seen pinned in public repositories, not pulled here
    # (no Docker engine); re-pin as deploy/README.md says.
    base_image_digest: str = "sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7"
    image_uid: int = 1000  # the image's non-root user
    ray_version: str = "2.60.0"
    python_version: str = "3.11"
    kuberay_version: str = "1.6.0"  # the oldest KubeRay whose Serve Service keeps `serve-grpc`
    gcs_port: int = 6379
    dashboard_port: int = 8265
    metrics_port: int = 8080
    cluster_name: str = "tandem-cloud"
    # The cloud's gateway (cloud_node.gateway): TLS and per-device tokens in front of Serve's proxy,
    # on the head. Edges connect to gateway_port; Serve's own ports stay cluster-internal.
    gateway_port: int = 8443
    gateway_service_type: str = "LoadBalancer"  # KubeRay: the gateway's Service (L4: TLS passes through)
    gateway_cpus: float = 0.5  # KubeRay: the gateway container's CPU (requests = limits)
    gateway_memory_mb: int = 256
    # Where every node holds the secret the gateway shows the replicas (an app arg: replicas refuse
    # calls without it). KubeRay mounts `gateway_secret` there; cluster.yaml's setup installs it.
    # Empty: the replicas check nothing and Serve's port is open to whoever reaches it.
    gateway_secret_file: str = "/etc/tandem/gateway/secret"
    # Kubernetes Secrets the pods mount (deploy/README.md, Security).
    tls_secret: str = "tandem-cloud-tls"  # type kubernetes.io/tls: tls.crt, tls.key
    tokens_secret: str = "tandem-cloud-tokens"  # cloud-tokens.json, the store of `tandem tokens`
    gateway_secret: str = "tandem-gateway"  # key `secret`
    client_ca_secret: str = ""  # key ca.crt, the devices' CA: mutual TLS; empty = off (also in cluster.yaml)
    extras: tuple[str, ...] = field(default=("cloud", "ray", "edge", "convert"))

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port", "gcs_port", "dashboard_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name}: must be in [0, 65535], got {getattr(self, name)}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"min_replicas/max_replicas: need 0 <= min <= max, max >= 1; got "
                             f"{self.min_replicas}/{self.max_replicas}")
        # A replica never holds more than max_sessions streams (it sheds the rest), so a target at or
        # above it would never be exceeded and the autoscaler would never add a replica.
        if not 0 < self.target_ongoing_requests < self.max_sessions:
            raise ValueError(f"target_ongoing_requests: must be in (0, max_sessions={self.max_sessions}), "
                             f"got {self.target_ongoing_requests}")
        check_batching(self.max_batch_rows, self.batch_window_ms, self.max_draft_len)
        if self.proxy_location not in ("EveryNode", "HeadOnly", "Disabled"):
            raise ValueError(f"proxy_location: EveryNode, HeadOnly or Disabled, got {self.proxy_location!r}")
        if not 0 <= self.max_surge_percent <= 100:
            raise ValueError(f"max_surge_percent: must be in [0, 100], got {self.max_surge_percent}")
        if self.replica_cpus < 0 or self.replica_memory_gb < 0:
            raise ValueError("replica_cpus and replica_memory_gb: must be >= 0")
        if self.threads < 0 or self.drain_margin_s < 0:
            raise ValueError("threads and drain_margin_s: must be >= 0")
        if not 0 < self.graceful_shutdown_wait_loop_s <= self.graceful_shutdown_timeout_s:
            raise ValueError("graceful_shutdown_wait_loop_s: must be in (0, graceful_shutdown_timeout_s], got "
                             f"{self.graceful_shutdown_wait_loop_s}")
        self._check_image()
        self._check_gateway()

    def _check_gateway(self) -> None:
        ports = {name: getattr(self, name) for name in ("grpc_port", "http_port", "gcs_port", "dashboard_port",
                                                         "metrics_port")}
        if not 0 < self.gateway_port <= 65535 or self.gateway_port in ports.values():
            raise ValueError(f"gateway_port: must be in [1, 65535] and differ from the head's other ports "
                             f"({ports}), got {self.gateway_port}")
        if self.gateway_service_type not in SERVICE_TYPES:
            raise ValueError(f"gateway_service_type: one of {SERVICE_TYPES}, got {self.gateway_service_type!r}")
        if self.gateway_cpus <= 0 or self.gateway_memory_mb <= 0:
            raise ValueError("gateway_cpus and gateway_memory_mb: must be > 0")
        path = self.gateway_secret_file
        if path and (not posixpath.isabs(path) or path.endswith("/") or posixpath.normpath(path) != path):
            raise ValueError(f"gateway_secret_file: an absolute file path or empty, got {path!r}")
        # KubeRay mounts the Secret over the whole folder: it must be one of its own.
        folder = posixpath.dirname(path)
        if path and (folder.count("/") < 2 or folder in SECRET_DIRS.values()
                     or f"{self.tandem_home}/".startswith(f"{folder}/")):
            raise ValueError(f"gateway_secret_file: its folder {folder!r} is mounted over whole, so it must be a "
                             f"folder of its own (at least two levels deep, not above {self.tandem_home}), got {path!r}")
        for name in ("tls_secret", "tokens_secret", "gateway_secret", "client_ca_secret"):
            value = getattr(self, name)
            if (value or name != "client_ca_secret") and not _K8S_NAME.fullmatch(value):
                raise ValueError(f"{name}: not a Kubernetes Secret name (lower-case letters, digits, '-'): {value!r}")

    def _check_image(self) -> None:
        if self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"image_pull_policy: one of {PULL_POLICIES}, got {self.image_pull_policy!r}")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", self.image_tag):
            raise ValueError(f"image_tag: not a valid tag: {self.image_tag!r}")
        if self.image_tag == "latest" and self.image_pull_policy != "Always":
            raise ValueError("image_tag: `latest` moves, so nodes would run different images; use a "
                             "version or commit tag, or set image_pull_policy=Always")
        if not _DIGEST.fullmatch(self.base_image_digest):
            raise ValueError(f"base_image_digest: expected sha256:<64 hex>, got {self.base_image_digest!r}")
        if self.image_uid <= 0:
            raise ValueError(f"image_uid: the image's user must not be root, got {self.image_uid}")

    @property
    def image(self) -> str:
        """The image reference every pod runs: [registry/]name:tag."""
        prefix = f"{self.image_registry.rstrip('/')}/" if self.image_registry else ""
        return f"{prefix}{self.image_name}:{self.image_tag}"

    @property
    def base_image(self) -> str:
        return f"python:{self.python_version}-slim@{self.base_image_digest}"

    @property
    def replica_threads(self) -> int:
        """torch threads per replica: the CPUs Ray reserves for it, not the host's cores."""
        return self.threads or max(1, int(self.replica_cpus))

    @property
    def drain_s(self) -> int:
        """The drain time plus a margin: pods' termination grace and the old cluster's deletion delay."""
        return math.ceil(self.graceful_shutdown_timeout_s) + self.drain_margin_s

    @property
    def initial_replicas(self) -> int:
        return self.max_replicas if self.start_at_max_replicas else self.min_replicas

    @property
    def max_ongoing_requests(self) -> int:
        """Above max_sessions, so the core's limit answers before Serve would queue a stream."""
        return self.max_sessions + SERVE_HEADROOM

    @property
    def max_worker_nodes(self) -> int:
        """Cloud workers at full scale, plus room for the replicas an upgrade starts first (surge)."""
        surge = -(-self.max_surge_percent * self.max_replicas // 100)
        return self.max_replicas + surge - (1 if self.head_hosts_replica else 0)

    def worker_nodes(self, replicas: int) -> int:
        return max(replicas - (1 if self.head_hosts_replica else 0), 0)

    def app_args(self) -> dict[str, Any]:
        return {name: self.replica_threads if name == "threads" else getattr(self, name) for name in APP_ARGS}

    def node_env(self) -> dict[str, str]:
        """Environment of every `ray start` (read by Serve's proxies and the replicas' workers)."""
        env = {"TANDEM_HOME": self.tandem_home}
        if not self.prefer_local_routing:
            env.update({name: "0" for name in PREFER_LOCAL_ENV})
        return env


def apply_overrides(spec: DeploySpec, assignments: Sequence[str]) -> DeploySpec:
    """`field=value` strings onto a spec, parsed by each field's type; ValueError names the field."""
    fields = {f.name: f for f in dataclasses.fields(DeploySpec)}
    changes: dict[str, Any] = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        current = getattr(spec, name)
        try:
            if isinstance(current, bool):
                changes[name] = {"true": True, "false": False}[text.lower()]
            elif isinstance(current, tuple):
                changes[name] = tuple(x for x in text.split(",") if x)
            else:
                changes[name] = type(current)(text)
        except (KeyError, ValueError):
            raise ValueError(f"{name}: not a valid {type(current).__name__}: {text!r}") from None
    return dataclasses.replace(spec, **changes)
