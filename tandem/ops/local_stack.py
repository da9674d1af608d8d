"""The local multi-process stack: cloud node, link shaper, edge node and orchestrator.

Guarantees: `launch` starts the four processes in dependency order and returns only when each
printed its ready line and the gRPC ones answer health checks; a failure raises
`procs.ChildFailed` with the failing child's log tail (the caller stops what was started).
`tandem demo` runs it attached (stopped when the demo ends); `tandem up` runs it detached and
records it in `TANDEM_HOME/run/stack.json` for `tandem down` and `tandem status`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def launch(start: StartFn, opts: StackConfig, say: Callable[[str], None]) -> dict[str, procs.Child]:
    """Start cloud -> shaper -> edge -> orchestrator; returns the children by name."""
    py, t0 = sys.executable, time.perf_counter()
    children: dict[str, procs.Child] = {}
    say(f"starting the cloud node (Ray Serve, target {opts.dtype}) ...")
    children["cloud"] = cloud = start("cloud", [py, "-m", "tandem", "serve", "cloud", "--port", "0", "--dtype",
                                                opts.dtype], timeout_s=900)
    say(f"  cloud verifier at {cloud.fields['grpc']} ({time.perf_counter() - t0:.1f} s)")
    children["netshape"] = shaper = start(
        "netshape", [py, "-m", "netshape", "--listen", "127.0.0.1:0", "--upstream", cloud.fields["grpc"],
                     "--rtt-ms", str(opts.link_rtt_ms), "--control", "127.0.0.1:0"], timeout_s=60, ready=r"^control=")
    say(f"  link shaper at {shaper.fields['listen']} (RTT +{opts.link_rtt_ms:g} ms, control {shaper.fields['control']})")
    children["edge"] = edge = start("edge", [py, "-m", "tandem", "serve", "edge", "--port", "0", "--cloud",
                                             shaper.fields["listen"], "--draft-len", str(opts.draft_len)], timeout_s=180)
    procs.wait_healthy(edge.fields["grpc"], timeout_s=60)
    say(f"  edge node at {edge.fields['grpc']}")
    children["orchestrator"] = orch = start(
        "orchestrator", [py, "-m", "tandem", "serve", "orchestrator", "--edge", edge.fields["grpc"], "--cloud",
                         shaper.fields["listen"], "--port", str(opts.grpc_port), "--http-port", str(opts.http_port),
                         "--round-deadline-ms", str(opts.round_deadline_ms)], timeout_s=180)
    procs.wait_healthy(orch.fields["grpc"], timeout_s=60)
    say(f"  orchestrator at grpc {orch.fields['grpc']}, http {orch.fields['http']}")
    say(f"all processes healthy; start-up took {time.perf_counter() - t0:.1f} s")
    return children


def state_file() -> Path:
    return paths.tandem_home() / "run" / "stack.json"


def write_state(children: dict[str, procs.Child]) -> Path:
    orch = children["orchestrator"].fields
    state = {
        "orchestrator_grpc": orch["grpc"],
        "orchestrator_http": orch["http"],
        "started_unix": time.time(),
        "link_control": children["netshape"].fields.get("control", ""),  # the shaper's HTTP control endpoint
        # identity: "BOOT:START" in seconds (procs.identity); records from before psutil hold "BOOT_ID:TICKS"
        "processes": [{"name": name, "pid": c.proc.pid, "identity": procs.identity(c.proc.pid), "log": str(c.log_path),
                       "address": c.fields.get("grpc") or c.fields.get("listen", "")} for name, c in children.items()],
    }
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
