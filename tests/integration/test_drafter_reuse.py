"""The edge drafter reuses an ended session's KV for the next request's shared prefix (a chat's
next turn) when the request's answer cannot depend on it (greedy, or sampled without a seed), on
the real ONNX runtime with the tiny random drafter."""

from __future__ import annotations

import pytest

from edge_node import drafter as drafter_mod
from edge_node.drafter import DrafterModel
from tandem_core.sampling import SamplingParams

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_k=20, seed=3)
UNSEEDED = SamplingParams(temperature=0.8, top_k=20)


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


def test_no_reuse_for_seeded_sampling_short_prefixes_or_a_session_in_use(drafter: DrafterModel) -> None:
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


def test_an_unseeded_sampled_turn_reuses_and_is_kept_but_a_seeded_one_never_reuses(drafter: DrafterModel) -> None:
    prompt = [3 + (i * 5) % 190 for i in range(30)]
    first = drafter.new_session(prompt, UNSEEDED, 11, max_length=80)
    answer = list(first.generate(max_new_tokens=6, eos_ids=frozenset()))
    assert first.tokens == [*prompt, *answer]
    drafter.retain(first)  # kept: a later request that may reuse takes it
    turn2 = [*prompt, *answer, 7, 8]
    seeded = drafter.new_session(turn2, SAMPLED, 3, max_length=80)
    assert seeded.reused == 0  # a seeded answer must not depend on the cache's rounding
    second = drafter.new_session(turn2, UNSEEDED, 12, max_length=80)
    assert second.reused >= len(prompt)  # the shared prefix and the answer came from the cache
    assert second.max_length > 80  # the first turn reserved room beyond its own request for the next turns
    more = list(second.generate(max_new_tokens=6, eos_ids=frozenset()))
    assert len(more) == 6 and second.tokens == [*turn2, *more]
    drafter.retain(second)
    greedy = drafter.new_session([*turn2, *more, 1], GREEDY, 0, max_length=80)
    assert greedy.reused >= len(turn2)  # a sampled session's cache serves a greedy request too


def drafter_path(drafter: DrafterModel) -> str:
    return drafter.model_dir
