"""Aggregation and printing for `tandem bench`.

Guarantees: one row per (method, category) plus an `all` category, with exactly the fields of the
benchmark JSON schema; a field that does not apply to a method is None (null in JSON). Rates are
ratios of totals (total tokens / total seconds), not means of per-prompt ratios.

Speculative rows also say how long the drafts were and why (`tandem_core.stats`):
`mean_draft_len` = drafted / rounds; `alt_hit_rate` = rounds prepared for the likeliest other verdict
whose verdict came / those prepared (greedy); `pipeline_hit_rate` = pipeline hits / tries, None when no
round was drafted ahead of its predecessor's verdict; `draft_reasons` the rounds per reason
class, summed over the prompts. Draft trees: `tree_nodes_per_round` = drafts verified / rounds, a
tree's nodes counted (mean_draft_len when no round sent a tree: a tree's `drafted` is its
depth), and `tree_rounds` the rounds that sent a tree, summed over the prompts.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tandem.pair import GenerationResult

FIELDS = ("method", "category", "n_prompts", "tokens_per_s", "ttft_ms", "acceptance_rate",
          "mean_accepted_len", "target_forwards_per_token", "edge_cpu_s_per_token",
          "cloud_cpu_s_per_token", "speedup_vs_target", "identical_to_target", "identical_to_cloud_only",
          "mean_draft_len", "pipeline_hit_rate", "alt_hit_rate", "draft_reasons")


@dataclass(frozen=True)
class Run:
    """One method on one prompt."""

    prompt_id: str
    category: str
    result: GenerationResult
    identical_to_target: bool | None  # None when the method does not claim the target's output
    rtt_ms: float | None = None  # networked methods: the link shaper's RTT; None in process
    identical_to_cloud_only: bool | None = None  # vs the engine's own target-only path; None: not claimed


def _sum_opt(values: Iterable[float | None]) -> float | None:
    vals = list(values)
    return None if any(v is None for v in vals) else float(sum(v for v in vals if v is not None))


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def aggregate(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Rows per (method, category) and per (method, 'all'), with speedups against `target`."""
    groups: dict[tuple[str, float | None, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.result.method, run.rtt_ms, run.category), []).append(run)
        groups.setdefault((run.result.method, run.rtt_ms, "all"), []).append(run)
    rows = {key: _row(key[0], key[2], group) | {"rtt_ms": key[1]} for key, group in groups.items()}
    for (_, _, category), row in rows.items():
        base = rows.get(("target", None, category))
        row["speedup_vs_target"] = _ratio(row["tokens_per_s"], base["tokens_per_s"]) if base else None
        row["decode_speedup_vs_target"] = (_ratio(row["decode_tokens_per_s"], base["decode_tokens_per_s"])
                                           if base else None)
    order = {m: i for i, m in enumerate(("target", "cloud_only", "assisted", "drafter", "tandem", "tandem_grpc",
                                          "cloud_stream"))}
    return sorted(rows.values(), key=lambda r: (r["category"] == "all", r["category"], order.get(r["method"], 99),
                                                r["rtt_ms"] or 0))


def _row(method: str, category: str, runs: Sequence[Run]) -> dict[str, Any]:
    results = [r.result for r in runs]
    tokens = sum(len(r.tokens) for r in results)
    wall = sum(r.wall_s for r in results)
    stats = [r.stats for r in results]
    has_stats = all(s is not None for s in stats)
    drafted = sum(s.drafted for s in stats if s is not None)
    rounds = sum(s.rounds for s in stats if s is not None)
    forwards = _sum_opt(r.target_forwards for r in results)
    identical = [r.identical_to_target for r in runs]
    own = [r.identical_to_cloud_only for r in runs]
    return {
        "method": method,
        "category": category,
        "n_prompts": len(runs),
        "tokens_per_s": _ratio(tokens, wall),
        "ttft_ms": 1000 * sum(r.ttft_s for r in results) / len(results),
        "acceptance_rate": _ratio(sum(s.accepted for s in stats if s is not None), drafted) if has_stats else None,
        "mean_accepted_len": _ratio(sum(s.round_tokens for s in stats if s is not None), rounds) if has_stats else None,
        "target_forwards_per_token": _ratio(forwards, tokens),
        "edge_cpu_s_per_token": _ratio(_sum_opt(r.edge_cpu_s for r in results), tokens),
        "cloud_cpu_s_per_token": _ratio(_sum_opt(r.cloud_cpu_s for r in results), tokens),
        "speedup_vs_target": None,
        "identical_to_target": None if any(i is None for i in identical) else all(identical),
        "identical_to_cloud_only": None if any(i is None for i in own) else all(own),
        "mean_draft_len": _ratio(drafted, rounds) if has_stats else None,
        "tree_nodes_per_round": _ratio(sum(s.nodes for s in stats if s is not None), rounds) if has_stats else None,
        "tree_rounds": sum(s.tree_rounds for s in stats if s is not None) if has_stats else None,
        "pipeline_hit_rate": _ratio(sum(s.pipeline_hits for s in stats if s is not None),
                                    sum(s.pipeline_tries for s in stats if s is not None)) if has_stats else None,
        "alt_hit_rate": _ratio(sum(getattr(s, "alt_hits", 0) for s in stats if s is not None),
                               sum(getattr(s, "alt_tries", 0) for s in stats if s is not None)) if has_stats else None,
        "draft_reasons": _sum_counts(s.draft_reasons for s in stats if s is not None) if has_stats else None,
        # Extras beyond the required schema. decode_tokens_per_s leaves out the time to the first
        # token (prefill), so a faster prefill cannot pass for faster decoding.
        "decode_tokens_per_s": _ratio(sum(len(r.tokens) - 1 for r in results), sum(r.wall_s - r.ttft_s for r in results)),
        "decode_speedup_vs_target": None,
        "identical_rate": None if any(i is None for i in identical) else sum(identical) / len(identical),
        "tokens": tokens,
        "wall_s": wall,
        "bytes_per_round": _bytes_per_round(results),
        # accepted drafts that retrieval copied or let the drafter check in one pass (tandem_core.lookup)
        "retrieval_draft_share": _ratio(sum(s.retrieval_accepted for s in stats if s is not None),
                                        sum(s.accepted for s in stats if s is not None)) if has_stats else None,
    }


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for key, n in c.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def _bytes_per_round(results: Sequence[GenerationResult]) -> float | None:
    """Message bytes (both directions) per verification round, or per streamed message."""
    if any(r.bytes_up is None or r.bytes_down is None for r in results):
        return None
    rounds = sum((r.stats.rounds if r.stats is not None and r.stats.rounds else r.messages or 0) for r in results)
    return _ratio(sum((r.bytes_up or 0) + (r.bytes_down or 0) for r in results), rounds)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for mod in ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an absent optional package is just not reported
            versions[mod] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "cpus_allowed": sorted(os.sched_getaffinity(0)),
            "memory_gib": round(mem_gib, 1), "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": versions}


def fmt(value: Any, spec: str) -> str:
    """A table cell: "-" for None, yes/NO for booleans, else `format(value, spec)`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("method", "category", "n", "tok/s", "decode tok/s", "TTFT ms", "accept", "tau", "k", "nodes/rnd",
              "pipe hit", "alt hit", "fwd/tok", "edge cpu/tok", "cloud cpu/tok", "retrieved", "speedup",
              "decode speedup", "identical", "= cloud-only")
    specs = ("", "", "d", ".2f", ".2f", ".0f", ".3f", ".2f", ".2f", ".2f", ".2f", ".2f", ".3f", ".3f", ".3f", ".2f",
             ".2f", ".2f", "", "")
    keys = ("method", "category", "n_prompts", "tokens_per_s", "decode_tokens_per_s", "ttft_ms", "acceptance_rate",
            "mean_accepted_len", "mean_draft_len", "tree_nodes_per_round", "pipeline_hit_rate", "alt_hit_rate",
            "target_forwards_per_token", "edge_cpu_s_per_token", "cloud_cpu_s_per_token", "retrieval_draft_share",
            "speedup_vs_target", "decode_speedup_vs_target", "identical_to_target", "identical_to_cloud_only")
    lines = [[fmt(row[k], s) for k, s in zip(keys, specs, strict=True)] for row in rows]
    for line, row in zip(lines, rows):
        if row.get("rtt_ms") is not None:
            line[0] += f"@{row['rtt_ms']:g}ms"
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def progress(message: str, tag: str = "bench") -> None:
    """One progress line on stderr, for every bench suite."""
    print(f"{tag}: {message}", file=sys.stderr, flush=True)
