"""`deploy/` on a real two-node Ray cluster on this machine, with the real edge node in front.

The cluster: `ray start --head` and `ray start --address` for one worker, each in its own
session with its own temporary folder, free ports and one `tandem_cloud` resource
(`tandem.ops.ray_cluster`). The application goes on with `serve deploy` of a Serve config rendered
from the single source (`tandem.deploy.gen`) with test overrides: tiny fp32 models, free ports,
2 replicas (min = max), small limits, the proxy on the head only (both nodes share one address
here). The replicas need the custom resource, so there is one on each node.

Which node serves the session: killing the head would kill the cluster (GCS), so the session
must run on the worker's replica. The test keeps Serve's default routing here (the proxy tries
the replica on its own node first, and only when that replica is full tries the others), then
opens `max_ongoing_requests` idle Verify streams, which land on the head's replica and fill
it; a probe session (opened and closed) shows when they have arrived, as it then lands on the
worker (on a loaded machine Serve may send an idle stream to the worker when the head's replica
is slow to report its queue; while probes still land on the head, more idle streams open). The
measured session therefore goes to the worker. The test does not trust this: the generation must
report a resume, which only happens if its replica went away. Right after
killing the worker (SIGKILL to every process of its session, as a machine failure would), the
idle streams are cancelled so that the head's replica can take the resumed session. Replicas are
placed on nodes by Ray's state API (each node's Ray node id, found by its `tandem-node` label);
for some seconds after the kill Serve and the GCS still report the dead worker's replica running,
and that replica must not count as one of the two (`LocalRayCluster.wait_running`).

Checks: replicas one per node; greedy output through the edge node equal across an undisturbed
run, the run whose worker is killed mid-answer (resumed on the head), and a run after the
worker rejoins; Serve brings the replica count back to 2 (one on the rejoined node); leaving
the cluster (also on failure) leaves no process and no folder.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from tandem.deploy.gen import SERVE_CONFIG, DeploySpec, render, serve_names
from tandem.ops.ray_cluster import LocalRayCluster, free_ports

pytestmark = pytest.mark.slow

PROMPT = [7, 8, 9, 10, 11, 12, 40, 41]
MAX_NEW = 48
RESOURCE = DeploySpec().replica_resource


def _spec(tiny_models, home: Path) -> DeploySpec:
    http_port, grpc_port = free_ports(2)
    return dataclasses.replace(
        DeploySpec(), model_dir=str(tiny_models.target_hf), dtype="fp32", tandem_home=str(home), threads=1,
        max_sessions=2, max_context=200, max_draft_len=8, max_new_tokens=64, http_host="127.0.0.1",
        http_port=http_port, grpc_port=grpc_port, proxy_location="HeadOnly", prefer_local_routing=True,
        min_replicas=2, max_replicas=2, target_ongoing_requests=1, graceful_shutdown_timeout_s=5,
        replica_cpus=0.5, replica_memory_gb=0,
        gateway_secret_file="")  # the test calls Serve's proxy directly, with no gateway in front


def _cluster_processes(root: Path) -> list[int]:
    """Any process on the machine whose command line mentions the cluster's folder."""
    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if str(root) in " ".join(p.info["cmdline"] or ())]


@pytest.fixture
def edge_factory(tiny_models) -> Iterator[Callable[[str], str]]:
    """Starts real edge nodes (the gRPC service, in this process) on free ports."""
    from edge_node.config import EdgeConfig
    from edge_node.drafter import DrafterModel
    from edge_node.servicer import create_server

    drafter = DrafterModel(tiny_models.drafter_onnx)
    servers = []

    def start(cloud: str) -> str:
        server, port = create_server(drafter, EdgeConfig(cloud_address=cloud, round_deadline_ms=30000,
                                                         max_resumes=6), "127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def _generate(edge: str, after_deltas: int = 0, action: Callable[[], None] | None = None) -> tuple[list[int], object]:
    """One greedy speculative answer through the edge node; `action` runs after that many deltas."""
    from protos.tandem.v1 import edge_pb2, edge_pb2_grpc

    request = edge_pb2.EdgeGenerateRequest(prompt_tokens=PROMPT, max_new_tokens=MAX_NEW, draft_len=4,
                                           mode=edge_pb2.EDGE_MODE_SPECULATIVE)
    tokens: list[int] = []
    stats = None
    deltas = 0
    with grpc.insecure_channel(edge) as channel:
        for response in edge_pb2_grpc.EdgeNodeStub(channel).Generate(request, timeout=300):
            if response.HasField("stats"):
                stats = response.stats
                continue
            tokens.extend(response.delta.tokens)
            deltas += 1
            if action is not None and deltas == after_deltas:
                action()
    return tokens, stats


class IdleStreams:
    """Verify streams that send nothing: each holds one of a replica's Serve request slots."""

    def __init__(self, address: str, count: int) -> None:
        from protos.tandem.v1 import cloud_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.stub = cloud_pb2_grpc.CloudVerifierStub(self.channel)
        self.calls = [self._idle_call() for _ in range(count)]

    def _idle_call(self) -> grpc.Call:
        return self.stub.Verify(iter(queue.Queue().get, object()), timeout=300)

    def probe_node(self, cluster: LocalRayCluster) -> str:
        """Open a session and close it: the name of the node whose replica took it."""
        from protos.tandem.v1 import cloud_pb2

        spec = cloud_pb2.SessionSpec(session_id="probe", prompt_tokens=PROMPT, max_new_tokens=4)
        call = self.stub.Verify(iter([cloud_pb2.VerifyRequest(open=spec)]), timeout=60)
        try:
            tag = next(call).opened.replica
        finally:
            call.cancel()
        app, deployment, _ = serve_names()
        node = cluster.node_of_replica(app, deployment, tag)
        return node.name if node is not None else "?"

    def wait_until_full(self, cluster: LocalRayCluster, full: str, timeout_s: float = 90) -> None:
        """Block until a new session goes past node `full`'s replica (the idle streams reached it).

        Serve tries the proxy's own node once per request, with a 0.1 s deadline for the replica's
        queue length; on a loaded machine that probe can time out and the stream goes to the other
        replica instead. So while probes still land on `full`, one more idle stream opens every few
        seconds (bounded: at most as many extra streams as the first batch)."""
        first = len(self.calls)
        deadline = time.monotonic() + timeout_s
        added_at = time.monotonic()
        while self.probe_node(cluster) == full:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.calls)} idle streams did not fill the {full} replica")
            if time.monotonic() - added_at > 5 and len(self.calls) < 2 * first:
                self.calls.append(self._idle_call())
                added_at = time.monotonic()
            time.sleep(0.5)

    def release(self) -> None:
        for call in self.calls:
            call.cancel()
        self.channel.close()


@pytest.mark.timeout(480)
def test_two_nodes_serve_survive_losing_the_serving_node_and_recover(tiny_models, edge_factory, tmp_path) -> None:
    from cloud_node.serve_app import wait_healthy

    app, deployment, _ = serve_names()
    spec = _spec(tiny_models, tmp_path / "home")
    with LocalRayCluster(env=spec.node_env()) as cluster:
        root = cluster.root
        cluster.start_head(num_cpus=1, resources={RESOURCE: 1})
        worker = cluster.add_worker("worker", num_cpus=1, resources={RESOURCE: 1})
        config = root / SERVE_CONFIG
        config.write_text(render(spec)[SERVE_CONFIG])
        cluster.serve_deploy(config)
        ingress = f"127.0.0.1:{spec.grpc_port}"
        wait_healthy(ingress, timeout_s=240)
        placed = cluster.wait_running(app, deployment, 2, timeout_s=180)
        assert sorted(node for node, _ in placed) == ["head", "worker"]

        edge = edge_factory(ingress)
        undisturbed, stats = _generate(edge)
        assert len(undisturbed) > 8 and stats.resumes == 0

        idle = IdleStreams(ingress, spec.max_ongoing_requests)
        idle.wait_until_full(cluster, "head")
        killed: list[int] = []

        def kill_worker() -> None:
            killed.extend(worker.pids())
            worker.kill()
            idle.release()

        try:
            disturbed, stats = _generate(edge, after_deltas=2, action=kill_worker)
        finally:
            idle.release()
        assert killed and not worker.pids()
        assert stats.resumes >= 1, "the session did not run on the killed worker"
        assert disturbed == undisturbed

        rejoined = cluster.add_worker("worker-rejoined", num_cpus=1, resources={RESOURCE: 1})
        placed = cluster.wait_running(app, deployment, 2, timeout_s=180)
        assert sorted(node for node, _ in placed) == ["head", rejoined.name]
        after, _ = _generate(edge)
        assert after == undisturbed
    assert not cluster.leftovers()
    assert not root.exists()
    assert not _cluster_processes(root)


@pytest.mark.timeout(240)
def test_leaving_the_cluster_on_failure_leaves_nothing_behind() -> None:
    cluster = LocalRayCluster()
    root = cluster.root
    with pytest.raises(RuntimeError, match="the test body failed"), cluster:
        head = cluster.start_head(num_cpus=1, resources={RESOURCE: 1})
        cluster.add_worker("worker", num_cpus=1, resources={RESOURCE: 1})
        assert head.pids() and len(cluster.leftovers()) > len(head.pids())
        raise RuntimeError("the test body failed")
    assert not cluster.leftovers()
    assert not root.exists()
    assert not _cluster_processes(root)
