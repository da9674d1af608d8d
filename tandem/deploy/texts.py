"""Fixed texts of the generated deployment files (comments and the Dockerfile template).

Guarantees: plain constants, no logic; `tandem.deploy.gen` fills every `{field}` from
`DeploySpec`, so a port, name or version appears in one place only.
"""

from __future__ import annotations

FILE_NOTES = {
    "serve_config.yaml": """
Ray Serve config of the cloud verifier (the target model behind Serve's gRPC proxy).
Deploy:  serve deploy deploy/serve_config.yaml --address http://HEAD:{dashboard_port}
One replica per cloud node (custom resource); the autoscaler keeps min..max replicas and adds
one when a replica carries more than target_ongoing_requests sessions (each Verify stream is one
long request). See deploy/README.md.
""",
    "cluster.yaml": """
Ray cluster launcher file:  ray up deploy/cluster.yaml   (run from the repository root)
A head node plus a group of cloud workers; each worker offers one `{resource}` resource, so
each runs one verifier replica. Then deploy the app:
  ray exec deploy/cluster.yaml 'cd ~/tandem && .venv/bin/serve deploy deploy/serve_config.yaml'
""",
    "rayservice.yaml": """
KubeRay RayService:  kubectl apply -f deploy/rayservice.yaml   (KubeRay >= 1.5.1, Ray token auth)
serveConfigV2 is deploy/serve_config.yaml verbatim. Clients reach the gRPC ingress through the
Service `<name>-serve`, port `{grpc_name}` ({grpc_port}). The image is built from deploy/Dockerfile.
""",
    "Dockerfile": """
Image of a cloud node (head or worker) for deploy/rayservice.yaml:
  docker build -f deploy/Dockerfile -t {image} .    (from the repository root)
NOT BUILT OR TESTED HERE: the development machine runs no Docker engine. The same steps (venv,
pinned install, `tandem models fetch`) run for real in the cluster launcher's setup commands.
""",
}

PROVIDER_NOTES = """
PLACEHOLDER: not tested, no cloud account is reachable from the development machine.
Replace with your provider before `ray up`:
  aws:   region/availability_zone here; InstanceType and ImageId (an Ubuntu 22.04+ AMI with
         python3.11) under each node type's node_config; IAM as in Ray's aws example.
  gcp:   type: gcp, region, availability_zone, project_id; node_config with machineType and disks.
  local: type: local, head_ip and worker_ips of machines you own (ssh reachable, same user).
The rest of the file is provider-independent. Size the nodes for one replica each: the target
in bf16 needs about 3.5 GB plus the KV budget (kv_budget_mb in serve_config.yaml).
"""

CLUSTER_NOTES = {
    "file_mounts": """
The repository (ray up runs from its root) and the cluster's Ray auth token. Ray 2.60 enables
token authentication: create the token once with `ray get-auth-token --generate`; every node gets
the same file and starts with RAY_AUTH_MODE=token.
""",
    "setup_commands": """
Every node: the pinned install (CPU torch wheels) and the model fetch, which verifies and skips
what is already there on a reused node.
""",
    "head_start_ray_commands": """
The node environment turns off Serve's prefer-local-node routing: a session is a long stream and
its replica should be the least loaded, not the one next to the proxy the client happened to hit.
""",
}

DOCKERFILE = """\
FROM python:{python}-slim

# gcc: the small-M verification kernel is compiled on first use (cloud_node/kernels);
# wget: KubeRay's probes use it.
RUN apt-get update \\
 && apt-get install -y --no-install-recommends gcc libc6-dev wget \\
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \\
    PYTHONUNBUFFERED=1 \\
    PATH=/opt/venv/bin:$PATH \\
    {env}

WORKDIR /opt/src
COPY requirements.lock pyproject.toml README.md ./
COPY tandem/ tandem/
COPY tandem_core/ tandem_core/
COPY tandem_sdk/ tandem_sdk/
COPY edge_node/ edge_node/
COPY cloud_node/ cloud_node/
COPY orchestrator/ orchestrator/
COPY protos/ protos/
COPY netshape/ netshape/
RUN python -m venv /opt/venv \\
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu -c requirements.lock ".[{extras}]"

# The models are part of the image (about 1.6 GB of downloads, converted once at build time);
# mount a volume at $TANDEM_HOME instead to keep the image small.
RUN tandem models fetch

EXPOSE {ports}
"""
