"""Prometheus metrics through the real cloud verifier, link shaper, edge node and orchestrator
(tiny models, greedy, in-process servers on 127.0.0.1, `tests.support.orch_stack`).

After one speculative answer the counters moved by exactly what the answer's statistics message
reports (the edge's in its registry, the orchestrator's as its `/metrics` serves them, the
cloud's verify rounds and prefill); after a cut link the fallback counters moved under the typed
cause the stats message names; every exposition parses with prometheus-client's parser and holds
only defined names.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_node import metrics as cloud_metrics
from edge_node import metrics as edge_metrics
from protos.enums import cause_from_proto
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem import metric_defs
from tests.support.orch_stack import Stack, local_stack

PROMPT = "def add(a, b):\n    return a + b\n"
N = 40

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _edge() -> Samples:
    return _samples(edge_metrics.exposition().decode())


def _orch(stack: Stack) -> Samples:
    with urllib.request.urlopen(f"http://{stack.orchestrator.http_address}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        return _samples(reply.read().decode())


def _cloud() -> Samples:
    from prometheus_client import generate_latest

    registry = cloud_metrics.registry()
    assert registry is not None, "Ray is running in this test process: the cloud's metrics went to Ray"
    return _samples(generate_latest(registry).decode())


def _moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def stack(tiny_models):
    with local_stack(tiny_models.target_hf, tiny_models.drafter_onnx, round_deadline_ms=1000) as s:
        yield s


def _generate(stack: Stack, route: int, on_tokens=None) -> opb.OrchestratorStats:
    request = opb.GenerateTextRequest(prompt=PROMPT, options=opb.GenerateOptions(route=route, max_new_tokens=N))
    stats, tokens = None, 0
    for msg in stack.stub.Generate(request, timeout=120):
        if msg.WhichOneof("kind") == "delta":
            tokens += len(msg.delta.tokens)
            if on_tokens is not None:
                on_tokens(tokens)
        elif msg.WhichOneof("kind") == "stats":
            stats = msg.stats
    assert stats is not None
    return stats


def test_one_speculative_answer_moves_the_counters_by_its_statistics(stack: Stack) -> None:
    edge0, orch0, cloud0 = _edge(), _orch(stack), _cloud()
    st = _generate(stack, opb.ROUTE_SPECULATIVE)
    edge1, orch1, cloud1 = _edge(), _orch(stack), _cloud()
    g = st.generation
    assert st.route == "speculative" and not st.switches and g.rounds > 0 and g.accepted > 0

    def edge(name: str, **labels: str) -> float:
        return _moved(edge0, edge1, name, **labels)

    assert edge("tandem_spec_accepted_tokens_total") == g.accepted
    assert edge("tandem_spec_draft_tokens_total") == g.drafted
    assert edge("tandem_spec_drafts_total") == g.rounds
    assert edge("tandem_spec_retrieval_draft_tokens_total") == g.retrieval_drafted
    assert edge("tandem_spec_retrieval_accepted_tokens_total") == g.retrieval_accepted <= g.accepted
    per_position = [edge("tandem_spec_accepted_tokens_per_position_total", position=str(i)) for i in range(17)]
    assert sum(per_position) == g.accepted
    assert per_position == sorted(per_position, reverse=True)  # a draft is accepted only after its predecessors
    round_tokens = edge("tandem_spec_tokens_per_round_sum")
    assert edge("tandem_spec_tokens_per_round_count") == edge("tandem_spec_draft_length_count") == g.rounds
    assert round_tokens == pytest.approx(g.mean_accepted_len * g.rounds, abs=1e-3)
    assert edge("tandem_spec_bonus_tokens_total") == round_tokens - g.accepted
    assert edge("tandem_edge_generated_tokens_total", source="verified") == g.verified_tokens == g.generated_tokens
    assert edge("tandem_edge_requests_total", route="speculative", finish_reason="length") == 1
    assert edge("tandem_edge_ttft_seconds_count", route="speculative") == 1
    assert edge("tandem_edge_ttft_seconds_sum", route="speculative") == pytest.approx(g.ttft_ms / 1000, abs=1e-3)
    assert 0 < edge("tandem_edge_inter_token_seconds_count", route="speculative") < g.generated_tokens  # not the first
    assert edge("tandem_edge_link_bytes_total", direction="up") == g.bytes_up

    def orch(name: str, **labels: str) -> float:
        return _moved(orch0, orch1, name, **labels)

    assert orch("tandem_orch_decisions_total", route="speculative", reason_class="client_override") == 1
    assert orch("tandem_orch_generated_tokens_total", source="verified") == g.verified_tokens
    assert orch("tandem_orch_ttft_seconds_count", route="speculative") == 1
    assert orch1[("tandem_orch_circuit_state", (("state", "closed"),))] == 1
    assert orch1[("tandem_orch_active_generations", ())] == 0

    assert _moved(cloud0, cloud1, "tandem_cloud_verify_round_seconds_count") == g.rounds
    assert _moved(cloud0, cloud1, "tandem_cloud_sessions_opened_total") == 1 + g.resumes
    assert _moved(cloud0, cloud1, "tandem_cloud_prefill_tokens_total") == g.cloud_prefill_tokens
    assert cloud1[("tandem_cloud_kv_budget_bytes", ())] > 0


def test_a_cut_link_counts_the_fallback_under_its_cause(stack: Stack) -> None:
    stack.shaper.set_conditions(rtt_ms=40, mode="up")
    stack.wait_link("up")
    cut = {"done": False}

    def on_tokens(n: int) -> None:
        if not cut["done"] and n >= 6:
            stack.shaper.drop_connections()
            cut["done"] = True

    edge0, orch0 = _edge(), _orch(stack)
    try:
        st = _generate(stack, opb.ROUTE_SPECULATIVE, on_tokens)
    finally:
        stack.shaper.set_conditions(rtt_ms=0, mode="up")
        stack.wait_link("up")
    edge1, orch1 = _edge(), _orch(stack)
    [switch] = st.switches
    cause = str(cause_from_proto(switch.cause))
    assert cause in ("broken_stream", "late_verdict")
    assert _moved(edge0, edge1, "tandem_edge_fallbacks_total", cause=cause) == 1
    assert _moved(orch0, orch1, "tandem_orch_fallbacks_total", cause=cause) == 1
    assert _moved(edge0, edge1, "tandem_edge_generated_tokens_total", source="local") == st.generation.local_tokens > 0
    assert _moved(orch0, orch1, "tandem_orch_generated_tokens_total", source="local") == st.generation.local_tokens


def test_every_exposition_parses_and_holds_only_defined_names(stack: Stack) -> None:
    suffixes = ("", "_total", "_created", "_bucket", "_sum", "_count")
    defined = {m.name.removesuffix("_total") + s for m in metric_defs.METRICS for s in suffixes}
    for samples in (_edge(), _orch(stack), _cloud()):
        names = {name for name, _ in samples}
        assert names and names <= defined, sorted(names - defined)
