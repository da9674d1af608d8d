"""The local multi-process stack: cloud node, link shaper, edge node and orchestrator.

Guarantees: `launch` starts the four processes in dependency order and returns only when each
printed its ready line and the gRPC ones answer health checks; a failure raises
`procs.ChildFailed` with the failing child's log tail (the caller stops what was started).
`tandem demo` runs it attached (stopped when the demo ends); `tandem up` runs it detached and
records it in `TANDEM_HOME/run/stack.json` for `tandem down` and `tandem status`, with each
process's Prometheus endpoint (`metrics`: the cloud's Ray exporter, the edge's metrics port, the
orchestrator's HTTP port; `metrics_url`). The orchestrator is told the shaper's (loopback) control
endpoint, so the web console at `console_url` can cut, black-hole, slow and restore the link.

Secure mode (`StackConfig.secure`, the default of `tandem up` and `tandem demo`): every hop is
TLS with a credential. `prepare_secrets` makes, under `TANDEM_HOME/secure` (mode 0700): a
development CA and a server certificate for localhost (`tandem.ops.devpki`), the cloud's token
store with a fresh token for this edge (the previous one is revoked), the edge's API key (the
orchestrator's credential toward it) and the orchestrator's API key (kept across starts, so
clients keep working). Client -> orchestrator: TLS + API key (gRPC and HTTPS); orchestrator ->
edge: TLS + key; edge -> shaper -> cloud gateway: TLS end to end (the shaper forwards bytes) +
the device token. Secrets reach the processes as files (flags name the files), never as
arguments.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem import paths
from tandem.ops import procs

StartFn = Callable[..., procs.Child]  # (name, argv, *, timeout_s, ready=None) -> Child


@dataclass(frozen=True)
class StackConfig:
    dtype: str = "bf16"
    link_rtt_ms: float = 0.0
    draft_len: int = 4
    grpc_port: int = 7070
    http_port: int = 7080
    round_deadline_ms: int = 1000
    secure: bool = True
    edge_metrics_port: int = 0  # the edge's /metrics (0: a free port)
    cloud_metrics_port: int = 0  # Ray's Prometheus exporter of the cloud node (0: a free port)


@dataclass(frozen=True)
class StackSecrets:
    """Paths only: what the processes and the clients read."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    cloud_tokens: Path
    edge_cloud_token: Path
    edge_api_key: Path
    api_key: Path


EDGE_DEVICE_NAME = "local-edge"


def secure_dir() -> Path:
    return paths.tandem_home() / "secure"


def prepare_secrets(folder: Path | None = None) -> StackSecrets:
    """Make (or reuse) the CA, certificates, token store, tokens and keys of a secure stack."""
    import secrets as random

    from cloud_node.tokens import STORE_FILE, TokenStore
    from tandem.ops import devpki
    from tandem.security import write_secret

    folder = folder or secure_dir()
    pki = devpki.ensure(folder / "pki")
    store = TokenStore(folder / STORE_FILE)
    for record in store.records():
        if record.name == EDGE_DEVICE_NAME and record.revoked is None:
            store.revoke(record.id)
    _, token = store.issue(EDGE_DEVICE_NAME, max_sessions=64)
    out = StackSecrets(folder, pki.ca_cert, pki.server_cert, pki.server_key, store.path,
                       folder / "edge-cloud.token", folder / "edge-api.key", folder / "api.key")
    write_secret(out.edge_cloud_token, token + "\n")
    write_secret(out.edge_api_key, random.token_urlsafe(32) + "\n")
    if not out.api_key.is_file():
        write_secret(out.api_key, random.token_urlsafe(32) + "\n")
    return out


def secrets_for(opts: StackConfig) -> StackSecrets | None:
    """The secrets a stack with these options runs with (made now), or None when not secure."""
    return prepare_secrets() if opts.secure else None


def sdk_options(sec: StackSecrets | None) -> dict[str, Any]:
    """Keyword arguments for `tandem_sdk.Client` to reach this stack's orchestrator."""
    if sec is None:
        return {}
    from tandem.security import read_secret

    return {"api_key": read_secret(file=sec.api_key, what="api key"), "ca_cert": str(sec.ca_cert)}


def _flags(sec: StackSecrets | None) -> dict[str, list[str]]:
    """Each process's security flags (file paths only)."""
    if sec is None:
        return {"cloud": [], "edge": [], "orchestrator": []}
    tls = ["--tls-cert", str(sec.server_cert), "--tls-key", str(sec.server_key)]
    return {
        "cloud": [*tls, "--tokens-file", str(sec.cloud_tokens)],
        "edge": [*tls, "--api-key-file", str(sec.edge_api_key), "--cloud-ca-cert", str(sec.ca_cert),
                 "--cloud-token-file", str(sec.edge_cloud_token)],
        "orchestrator": [*tls, "--api-key-file", str(sec.api_key), "--edge-ca-cert", str(sec.ca_cert),
                         "--edge-api-key-file", str(sec.edge_api_key), "--cloud-ca-cert", str(sec.ca_cert)],
    }


def launch(start: StartFn, opts: StackConfig, say: Callable[[str], None],
           secrets: StackSecrets | None = None) -> dict[str, procs.Child]:
    """Start cloud -> shaper -> edge -> orchestrator; returns the children by name. With
    `opts.secure`, `secrets` (made by `prepare_secrets` when not given) secure every hop."""
    py, t0 = sys.executable, time.perf_counter()
    if opts.secure and secrets is None:
        secrets = prepare_secrets()
    sec = secrets if opts.secure else None
    flags, ca = _flags(sec), (sec.ca_cert if sec else None)
    if sec:
        say(f"secure: TLS with the development CA {sec.ca_cert}, per-device cloud token, API keys in {sec.folder}")
    children: dict[str, procs.Child] = {}
    say(f"starting the cloud node (Ray Serve, target {opts.dtype}) ...")
    children["cloud"] = cloud = start("cloud", [py, "-m", "tandem", "serve", "cloud", "--port", "0", "--dtype",
                                                opts.dtype, "--metrics-port", str(opts.cloud_metrics_port),
                                                *flags["cloud"]], timeout_s=900)
    say(f"  cloud verifier at {cloud.fields['grpc']} ({time.perf_counter() - t0:.1f} s)")
    children["shaper"] = shaper = start(
        "shaper", [py, "-m", "netshape", "--listen", "127.0.0.1:0", "--upstream", cloud.fields["grpc"],
                   "--rtt-ms", str(opts.link_rtt_ms), "--control", "127.0.0.1:0"], timeout_s=60, ready=r"^control=")
    say(f"  link shaper at {shaper.fields['listen']} (RTT +{opts.link_rtt_ms:g} ms, control {shaper.fields['control']})")
    children["edge"] = edge = start("edge", [py, "-m", "tandem", "serve", "edge", "--port", "0", "--cloud",
                                             shaper.fields["listen"], "--draft-len", str(opts.draft_len),
                                             "--metrics-port", str(opts.edge_metrics_port),
                                             *flags["edge"]], timeout_s=180)
    procs.wait_healthy(edge.fields["grpc"], timeout_s=60, ca_cert=ca)
    say(f"  edge node at {edge.fields['grpc']}")
    children["orchestrator"] = orch = start(
        "orchestrator", [py, "-m", "tandem", "serve", "orchestrator", "--edge", edge.fields["grpc"], "--cloud",
                         shaper.fields["listen"], "--port", str(opts.grpc_port), "--http-port", str(opts.http_port),
                         "--round-deadline-ms", str(opts.round_deadline_ms), "--shaper-control", shaper.fields["control"],
                         *flags["orchestrator"]], timeout_s=180)
    procs.wait_healthy(orch.fields["grpc"], timeout_s=60, ca_cert=ca)
    say(f"  orchestrator at grpc {orch.fields['grpc']}, http {orch.fields['http']}")
    say(f"all processes healthy; start-up took {time.perf_counter() - t0:.1f} s")
    return children


def metrics_url(name: str, fields: dict[str, str], *, secure: bool) -> str:
    """Where Prometheus scrapes a process ("" for the shaper): the edge's own metrics port and the
    orchestrator's HTTP port (both over TLS with the API key when secure, see
    deploy/prometheus-local.yaml), the cloud's Ray exporter (plain HTTP, loopback)."""
    scheme = "https" if secure else "http"
    address = {"cloud": fields.get("metrics"), "edge": fields.get("metrics"), "orchestrator": fields.get("http")}.get(name)
    if not address:
        return ""
    return f"{'http' if name == 'cloud' else scheme}://{address}/metrics"


def console_url(http_address: str, *, secure: bool, api_key: str | None = None) -> str:
    """The web console on the orchestrator's HTTP port; with `api_key`, in the URL's fragment,
    which the browser keeps to itself (the page reads it, stores it for the tab, and clears it)."""
    url = f"{'https' if secure else 'http'}://{http_address}/"
    return url + (f"#key={api_key}" if api_key else "")


def state_file() -> Path:
    return paths.tandem_home() / "run" / "stack.json"


def write_state(children: dict[str, procs.Child], secrets: StackSecrets | None = None) -> Path:
    """The record `tandem down` and `tandem status` read; with `secrets`, the CA and API-key
    paths (never their contents) under "tls" and "auth"."""
    orch = children["orchestrator"].fields
    state: dict = {
        "orchestrator_grpc": orch["grpc"],
        "orchestrator_http": orch["http"],
        "started_unix": time.time(),
        "link_control": children["shaper"].fields.get("control", ""),  # the shaper's HTTP control endpoint
        # identity: "BOOT:START" in seconds (procs.identity); records from before psutil hold "BOOT_ID:TICKS"
        "processes": [{"name": name, "pid": c.proc.pid, "identity": procs.identity(c.proc.pid), "log": str(c.log_path),
                       "address": c.fields.get("grpc") or c.fields.get("listen", ""),
                       "metrics": metrics_url(name, c.fields, secure=secrets is not None)}
                      for name, c in children.items()],
    }
    if secrets is not None:
        state["tls"] = {"ca_cert": str(secrets.ca_cert)}
        # the orchestrator's key (its API, console and /metrics) and the edge's (its API and /metrics)
        state["auth"] = {"api_key_file": str(secrets.api_key), "edge_api_key_file": str(secrets.edge_api_key)}
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)
    return path


def read_state() -> dict | None:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
