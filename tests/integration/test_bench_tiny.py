"""`tandem bench` end to end on tiny models: the JSON has the documented shape and the greedy
speculative rows are identical to the target."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tandem.bench.cores import pin
from tandem.bench.report import FIELDS
from tandem.cli.main import main


def test_bench_writes_the_documented_json(tiny_models, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"id": "a", "category": "code", "prompt": "def add(a, b):"},
        {"id": "b", "category": "code", "messages": [{"role": "user", "content": "Hello"}]},
        {"id": "c", "category": "prose", "prompt": "The river shapes"},
    ]) + "\n")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--prompts", str(prompts), "--max-new-tokens", "12", "--json", str(out),
               "--dtype", "fp32", "--draft-len", "3", "--target", str(tiny_models.target_hf),
               "--drafter", str(tiny_models.drafter_onnx), "--drafter-hf", str(tiny_models.drafter_hf)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {"machine", "config", "results"} <= doc.keys()
    rows = {(r["method"], r["category"]): r for r in doc["results"]}
    assert set(rows) == {(m, c) for m in ("target", "cloud_only", "assisted", "drafter", "tandem")
                         for c in ("code", "prose", "all")}
    for row in doc["results"]:
        assert set(FIELDS) <= row.keys()
    assert rows[("tandem", "all")]["identical_to_target"] is True
    assert rows[("assisted", "all")]["identical_to_target"] is True
    assert rows[("tandem", "all")]["identical_to_cloud_only"] is True
    assert rows[("cloud_only", "all")]["identical_to_target"] is True  # fp32: the engine agrees with transformers
    assert rows[("assisted", "all")]["identical_to_cloud_only"] is None  # transformers' numerics: not claimed
    assert rows[("target", "code")]["speedup_vs_target"] == 1.0
    assert rows[("drafter", "code")]["acceptance_rate"] is None  # does not apply: null
    assert rows[("drafter", "code")]["cloud_cpu_s_per_token"] is None
    assert 0 < rows[("tandem", "code")]["target_forwards_per_token"] <= 1
    assert rows[("tandem", "code")]["edge_cpu_s_per_token"] > 0
    assert "tandem" in capsys.readouterr().out


def test_bench_rejects_a_malformed_prompts_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "category": "code"}\n')
    assert main(["bench", "--prompts", str(bad), "--target", "t", "--drafter", "d"]) == 2
    assert "exactly one of 'prompt' or 'messages'" in capsys.readouterr().err


def test_bench_in_bf16_is_bit_identical_to_the_cloud_only_path(tiny_models, tmp_path: Path) -> None:
    """bf16, where shapes change the rounding: speculative (any draft length) equals cloud-only."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "category": "code", "prompt": text}) for i, text in
                                 enumerate(["def add(a, b):", "The river shapes the valley", "import os\n"])) + "\n")
    for draft_len in ("2", "7"):
        out = tmp_path / f"bench{draft_len}.json"
        assert main(["bench", "--prompts", str(prompts), "--max-new-tokens", "24", "--json", str(out),
                     "--dtype", "bf16", "--draft-len", draft_len, "--methods", "cloud_only,tandem",
                     "--target", str(tiny_models.target_hf), "--drafter", str(tiny_models.drafter_onnx)]) == 0
        runs = json.loads(out.read_text())["runs"]
        assert [r["identical_to_cloud_only"] for r in runs] == [True] * 6


def _two_prompts(tmp_path: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"id": "a", "category": "code", "prompt": "def add(a, b):"},
        {"id": "c", "category": "prose", "prompt": "The river shapes"},
    ]) + "\n")
    return prompts


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--split-cores needs 2 CPUs")
def test_split_cores_pins_each_side_and_says_so(tiny_models, tmp_path: Path) -> None:
    """In process: the target alone on the cloud's CPU, the drafter on the edge's, the pair on both;
    the JSON records what the kernel applied to every thread, and the draft fields."""
    import torch

    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        rc = main(["bench", "--prompts", str(_two_prompts(tmp_path)), "--max-new-tokens", "12", "--json", str(out),
                   "--dtype", "fp32", "--draft-len", "3", "--methods", "target,drafter,tandem", "--split-cores",
                   "--target", str(tiny_models.target_hf), "--drafter", str(tiny_models.drafter_onnx)])
    finally:
        pin(before)  # the test process goes on with what it had
        torch.set_num_threads(threads)
    assert rc == 0
    doc = json.loads(out.read_text())
    split = doc["config"]["split_cores"]
    edge, cloud = sorted(before)[:2]
    assert (split["edge_cpus"], split["cloud_cpus"], split["threads_per_side"]) == ([edge], [cloud], 1)
    assert split["bench_process_torch_threads"] == 1
    assert split["bench_process_cpus_allowed"] == {"edge": [str(edge)], "cloud": [str(cloud)],
                                                   "both": [f"{edge}-{cloud}" if cloud == edge + 1 else f"{edge},{cloud}"]}
    assert split["cloud"] is None  # no networked method: no cloud node
    assert doc["machine"]["cpus_allowed"] == sorted(before)
    rows = {(r["method"], r["category"]): r for r in doc["results"]}
    spec, base = rows[("tandem", "all")], rows[("target", "all")]
    assert spec["identical_to_target"] is True
    assert isinstance(spec["mean_draft_len"], float) and 0 < spec["mean_draft_len"] <= 3
    assert isinstance(spec["draft_reasons"], dict) and all(isinstance(n, int) for n in spec["draft_reasons"].values())
    assert spec["pipeline_hit_rate"] is None  # in process, nothing is drafted ahead of a verdict
    assert (base["mean_draft_len"], base["pipeline_hit_rate"], base["draft_reasons"]) == (None, None, None)


def test_sampled_rows_report_speedup_and_acceptance(tiny_models, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--prompts", str(_two_prompts(tmp_path)), "--max-new-tokens", "12", "--json", str(out),
                 "--dtype", "fp32", "--draft-len", "3", "--methods", "target,cloud_only,tandem", "--temperature", "0.7",
                 "--seed", "5", "--target", str(tiny_models.target_hf),
                 "--drafter", str(tiny_models.drafter_onnx)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["sampling"] == {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "seed": 5}
    rows = {(r["method"], r["category"]): r for r in doc["results"]}
    spec = rows[("tandem", "all")]
    assert spec["speedup_vs_target"] > 0 and 0 <= spec["acceptance_rate"] <= 1
    # sampled answers are not claimed equal to anything
    assert all(r["identical_to_target"] is None and r["identical_to_cloud_only"] is None for r in doc["results"])


def test_bench_rejects_a_negative_temperature(capsys) -> None:
    assert main(["bench", "--temperature", "-1", "--target", "t", "--drafter", "d"]) == 2
    assert "--temperature" in capsys.readouterr().err
