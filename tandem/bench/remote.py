"""The networked methods of `tandem bench`: `tandem_grpc` (and its variants), `tandem_grpc_tls`, `cloud_stream`.

Guarantees:
- The cloud node runs as its own process (`tandem serve cloud`, Ray Serve behind its gRPC proxy
  and the gateway) and the link shaper (`python -m netshape`) sits between it and the edge side,
  which runs in the benchmark's process (the ONNX drafter plus `edge_node.generation`), so edge
  CPU is this process's CPU and cloud CPU is the CPU of the cloud's whole process tree (Ray
  included).
- `tandem_grpc_tls` is `tandem_grpc` through a second gateway (`python -m cloud_node gateway`)
  in front of the same Serve proxy, with TLS (a development CA made in a temporary folder) and a
  device token, behind its own shaper with the same settings: the two differ only by TLS and
  the token check. `handshake_figures` measures a connection's set-up with and without TLS and
  what reusing a connection saves. No secret is returned or written anywhere but the temporary
  folder.
- Each RTT is set on the shapers at run time; every method sees the same link.
- With `cloud_cpu` (`tandem bench --split-cores`), the cloud node runs with one torch thread per
  replica and each replica pins all its threads to that CPU before loading the target
  (`cloud_node.serve_app.REPLICA_CPUS_ENV`, inherited by Ray's workers); Ray's helpers, Serve's
  proxy, the gateway and the shaper stay unpinned. `pinning` reads back what the kernel applied.
- The processes are stopped when the benchmark ends, whatever happens (`tandem.procs.Stack`).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem.pair import GenerationResult
from tandem_core.sampling import SamplingParams, resolve_seed
from tandem_core.stats import RequestStats

_FINISHED = object()


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return total


class RemoteStack:
    """Cloud node + link shaper as processes, and the edge side in this process."""

    def __init__(self, stack: Any, drafter: Any, *, dtype: str, model_dir: Path | None, progress: Any,
                 tls: bool = False, cloud_cpu: int | None = None) -> None:
        import grpc

        py = sys.executable
        progress("starting the cloud node (Ray Serve) for the networked methods ...")
        argv = [py, "-m", "tandem", "serve", "cloud", "--port", "0", "--dtype", dtype]
        if model_dir is not None:
            argv += ["--model-dir", str(model_dir)]
        env = None
        if cloud_cpu is not None:
            from cloud_node.serve_app import REPLICA_CPUS_ENV
            from tandem.bench.cores import THREADS

            argv += ["--threads", str(THREADS)]
            env = os.environ | {REPLICA_CPUS_ENV: str(cloud_cpu)}
        secure = _SecureSide(argv) if tls else None
        self.cloud = stack.start("cloud", argv, timeout_s=600, env=env)
        self.controls: list[Any] = []
        self.plain_address = self._shaper(stack, "netshape", self.cloud.fields["grpc"])
        self.channel = grpc.insecure_channel(self.plain_address)
        self.channels = {"tandem_grpc": self.channel}
        self.secure = secure
        if secure is not None:
            gateway = stack.start("gateway", secure.gateway_argv(py), timeout_s=60)
            self.tls_address = self._shaper(stack, "netshape-tls", gateway.fields["grpc"])
            self.channels["tandem_grpc_tls"] = secure.channel(self.tls_address)
            progress(f"TLS gateway at {gateway.fields['grpc']} (same Serve proxy), its shaper at {self.tls_address}")
        self.drafter = drafter
        progress(f"cloud at {self.cloud.fields['grpc']}, link shaper at {self.plain_address}")

    def _shaper(self, stack: Any, name: str, upstream: str) -> str:
        from netshape.control import ShaperControl

        shaper = stack.start(name, [sys.executable, "-m", "netshape", "--listen", "127.0.0.1:0", "--upstream", upstream,
                                    "--control", "127.0.0.1:0"], timeout_s=60, ready=r"^control=")
        self.controls.append(ShaperControl(shaper.fields["control"]))
        return str(shaper.fields["listen"])

    def pinning(self) -> dict[str, Any]:
        """The replicas' pids and their threads' `Cpus_allowed_list`, and the other cloud processes'."""
        from tandem.bench.cores import helpers_allowed, replicas

        return {"replicas": replicas(self.cloud.proc.pid), "others_cpus_allowed": helpers_allowed(self.cloud.proc.pid)}

    def set_rtt(self, rtt_ms: float) -> None:
        for control in self.controls:
            control.set(rtt_ms=rtt_ms)

    def speculative(self, ids: Sequence[int], params: SamplingParams, *, draft_len: int,
                    max_new_tokens: int, method: str = "tandem_grpc") -> GenerationResult:
        from edge_node.cloud_link import CloudLink, SessionRequest
        from edge_node.generation import generate_speculative
        from tandem_core.branching import DEFAULT_TREE_NODES

        seed = resolve_seed(params.seed)
        # tandem_grpc_model and tandem_grpc_seq: tandem_grpc's channel
        channel = self.channels["tandem_grpc_tls" if method == "tandem_grpc_tls" else "tandem_grpc"]
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(ids), params, seed, max_new_tokens),
                         round_timeout_s=60.0, open_timeout_s=120.0)
        cloud0 = _tree_cpu_s(self.cloud.proc.pid)
        r = generate_speculative(self.drafter, link, ids, params, seed, draft_len=draft_len,
                                 max_new_tokens=max_new_tokens,
                                 lookup=method not in ("tandem_grpc_model", "tandem_grpc_seq"),
                                 # the old protocol and tandem_grpc_nopipe: one round at a time
                                 pipeline=method not in ("tandem_grpc_seq", "tandem_grpc_nopipe"),
                                 alternatives=method == "tandem_grpc_alt",
                                 tree_nodes=0 if method == "tandem_grpc_chain" else DEFAULT_TREE_NODES,  # chains: the baseline
                                 sampled_ahead=method == "tandem_grpc_ahead")
        cloud_cpu = _tree_cpu_s(self.cloud.proc.pid) - cloud0
        return GenerationResult(method, tuple(r.tokens), r.ttft_s, r.wall_s, r.edge_cpu_s, cloud_cpu, r.stats,
                                r.stats.target_forwards, bytes_up=r.bytes_up, bytes_down=r.bytes_down)

    def cloud_stream(self, ids: Sequence[int], params: SamplingParams, *, max_new_tokens: int) -> GenerationResult:
        from edge_node.cloud_link import cloud_generate

        seed = resolve_seed(params.seed)
        cloud0, t0 = _tree_cpu_s(self.cloud.proc.pid), time.perf_counter()
        tokens: list[int] = []
        first: float | None = None
        messages = 0
        counter = {"up": 0, "down": 0}
        for response in cloud_generate(self.channel, ids, params, seed, max_new_tokens, counter=counter):
            if first is None and response.tokens:
                first = time.perf_counter()
            tokens.extend(response.tokens)
            messages += 1
        wall = time.perf_counter() - t0
        stats = RequestStats()
        stats.add_tokens(len(tokens))
        stats.add_target_forwards(len(tokens))
        return GenerationResult("cloud_stream", tuple(tokens), (first or time.perf_counter()) - t0, wall, None,
                                _tree_cpu_s(self.cloud.proc.pid) - cloud0, None, len(tokens),
                                bytes_up=counter["up"], bytes_down=counter["down"], messages=messages)


class _SecureSide:
    """The TLS gateway's files (a temporary folder, removed at exit) and the edge's channel to it."""

    def __init__(self, cloud_argv: list[str]) -> None:
        import atexit
        import secrets
        import shutil
        import socket
        import tempfile

        from cloud_node.tokens import TokenStore
        from tandem.ops import devpki
        from tandem.security import write_secret

        self.folder = Path(tempfile.mkdtemp(prefix="tdm-bench-tls-"))
        atexit.register(shutil.rmtree, self.folder, True)
        self.pki = devpki.ensure(self.folder / "pki")
        self.store = TokenStore(self.folder / "tokens.json")
        self._token = self.store.issue("bench-edge", max_sessions=64)[1]
        self.secret_file = write_secret(self.folder / "gateway.secret", secrets.token_urlsafe(32))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.serve_port = int(s.getsockname()[1])
        cloud_argv += ["--serve-port", str(self.serve_port), "--gateway-secret-file", str(self.secret_file)]

    def gateway_argv(self, py: str) -> list[str]:
        return [py, "-m", "cloud_node", "gateway", "--upstream", f"127.0.0.1:{self.serve_port}", "--port", "0",
                "--gateway-secret-file", str(self.secret_file), "--tls-cert", str(self.pki.server_cert),
                "--tls-key", str(self.pki.server_key), "--tokens-file", str(self.store.path)]

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> Any:
        from tandem.security import ClientTls, secure_channel

        return secure_channel(address, ClientTls(self.pki.ca_cert), self._token, options=options)


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": 1000 * ordered[len(ordered) // 2], "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))],
            "n": len(ordered)}


def handshake_figures(remote: RemoteStack, ids: Sequence[int], repeats: int, progress: Any) -> dict[str, Any]:
    """A connection's cost, plaintext vs TLS, and what reuse saves.

    - `health_*`: a Health.Check on a new channel (TCP connect, HTTP/2 set-up, TLS handshake when
      secure, one RPC through the gateway to a replica) vs on a channel already connected.
    - `open_*`: opening a speculative session (the prompt's prefill included, the cloud's prefix
      cache reusing it after the first) on a new channel vs on a reused one, then closing it.
    Both gateways forward to the same Serve proxy, at the link's RTT 0.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edge_node.cloud_link import CloudLink, SessionRequest

    assert remote.secure is not None
    remote.set_rtt(0.0)
    own = [("grpc.use_local_subchannel_pool", 1)]  # a new channel makes a new connection (no shared subchannel)
    makers = {"plain": lambda: grpc.insecure_channel(remote.plain_address, options=own),
              "tls": lambda: remote.secure.channel(remote.tls_address, options=own)}  # type: ignore[union-attr]
    out: dict[str, Any] = {}

    def health(channel: Any) -> None:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)

    def open_close(channel: Any) -> None:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(ids), SamplingParams(), 0, 8),
                         round_timeout_s=60.0, open_timeout_s=120.0)
        link.open(wait=True)
        link.close()

    for kind, make in makers.items():
        for what, fn in (("health", health), ("open", open_close)):
            with make() as warm:
                fn(warm)  # the reused channel is connected (and the prompt cached) before timing
                reused = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn(warm)
                    reused.append(time.perf_counter() - t0)
            fresh = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                with make() as channel:
                    fn(channel)
                fresh.append(time.perf_counter() - t0)
            out[f"{what}_{kind}_new_connection"] = _quantiles(fresh)
            out[f"{what}_{kind}_reused_connection"] = _quantiles(reused)
            progress(f"{what} {kind}: new connection {out[f'{what}_{kind}_new_connection']['median_ms']:.1f} ms, "
                     f"reused {out[f'{what}_{kind}_reused_connection']['median_ms']:.1f} ms (median of {repeats})")
    return out
