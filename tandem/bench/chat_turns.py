"""`tandem bench --suite chat-turns`: one conversation, turn by turn, through the orchestrator.

It starts the local stack as processes (`tandem.ops.local_stack`: the cloud node on Ray Serve,
the link shaper at 0 ms, the edge node, the orchestrator without personal documents), warms it
up with one short unrelated answer, then holds one 6-turn conversation through the SDK, as a
chat client does: each turn sends the whole history (the user messages and the previous
answers) on the speculative route, greedy (or, with `--temperature T`, sampled without a seed, as a
chat client does), `--max-new-tokens` per answer. So each turn adds one
user message (about 40-60 tokens) and the previous answer. Per turn it reports:
- the prompt tokens (the orchestrator's count) and how many the turn added;
- TTFT as the client sees it (request sent -> first token), and the edge node's own;
- the tokens the cloud prefilled and those it reused from its prefix cache, as its
  ServerTiming reports them and the answer's statistics carry them ("-" when it reports neither);
- the tokens the drafter prefilled and how long that took (the edge reuses an earlier turn's
  drafter KV for greedy and unseeded sampled requests, `edge_node.drafter`);
- the answer's tokens and its time (request sent -> last token), its route (with any switch
  mid-answer) and the acceptance rate.
It ends with TTFT at the last turn over the first (the goal is <= 1.3) and whether, from turn 2
on, the cloud prefilled no more than each turn added. Progress lines go to stderr, the
machine's CPU and the table to stdout, `--json PATH` writes everything. `--models tiny` uses tiny
random models and shortened user messages (their context holds 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from tandem.bench.report import fmt, machine_info, progress
from tandem.cli.main import CliError

_progress = partial(progress, tag="chat-turns")

USER_TURNS = (
    "I am writing a small Python command-line tool that reads a CSV file of expenses with the columns date, "
    "category and amount. Write a function `load_expenses(path)` that returns a list of dictionaries, one per row, "
    "with the amount as a float.",
    "Good. Now add a function `total_by_category(expenses)` that returns a dictionary mapping each category to the "
    "sum of its amounts, rounded to two decimals. Keep the same style and add a short docstring.",
    "Some rows in my file have an empty amount or a value like 'n/a'. Change `load_expenses` so that it skips such "
    "rows and logs a warning with the row number instead of raising an exception.",
    "Next, I want to filter by month. Write `expenses_in_month(expenses, year, month)` that parses the date column, "
    "which uses the ISO format YYYY-MM-DD, and keeps only the rows of that month.",
    "Now wire everything together with argparse: the tool takes the CSV path and an optional --month argument in "
    "the form YYYY-MM, and prints one line per category with its total, largest total first.",
    "Finally, write two pytest tests for `total_by_category`: one with a few rows in two categories, and one with "
    "an empty list, which should give an empty dictionary. Use plain asserts.",
)
TINY_CHARS = 40  # tiny models: the start of each user message, so that six turns fit their context
ROUND_DEADLINE_MS = 10_000  # a slow round on a busy machine must not move the answer to the device


def run_suite(args: argparse.Namespace) -> int:
    """Entry point for `tandem bench --suite chat-turns`."""
    from tandem import paths
    from tandem.bench.scale import bench_models
    from tandem.ops import local_stack, procs
    from tandem_sdk import Client

    temperature = _temperature(args)  # checked before any process starts
    kind = getattr(args, "models", "real")
    turns = [t[:TINY_CHARS] if kind == "tiny" else t for t in USER_TURNS]
    log_dir = paths.tandem_home() / "logs" / f"bench-chat-turns-{datetime.now():%Y%m%d-%H%M%S}"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tdm-chat-") as work, procs.Stack(log_dir) as stack:
        target, drafter, dtype = bench_models(kind, args, Path(work), _progress)
        env = dict(os.environ, TANDEM_CLOUD_MODEL_DIR=str(target), TANDEM_EDGE_DRAFTER=str(drafter),
                   TANDEM_ORCH_PERSONAL="false")
        opts = local_stack.StackConfig(dtype=dtype, draft_len=args.draft_len, grpc_port=0, http_port=0,
                                       round_deadline_ms=ROUND_DEADLINE_MS)
        secrets = local_stack.secrets_for(opts)
        children = local_stack.launch(partial(stack.start, env=env), opts, _progress, secrets)
        with Client(children["orchestrator"].fields["grpc"], generate_timeout_s=1800,
                    **local_stack.sdk_options(secrets)) as client:
            client.complete(prompt="Say hi.", route="speculative", max_new_tokens=4)  # warm-up
            rows = _conversation(client, turns, args.max_new_tokens, temperature)
    info = machine_info()
    summary = summarize(rows)
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB")
    print(format_table(rows))
    print(format_summary(summary))
    _progress(f"done in {time.monotonic() - t0:.0f} s; logs in {log_dir}")
    if args.json:
        config = {"models": kind, "target": str(target), "drafter": str(drafter), "dtype": dtype,
                  "max_new_tokens": args.max_new_tokens, "draft_len": args.draft_len, "route": "speculative",
                  "temperature": temperature, "seed": None,
                  "round_deadline_ms": ROUND_DEADLINE_MS, "user_turns": turns}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": "chat-turns", "machine": info, "config": config,
                                         "summary": summary, "turns": rows}, indent=2) + "\n")
        _progress(f"wrote {args.json}")
    return 0


def _temperature(args: argparse.Namespace) -> float:
    t = float(getattr(args, "temperature", 0.0) or 0.0)
    if not 0.0 <= t <= 2.0:
        raise CliError(f"--temperature: must be in [0, 2], got {t}")
    return t


def _conversation(client: Any, turns: list[str], max_new_tokens: int, temperature: float = 0.0) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    for n, user in enumerate(turns, 1):
        messages.append({"role": "user", "content": user})
        row = _turn(client, messages, max_new_tokens, temperature)
        row["turn"] = n
        row["added_tokens"] = row["prompt_tokens"] - (rows[-1]["prompt_tokens"] if rows else 0)
        rows.append(row)
        messages.append({"role": "assistant", "content": row["text"]})
        _progress(f"turn {n}: {row['prompt_tokens']} prompt tokens (+{row['added_tokens']}), TTFT "
                  f"{row['ttft_ms']:.0f} ms, cloud prefilled {fmt(row['cloud_prefill_tokens'], 'd')} reused "
                  f"{fmt(row['cloud_reused_tokens'], 'd')}, drafter prefilled {row['drafter_prefill_tokens']} in "
                  f"{row['drafter_prefill_ms']:.0f} ms, route {row['route']}")
    return rows


def _turn(client: Any, messages: list[dict[str, str]], max_new_tokens: int, temperature: float) -> dict[str, Any]:
    """One answer to the history so far, timed on the client (sampled without a seed if
    `temperature` > 0)."""
    t0, first, text = time.perf_counter(), None, []
    answer = client.generate(messages=list(messages), route="speculative", max_new_tokens=max_new_tokens,
                             temperature=temperature)
    for delta in answer:
        if first is None and delta.tokens:
            first = time.perf_counter()
        text.append(delta.text)
    done = time.perf_counter()
    s = answer.stats
    reported = s.cloud_prefill_tokens or s.cloud_reused_tokens  # both 0: the cloud does not report them
    return {"prompt_tokens": answer.started.prompt_tokens, "ttft_ms": 1000 * ((first or time.perf_counter()) - t0),
            "edge_ttft_ms": s.edge_ttft_ms, "answer_ms": 1000 * (done - t0),
            "cloud_prefill_tokens": s.cloud_prefill_tokens if reported else None,
            "cloud_reused_tokens": s.cloud_reused_tokens if reported else None,
            "drafter_prefill_tokens": s.drafter_prefill_tokens, "drafter_prefill_ms": s.drafter_prefill_ms,
            "answer_tokens": s.generated_tokens, "acceptance_rate": s.acceptance_rate,
            "route": "->".join([s.route] + [w.to_route for w in s.switches]), "text": "".join(text)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """TTFT growth, and whether the cloud and the drafter prefilled only each turn's new tokens."""
    later = rows[1:]
    cloud = [r["cloud_prefill_tokens"] for r in later]
    return {
        "turns": len(rows),
        "ttft_last_over_first": rows[-1]["ttft_ms"] / rows[0]["ttft_ms"] if rows and rows[0]["ttft_ms"] else None,
        "cloud_prefills_only_new_tokens": (None if any(c is None for c in cloud) else
                                           all(r["cloud_prefill_tokens"] <= r["added_tokens"] for r in later)),
        "drafter_reprefills_history_turns": sum(r["drafter_prefill_tokens"] >= r["prompt_tokens"] for r in rows),
        "drafter_prefill_ms_last": rows[-1]["drafter_prefill_ms"] if rows else None,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'turn':>4} {'prompt tok':>10} {'added':>5} {'TTFT ms':>8} {'edge TTFT ms':>12} {'cloud prefill':>13} "
            f"{'cloud reused':>12} {'drafter prefill':>15} {'drafter ms':>10} {'answer':>6} {'answer ms':>9} "
            f"{'accept':>6}  route")
    lines = [head]
    for r in rows:
        lines.append(f"{r['turn']:>4} {r['prompt_tokens']:>10} {r['added_tokens']:>5} {r['ttft_ms']:>8.0f} "
                     f"{r['edge_ttft_ms']:>12.0f} {fmt(r['cloud_prefill_tokens'], 'd'):>13} "
                     f"{fmt(r['cloud_reused_tokens'], 'd'):>12} {r['drafter_prefill_tokens']:>15} "
                     f"{r['drafter_prefill_ms']:>10.0f} {r['answer_tokens']:>6} {r['answer_ms']:>9.0f} "
                     f"{r['acceptance_rate']:>6.2f}  "
                     f"{r['route']}")
    return "\n".join(lines)


def format_summary(s: dict[str, Any]) -> str:
    return "\n".join([
        f"TTFT at turn {s['turns']} / turn 1: {fmt(s['ttft_last_over_first'], '.2f')} (goal <= 1.3)",
        f"from turn 2 on, the cloud prefilled only the new tokens: {fmt(s['cloud_prefills_only_new_tokens'], '')}"
        + (" (the cloud reports no prefill counts)" if s["cloud_prefills_only_new_tokens"] is None else ""),
        f"the drafter re-prefilled the whole history on {s['drafter_reprefills_history_turns']} of {s['turns']} "
        f"turns ({fmt(s['drafter_prefill_ms_last'], '.0f')} ms at turn {s['turns']})",
    ])
