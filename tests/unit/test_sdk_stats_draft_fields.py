"""The SDK's Stats carry the edge's pipelining, draft-length and tree figures (GenerationStats 25-29)."""

from __future__ import annotations

import dataclasses
import json

from protos.tandem.v1 import common_pb2, orchestrator_pb2
from tandem_sdk import _convert


def _proto(**generation: object) -> orchestrator_pb2.OrchestratorStats:
    gen = common_pb2.GenerationStats(route="speculative", rounds=4, drafted=14, accepted=10, **generation)
    return orchestrator_pb2.OrchestratorStats(route="speculative", generation=gen)


def test_pipeline_counts_and_draft_reasons_convert() -> None:
    stats = _convert.stats(_proto(pipeline_tries=3, pipeline_hits=2, draft_reasons={"pinned": 3, "probe": 1}))
    assert (stats.pipeline_tries, stats.pipeline_hits) == (3, 2)
    assert stats.pipeline_hit_rate == 2 / 3
    assert stats.draft_reasons == {"pinned": 3, "probe": 1}
    assert stats.mean_draft_len == 14 / 4
    assert json.loads(json.dumps(dataclasses.asdict(stats)))["draft_reasons"] == {"pinned": 3, "probe": 1}


def test_no_pipelined_round_and_no_rounds_give_none() -> None:
    stats = _convert.stats(_proto())
    assert (stats.pipeline_tries, stats.pipeline_hit_rate, stats.draft_reasons) == (0, None, {})
    empty = _convert.stats(orchestrator_pb2.OrchestratorStats(route="local"))
    assert empty.mean_draft_len is None


def test_tree_counts_convert() -> None:
    stats = _convert.stats(_proto(tree_rounds=3, nodes=22))
    assert (stats.tree_rounds, stats.nodes, stats.tree_nodes_per_round) == (3, 22, 22 / 4)
    assert _convert.stats(orchestrator_pb2.OrchestratorStats(route="local")).tree_nodes_per_round is None
