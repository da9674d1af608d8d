"""`tandem bench --split-cores` and the bench rows' draft fields: which CPU each method gets, the
usage error with one CPU, that pinning reaches every thread of a process, and how
mean_draft_len, pipeline_hit_rate and draft_reasons are summed over prompts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tandem.bench.cores import THREADS, observe, pin, plan_cores, role_of
from tandem.bench.report import FIELDS, Run, aggregate, format_table
from tandem.cli.main import main
from tandem.pair import GenerationResult
from tandem_core.stats import RequestStats, RoundStats


@pytest.mark.parametrize(("available", "edge", "cloud"), [({0, 1}, 0, 1), ({3, 1, 7}, 1, 3), ([5, 2], 2, 5)])
def test_the_plan_takes_the_two_lowest_cpus_this_process_may_use(available, edge: int, cloud: int) -> None:
    plan = plan_cores(available)
    assert (plan.edge, plan.cloud) == (edge, cloud)
    assert plan.describe()["edge_cpus"] == [edge] and plan.describe()["cloud_cpus"] == [cloud]
    assert plan.describe()["threads_per_side"] == THREADS == 1


@pytest.mark.parametrize("available", [set(), {4}])
def test_fewer_than_two_cpus_is_refused(available: set[int]) -> None:
    with pytest.raises(ValueError, match="needs 2 CPUs"):
        plan_cores(available)


@pytest.mark.parametrize(("method", "role"), [
    ("target", "cloud"), ("cloud_only", "cloud"),
    ("tandem", "both"), ("tandem_model", "both"), ("assisted", "both"),
    ("drafter", "edge"), ("drafter_model", "edge"), ("tandem_grpc", "edge"), ("tandem_grpc_seq", "edge"),
    ("tandem_grpc_model", "edge"), ("tandem_grpc_tls", "edge"), ("cloud_stream", "edge"),
])
def test_each_method_runs_where_its_side_does(method: str, role: str) -> None:
    plan = plan_cores({0, 1})
    assert role_of(method) == role
    assert plan.cpus_for(method) == {"cloud": {1}, "edge": {0}, "both": {0, 1}}[role]


def test_split_cores_with_one_cpu_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert main(["bench", "--split-cores", "--target", "t", "--drafter", "d"]) == 2
    assert "--split-cores needs 2 CPUs" in capsys.readouterr().err


def test_split_cores_belongs_to_the_methods_suite(capsys) -> None:
    assert main(["bench", "--suite", "fallback", "--split-cores"]) == 2
    assert "methods suite only" in capsys.readouterr().err


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_pin_reaches_every_thread_of_another_process() -> None:
    script = ("import threading, time\n"
              "[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(3)]\n"
              "print('up', flush=True)\ntime.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        cpu = min(os.sched_getaffinity(0))
        pin({cpu}, child.pid)
        assert observe(child.pid) == [str(cpu)]
        assert len(os.listdir(f"/proc/{child.pid}/task")) >= 4  # the main thread and its three
    finally:
        child.kill()
        child.wait()


def _result(method: str, stats: RequestStats | None) -> GenerationResult:
    return GenerationResult(method, (1, 2, 3, 4), 0.1, 1.0, 0.5 if stats else None, 0.5, stats, 4)


def _stats(rounds: list[tuple[int, int, str]], pipeline: list[bool]) -> RequestStats:
    s = RequestStats()
    for drafted, accepted, reason in rounds:
        s.add_round(RoundStats(drafted, accepted, accepted + 1, reason=reason))
    for hit in pipeline:
        s.add_pipeline(hit)
    return s


def test_rows_sum_draft_lengths_pipeline_hits_and_reasons_over_prompts() -> None:
    a = _stats([(4, 4, "pinned"), (2, 0, "low_acceptance")], [True, False])
    b = _stats([(6, 3, "cost_model"), (4, 1, "pinned")], [True])
    runs = [Run("p1", "code", _result("tandem_grpc", a), True, 50.0), Run("p2", "code", _result("tandem_grpc", b), True, 50.0),
            Run("p1", "code", _result("target", None), None), Run("p2", "code", _result("target", None), None)]
    rows = {(r["method"], r["category"]): r for r in aggregate(runs)}
    spec = rows[("tandem_grpc", "all")]
    assert set(FIELDS) <= spec.keys()
    assert spec["mean_draft_len"] == pytest.approx(16 / 4)
    assert spec["tree_nodes_per_round"] == pytest.approx(16 / 4) and spec["tree_rounds"] == 0  # no tree: k
    assert spec["pipeline_hit_rate"] == pytest.approx(2 / 3)
    assert spec["draft_reasons"] == {"cost_model": 1, "low_acceptance": 1, "pinned": 2}
    base = rows[("target", "all")]
    assert (base["mean_draft_len"], base["pipeline_hit_rate"], base["draft_reasons"]) == (None, None, None)


def test_tree_rounds_count_their_nodes_weighted_by_rounds() -> None:
    a, b = RequestStats(), RequestStats()
    a.add_round(RoundStats(3, 2, 3, nodes=9))  # a tree: depth 3, 9 nodes
    a.add_round(RoundStats(4, 1, 2))  # a chain of 4
    b.add_round(RoundStats(2, 2, 3, nodes=5))
    runs = [Run("p1", "code", _result("tandem_grpc", a), True, 0.0), Run("p2", "code", _result("tandem_grpc", b), True, 0.0),
            Run("p1", "code", _result("target", None), None)]
    rows = {(r["method"], r["category"]): r for r in aggregate(runs)}
    spec, base = rows[("tandem_grpc", "all")], rows[("target", "all")]
    assert spec["tree_nodes_per_round"] == pytest.approx((9 + 4 + 5) / 3) and spec["tree_rounds"] == 2
    assert spec["mean_draft_len"] == pytest.approx((3 + 4 + 2) / 3)
    assert (base["tree_nodes_per_round"], base["tree_rounds"]) == (None, None)
    table = format_table(list(rows.values())).splitlines()
    column = table[0].index("nodes/rnd")
    assert "6.00" in next(line for line in table if line.startswith("tandem_grpc@0ms"))[column:column + 9]


def test_no_pipelined_round_gives_no_hit_rate() -> None:
    runs = [Run("p1", "code", _result("tandem", _stats([(4, 2, "")], [])), True)]
    row = aggregate(runs)[0]
    assert row["pipeline_hit_rate"] is None and row["mean_draft_len"] == 4.0 and row["draft_reasons"] == {}
