"""Draft trees through the real edge drafter and the core's loop, on fake models.

Everything between the models is the real code: the edge's `DrafterSession` (its alternatives:
the next likeliest tokens in greedy mode, further draws without replacement on the position's
stream in sampling mode), `LookupDrafter` with `Branching` planning the siblings, the loop
(pipelined or not: a verdict down a sibling keeps only the chain's drafts before it), and
`target_round` verifying the tree (`tandem_core.tree.verify_tree`) over a target that scores
every node after its own path. The fakes are the two models, whose distributions are known
exactly (`tests.support.sampling_models`), so the answers can be held to the target's:
greedy token for token, sampled by a chi-square test (ALPHA = 1e-8, fixed seeds). The wrong
tree samplers that the same test rejects are in `tests/unit/test_tree_sampling_fake_models.py`;
here, on a 5-token vocabulary, a planted wrong sibling rule (the likeliest token left instead of
a draw) moved the p-value only to 0.01-0.3, so no control is claimed at this level.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from tandem.limits import MAX_DRAFT_LEN
from tandem_core.lookup import LookupDrafter, LookupPolicy
from tandem_core.loop import Draft, TargetVerifier, speculative_generate
from tandem_core.sampling import SamplingParams
from tandem_core.stats import RequestStats
from tests.integration.test_sampling_pipeline_fake_models import FakeOnnxDrafterModel, FakeTargetSession
from tests.support.sampling_models import V, chi_square, drafter_logits, exact_distribution, target_logits

PROMPT = (1, 2)
ALPHA = 1e-8
TRANSFORMED = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
GREEDY = SamplingParams()


def answer(drafter: FakeOnnxDrafterModel, params: SamplingParams, seed: int, n: int, *, pipeline: bool,
           room: int = 64) -> tuple[tuple[int, ...], RequestStats]:
    """One answer with trees: a policy whose rows cost nothing (a still clock), so every
    alternative with a chance goes in."""
    target = FakeTargetSession(PROMPT)
    verifier = TargetVerifier(target, params, seed=seed, start=len(PROMPT), max_new_tokens=n, eos_ids=frozenset())
    session: Any = drafter.new_session(PROMPT, params, seed, max_length=len(PROMPT) + n + MAX_DRAFT_LEN + 2)
    drafts = LookupDrafter(session, None, LookupPolicy(draft_s=0.0), model_len=3, vocab=V, clock=lambda: 0.0,
                           trees=lambda: room)
    if pipeline:
        verifier.submit(Draft((), None))
    stats = RequestStats()
    tokens = tuple(t for v in speculative_generate(drafts, verifier, draft_len=MAX_DRAFT_LEN, max_new_tokens=n,
                                                   stats=stats, pipeline=pipeline, first_sent=pipeline)
                   for t in v.tokens)
    return tokens, stats


def target_greedy(n: int) -> tuple[int, ...]:
    out = list(PROMPT)
    for _ in range(n):
        out.append(int(np.argmax(target_logits(out))))
    return tuple(out[len(PROMPT):])


@pytest.mark.parametrize("kind", ["close", "shifted", "avoids_favourite"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])
def test_greedy_tree_answers_are_the_targets_with_fake_models(kind: str, pipeline: bool) -> None:
    drafter = FakeOnnxDrafterModel(drafter_logits(kind), 0)
    tokens, stats = answer(drafter, GREEDY, 0, 24, pipeline=pipeline)
    assert tokens == target_greedy(24)
    if kind != "close":  # the close drafter is never rejected: no sibling is worth a row
        assert stats.tree_rounds > 0 and stats.tree_nodes_per_round > stats.mean_draft_len


def test_no_tree_goes_to_a_verifier_without_room_with_fake_models() -> None:
    tokens, stats = answer(FakeOnnxDrafterModel(drafter_logits("shifted"), 0), GREEDY, 0, 12, pipeline=True, room=0)
    assert tokens == target_greedy(12) and stats.tree_rounds == 0


@pytest.mark.parametrize(("pipeline", "room"), [(False, 64), (True, 64), (False, 4)],
                         ids=["sequential", "pipelined", "one-sibling"])
def test_sampled_tree_answers_follow_the_exact_target_distribution_with_fake_models(pipeline: bool, room: int) -> None:
    """The "shifted" drafter is rejected often, so siblings are tested often; 4 tokens take
    two rounds or more. With room for one sibling (3 drafts + 1), only the first alternative
    drawn goes in."""
    drafter = FakeOnnxDrafterModel(drafter_logits("shifted"), 3)
    n, answers, tree_rounds = 4, 2500, 0
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(90_000, 90_000 + answers):
        tokens, stats = answer(drafter, TRANSFORMED, seed, n, pipeline=pipeline, room=room)
        counts[tokens] += 1
        tree_rounds += stats.tree_rounds
    assert tree_rounds > answers  # trees in most answers
    stat, df, pvalue = chi_square(counts, exact_distribution(PROMPT, n, TRANSFORMED))
    assert pvalue > ALPHA, f"chi2 {stat:.1f} with {df} degrees of freedom, p-value {pvalue:.2e}"
