"""The first round after a session's prefill is answered from the prefill's last row (real tiny
target, real engine and batcher, fp32 and bf16; no fakes).

The prefill runs the whole prompt and keeps the logits after its last token, so round 1 with no
drafts (the first token of every answer) takes no pass, and a first round with drafts runs only
the drafts. Each must give, bit for bit, what the old layout gives: a prefill of the prompt but
its last token, then a round over [last token, *drafts]; and the session must go on exactly as
that one does (the next rounds, a tree as the first round, a commit of rejected drafts).
"""

from __future__ import annotations

import numpy as np
import pytest

from cloud_node.scorer import ScorerSession, TargetModel

PROMPT_LENS = (1, 2, 31, 32, 33, 70)  # one token; the prefill's last tile full, or one row over


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def target(request, tiny_models) -> TargetModel:
    return TargetModel(tiny_models.target_hf, dtype=request.param)


def _prompt(n: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, 500, n)]


def _old_layout(target: TargetModel, prompt: list[int]) -> ScorerSession:
    """A session whose cache holds the prompt but its last token, as a round leaves it."""
    s = target.new_session(prompt)
    s.cache.crop(len(prompt) - 1)
    s._next = None  # what the session held before the first round was taken from the prefill
    return s


@pytest.mark.parametrize("prompt_len", PROMPT_LENS)
def test_round_one_without_drafts_takes_no_pass_and_equals_a_round(target: TargetModel, prompt_len: int) -> None:
    prompt = _prompt(prompt_len, prompt_len)
    new = target.new_session(prompt)
    passes = new.forwards
    assert new.cached_len == prompt_len and new.prefilled == prompt_len - 1
    first = new.score(())
    assert new.forwards == passes  # no pass: the prefill's last row
    old = _old_layout(target, prompt)
    before = old.forwards
    assert np.array_equal(first, old.score(())) and old.forwards == before + 1
    rng = np.random.default_rng(prompt_len)
    for _ in range(3):  # the session goes on exactly as the old one
        token = int(rng.integers(3, 500))
        new.commit(0, [token])
        old.commit(0, [token])
        assert new.cached_len == old.cached_len == len(new.committed) - 1
        drafts = [int(x) for x in rng.integers(3, 500, int(rng.integers(0, 5)))]
        assert np.array_equal(new.score(drafts), old.score(drafts))


@pytest.mark.parametrize("prompt_len", PROMPT_LENS)
def test_a_first_round_with_drafts_runs_only_the_drafts(target: TargetModel, prompt_len: int) -> None:
    prompt = _prompt(prompt_len, 100 + prompt_len)
    drafts = _prompt(4, 200 + prompt_len)
    new, old = target.new_session(prompt), _old_layout(target, prompt)
    logits = new.score(drafts)
    assert logits.shape == (5, target.vocab_size)
    assert np.array_equal(logits, old.score(drafts))
    new.commit(2, [*drafts[:2], 9])  # two kept, the rest cropped
    old.commit(2, [*drafts[:2], 9])
    assert new.cached_len == old.cached_len == len(new.committed) - 1
    assert np.array_equal(new.score([5, 6]), old.score([5, 6]))


def test_a_tree_as_the_first_round_scores_the_prompts_last_token_again(target: TargetModel) -> None:
    prompt = _prompt(40, 7)
    tokens, parents = [11, 12, 13, 14], [-1, 0, -1, 2]
    new, old = target.new_session(prompt), _old_layout(target, prompt)
    assert np.array_equal(new.score_tree(tokens, parents), old.score_tree(tokens, parents))
    new.commit_path([2, 3], [13, 14, 20])
    old.commit_path([2, 3], [13, 14, 20])
    assert new.cached_len == old.cached_len == len(new.committed) - 1
    assert np.array_equal(new.score(()), old.score(()))


def test_a_prefix_reused_up_to_the_last_token_still_answers_round_one_from_the_prefill(target: TargetModel) -> None:
    prompt = _prompt(50, 3)
    source = target.new_session(prompt)
    source.score(())
    source.commit(0, [17])
    reused = target.new_session(prompt, prefix=(source, len(prompt)))
    assert reused.reused == len(prompt) - 1 and reused.prefilled == 0
    passes = reused.forwards
    assert np.array_equal(reused.score(()), target.new_session(prompt).score(()))
    assert reused.forwards == passes
