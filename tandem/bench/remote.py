"""The networked methods of `tandem bench`: `tandem_grpc` and `cloud_stream`.

Guarantees:
- The cloud node runs as its own process (`tandem serve cloud`, Ray Serve behind its gRPC proxy)
  and the link shaper (`python -m netshape`) sits between it and the edge side, which runs in
  the benchmark's process (the ONNX drafter plus `edge_node.generation`), so edge CPU is this
  process's CPU and cloud CPU is the CPU of the cloud's whole process tree (Ray included).
- Each RTT is set on the shaper at run time; both methods see the same link.
- The processes are stopped when the benchmark ends, whatever happens (`tandem.procs.Stack`).
"""

from __future__ import annotations

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

    def __init__(self, stack: Any, drafter: Any, *, dtype: str, model_dir: Path | None, progress: Any) -> None:
        import grpc

        from netshape.control import ShaperControl

        py = sys.executable
        progress("starting the cloud node (Ray Serve) for the networked methods ...")
        argv = [py, "-m", "tandem", "serve", "cloud", "--port", "0", "--dtype", dtype]
        if model_dir is not None:
            argv += ["--model-dir", str(model_dir)]
        self.cloud = stack.start("cloud", argv, timeout_s=600)
        shaper = stack.start("netshape", [py, "-m", "netshape", "--listen", "127.0.0.1:0", "--upstream",
                                          self.cloud.fields["grpc"], "--control", "127.0.0.1:0"],
                             timeout_s=60, ready=r"^control=")
        self.control = ShaperControl(shaper.fields["control"])
        self.channel = grpc.insecure_channel(shaper.fields["listen"])
        self.drafter = drafter
        progress(f"cloud at {self.cloud.fields['grpc']}, link shaper at {shaper.fields['listen']}")

    def set_rtt(self, rtt_ms: float) -> None:
        self.control.set(rtt_ms=rtt_ms)

    def speculative(self, ids: Sequence[int], params: SamplingParams, *, draft_len: int,
                    max_new_tokens: int) -> GenerationResult:
        from edge_node.cloud_link import CloudLink, SessionRequest
        from edge_node.generation import generate_speculative

        seed = resolve_seed(params.seed)
        link = CloudLink(self.channel, SessionRequest(uuid.uuid4().hex, tuple(ids), params, seed, max_new_tokens),
                         round_timeout_s=60.0, open_timeout_s=120.0)
        cloud0 = _tree_cpu_s(self.cloud.proc.pid)
        r = generate_speculative(self.drafter, link, ids, params, seed, draft_len=draft_len,
                                 max_new_tokens=max_new_tokens)
        cloud_cpu = _tree_cpu_s(self.cloud.proc.pid) - cloud0
        return GenerationResult("tandem_grpc", tuple(r.tokens), r.ttft_s, r.wall_s, r.edge_cpu_s, cloud_cpu, r.stats,
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
