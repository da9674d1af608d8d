"""`tandem bench --suite cloud-scale` (replay load) and `--suite chat-turns` on tiny models.

Slow: each starts real processes (a two-node Ray cluster with the Serve deployment, or the local
stack: cloud node on Ray Serve, link shaper, edge node, orchestrator), about a minute each on
two cores. TANDEM_HOME is a temporary folder. The figures of tiny random models mean nothing;
these tests check the rows and their fields, and that replayed sessions follow their solo runs.
The methods suite with `--split-cores` checks that the Serve replica really runs pinned.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tandem.bench.cores import pin
from tandem.cli.main import main

pytestmark = pytest.mark.slow

ROW_FIELDS = {"load", "replicas", "sessions", "agg_tok_s", "verify_p50_ms", "verify_p95_ms", "open_p50_ms",
              "rejected", "failed", "diverged", "identical", "batch_sessions_mean", "retry_hint_ms",
              "sessions_per_replica"}
TURN_FIELDS = {"turn", "prompt_tokens", "added_tokens", "ttft_ms", "answer_ms", "cloud_prefill_tokens", "cloud_reused_tokens",
               "drafter_prefill_tokens", "drafter_prefill_ms", "answer_tokens", "route"}


@pytest.mark.timeout(420)
def test_cloud_scale_replays_recorded_drafts(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    out, replay = tmp_path / "scale.json", tmp_path / "replay.json"
    rc = main(["bench", "--suite", "cloud-scale", "--models", "tiny", "--load", "replay", "--sessions", "1,2",
               "--replicas", "1", "--max-new-tokens", "16", "--duration", "3", "--replay-file", str(replay),
               "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [(r["load"], r["replicas"], r["sessions"]) for r in rows] == [("replay", 1, 1), ("replay", 1, 2)]
    for row in rows:
        assert row.keys() >= ROW_FIELDS
        # closed loop: each of the N clients replays one session after another for 3 s
        assert row["sessions_run"] >= row["sessions"]
        assert (row["completed"], row["rejected"], row["failed"], row["diverged"]) == (row["sessions_run"], 0, 0, 0)
        assert row["identical"] is True and row["agg_tok_s"] > 0
        assert row["verify_p50_ms"] > 0 and row["open_p50_ms"] > 0
        assert row["batch_sessions_mean"] is None or row["batch_sessions_mean"] >= 1
    recorded = json.loads(replay.read_text())["prompts"]
    assert set(recorded) == {"tiny-0", "tiny-1"}  # once per prompt used
    assert all(len(r["tokens"]) == 16 for r in recorded.values())
    stdout = capsys.readouterr().out
    assert f"machine: {doc['machine']['cpu']}" in stdout and "replay" in stdout


@pytest.mark.timeout(420)
@pytest.mark.parametrize("temperature", ["0", "0.9"])
def test_chat_turns_reports_six_turns(temperature: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """Greedy, and sampled without a seed (a chat client's request): either way each turn reuses
    the earlier turns' KV on both sides."""
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    out = tmp_path / "chat.json"
    rc = main(["bench", "--suite", "chat-turns", "--models", "tiny", "--max-new-tokens", "8", "--json", str(out),
               "--temperature", temperature])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["temperature"] == float(temperature) and doc["config"]["seed"] is None
    turns = doc["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4, 5, 6]
    for before, turn in zip([None, *turns], turns):
        assert turn.keys() >= TURN_FIELDS
        assert turn["route"].startswith("speculative") and turn["answer_tokens"] > 0 and turn["ttft_ms"] > 0
        assert turn["prompt_tokens"] == (before["prompt_tokens"] if before else 0) + turn["added_tokens"]
        assert turn["added_tokens"] > 0
        assert 0 < turn["drafter_prefill_tokens"] <= turn["prompt_tokens"] and turn["drafter_prefill_ms"] > 0
        assert turn["cloud_prefill_tokens"] is not None and turn["cloud_prefill_tokens"] >= 0
        if before is not None:  # the earlier turns' KV is reused on both sides: only the new part is prefilled
            assert turn["drafter_prefill_tokens"] <= turn["added_tokens"] + before["answer_tokens"]
            assert turn["cloud_prefill_tokens"] <= turn["added_tokens"] + before["answer_tokens"]
    assert doc["summary"]["turns"] == 6 and doc["summary"]["ttft_last_over_first"] > 0
    assert "TTFT at turn 6 / turn 1" in capsys.readouterr().out


@pytest.mark.timeout(420)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--split-cores needs 2 CPUs")
def test_split_cores_pins_the_replica_and_the_edge(tiny_models, tmp_path: Path, monkeypatch) -> None:
    """A real Ray Serve replica runs on the cloud's CPU (every thread), Ray's helpers stay unpinned,
    the edge side on the other CPU; the rows carry the draft fields."""
    import torch

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "category": "code", "prompt": "def add(a, b):"}) + "\n")
    out = tmp_path / "bench.json"
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        rc = main(["bench", "--prompts", str(prompts), "--max-new-tokens", "8", "--json", str(out), "--dtype", "fp32",
                   "--methods", "target,tandem_grpc,tandem_grpc_seq", "--rtt-ms", "0", "--split-cores",
                   "--target", str(tiny_models.target_hf), "--drafter", str(tiny_models.drafter_onnx)])
    finally:
        pin(before)
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads(out.read_text())
    split = doc["config"]["split_cores"]
    edge, cloud = (str(c) for c in sorted(before)[:2])
    assert split["bench_process_cpus_allowed"] == {"cloud": [cloud], "edge": [edge]}
    replicas = split["cloud"]["replicas"]
    assert len(replicas) == 1 and replicas[0]["pid"] > 0
    assert replicas[0]["cpus_allowed_list"] == [cloud]  # every thread of the replica
    assert cloud not in split["cloud"]["others_cpus_allowed"]  # Ray's helpers were not pinned to it alone
    rows = {(r["method"], r["category"]): r for r in doc["results"]}
    for method in ("tandem_grpc", "tandem_grpc_seq"):
        row = rows[(method, "all")]
        assert row["identical_to_target"] is True and row["rtt_ms"] == 0
        assert isinstance(row["mean_draft_len"], float) and row["mean_draft_len"] > 0
        assert isinstance(row["draft_reasons"], dict)
        assert row["pipeline_hit_rate"] is None or 0 <= row["pipeline_hit_rate"] <= 1
    assert rows[("tandem_grpc_seq", "all")]["mean_draft_len"] <= 4
