"""`LocalRayCluster` places replicas on nodes by Ray node id, and a killed node never matches.

Ray's CLI is replaced by canned answers shaped like Ray 2.60's: right after a node is SIGKILLed,
Serve still reports its replica RUNNING and the GCS still lists that node and that actor ALIVE
(the pid is dead), for some seconds. No Ray process runs here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from tandem.ops import ray_cluster
from tandem.ops.ray_cluster import ClusterError, LocalRayCluster, RayNode

APP, DEPLOYMENT = "app", "Dep"


def _name(pid: int) -> str:
    """The replica actor's name for the tag `t<pid>`, as Serve names it."""
    return f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#t{pid}"


class FakeRay:
    """What `serve status`, `ray list nodes` and `ray list actors` answer, changeable per step."""

    def __init__(self) -> None:
        self.running = 2
        self.nodes: list[str] = []  # ids the GCS reports ALIVE
        self.actors: list[tuple[int, str]] = []  # (pid, node id) of ALIVE replica actors

    def __call__(self, args: Sequence[str], timeout_s: float = 120) -> str:
        if args[0] == "serve":
            states = {"RUNNING": self.running}
            return yaml.safe_dump({"applications": {APP: {"deployments": {DEPLOYMENT: {"replica_states": states}}}}})
        kind, filters = args[2], [args[i + 1] for i, a in enumerate(args) if a == "--filter"]
        if kind == "nodes":
            rows = [{"node_id": n, "state": "ALIVE"} for n in self.nodes]
        else:
            name = next((f.split("=", 1)[1] for f in filters if f.startswith("name=")), None)
            rows = [{"pid": p, "node_id": n, "state": "ALIVE", "name": _name(p)} for p, n in self.actors
                    if name in (None, _name(p))]
        return json.dumps(rows) if rows else "No resource in the cluster\n"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LocalRayCluster, FakeRay]:
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda s: None)
    c = LocalRayCluster(root=tmp_path / "cluster")
    fake = FakeRay()
    monkeypatch.setattr(c, "cli", fake)
    c.gcs_address = "127.0.0.1:1"
    for name in ("head", "worker"):
        c.nodes.append(RayNode(name, tmp_path / name, sid=-1, log_path=tmp_path / f"{name}.log", node_id=f"id-{name}"))
    fake.nodes = ["id-head", "id-worker"]
    fake.actors = [(101, "id-head"), (202, "id-worker")]
    return c, fake


def test_replicas_are_named_by_their_node_id(cluster) -> None:
    c, _ = cluster
    assert c.replicas(APP, DEPLOYMENT) == [("head", 101), ("worker", 202)]
    assert c.node_of_replica(APP, DEPLOYMENT, "t202") is c.nodes[1]


def test_a_killed_node_never_matches_while_the_gcs_still_reports_it(cluster) -> None:
    c, _ = cluster
    c.nodes[1].killed = True  # the GCS answers are unchanged: node and actor still ALIVE
    assert c.replicas(APP, DEPLOYMENT) == [("?", 202), ("head", 101)]
    assert c.node_of_replica(APP, DEPLOYMENT, "t202") is None
    assert list(c.live_nodes()) == ["id-head"]


def test_wait_running_skips_the_dead_nodes_replica(cluster, tmp_path: Path) -> None:
    c, fake = cluster
    c.nodes[1].killed = True
    c.nodes.append(RayNode("rejoined", tmp_path / "r", sid=-1, log_path=tmp_path / "r.log", node_id="id-rejoined"))
    answers = iter([
        (["id-head", "id-worker", "id-rejoined"], [(101, "id-head"), (202, "id-worker")]),  # stale: Serve says 2
        (["id-head", "id-rejoined"], [(101, "id-head"), (303, "id-rejoined")]),  # the GCS caught up
    ])
    real_cli = fake.__call__

    def cli(args: Sequence[str], timeout_s: float = 120) -> str:
        if args[0] == "serve":
            fake.nodes, fake.actors = next(answers)
        return real_cli(args, timeout_s)

    c.cli = cli  # type: ignore[method-assign]
    assert c.wait_running(APP, DEPLOYMENT, 2) == [("head", 101), ("rejoined", 303)]


def test_no_actors_is_an_empty_list_not_an_error(cluster) -> None:
    c, fake = cluster
    fake.actors = []
    assert c.replicas(APP, DEPLOYMENT) == []
    assert c.node_of_replica(APP, DEPLOYMENT, "t101") is None


def test_node_names_are_unique_labels(cluster) -> None:
    c, _ = cluster
    with pytest.raises(ClusterError, match="must be new"):
        c.add_worker("worker", num_cpus=1, resources={})
    with pytest.raises(ClusterError, match="valid Ray label"):
        c.add_worker("bad name", num_cpus=1, resources={})


def test_free_ports_sit_below_the_ephemeral_range_and_are_free_on_v4_and_v6() -> None:
    """A port chosen for Ray or Serve must not be one a process binding port 0 can take (Ray's
    own agents do, between the choice and the use): below the kernel's ephemeral range, and above
    the ports Ray hands its workers."""
    import socket

    from tandem.ports import RAY_WORKER_PORTS_END, _ephemeral_low, free_ports

    ports = free_ports(6)
    assert len(set(ports)) == 6 and all(RAY_WORKER_PORTS_END < p < _ephemeral_low() for p in ports)
    for p in ports:
        with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
            s.bind(("::" if socket.has_ipv6 else "0.0.0.0", p))  # dual-stack where there is IPv6, as Serve binds
