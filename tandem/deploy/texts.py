"""Fixed texts of the generated deployment files (comments, the Dockerfile and .dockerignore).

Guarantees: plain constants, no logic; `tandem.deploy.gen` fills every `{field}` from
`DeploySpec`, so a port, name or version appears in one place only.
"""

from __future__ import annotations

FILE_NOTES = {
    "serve_config.yaml": """
Ray Serve config of the cloud verifier (the target model behind Serve's gRPC proxy).
Deploy (token auth on):  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token \\
  serve deploy deploy/serve_config.yaml --address http://HEAD:{dashboard_port}
One replica per cloud node (custom resource); the autoscaler keeps min..max replicas and adds
one when a replica carries more than target_ongoing_requests sessions (each Verify stream is one
long request). `threads` is the replica's num_cpus, never the host's core count.
The replicas refuse calls without the gateway's secret, read from gateway_secret_file
({secret_file}) where the app is built and on every replica's node:
cluster.yaml installs it, rayservice.yaml mounts it. See deploy/README.md (Security).
""",
    "cluster.yaml": """
Ray cluster launcher file:  ray up deploy/cluster.yaml   (run from the repository root; the aws
provider needs `pip install boto3` where you run it). A head node plus a group of cloud workers;
each worker offers one `{resource}` resource, so each runs one verifier replica. Then deploy:
  ray exec deploy/cluster.yaml '{deploy_cmd}'
The head also runs the cloud's gateway (TLS, per-device tokens) on port {gateway_port}, the only
port edges use: put tls.crt, tls.key and cloud-tokens.json in {secure_dir} on the head
(deploy/README.md, Security).
""",
    "rayservice.yaml": """
KubeRay RayService:  kubectl apply -f deploy/rayservice.yaml   (KubeRay >= {kuberay_version}, Ray token auth)
KubeRay {kuberay_version} is the first release whose Serve Service keeps ports named `serve-*`
(KubeRay PR #4558); older releases keep only `serve` and drop `{grpc_name}`.
serveConfigV2 is deploy/serve_config.yaml verbatim. The image is built from deploy/Dockerfile.
Edges connect to the gateway (TLS, per-device tokens), a second container of the head
pod, through the Service `{name}-gateway` (the second document), port {gateway_port}.
The Service `{name}-serve` (ClusterIP, made by KubeRay) stays inside the cluster; its
port `{grpc_name}` ({grpc_port}) refuses calls that did not come through the gateway.
Create the Secrets first (deploy/README.md, Security); they are mounted with
defaultMode 288 (octal 0440) and the pods' fsGroup {uid}.
""",
    "Dockerfile": """
Image of a cloud node (head or worker) for deploy/rayservice.yaml, linux/amd64, from the repository root:
  docker build --platform linux/amd64 -f deploy/Dockerfile -t {image} .
Stages: deps (the locked dependencies), models (`tandem models fetch`, baked into the image in
its own layer), build (gcc compiles the small-M kernel), runtime (no compiler, user {uid}).
NOT BUILT HERE: the development machine runs no Docker engine; tests lint this file (hadolint).
""",
    ".dockerignore": """
The build context of deploy/Dockerfile: everything is ignored except what its COPY lines name.
""",
}

PROVIDER_NOTES = """
PLACEHOLDER: not tested, no cloud account is reachable from the development machine.
Replace with your provider before `ray up`:
  aws:   region/availability_zone here; InstanceType and ImageId (an Ubuntu 22.04+ AMI with
         python3.11) under each node type's node_config; IAM as in Ray's aws example. The
         launcher imports boto3, which the lock does not pin: `pip install boto3` first.
  gcp:   type: gcp, region, availability_zone, project_id; node_config with machineType and disks.
  local: type: local, head_ip and worker_ips of machines you own (ssh reachable, same user).
security_group (aws) opens the gateway's port to everyone; Ray's default group adds ssh and
traffic between the nodes. Keep Ray's own ports (GCS, dashboard, Serve's proxies) closed outside.
The rest of the file is provider-independent. Size the nodes for one replica each: the target
in bf16 needs about 3.5 GB plus the KV budget (kv_budget_mb in serve_config.yaml).
"""

CLUSTER_NOTES = {
    "file_mounts": """
The repository (ray up runs from its root), the cluster's Ray auth token and the gateway's
secret. Ray 2.60 enables token authentication: create the token once with
`ray get-auth-token --generate`; every node gets the same file and starts with
RAY_AUTH_MODE=token. Make {launcher_secret} once too (deploy/README.md, Security);
`ray up` stops when either file is missing.
""",
    "setup_commands": """
Every node: the pinned install (CPU torch wheels), the model fetch, which verifies and skips
what is already there on a reused node, and the gateway's secret at
{secret_file} (mode 0400), where the replicas read it.
""",
    "head_start_ray_commands": """
The node environment turns off Serve's prefer-local-node routing: a session is a long stream and
its replica should be the least loaded, not the one next to the proxy the client happened to hit.
Then the gateway, as the systemd unit {unit} (`journalctl -u {unit}`), in front
of the head's Serve proxy; it restarts every 5 s until its files are in {secure_dir}.
""",
}

GATEWAY_SERVICE_NOTE = """
The gateway's Service, what edges connect to: TLS on port {gateway_port}, to the head only (one
gateway counts each device's sessions). A LoadBalancer passes TCP through, so TLS ends in the
gateway. KubeRay labels the head pod `ray.io/node-type: head` and, while its Serve proxy (the
gateway's upstream) is healthy, `ray.io/serve: "true"`; do not set
excludeHeadPodFromServeSvc, which keeps that label false. The pods carry no label naming the
RayService: the templates add one.
"""

# {base}: python:X.Y-slim@sha256:...; {copy_source}: one COPY line per package of the wheel.
DOCKERFILE = """\
FROM {base} AS deps
ENV PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    PATH=/opt/venv/bin:$PATH \\
    TANDEM_HOME={home}
WORKDIR /opt/src
# 1. The locked third-party dependencies. Only the lock and the project metadata are copied, so
#    this layer is rebuilt when they change, not when the code does (the project itself is
#    installed from its wheel in the runtime stage).
COPY requirements.lock pyproject.toml README.md ./
RUN python -m venv /opt/venv \\
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu -c requirements.lock ".[{extras}]" \\
 && pip uninstall -y tandem

# 2. The models, fetched and converted at build time into their own layer. Only the modules that
#    `tandem models fetch` runs are copied, so a code change elsewhere reuses this layer.
FROM deps AS models
COPY tandem/__init__.py tandem/paths.py tandem/
COPY tandem/models/ tandem/models/
RUN python -c "from tandem.models import fetch; fetch.fetch()" \\
 && rm -rf {home}/downloads

# 3. gcc lives in this stage only: it builds the wheel and compiles the small-M kernel
#    (cloud_node/kernels) into {home}/kernels, which the runtime stage copies.
FROM deps AS build
# Debian's package versions move with its security updates; the base image is pinned by digest.
# hadolint ignore=DL3008
RUN apt-get update \\
 && apt-get install -y --no-install-recommends gcc libc6-dev \\
 && rm -rf /var/lib/apt/lists/*
{copy_source}
WORKDIR /
RUN pip wheel --no-deps --wheel-dir /opt/wheels /opt/src \\
 && pip install --no-deps /opt/wheels/*.whl \\
 && python -c "{compile_kernel}"

# 4. The runtime: the base image, wget (KubeRay's readiness probes run it), the dependencies,
#    the models, the project's wheel and the compiled kernel; no compiler; a non-root user.
FROM {base} AS runtime
# Debian's package versions move with its security updates; the base image is pinned by digest.
# hadolint ignore=DL3008
RUN apt-get update \\
 && apt-get install -y --no-install-recommends wget \\
 && rm -rf /var/lib/apt/lists/* \\
 && useradd --create-home --uid {uid} --user-group --shell /bin/bash tandem
ENV PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    PYTHONUNBUFFERED=1 \\
    PATH=/opt/venv/bin:$PATH \\
    {env}
COPY --from=deps /opt/venv /opt/venv
COPY --from=models {home}/models {home}/models
COPY --from=build /opt/wheels /opt/wheels
RUN pip install --no-deps /opt/wheels/*.whl \\
 && rm -rf /opt/wheels
# The runtime has no compiler: the replicas load this prebuilt library (TANDEM_SMALLM_KERNEL).
COPY --from=build {home}/kernels {home}/kernels
ENV TANDEM_SMALLM_KERNEL={home}/kernels/smallm_gemm.so
# The replicas cache their tile plan (cloud_node/autotune.py) here, so a restart skips the tuning.
RUN mkdir -p {home}/autotune && chown {uid}:{uid} {home}/autotune
USER {uid}
WORKDIR /home/tandem
EXPOSE {ports}
"""

# Compiles the kernel for the CPU flags in cloud_node/kernels/build.py (AVX2/FMA), whatever the
# build machine's own CPU; run from / so that it imports the installed wheel.
COMPILE_KERNEL = ("from pathlib import Path; from cloud_node.kernels import build as k; "
                  "k.compile_library(k.find_compiler(), Path('{home}/kernels/smallm_gemm.so'))")

DOCKERIGNORE_TAIL = """\
**/__pycache__
**/*.pyc
"""
