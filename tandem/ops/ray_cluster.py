"""A Ray cluster of several nodes on this one machine, driven through Ray's own CLI.

Used by the end-to-end test of `deploy/` and by `tandem bench --suite cloud-scale`.

Guarantees:
- Each node is one `ray start` (`--head`, or `--address` for a worker) run in a session of its
  own, with its own temporary directory and explicitly chosen free ports (never Ray's fixed
  defaults, so it can run beside other Ray instances on the machine). Every process of a node,
  raylet, agents and workers included, stays in that session: `RayNode.kill()` stops that node
  alone, as a machine failure would (psutil and `os.getsid`, no /proc: Linux and macOS).
- Each node carries the Ray label `tandem-node=<name>` (names are unique in a cluster), by which
  its Ray node id is found once it is up. Actors are placed on nodes by that id, from Ray's own
  state API, never by pid. A node that was killed is never matched again, even while the GCS
  still reports it (and its actors) alive, which it does for some seconds after a SIGKILL.
- The cluster uses token authentication with a token file in its own folder; nothing is read
  from or written to `~/.ray` or `/tmp/ray`.
- `stop()` (also on leaving the `with` block, whatever happened) kills every process of every
  node it started and removes the folder; `leftovers()` lists what would still be running. It
  never runs `ray stop`, which stops every Ray process on the machine, other users' included.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tandem.ops import procs
from tandem.ports import free_ports

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_BIN = Path(sys.executable).parent
# Ports each node needs besides Ray's worker ports (10002-19999, where free ports never fall).
_NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")
NODE_LABEL = "tandem-node"  # Ray node label holding the RayNode's name
_NODE_NAME = re.compile(r"[A-Za-z0-9]([-_.A-Za-z0-9]{0,61}[A-Za-z0-9])?")  # what a Ray label value may be


class ClusterError(RuntimeError):
    """A Ray command failed; the message carries the end of its output."""


@dataclass
class RayNode:
    """One `ray start`: its session id names every process of the node, its Ray node id the node
    in Ray's state API ("" until it registered)."""

    name: str
    temp_dir: Path
    sid: int
    log_path: Path
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str = ""
    killed: bool = False

    def pids(self) -> list[int]:
        return procs.session_members(self.sid)

    def kill(self, timeout_s: float = 15.0) -> None:
        """SIGKILL every process of the node (a node failure); returns once none is left."""
        self.killed = True
        if left := procs.kill_session(self.sid, timeout_s):
            raise ClusterError(f"node {self.name}: processes {left} survive SIGKILL")


class LocalRayCluster:
    """Head and workers as `ray start` processes; `serve` commands against its dashboard."""

    def __init__(self, root: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="tdm-ray-"))  # short: socket paths
        self.root.mkdir(parents=True, exist_ok=True)
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.nodes: list[RayNode] = []
        self.gcs_address = ""
        self.dashboard_url = ""

    def _ray_start(self, name: str, args: list[str], num_cpus: float, resources: Mapping[str, float],
                   timeout_s: float) -> RayNode:
        if not _NODE_NAME.fullmatch(name) or any(node.name == name for node in self.nodes):
            raise ClusterError(f"node name {name!r}: must be new in this cluster and a valid Ray label value")
        deadline = time.monotonic() + timeout_s
        temp_dir = self.root / name
        temp_dir.mkdir(exist_ok=True)
        ports = dict(zip(_NODE_PORTS, free_ports(len(_NODE_PORTS))))
        argv = [str(_BIN / "ray"), "start", *args, "--temp-dir", str(temp_dir), "--node-ip-address", HOST,
                "--num-cpus", f"{num_cpus:g}", "--resources", json.dumps(dict(resources)),
                "--labels", f"{NODE_LABEL}={name}", "--object-store-memory", str(80 << 20), "--disable-usage-stats",
                *[f"--{k}={v}" for k, v in ports.items()]]
        log_path = self.root / f"{name}-start.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)
        node = RayNode(name, temp_dir, proc.pid, log_path, dict(resources))
        self.nodes.append(node)  # before waiting: stop() must find it even if the start fails
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise ClusterError(f"`ray start` for {name} {'timed out' if rc is None else f'exited {rc}'}:\n"
                               + _tail(log_path))
        node.node_id = self._registered_id(name, deadline)
        log.info("node %s up (session %d, Ray node %s)", name, node.sid, node.node_id)
        return node

    def _registered_id(self, name: str, deadline: float) -> str:
        """The Ray node id of the live node labelled `name`, once the GCS lists it (the state API
        can refuse for a moment right after the head starts)."""
        while True:
            try:
                nodes, why = self._gcs_nodes(), ""
            except ClusterError as exc:
                nodes, why = [], f": {exc}"
            ids = [n["node_id"] for n in nodes if (n.get("labels") or {}).get(NODE_LABEL) == name]
            if len(ids) == 1:
                return str(ids[0])
            if len(ids) > 1 or time.monotonic() > deadline:
                raise ClusterError(f"node {name}: {len(ids)} live Ray nodes labelled {NODE_LABEL}={name}{why}")
            time.sleep(0.5)

    def _gcs_nodes(self) -> list[dict[str, Any]]:
        """The nodes the GCS reports ALIVE (it reports a SIGKILLed node so for some seconds)."""
        return self.state_list("nodes", "state=ALIVE")

    def state_list(self, kind: str, *filters: str) -> list[dict[str, Any]]:
        """`ray list KIND` with these `key=value` filters, as JSON rows ([] when none matches)."""
        out = self.cli(["ray", "list", kind, "--address", self.gcs_address, "--format", "json", "--limit", "1000",
                        *[arg for f in filters for arg in ("--filter", f)]])
        if out.strip() == "No resource in the cluster":  # what it prints for no rows, even as JSON
            return []
        return list(json.loads(out))

    def start_head(self, num_cpus: float, resources: Mapping[str, float], timeout_s: float = 120) -> RayNode:
        gcs, dashboard, client = free_ports(len(_HEAD_PORTS))
        self.gcs_address = f"{HOST}:{gcs}"  # before the start: it finds the node's id there
        node = self._ray_start("head", ["--head", f"--port={gcs}", "--include-dashboard=true",
                                        f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}",
                                        f"--ray-client-server-port={client}"], num_cpus, resources, timeout_s)
        self.dashboard_url = f"http://{HOST}:{dashboard}"
        return node

    def add_worker(self, name: str, num_cpus: float, resources: Mapping[str, float],
                   timeout_s: float = 120) -> RayNode:
        if not self.gcs_address:
            raise ClusterError("start the head first")
        return self._ray_start(name, [f"--address={self.gcs_address}"], num_cpus, resources, timeout_s)

    def cli(self, args: Sequence[str], timeout_s: float = 120) -> str:
        """Run `ray ...` or `serve ...` (first arg) against this cluster; its stdout."""
        tool, *rest = args
        proc = subprocess.run([str(_BIN / tool), *rest], check=False, capture_output=True, text=True, env=self.env,
                              timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=self.root)
        if proc.returncode != 0:
            raise ClusterError(f"`{' '.join(args)}` exited {proc.returncode}:\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-3000:]}")
        return proc.stdout

    def serve_deploy(self, config: Path) -> None:
        self.cli(["serve", "deploy", str(config), "--address", self.dashboard_url])

    def serve_status(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load(self.cli(["serve", "status", "--address", self.dashboard_url])) or {}

    def alive_actors(self, class_name: str) -> list[dict[str, Any]]:
        """Live actors of a class (e.g. a Serve replica class) with their node ids and pids. The GCS
        keeps the actors of a SIGKILLed node ALIVE until it notices the node died."""
        return self.state_list("actors", f"class_name={class_name}", "state=ALIVE")

    def live_nodes(self) -> dict[str, RayNode]:
        """Our nodes by Ray node id: those not killed that the GCS reports alive."""
        alive = {n["node_id"] for n in self._gcs_nodes()}
        return {node.node_id: node for node in self.nodes if not node.killed and node.node_id in alive}

    def node_of_replica(self, app: str, deployment: str, tag: str) -> RayNode | None:
        """The live node running Serve replica `tag` (the opaque id a session's SessionOpened
        carries); None if that replica is gone or its node was killed."""
        live = self.live_nodes()
        actors = self.state_list("actors", f"name=SERVE_REPLICA::{app}#{deployment}#{tag}", "state=ALIVE")
        found = [live[a["node_id"]] for a in actors if a.get("node_id") in live]
        return found[0] if len(found) == 1 else None

    def replicas(self, app: str, deployment: str) -> list[tuple[str, int]]:
        """(node name, pid) of each live replica actor of a Serve deployment; the name is "?" for a
        replica whose node was killed or is not ours."""
        actors = self.alive_actors(f"ServeReplica:{app}:{deployment}")
        nodes = self.live_nodes()
        return sorted((getattr(nodes.get(str(a.get("node_id"))), "name", "?"), int(a["pid"])) for a in actors)

    def wait_running(self, app: str, deployment: str, n: int, timeout_s: float = 180) -> list[tuple[str, int]]:
        """Wait until Serve reports exactly n RUNNING replicas (and nothing else), each an actor on a
        live node of ours; their (node, pid). Right after a node is killed, Serve and the GCS still
        report its replica running for some seconds: that replica does not count."""
        deadline = time.monotonic() + timeout_s
        states: Any = None
        while time.monotonic() < deadline:
            try:
                apps = self.serve_status().get("applications") or {}
                states = apps.get(app, {}).get("deployments", {}).get(deployment, {}).get("replica_states")
                if states == {"RUNNING": n}:
                    replicas = self.replicas(app, deployment)
                    if len(replicas) == n and all(node != "?" for node, _ in replicas):
                        return replicas
                    states = {"RUNNING": n, "replicas": replicas}
            except ClusterError as exc:  # the dashboard can be busy right after a node change
                states = str(exc)[:200]
            time.sleep(1.0)
        raise ClusterError(f"{app}/{deployment}: not {n} running replicas after {timeout_s:.0f} s: {states}")

    def leftovers(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids()]

    def stop(self) -> None:
        """Kill every node's processes (workers first, the head last) and remove the folder."""
        errors = []
        for node in reversed(self.nodes):
            try:
                node.kill()
            except ClusterError as exc:
                errors.append(str(exc))
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise ClusterError("; ".join(errors))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
