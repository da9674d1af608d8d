"""`tandem bench --suite fallback`: how long a broken link stalls an answer, on the real stack.

It starts the local stack as processes (cloud node on Ray Serve with the target, link shaper,
edge node, orchestrator), then for each fault (`cut`: every connection reset; `blackhole`:
bytes stop flowing, connections stay open) runs speculative answers through the SDK, applies the
fault through the shaper's control endpoint once a few tokens have arrived, and records the
stall: the time from the fault to the next token, and the longest gap between tokens over the
whole answer. The goal is a stall of at most the round deadline + 250 ms. It also reports the
route switch the statistics carry and the tokens from each path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from datetime import datetime
from typing import Any

from tandem.bench.report import progress as _progress

FAULTS = ("cut", "blackhole")



def _one(client: Any, control: Any, fault: str, prompt: str, n: int, after_tokens: int) -> dict[str, Any]:
    arrivals: list[float] = []
    tokens = 0
    fault_at: float | None = None
    answer = client.generate(prompt=prompt, route="speculative", max_new_tokens=n, category="code")
    for delta in answer:
        arrivals.append(time.monotonic())
        tokens += len(delta.tokens)
        if fault_at is None and tokens >= after_tokens:
            control.drop() if fault == "cut" else control.set(mode="blackhole")
            fault_at = time.monotonic()
    control.set(mode="up")
    after = [t for t in arrivals if fault_at is not None and t >= fault_at]
    s = answer.stats
    return {"fault": fault, "tokens": s.generated_tokens, "verified_tokens": s.verified_tokens,
            "local_tokens": s.local_tokens, "switches": [dataclasses.asdict(w) for w in s.switches],
            "stall_after_fault_ms": 1000 * (after[0] - fault_at) if after and fault_at else None,
            "max_gap_ms": 1000 * max((b - a for a, b in zip(arrivals, arrivals[1:])), default=0.0),
            "tokens_per_s": s.tokens_per_s, "ttft_ms": s.ttft_ms}


def run_suite(args: argparse.Namespace) -> int:
    from netshape.control import ShaperControl
    from tandem import paths
    from tandem.ops import local_stack, procs
    from tandem_sdk import Client

    log_dir = paths.tandem_home() / "logs" / f"bench-fallback-{datetime.now():%Y%m%d-%H%M%S}"
    opts = local_stack.StackConfig(dtype=args.dtype, grpc_port=0, http_port=0)
    deadline_ms = opts.round_deadline_ms
    prompt = "Write a Python function that merges two sorted lists into one sorted list."
    rows: list[dict[str, Any]] = []
    secrets = local_stack.secrets_for(opts)
    with procs.Stack(log_dir) as stack:
        children = local_stack.launch(stack.start, opts, _progress, secrets)
        control = ShaperControl(children["shaper"].fields["control"])
        with Client(children["orchestrator"].fields["grpc"], generate_timeout_s=1800,
                    **local_stack.sdk_options(secrets)) as client:
            client.complete(prompt="Say hi.", route="speculative", max_new_tokens=4)  # warm-up
            for fault in FAULTS:
                for r in range(max(args.repeats, 1)):
                    _wait_link_up(client)
                    row = _one(client, control, fault, prompt, args.max_new_tokens, after_tokens=8)
                    rows.append(row)
                    _progress(f"{fault} {r + 1}/{args.repeats}: stall {row['stall_after_fault_ms']:.0f} ms, max gap "
                              f"{row['max_gap_ms']:.0f} ms, verified {row['verified_tokens']} + local "
                              f"{row['local_tokens']} tokens")
            _wait_link_up(client)
            routing = _link_down_routing(client, control, args.max_new_tokens)
    print(f"round deadline {deadline_ms} ms; goal: stall <= {deadline_ms + 250} ms")
    print("fault      stall after fault (ms)   max gap (ms)   verified+local tokens   switch")
    for row in rows:
        sw = row["switches"][0]["reason"][:60] if row["switches"] else "none"
        print(f"{row['fault']:<10} {row['stall_after_fault_ms'] or 0:>22.0f}   {row['max_gap_ms']:>12.0f}   "
              f"{row['verified_tokens']:>9} + {row['local_tokens']:<10}   {sw}")
    print(f"link down -> seen down after {routing['detect_ms']:.0f} ms (health interval 1000 ms); auto then routed "
          f"{routing['down_route']!r}; link up again -> auto routed {routing['up_route']!r} for a "
          f"{routing['max_new_tokens']}-token code answer")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": "fallback", "round_deadline_ms": deadline_ms,
                                         "max_new_tokens": args.max_new_tokens, "runs": rows, "routing": routing},
                                        indent=2))
        _progress(f"wrote {args.json}")
    return 0


def _started(client: Any, prompt: str, n: int) -> Any:
    """The route the orchestrator picks for an `n`-token answer (the answer is cancelled after
    its first delta; the route is decided before it)."""
    answer = client.generate(prompt=prompt, max_new_tokens=n, category="code")
    next(iter(answer), None)
    started = answer.started
    answer.cancel()
    return started


def _link_down_routing(client: Any, control: Any, n: int) -> dict[str, Any]:
    """Take the link down: how long until the orchestrator sees it, and where `auto` goes."""
    prompt = "Write a Python function that checks whether a number is prime."
    control.set(mode="down")
    t0 = time.monotonic()
    while client.status().link.state != "down":
        time.sleep(0.02)
    detect_ms = 1000 * (time.monotonic() - t0)
    down = _started(client, prompt, n)
    control.set(mode="up")
    _wait_link_up(client)
    up = _started(client, prompt, n)
    return {"detect_ms": detect_ms, "max_new_tokens": n, "down_route": down.route, "down_reason": down.reason,
            "up_route": up.route, "up_reason": up.reason}


def _wait_link_up(client: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.status().link.state != "up":
        if time.monotonic() > deadline:
            raise RuntimeError("the link did not come back up")
        time.sleep(0.2)
