"""Draft trees (`tandem_core.tree`): the representation, its validation, and greedy verification.

Greedy trees must reproduce the target's own greedy decoding exactly, whatever the tree: the
loop below runs whole answers with trees of several shapes (a chain, best-first trees from a
drafter, trees sampled from a drafter, random trees, the target drafting for itself) over a fake
context-dependent target and drafter on an 8-token vocabulary, and compares every token and the
finish reason with plain greedy decoding of the target. A property test over random trees checks
that a round accepts exactly the longest path of the tree that the target's greedy tokens follow.
Statistical tests of the sampling mode are in `test_tree_sampling_fake_models.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem_core.sampling import DRAFTER_STREAM, round_rng
from tandem_core.tree import (
    MAX_TREE_DEPTH,
    MAX_TREE_NODES,
    DraftTree,
    greedy_tree,
    sample_tree,
    verify_tree_greedy,
)
from tandem_core.verify import FinishReason, verify_greedy
from tests.support.fuzz import fuzz, timeout_s

QUICK = 200
NO_EOS: frozenset[int] = frozenset()

# --- fake models: logits depend on the last two tokens and the length mod 3 ------------------

V = 8
_TARGET = np.random.default_rng(15).normal(0.0, 1.0, size=(3, V, V, V))
_NOISE = np.random.default_rng(16).normal(0.0, 0.7, size=(3, V, V, V))
# Integer logits over 4 tokens for the property tests: many ties, which go to the lower id.
V_SMALL = 4
_TARGET_TIES = np.random.default_rng(17).integers(-2, 3, size=(3, V_SMALL, V_SMALL)).astype(np.float32)


def fake_target_logits(context: Sequence[int]) -> np.ndarray:
    return _TARGET[len(context) % 3, context[-2], context[-1]]


def fake_drafter_logits(context: Sequence[int]) -> np.ndarray:
    return _TARGET[len(context) % 3, context[-2], context[-1]] + _NOISE[len(context) % 3, context[-2], context[-1]]


def fake_tied_target_logits(context: Sequence[int]) -> np.ndarray:
    return _TARGET_TIES[len(context) % 3, context[-1]]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def target_greedy(logits: Callable[[Sequence[int]], np.ndarray], context: Sequence[int], n: int,
                  eos_ids: frozenset[int] = NO_EOS) -> list[int]:
    """The target's own greedy tokens: n of them, or up to and including the first EOS."""
    out: list[int] = []
    while len(out) < n and not (out and out[-1] in eos_ids):
        out.append(int(np.argmax(logits([*context, *out]))))
    return out


def target_rows(logits: Callable[[Sequence[int]], np.ndarray], context: Sequence[int], tree: DraftTree) -> np.ndarray:
    """(n + 1, V): the target after the context, then after each node's path (one tree pass)."""
    return np.stack([logits([*context, *tree.path_tokens(i)]) for i in range(-1, len(tree))])


Builder = Callable[[tuple[int, ...], int], DraftTree]  # (context, remaining) -> tree


def tree_generate(build: Builder, prompt: Sequence[int], n: int,
                  eos_ids: frozenset[int] = NO_EOS) -> tuple[list[int], FinishReason | None]:
    """A whole answer in tree rounds; checks each round's path against its tokens."""
    committed, out = list(prompt), []
    while True:
        tree = build(tuple(committed), n - len(out))
        result = verify_tree_greedy(tree, target_rows(fake_target_logits, committed, tree), eos_ids=eos_ids,
                                    remaining=n - len(out))
        verdict = result.verdict
        assert len(result.path) == verdict.accepted
        assert [tree.tokens[i] for i in result.path] == list(verdict.tokens[: verdict.accepted])
        assert all(tree.parents[b] == a for a, b in zip((-1, *result.path), result.path))
        out += verdict.tokens
        committed += verdict.tokens
        if verdict.finished:
            return out, verdict.finish_reason


def random_tree(rng: np.random.Generator, n: int, vocab: int = V) -> DraftTree:
    """n nodes, each under a random earlier node (or the root) with room for it."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    for i in range(n):
        open_parents = [a for a in range(-1, i) if parents.count(a) < vocab and (a < 0 or depths[a] + 1 < MAX_TREE_DEPTH)]
        a = open_parents[int(rng.integers(len(open_parents)))]
        used = {tokens[c] for c in range(i) if parents[c] == a}
        tokens.append(int(rng.choice([t for t in range(vocab) if t not in used])))
        parents.append(a)
        depths.append(0 if a < 0 else depths[a] + 1)
    return DraftTree(tuple(tokens), tuple(parents))


def _chain_builder(k: int) -> Builder:
    def build(context: tuple[int, ...], remaining: int) -> DraftTree:
        tokens = target_greedy(fake_drafter_logits, context, min(k, remaining - 1))
        return DraftTree.chain(tokens)
    return build


def _best_first_builder(max_nodes: int, width: int) -> Builder:
    def build(context: tuple[int, ...], remaining: int) -> DraftTree:
        return greedy_tree(lambda path: softmax(fake_drafter_logits([*context, *path])), max_nodes=max_nodes,
                           width=width, max_depth=max(1, min(8, remaining - 1)))
    return build


def _sampled_builder(widths: tuple[int, ...]) -> Builder:
    def build(context: tuple[int, ...], remaining: int) -> DraftTree:
        return sample_tree(lambda path: softmax(fake_drafter_logits([*context, *path])), widths,
                           lambda d: round_rng(7, DRAFTER_STREAM, len(context) + d))
    return build


def _random_builder(n: int) -> Builder:
    def build(context: tuple[int, ...], remaining: int) -> DraftTree:
        return random_tree(np.random.default_rng(len(context)), n)
    return build


def _self_builder(context: tuple[int, ...], remaining: int) -> DraftTree:
    """The target drafting for itself: the best-first tree holds the target's greedy path."""
    return greedy_tree(lambda path: softmax(fake_target_logits([*context, *path])), max_nodes=10, width=2, max_depth=5)


# --- representation -------------------------------------------------------------------------

#        0   1   2   3   4   5
TOKENS = (5, 2, 7, 5, 1, 2)
PARENTS = (-1, -1, 0, 0, 1, 3)


def test_depths_paths_children_groups() -> None:
    tree = DraftTree(TOKENS, PARENTS)
    assert tree.depths == (0, 0, 1, 1, 1, 2)
    assert tree.paths == ((0,), (1,), (0, 2), (0, 3), (1, 4), (0, 3, 5))
    assert tree.path_tokens(5) == (5, 5, 2) and tree.path_tokens(-1) == ()
    assert tree.children(-1) == (0, 1) and tree.children(0) == (2, 3) and tree.children(2) == ()
    assert tree.groups == (-1, 0, 1, 3)
    assert not tree.is_chain and len(tree) == 6


def test_ancestor_mask() -> None:
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [1, 0, 0, 1, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(DraftTree(TOKENS, PARENTS).ancestor_mask(), expected)
    assert DraftTree((), ()).ancestor_mask().shape == (0, 0)


def test_a_chain_is_the_linear_draft() -> None:
    chain = DraftTree.chain([4, 4, 1, 0])
    assert chain.parents == (-1, 0, 1, 2) and chain.is_chain and chain.depths == (0, 1, 2, 3)
    np.testing.assert_array_equal(chain.ancestor_mask(), np.tril(np.ones((4, 4), dtype=bool)))
    assert chain.groups == (-1, 0, 1, 2)  # one q row per drafted token, as the linear (k, V) q
    assert DraftTree((4, 4, 1, 0), (-1, 0, 1, 2)) == chain


def test_chain_q_rows_are_the_linear_q() -> None:
    q = np.random.default_rng(0).dirichlet(np.ones(V), size=3)
    chain = DraftTree.chain([1, 2, 3], q)
    assert chain.groups == (-1, 0, 1)
    np.testing.assert_array_equal(chain.q, q)


Q_OK = np.full((1, 4), 0.25)


@pytest.mark.parametrize(
    ("tokens", "parents", "q", "match"),
    [
        ((1, 2), (-1,), None, "equal length"),
        ((1, 2), (-1, 1), None, "parent must be"),
        ((1, 2), (-1, 2), None, "parent must be"),
        ((1,), (-2,), None, "parent must be"),
        ((3, 3), (-1, -1), None, "distinct"),
        ((1, 2, 1), (-1, 0, 0), None, None),  # the same token under different parents is fine
        ((-1,), (-1,), None, "token ids"),
        (tuple(range(MAX_TREE_NODES + 1)), (-1,) * (MAX_TREE_NODES + 1), None, "at most 64 nodes"),
        ((0,) * MAX_TREE_DEPTH, tuple(range(-1, MAX_TREE_DEPTH - 1)), None, None),
        ((0,) * (MAX_TREE_DEPTH + 1), tuple(range(-1, MAX_TREE_DEPTH)), None, "at most 16 tokens"),
        ((1, 2), (-1, -1), Q_OK, None),
        ((1, 2), (-1, 0), Q_OK, r"q must be \(2, V\)"),
        ((1,), (-1,), np.full((1, 4), 0.2), "sum"),
        ((1,), (-1,), np.array([[0.5, 0.5, np.nan, 0.0]]), "sum"),
        ((1,), (-1,), np.array([[1.5, -0.5, 0.0, 0.0]]), "non-negative"),
        ((2,), (-1,), np.array([[0.5, 0.5, 0.0, 0.0]]), "q = 0"),
        ((4,), (-1,), Q_OK, "outside the vocabulary"),
    ],
)
def test_validation(tokens: tuple[int, ...], parents: tuple[int, ...], q: np.ndarray | None, match: str | None) -> None:
    if match is None:
        DraftTree(tokens, parents, q)
    else:
        with pytest.raises(ValueError, match=match):
            DraftTree(tokens, parents, q)


def test_rows_must_match_the_tree() -> None:
    tree = DraftTree(TOKENS, PARENTS)
    with pytest.raises(ValueError, match=r"\(7, V\)"):
        verify_tree_greedy(tree, np.zeros((6, V)), eos_ids=NO_EOS, remaining=9)
    with pytest.raises(ValueError, match="token ids"):
        verify_tree_greedy(tree, np.zeros((7, 6)), eos_ids=NO_EOS, remaining=9)
    with pytest.raises(ValueError, match="NaN"):
        verify_tree_greedy(tree, np.full((7, V), np.nan), eos_ids=NO_EOS, remaining=9)


# --- greedy verification --------------------------------------------------------------------

BUILDERS = {
    "chain-4": _chain_builder(4),
    "best-first-12x3": _best_first_builder(12, 3),
    "best-first-40x4": _best_first_builder(40, 4),
    "sampled-3-2-1": _sampled_builder((3, 2, 1)),
    "random-20": _random_builder(20),
    "empty": lambda context, remaining: DraftTree((), ()),
    "target-itself": _self_builder,
}


@pytest.mark.parametrize("name", BUILDERS)
def test_tree_rounds_give_the_target_greedy_tokens_with_fake_models(name: str) -> None:
    for prompt in [(0, 1), (3, 3), (7, 2, 5)]:
        for n in (1, 5, 23):
            tokens, reason = tree_generate(BUILDERS[name], prompt, n)
            assert tokens == target_greedy(fake_target_logits, prompt, n), (prompt, n)
            assert reason is FinishReason.LENGTH


@pytest.mark.parametrize("name", ["best-first-12x3", "random-20", "target-itself"])
def test_tree_rounds_stop_at_the_targets_eos_with_fake_models(name: str) -> None:
    prompt = (0, 1)
    reference = target_greedy(fake_target_logits, prompt, 30)
    eos = reference[9]  # a token the target emits at step 10 (maybe earlier too)
    expected = reference[: reference.index(eos) + 1]
    tokens, reason = tree_generate(BUILDERS[name], prompt, 30, eos_ids=frozenset({eos}))
    assert tokens == expected and reason is FinishReason.STOP


def test_trees_save_target_passes_with_fake_models() -> None:
    """Not a correctness check: wider trees accept more per round on this drafter."""
    def rounds(build: Builder) -> int:
        count, committed = 0, [0, 1]
        while len(committed) < 42:
            tree = build(tuple(committed), 99)
            committed += verify_tree_greedy(tree, target_rows(fake_target_logits, committed, tree), eos_ids=NO_EOS,
                                            remaining=99).verdict.tokens
            count += 1
        return count
    chain = rounds(_chain_builder(4))  # 16 rounds for 40 tokens
    assert rounds(_best_first_builder(24, 3)) < chain and rounds(_self_builder) < chain  # 12 and 10


def test_a_tree_holding_the_targets_path_accepts_its_full_depth_with_fake_models() -> None:
    rng = np.random.default_rng(3)
    for trial in range(40):
        context = tuple(int(t) for t in rng.integers(0, V, size=3))
        depth = int(rng.integers(1, MAX_TREE_DEPTH + 1))
        path = target_greedy(fake_target_logits, context, depth + 1)
        base = random_tree(rng, int(rng.integers(0, MAX_TREE_NODES - MAX_TREE_DEPTH + 1)))
        tree = _graft(base, path[:depth], rng)
        result = verify_tree_greedy(tree, target_rows(fake_target_logits, context, tree), eos_ids=NO_EOS, remaining=99)
        assert result.verdict.accepted == depth, trial
        assert list(result.verdict.tokens) == path
        assert tree.path_tokens(result.path[-1]) == tuple(path[:depth])


def _graft(tree: DraftTree, path: Sequence[int], rng: np.random.Generator) -> DraftTree:
    """`tree` with `path` added from the root (reusing the nodes that already spell a prefix of it),
    each new node inserted at a random place after its parent."""
    tokens, parents = list(tree.tokens), list(tree.parents)
    node = -1
    for t in path:
        existing = next((c for c in range(len(tokens)) if parents[c] == node and tokens[c] == t), None)
        if existing is not None:
            node = existing
            continue
        at = int(rng.integers(node + 1, len(tokens) + 1))
        parents = [a + 1 if a >= at else a for a in parents]
        tokens.insert(at, t)
        parents.insert(at, node)
        node = at
    return DraftTree(tuple(tokens), tuple(parents))


@st.composite
def trees(draw: st.DrawFn, vocab: int = V_SMALL, max_nodes: int = 24) -> DraftTree:
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    for i in range(draw(st.integers(0, max_nodes))):
        open_parents = [a for a in range(-1, i) if parents.count(a) < vocab and (a < 0 or depths[a] + 1 < MAX_TREE_DEPTH)]
        a = draw(st.sampled_from(open_parents))
        used = {tokens[c] for c in range(i) if parents[c] == a}
        tokens.append(draw(st.sampled_from([t for t in range(vocab) if t not in used])))
        parents.append(a)
        depths.append(0 if a < 0 else depths[a] + 1)
    return DraftTree(tuple(tokens), tuple(parents))


@pytest.mark.timeout(timeout_s(30, QUICK))
@fuzz(QUICK)
@given(tree=trees(), context=st.lists(st.integers(0, V_SMALL - 1), min_size=2, max_size=4),
       remaining=st.integers(1, 20), eos=st.sampled_from([None, 0, 3]))
def test_fuzz_a_round_accepts_the_longest_path_the_target_follows_with_fake_models(
        tree: DraftTree, context: list[int], remaining: int, eos: int | None) -> None:
    eos_ids = frozenset() if eos is None else frozenset({eos})
    result = verify_tree_greedy(tree, target_rows(fake_tied_target_logits, context, tree), eos_ids=eos_ids,
                                remaining=remaining)
    greedy = target_greedy(fake_tied_target_logits, context, MAX_TREE_DEPTH + 1)
    # The longest root path whose tokens the target's greedy decoding spells, found independently.
    longest = max([len(p) for p in tree.paths if [tree.tokens[i] for i in p] == greedy[: len(p)]], default=0)
    expected = target_greedy(fake_tied_target_logits, context, min(longest + 1, remaining), eos_ids)
    assert list(result.verdict.tokens) == expected
    assert result.verdict.accepted == min(longest, len(expected))
    assert result.verdict.finished == (len(expected) == remaining or expected[-1] in eos_ids)


@fuzz(QUICK)
@given(tokens=st.lists(st.integers(0, V_SMALL - 1), max_size=MAX_TREE_DEPTH),
       seed=st.integers(0, 2**32 - 1), remaining=st.integers(1, 20), eos=st.sampled_from([None, 0, 3]))
def test_fuzz_a_chain_verifies_as_the_linear_draft(tokens: list[int], seed: int, remaining: int, eos: int | None) -> None:
    logits = np.random.default_rng(seed).integers(-1, 2, size=(len(tokens) + 1, V_SMALL)).astype(np.float32)
    eos_ids = frozenset() if eos is None else frozenset({eos})
    result = verify_tree_greedy(DraftTree.chain(tokens), logits, eos_ids=eos_ids, remaining=remaining)
    assert result.verdict == verify_greedy(tokens, logits, eos_ids=eos_ids, remaining=remaining)
    assert result.path == tuple(range(result.verdict.accepted))


@fuzz(QUICK)
@given(tree=trees(vocab=3, max_nodes=MAX_TREE_NODES))
def test_fuzz_mask_and_paths_agree(tree: DraftTree) -> None:
    mask = tree.ancestor_mask()
    for i, path in enumerate(tree.paths):
        assert set(np.flatnonzero(mask[i]).tolist()) == set(path)
        assert len(path) == tree.depths[i] + 1 and path[-1] == i
        assert all(tree.parents[b] == a for a, b in zip((-1, *path), path))


# --- the drafter's builders -----------------------------------------------------------------

def test_greedy_tree_is_a_chain_where_the_drafter_is_sure_and_branches_where_it_hesitates() -> None:
    def q_fn(path: tuple[int, ...]) -> np.ndarray:
        q = np.full(V, 0.01)
        if len(path) == 1:  # unsure after the first token: two candidates of 0.45
            q[[3, 6]] = 0.45
        else:
            q[len(path) % V] = 1.0 - 0.07
        return q / q.sum()
    # Path probabilities: 0 (0.93); then 3 and 6 (0.436 each); then 2 under each (0.405); then
    # 3 under those (0.377); the root's runners-up are 0.01.
    tree = greedy_tree(q_fn, max_nodes=5, width=3)
    assert tree.tokens == (0, 3, 6, 2, 2)
    assert tree.parents == (-1, 0, 0, 1, 2)
    assert greedy_tree(q_fn, max_nodes=MAX_TREE_NODES, width=3, min_prob=0.4) == tree
    assert greedy_tree(q_fn, max_nodes=3, width=3).tokens == (0, 3, 6)
    assert greedy_tree(q_fn, max_nodes=20, width=1).is_chain
    assert greedy_tree(q_fn, max_nodes=0).tokens == ()


def test_greedy_tree_bounds() -> None:
    def q_fn(path: tuple[int, ...]) -> np.ndarray:
        return softmax(fake_drafter_logits([0, 1, *path]))
    tree = greedy_tree(q_fn, max_nodes=MAX_TREE_NODES, width=V, max_depth=3)
    assert len(tree) == MAX_TREE_NODES and max(tree.depths) == 2
    for bad in [dict(max_nodes=MAX_TREE_NODES + 1), dict(max_nodes=4, max_depth=MAX_TREE_DEPTH + 1),
                dict(max_nodes=4, width=0)]:
        with pytest.raises(ValueError):
            greedy_tree(q_fn, **bad)


def test_sample_tree_shape_and_q_rows() -> None:
    def q_fn(path: tuple[int, ...]) -> np.ndarray:
        q = np.zeros(V)
        q[: 2 + len(path)] = 2.0  # unnormalized on purpose: 2, then 3, then 4 tokens with mass
        return q
    tree = sample_tree(q_fn, (3, 4, 1), lambda d: np.random.default_rng(d))
    assert tree.depths == (0, 0) + (1,) * 6 + (2,) * 6  # root: 2 of 3 asked; then 3 each; then 1 each
    assert tree.parents == (-1, -1, 0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7)
    assert tree.q is not None and tree.q.shape == (len(tree.groups), V)
    for g, a in enumerate(tree.groups):
        np.testing.assert_allclose(tree.q[g], q_fn(tree.path_tokens(a)) / q_fn(tree.path_tokens(a)).sum())
    with pytest.raises(ValueError, match="more than 64"):
        sample_tree(q_fn, (4, 4, 4), lambda d: np.random.default_rng(d))
    assert sample_tree(q_fn, (), lambda d: np.random.default_rng(d)) == DraftTree((), ())
