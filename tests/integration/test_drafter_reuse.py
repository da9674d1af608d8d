"""The edge drafter reuses an ended greedy session's KV for the next request's shared prefix (a
chat's next turn), on the real ONNX runtime with the tiny random drafter."""

from __future__ import annotations

import pytest

from edge_node import drafter as drafter_mod
from edge_node.drafter import DrafterModel
from tandem_core.sampling import SamplingParams

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_k=20, seed=3)


@pytest.fixture()
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.drafter_onnx)


def test_a_next_turn_reuses_the_shared_prefix_and_continues_as_a_fresh_prefill(drafter: DrafterModel) -> None:
    turn1 = [5 + (i * 7) % 200 for i in range(40)]
    first = drafter.new_session(turn1, GREEDY, 0, max_length=len(turn1) + 40)
    answer = list(first.generate(max_new_tokens=12, eos_ids=frozenset()))
    drafter.retain(first)
    turn2 = [*turn1, *answer, 9, 8, 7, 6]
    reused = drafter.new_session(turn2, GREEDY, 0, max_length=len(turn2) + 40)
    assert reused.reused >= len(turn1)  # only the rest was prefilled
    fresh = DrafterModel(drafter_path(drafter)).new_session(turn2, GREEDY, 0, max_length=len(turn2) + 40)
    assert fresh.reused == 0
    eos: frozenset[int] = frozenset()
    assert list(reused.generate(max_new_tokens=15, eos_ids=eos)) == list(fresh.generate(max_new_tokens=15, eos_ids=eos))


def test_no_reuse_for_sampling_short_prefixes_or_a_session_in_use(drafter: DrafterModel) -> None:
    prompt = [3 + i for i in range(30)]
    done = drafter.new_session(prompt, GREEDY, 0, max_length=80)
    list(done.generate(max_new_tokens=5, eos_ids=frozenset()))
    drafter.retain(done)
    assert drafter.new_session(prompt + [1, 2], SAMPLED, 3, max_length=80).reused == 0  # seeded sampling
    short = [*prompt[:drafter_mod.MIN_REUSE - 1], 250, 251]
    assert drafter.new_session(short, GREEDY, 0, max_length=80).reused == 0  # too little in common
    taken = drafter.new_session(prompt + [1], GREEDY, 0, max_length=80)
    assert taken.reused > 0
    assert drafter.new_session(prompt + [1], GREEDY, 0, max_length=80).reused == 0  # the generator is in use
    sampled = drafter.new_session(prompt, SAMPLED, 3, max_length=80)
    drafter.retain(sampled)  # never kept: its drafts must stay reproducible
    assert drafter.new_session(prompt + [4], GREEDY, 0, max_length=80).reused == 0


def drafter_path(drafter: DrafterModel) -> str:
    return drafter.model_dir
