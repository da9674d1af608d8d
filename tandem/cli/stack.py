"""`tandem up`, `tandem down`, `tandem status`: the local stack in the background.

Guarantees:
- `up` starts cloud node, link shaper, edge node and orchestrator detached (each in its own
  session, logs under TANDEM_HOME/run/logs), waits until all are healthy, records them in
  TANDEM_HOME/run/stack.json and prints the orchestrator's gRPC and HTTP addresses, one per line,
  as HOST:PORT. Progress goes to stderr. If any process fails, everything started is stopped and
  the exit code is 2 with the failing process's log tail. A stack already running is an error.
  A bad flag (a --link-rtt-ms that is negative, nan or inf, a --draft-len or port out of range)
  exits 2 with one line naming it, before anything starts.
- `down` stops every process `up` started (their whole sessions, Ray's workers included) and
  removes the record; with nothing running it says so and succeeds. Each process gets SIGTERM
  and `_down_grace_s()` to drain (the nodes' default drain period plus 10 s to exit) before
  SIGKILL, so answers in flight finish; the orchestrator goes first, the edge under it next.
- `status` shows each process's health (exit 0 when all are healthy, 1 otherwise) and the
  orchestrator's view of the link. `status --json` prints one JSON object: `processes` (each
  with `name` among cloud, shaper, edge, orchestrator, `pid`, `grpc` HOST:PORT, `http` for the
  orchestrator, `healthy`, `metrics`: the URL Prometheus scrapes, "" for the shaper; see
  deploy/prometheus-local.yaml), `link`, and in secure mode `tls.ca_cert`, `auth.api_key_file` (the
  orchestrator's key) and `auth.edge_api_key_file` (the edge's, for its /metrics)
  (paths; never a key). The exit codes are the same.
- Secure by default: `up` runs every hop over TLS with credentials (`local_stack`'s secure
  mode); `--insecure` turns that off, by name. The orchestrator's addresses printed are then
  reached with the CA and the API key that `status --json` names; `tandem generate`/`docs`
  find both in the stack record.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from pathlib import Path
from typing import Any

from tandem.cli.main import CliError

# The Prometheus ports `tandem up` uses by default: deploy/prometheus-local.yaml scrapes them.
EDGE_METRICS_PORT, CLOUD_METRICS_PORT = 7081, 7082


def add_parser(sub: Any) -> None:
    up = sub.add_parser("up", help="start the local stack in the background; prints the orchestrator's addresses")
    up.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="target dtype")
    up.add_argument("--link-rtt-ms", type=float, default=0.0, help="round-trip time the link shaper adds")
    up.add_argument("--draft-len", type=int, default=4)
    up.add_argument("--port", type=int, default=7070, help="orchestrator gRPC port (0 = free port)")
    up.add_argument("--http-port", type=int, default=7080, help="OpenAI-compatible HTTP port (0 = free port)")
    up.add_argument("--edge-metrics-port", type=int, default=EDGE_METRICS_PORT,
                    help="the edge's Prometheus /metrics port (0 = free port)")
    up.add_argument("--cloud-metrics-port", type=int, default=CLOUD_METRICS_PORT,
                    help="the cloud's Prometheus port, Ray's exporter (0 = free port)")
    add_secure_flags(up)
    up.set_defaults(func=run_up)
    down = sub.add_parser("down", help="stop everything `tandem up` started")
    down.set_defaults(func=run_down)
    status = sub.add_parser("status", help="health of each process of the local stack")
    status.add_argument("--json", action="store_true", help="one JSON object (processes, link, tls, auth)")
    status.set_defaults(func=run_status)


def add_secure_flags(p: argparse.ArgumentParser) -> None:
    """`--secure` (the default) / `--insecure` for a command that starts the local stack."""
    security = p.add_mutually_exclusive_group()
    security.add_argument("--secure", dest="secure", action="store_true", default=True,
                          help="TLS and a credential on every hop; CA, tokens and keys under TANDEM_HOME/secure "
                               "(the default)")
    security.add_argument("--insecure", dest="secure", action="store_false",
                          help="plaintext, no credentials (every process still listens on loopback only)")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ours(p: dict) -> bool:
    """The recorded process (or its session) is still there, and its pid was not reused."""
    from tandem.ops import procs

    pid = int(p["pid"])
    return procs.same_process(pid, p.get("identity", "")) and procs.session_alive(pid)


def _running(state: dict | None) -> list[dict]:
    return [p for p in (state or {}).get("processes", []) if _ours(p)]


def run_up(args: argparse.Namespace) -> int:
    from tandem import paths
    from tandem.models import registry as models
    from tandem.ops import local_stack, procs

    if not (math.isfinite(args.link_rtt_ms) and args.link_rtt_ms >= 0):
        raise CliError(f"--link-rtt-ms: must be a finite number >= 0, got {args.link_rtt_ms}")
    if not 1 <= args.draft_len <= 16:
        raise CliError(f"--draft-len: must be in [1, 16], got {args.draft_len}")
    for flag, port in (("--port", args.port), ("--http-port", args.http_port),
                       ("--edge-metrics-port", args.edge_metrics_port), ("--cloud-metrics-port", args.cloud_metrics_port)):
        if not 0 <= port <= 65535:
            raise CliError(f"{flag} must be in [0, 65535], got {port}")
    if _running(local_stack.read_state()):
        raise CliError("the local stack is already running; `tandem status` shows it, `tandem down` stops it")
    try:
        models.require_pair()
    except models.ModelsMissing as exc:
        raise CliError(str(exc)) from None
    log_dir = paths.tandem_home() / "run" / "logs"
    started: list[procs.Child] = []

    def start(name: str, argv: list[str], *, timeout_s: float, ready: str | None = None) -> procs.Child:
        child = procs.start(name, argv, log_dir=log_dir, timeout_s=timeout_s, ready=ready, detach=True)
        started.append(child)
        return child

    opts = local_stack.StackConfig(dtype=args.dtype, link_rtt_ms=args.link_rtt_ms, draft_len=args.draft_len,
                                    grpc_port=args.port, http_port=args.http_port, secure=args.secure,
                                    edge_metrics_port=args.edge_metrics_port,
                                    cloud_metrics_port=args.cloud_metrics_port)
    _say(f"logs in {log_dir}")
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    secrets = local_stack.secrets_for(opts)
    try:
        children = local_stack.launch(start, opts, _say, secrets)
    except BaseException as exc:
        _say("start-up failed; stopping what was started")
        for child in reversed(started):
            procs.stop(child)
        if isinstance(exc, procs.ChildFailed | KeyboardInterrupt):
            raise CliError(str(exc) or "interrupted") from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    path = local_stack.write_state(children, secrets)
    _say(f"recorded in {path}; `tandem down` stops it")
    if secrets is not None:
        _say(f"TLS: trust {secrets.ca_cert}; API key in {secrets.api_key} (send it as 'Authorization: Bearer KEY')")
    orch = children["orchestrator"].fields
    asks = " (it asks for the API key)" if secrets is not None else ""
    _say(f"web console: {local_stack.console_url(orch['http'], secure=secrets is not None)}{asks}")
    print(orch["grpc"])
    print(orch["http"])
    return 0


def _down_grace_s() -> float:
    """`tandem up` starts the nodes with the default drain period; allow it, plus a margin."""
    from tandem.limits import DRAIN_S

    return DRAIN_S + 10.0


def run_down(args: argparse.Namespace) -> int:
    from tandem.ops import local_stack, procs

    state = local_stack.read_state()
    if state is None:
        _say("nothing to stop: no stack recorded")
        return 0
    for p in reversed(state.get("processes", [])):
        if _ours(p):
            _say(f"stopping {p['name']} (pid {p['pid']})")
            procs.stop_session(int(p["pid"]), grace_s=_down_grace_s())
    local_stack.state_file().unlink(missing_ok=True)
    _say("stopped")
    return 0


def _grpc_healthy(address: str, ca_cert: str | None = None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tandem.security import ClientTls, secure_channel

    try:
        with secure_channel(address, ClientTls(Path(ca_cert)) if ca_cert else None, None) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _port_open(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _process_rows(state: dict) -> list[dict[str, Any]]:
    ca = (state.get("tls") or {}).get("ca_cert")
    rows = []
    for p in state.get("processes", []):
        name = "shaper" if p["name"] == "netshape" else p["name"]  # records from before the rename
        alive = _ours(p)
        address = p.get("address", "")
        ok = alive and bool(address) and (_port_open(address) if name == "shaper" else _grpc_healthy(address, ca))
        row: dict[str, Any] = {"name": name, "pid": int(p["pid"]), "grpc": address, "healthy": ok,
                               "state": "healthy" if ok else ("unhealthy" if alive else "stopped")}
        if name == "orchestrator":
            row["http"] = state.get("orchestrator_http", "")
        row["metrics"] = p.get("metrics", "")  # Prometheus' /metrics URL ("" for the shaper)
        rows.append(row)
    return rows


def run_status(args: argparse.Namespace) -> int:
    import json

    from tandem.ops import local_stack

    state = local_stack.read_state()
    if state is None:
        if args.json:
            print(json.dumps({"processes": [], "running": False}))
        else:
            print("no local stack recorded (start one with `tandem up`)")
        return 1
    rows = _process_rows(state)
    healthy = bool(rows) and all(r["healthy"] for r in rows)
    link = _link(state) if healthy else None
    if args.json:
        out: dict[str, Any] = {"running": True, "healthy": healthy,
                               "processes": [{k: v for k, v in r.items() if k != "state"} for r in rows],
                               "link": link if isinstance(link, dict) else None,
                               "link_control": state.get("link_control", "")}
        for key in ("tls", "auth"):
            if key in state:
                out[key] = state[key]
        print(json.dumps(out, indent=2))
        return 0 if healthy else 1
    for r in rows:
        print(f"{r['name']:<13} {r['state']:<10} pid {r['pid']:<8} {r['grpc']}")
    print(f"{'http':<13} {'-':<10} {'':<12} {state.get('orchestrator_http', '')}")
    if isinstance(link, dict):
        print(f"link {link['state']}, circuit {link['circuit']}, rtt {link['rtt_ms']:.1f} ms "
              f"(+-{link['rtt_jitter_ms']:.1f}), recent acceptance {link['recent_acceptance']:.2f}, "
              f"documents {link['documents']}")
    elif link is not None:
        print(f"orchestrator status failed: {link}")
    return 0 if healthy else 1


def client_options(state: dict) -> dict[str, Any]:
    """SDK keyword arguments (CA and API key) for the recorded stack; {} when it is not secure."""
    from tandem.security import read_secret

    opts: dict[str, Any] = {}
    if (state.get("tls") or {}).get("ca_cert"):
        opts["ca_cert"] = state["tls"]["ca_cert"]
    key_file = (state.get("auth") or {}).get("api_key_file")
    if key_file:
        opts["api_key"] = read_secret(file=Path(key_file), what="api key")
    return opts


def _link(state: dict) -> dict[str, Any] | str:
    """The orchestrator's view of the link, or the error's text."""
    from tandem_sdk import Client, TandemError

    try:
        with Client(state["orchestrator_grpc"], timeout_s=5, **client_options(state)) as client:
            s = client.status()
    except TandemError as exc:
        return str(exc)
    link = s.link
    return {"state": link.state, "circuit": link.circuit, "rtt_ms": link.rtt_ms, "rtt_jitter_ms": link.rtt_jitter_ms,
            "recent_acceptance": s.recent_acceptance, "documents": s.documents}
