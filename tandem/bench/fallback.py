"""`tandem bench --suite fallback`: how long a broken link stalls an answer, and whether a slow but
alive one misfires, on the real stack.

It starts the local stack as processes (cloud node on Ray Serve with the target, link shaper,
edge node, orchestrator; `--models tiny` for tiny random models, a quick check), with the edge's
default settings: the round deadline is learnt from the measured rounds (`tandem_core.deadline`),
the configured 1000 ms its ceiling. Then:
- Faults at RTT 0. For each fault (`cut`: every connection reset; `blackhole`: bytes stop flowing,
  connections stay open), `--repeats` times: `WARM_ANSWERS` unmeasured answers (the edge learns
  its deadline, which a black hole's missed verdict resets), then a speculative answer through the
  SDK, the fault applied through the shaper's control endpoint once a few tokens have arrived.
  It records the stall (the longest wait for a token from the fault on: the tokens of a verdict
  already on its way arrive after the fault, so the wait to the next token alone would read 0 ms),
  the longest gap between tokens over the whole answer, the tokens from each path, the switch,
  and from the switch's reason how long the round waited and what ended it: the learnt deadline,
  an unanswered link check (with the learnt deadline it came before), or the ceiling. Goals: a
  cut stalls <= 250 ms, a black hole <= 600 ms.
- A slow, jittery link: RTT 200 ms +- 50 ms jitter each way, `JITTER_ANSWERS` speculative answers,
  counting the spurious fallbacks (answers that left the cloud; goal 0) and resumes; then one
  black hole on that link, whose learnt deadline and stall it reports too.
- Routing: the link taken down; how long until the orchestrator sees it, and where `auto` goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tempfile
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from tandem.bench.report import progress as _progress

FAULTS = ("cut", "blackhole")
GOAL_STALL_MS = {"cut": 250, "blackhole": 600}
WARM_ANSWERS = 2  # before each measured answer: about 10 rounds each, past the deadline's 8 samples
JITTER = {"rtt_ms": 200.0, "jitter_ms": 50.0}
JITTER_ANSWERS = 10
FAULT_AFTER_TOKENS = 8
PROMPT = "Write a Python function that merges two sorted lists into one sorted list."
_WAITED = re.compile(r"no reply within (\d+) ms")
_LEARNT = re.compile(r"no reply within (\d+) ms of sending round \d+ \(the learnt deadline|deadline (\d+) ms\)")


def _one(client: Any, control: Any, fault: str | None, n: int, after_tokens: int = FAULT_AFTER_TOKENS
         ) -> dict[str, Any]:
    """One speculative answer; with `fault`, applied once `after_tokens` tokens have arrived."""
    arrivals: list[float] = []
    tokens = 0
    fault_at: float | None = None
    answer = client.generate(prompt=PROMPT, route="speculative", max_new_tokens=n, category="code")
    for delta in answer:
        arrivals.append(time.monotonic())
        tokens += len(delta.tokens)
        if fault is not None and fault_at is None and tokens >= after_tokens:
            control.drop() if fault == "cut" else control.set(mode="blackhole")
            fault_at = time.monotonic()
    if fault is not None:
        control.set(mode="up")
    after = [fault_at, *(t for t in arrivals if t >= fault_at)] if fault_at is not None else []
    s = answer.stats
    switches = [dataclasses.asdict(w) for w in s.switches]
    reason = switches[0]["reason"] if switches else ""
    waited, learnt = _WAITED.search(reason), _LEARNT.search(reason)
    return {"fault": fault or "none", "tokens": s.generated_tokens, "verified_tokens": s.verified_tokens,
            "local_tokens": s.local_tokens, "resumes": s.resumes, "switches": switches,
            "learnt_deadline_ms": int(learnt[1] or learnt[2]) if learnt else None,
            "deadline_waited_ms": int(waited[1]) if waited else None,
            "ended_by": None if not waited else "link check" if "link check" in reason else
            "learnt deadline" if learnt else "ceiling",
            "stall_after_fault_ms": 1000 * max(b - a for a, b in zip(after, after[1:])) if len(after) > 1 else None,
            "max_gap_ms": 1000 * max((b - a for a, b in zip(arrivals, arrivals[1:])), default=0.0),
            "tokens_per_s": s.tokens_per_s, "ttft_ms": s.ttft_ms}


def _faults(client: Any, control: Any, args: argparse.Namespace, link: str) -> list[dict[str, Any]]:
    rows = []
    for fault in FAULTS:
        for r in range(max(args.repeats, 1)):
            _wait_link_up(client)
            for _ in range(WARM_ANSWERS):
                _one(client, control, None, args.max_new_tokens)
            row = dict(_one(client, control, fault, args.max_new_tokens), link=link)
            rows.append(row)
            learnt = f" (deadline {_deadline(row)})" if row["deadline_waited_ms"] else ""
            _progress(f"{fault} at {link} {r + 1}/{args.repeats}: stall {row['stall_after_fault_ms'] or 0:.0f} ms"
                      f"{learnt}, verified {row['verified_tokens']} + local {row['local_tokens']} tokens")
    return rows


def _jittery(client: Any, control: Any, n: int) -> dict[str, Any]:
    """`JITTER_ANSWERS` answers over the jittery link, then one black hole on it."""
    control.set(**JITTER)
    answers = []
    for i in range(JITTER_ANSWERS):
        answers.append(_one(client, control, None, n))
        _progress(f"jitter answer {i + 1}/{JITTER_ANSWERS}: {len(answers[-1]['switches'])} switch(es), "
                  f"{answers[-1]['resumes']} resume(s), {answers[-1]['tokens_per_s']:.2f} tok/s")
    hole = dict(_one(client, control, "blackhole", n), link="jitter")
    control.set(rtt_ms=0.0, jitter_ms=0.0)
    return {"conditions": JITTER, "answers": answers, "blackhole": hole,
            "spurious_fallbacks": sum(bool(a["switches"]) for a in answers),
            "resumes": sum(a["resumes"] for a in answers)}


def run_suite(args: argparse.Namespace) -> int:
    from netshape.control import ShaperControl
    from tandem import paths
    from tandem.bench.scale import bench_models
    from tandem.ops import local_stack, procs
    from tandem_sdk import Client

    kind = getattr(args, "models", "real")
    log_dir = paths.tandem_home() / "logs" / f"bench-fallback-{datetime.now():%Y%m%d-%H%M%S}"
    with tempfile.TemporaryDirectory(prefix="tdm-fallback-") as work, procs.Stack(log_dir) as stack:
        target, drafter, dtype = bench_models(kind, args, Path(work), _progress)
        env = dict(os.environ, TANDEM_CLOUD_MODEL_DIR=str(target), TANDEM_EDGE_DRAFTER=str(drafter))
        opts = local_stack.StackConfig(dtype=dtype, grpc_port=0, http_port=0)
        secrets = local_stack.secrets_for(opts)
        children = local_stack.launch(partial(stack.start, env=env), opts, _progress, secrets)
        control = ShaperControl(children["shaper"].fields["control"])
        with Client(children["orchestrator"].fields["grpc"], generate_timeout_s=1800,
                    **local_stack.sdk_options(secrets)) as client:
            client.complete(prompt="Say hi.", route="speculative", max_new_tokens=4)  # warm-up
            rows = _faults(client, control, args, "rtt 0")
            _wait_link_up(client)
            jitter = _jittery(client, control, args.max_new_tokens)
            _wait_link_up(client)
            routing = _link_down_routing(client, control, args.max_new_tokens)
    _report(rows, jitter, routing, opts.round_deadline_ms)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": "fallback", "models": kind, "round_deadline_ms": opts.round_deadline_ms,
                                         "goal_stall_ms": GOAL_STALL_MS, "max_new_tokens": args.max_new_tokens,
                                         "runs": rows, "jitter": jitter, "routing": routing}, indent=2))
        _progress(f"wrote {args.json}")
    return 0


def _report(rows: list[dict[str, Any]], jitter: dict[str, Any], routing: dict[str, Any], ceiling_ms: int) -> None:
    print(f"round deadline: learnt from the rounds, ceiling {ceiling_ms} ms; goals: cut stall <= "
          f"{GOAL_STALL_MS['cut']} ms, black hole at RTT 0 <= {GOAL_STALL_MS['blackhole']} ms")
    print("fault      link     stall after fault (ms)           round waited   max gap (ms)   verified+local   switch")
    for row in [*rows, jitter["blackhole"]]:
        sw = row["switches"][0]["reason"][:60] if row["switches"] else "none"
        print(f"{row['fault']:<10} {row['link']:<8} {row['stall_after_fault_ms'] or 0:>22.0f}   {_deadline(row):>23}   "
              f"{row['max_gap_ms']:>12.0f}   {row['verified_tokens']:>6} + {row['local_tokens']:<7}   {sw}")
    c = jitter["conditions"]
    print(f"RTT {c['rtt_ms']:g} ms +- {c['jitter_ms']:g} ms jitter, {len(jitter['answers'])} answers: "
          f"{jitter['spurious_fallbacks']} spurious fallback(s) (goal 0), {jitter['resumes']} resume(s), max gap "
          f"{max(a['max_gap_ms'] for a in jitter['answers']):.0f} ms")
    print(f"link down -> seen down after {routing['detect_ms']:.0f} ms (health interval 1000 ms); auto then routed "
          f"{routing['down_route']!r}; link up again -> auto routed {routing['up_route']!r} for a "
          f"{routing['max_new_tokens']}-token code answer")


def _deadline(row: dict[str, Any]) -> str:
    """How long the round waited and what ended it ("-" when no wait did)."""
    if row["deadline_waited_ms"] is None:
        return "-"
    if row["ended_by"] == "link check":
        return f"{row['deadline_waited_ms']} ms, check (of {row['learnt_deadline_ms']})"
    return f"{row['deadline_waited_ms']} ms, {row['ended_by'].split()[0]}"


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
