"""`ScorerSession.score_tree` / `commit_path` on the tiny fp32 target (real engine and batcher, no
fakes): a tree's logits rows are bit-equal to chain passes over each node's path; after
commit_path the cache (every layer's K/V) and the next rounds' logits are bit-equal to those of a
session that scored and committed the accepted path as a chain; every error path leaves the cache
holding exactly the committed tokens but the last, so the session goes on as if nothing happened.
"""

from __future__ import annotations

import numpy as np
import pytest

from cloud_node.scorer import ScorerSession, TargetModel
from tandem_core.tree import DraftTree
from tests.integration.test_cloud_tree import chain_logits, planted_tree

PROMPT_LENS = (1, 7, 40, 70, 130)  # the root and the nodes cross key blocks of 8, 32 and 64


@pytest.fixture(scope="module")
def target(tiny_models) -> TargetModel:
    return TargetModel(tiny_models.target_hf, dtype="fp32")


def _prompt(n: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, 500, n)]


def _same_cache(a: ScorerSession, b: ScorerSession) -> None:
    assert a.cached_len == b.cached_len == len(a.committed) - 1 and a.committed == b.committed
    assert a.cache.tree is None and b.cache.tree is None
    n = a.cached_len
    for ka, kb, va, vb in zip(a.cache.k, b.cache.k, a.cache.v, b.cache.v, strict=True):
        assert ka[:, :n].equal(kb[:, :n]) and va[:, :n].equal(vb[:, :n])


@pytest.mark.parametrize("prompt_len", PROMPT_LENS)
def test_commit_path_leaves_the_cache_a_chain_round_over_the_path_leaves(target: TargetModel, prompt_len: int) -> None:
    rng = np.random.default_rng(prompt_len)
    prompt = _prompt(prompt_len, prompt_len)
    a, b = target.new_session(prompt), target.new_session(prompt)
    for step in range(4):
        tree = planted_tree(rng, [], int(rng.integers(1, 30)), max_depth=8)
        logits = a.score_tree(tree.tokens, tree.parents)
        assert np.array_equal(logits, chain_logits(target, a.committed, tree, prefix=(a.cache, a.cached_len)))
        node = int(rng.integers(-1, len(tree)))  # -1: nothing accepted
        path = () if node < 0 else tree.paths[node]
        drafts = [tree.tokens[i] for i in path]
        tokens = [*drafts, int(rng.integers(3, 500))]
        a.commit_path(path, tokens)
        b.score(drafts)
        b.commit(len(drafts), tokens)
        _same_cache(a, b)
        chain = [int(x) for x in rng.integers(3, 500, int(rng.integers(0, 6)))]
        assert np.array_equal(a.score(chain), b.score(chain)), step
        a.commit(0, chain[:1] or [7])
        b.commit(0, chain[:1] or [7])
        _same_cache(a, b)


def test_every_error_path_leaves_the_cache_at_the_committed_tokens(target: TargetModel) -> None:
    prompt = _prompt(20, 1)
    a, fresh = target.new_session(prompt), target.new_session(prompt)
    tree = DraftTree((10, 11, 12, 13), (-1, -1, 0, 1))
    want = fresh.score([10, 12])
    fresh.cache.crop(len(prompt) - 1)

    a.score_tree(tree.tokens, tree.parents)
    with pytest.raises(ValueError, match="not a root-to-node path"):
        a.commit_path((0, 3), [10, 13, 5])  # 3 is not a child of 0
    _same_cache(a, fresh)
    a.score_tree(tree.tokens, tree.parents)
    with pytest.raises(ValueError, match="commits"):
        a.commit_path((0, 2), [10])  # too few tokens for the path
    _same_cache(a, fresh)
    a.score_tree(tree.tokens, tree.parents)
    with pytest.raises(ValueError, match="commit_path"):
        a.commit(1, [10, 5])  # a tree's verdict goes through commit_path
    _same_cache(a, fresh)
    with pytest.raises(ValueError, match="needs a score_tree"):
        a.commit_path((), [5])
    with pytest.raises(ValueError, match="parent"):
        a.score_tree([10, 11], [-1, 1])  # malformed: nothing runs
    with pytest.raises(ValueError, match="vocabulary"):
        a.score_tree([10, 10**6], [-1, -1])
    _same_cache(a, fresh)
    a.score_tree(tree.tokens, tree.parents)  # scored, never committed (a failed round) ...
    assert np.array_equal(a.score([10, 12]), want)  # ... the next round drops it
    a.cache.crop(len(prompt) - 1)
    a.score_tree(tree.tokens, tree.parents)
    assert np.array_equal(a.score_tree((10, 12), (-1, 0)), want)  # a tree after a pending tree too
