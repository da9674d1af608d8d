"""Draft trees in the batched engine, on the tiny random target: every node gets the bits the same
token gets at the same position in a chain pass over its root-to-node path, whatever the tree's
shape and whatever else shares the pass; `KVCache.accept` leaves the cache a chain pass over the
accepted path would have left; greedy tree rounds decode exactly as the target alone.

Real parts: the tiny Qwen2 target (random weights) loaded with transformers, the real engine and
autotune, `tandem_core.tree`'s greedy verification. No fakes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_node import autotune
from cloud_node.engine import Engine, KVCache, Rows, TilePlan
from cloud_node.scorer import tune_weights
from tandem_core.tree import DraftTree, verify_tree_greedy

# Tree shapes in tandem_core's convention (parent -1: a child of the root, the last committed token).
SHAPES = {
    "chain": [-1, 0, 1, 2, 3, 4],
    "wide root": [-1] * 9,
    "deep branch": [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 2, 12, 13, 14, 15, 16, 5, 18],
    "mixed": [-1, -1, -1, 0, 0, 1, 3, 3, 4, 6, 6, 9, 10, 11, 12, 13, 14, 15, 2, 18, 18, 7, 21],
}
PREFIX_LENS = (3, 13, 61, 130)  # the root and the nodes cross key blocks of 8, 32 and 64


def _ids(seed: int, n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, 250, n)]


def _model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _plans(model) -> list[TilePlan]:
    """The first plan the autotune finds invariant here, and fixed padded tiles of two sizes
    (short query tiles and key blocks, so that segments span several tiles and blocks)."""
    found = autotune.candidates(tune_weights(model))
    assert found, "no tile plan passed the invariance checks on this CPU"
    return [found[0], TilePlan(rows=16, min_rows=16, pad=True, att_rows=2, key_block=8),
            TilePlan(rows=16, min_rows=16, pad=True, att_rows=8, key_block=32)]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def engines(request, tiny_models) -> list[Engine]:
    model = _model(tiny_models.target_hf, request.param)
    return [Engine(model, plan) for plan in _plans(model)]


def _prefilled(engine: Engine, ids: list[int]) -> KVCache:
    cache = engine.new_cache()
    engine.forward([Rows(cache, ids, 0)])
    return cache


def _copy(engine: Engine, source: KVCache) -> KVCache:
    cache = engine.new_cache()
    cache.copy_prefix_from(source, source.length)
    return cache


def _tree(shape: str, seed: int) -> DraftTree:
    """Random tokens on the shape; siblings distinct."""
    parents = SHAPES[shape]
    rng = np.random.default_rng(seed)
    tokens: list[int] = []
    for i, a in enumerate(parents):
        taken = {tokens[j] for j in range(i) if parents[j] == a}
        tokens.append(next(t for t in (int(x) for x in rng.integers(3, 250, 50)) if t not in taken))
    return DraftTree(tuple(tokens), tuple(parents))


def _chain_rows(engine: Engine, prefix: KVCache, root: int, tree: DraftTree) -> np.ndarray:
    """(n + 1, V): row 0 after the root, row 1 + i after node i, each from a chain pass over
    [root, *node i's path] alone (one pass per leaf gives every node on its path)."""
    out = np.full((len(tree) + 1, engine.vocab_size), np.nan, np.float32)
    leaves = [i for i in range(len(tree)) if not tree.children(i)] or [-1]
    for leaf in leaves:
        path = tree.paths[leaf] if leaf >= 0 else ()
        got = engine.forward([Rows(_copy(engine, prefix), [root, *tree.path_tokens(leaf)], len(path) + 1)])[0]
        out[[0, *(1 + i for i in path)]] = got
    return out


def _strangers(engine: Engine, rng: np.random.Generator) -> list[Rows]:
    """Other sessions' rows in the same pass: verification rounds, a prefill chunk, a second tree."""
    def seed() -> int:
        return int(rng.integers(1 << 30))

    caches = [engine.new_cache() for _ in range(4)]
    engine.forward([Rows(c, _ids(seed(), int(rng.integers(1, 70))), 0) for c in caches])
    rows = [Rows(c, _ids(seed(), int(rng.integers(1, 6))), int(rng.integers(0, 3))) for c in caches[:3]]
    rows.append(Rows(engine.new_cache(), _ids(seed(), 37), 0))  # a prefill chunk
    other = _tree("mixed", seed())
    rows.append(Rows.for_tree(caches[3], 5, other.tokens, other.parents))
    return rows


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_node_gets_the_bits_of_a_chain_pass_over_its_path(engines, shape: str) -> None:
    rng = np.random.default_rng(1)
    for engine in engines:
        for n_prefix in PREFIX_LENS:
            prefix = _prefilled(engine, _ids(n_prefix, n_prefix))
            tree, root = _tree(shape, n_prefix), 17
            want = _chain_rows(engine, prefix, root, tree)
            alone = engine.forward([Rows.for_tree(_copy(engine, prefix), root, tree.tokens, tree.parents)])[0]
            assert np.array_equal(alone, want), (engine.plan, n_prefix)
            mine = Rows.for_tree(_copy(engine, prefix), root, tree.tokens, tree.parents)
            batch = [mine, *_strangers(engine, rng)]
            rng.shuffle(batch)
            got = engine.forward(batch)[batch.index(mine)]
            assert np.array_equal(got, want), (engine.plan, n_prefix)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_accept_leaves_the_cache_a_chain_pass_over_the_path_would(engines, shape: str) -> None:
    rng = np.random.default_rng(2)
    for engine in engines:
        prefix = _prefilled(engine, _ids(4, 29))
        tree, root, after = _tree(shape, 5), 23, _ids(6, 11)
        for leaf in (-1, 0, len(tree) - 1, max(range(len(tree)), key=lambda i: tree.depths[i])):
            path = tree.paths[leaf] if leaf >= 0 else ()
            chain = _copy(engine, prefix)
            engine.forward([Rows(chain, [root, *tree.path_tokens(leaf)], 0)])
            want = engine.forward([Rows(chain, after, len(after))])[0]
            cache = _copy(engine, prefix)
            batch = [Rows.for_tree(cache, root, tree.tokens, tree.parents), *_strangers(engine, rng)]
            engine.forward(batch)
            cache.accept([0, *(1 + i for i in path)])
            assert cache.length == chain.length - len(after)
            got = engine.forward([Rows(cache, after, len(after)), *_strangers(engine, rng)])[0]
            assert np.array_equal(got, want), (engine.plan, path)
            for layer in range(engine.layers):  # the K/V themselves, the tokens after included
                assert torch.equal(cache.k[layer][:, :cache.length], chain.k[layer][:, :chain.length])
                assert torch.equal(cache.v[layer][:, :cache.length], chain.v[layer][:, :chain.length])


def test_a_tree_of_engine_rows_may_have_several_roots_and_a_chain_stem(engines) -> None:
    """The engine's own convention: parent -1 is any row right after the cache (a forest)."""
    engine = engines[1]
    prefix = _prefilled(engine, _ids(8, 12))
    ids, parents = _ids(9, 7), [-1, 0, 1, -1, 3, 1, 5]
    got = engine.forward([Rows(_copy(engine, prefix), ids, 7, parents)])[0]
    for node, path in enumerate([[0], [0, 1], [0, 1, 2], [3], [3, 4], [0, 1, 5], [0, 1, 5, 6]]):
        chain = engine.forward([Rows(_copy(engine, prefix), [ids[i] for i in path], 1)])[0][0]
        assert np.array_equal(got[node], chain), node


def test_greedy_tree_rounds_decode_exactly_as_the_target_alone(engines) -> None:
    """Trees hold the target's next token somewhere at most levels (and random tokens around
    it); verify_tree_greedy on the engine's rows, then accept: the output is plain greedy."""
    engine, n_new = engines[0], 40
    prompt = _ids(10, 21)
    cache = _prefilled(engine, prompt[:-1])
    want, last = [], prompt[-1]
    for _ in range(n_new):
        last = int(np.argmax(engine.forward([Rows(cache, [last], 1)])[0][0]))
        want.append(last)
    rng = np.random.default_rng(3)
    cache, got, last = _prefilled(engine, prompt[:-1]), [], prompt[-1]
    while len(got) < n_new:
        tokens, parents, frontier = [], [], [(-1, len(got))]  # (node, index in want it predicts)
        while frontier and len(tokens) < 24:
            node, at = frontier.pop(0)
            kids = {int(t) for t in rng.integers(3, 250, int(rng.integers(1, 4)))}
            if at < n_new and rng.random() < 0.8:
                kids.add(want[at])
            for t in sorted(kids):
                tokens.append(t)
                parents.append(node)
                frontier.append((len(tokens) - 1, at + 1 if at < n_new and t == want[at] else n_new + 1))
        tree = DraftTree(tuple(tokens), tuple(parents))
        logits = engine.forward([Rows.for_tree(cache, last, tree.tokens, tree.parents), *_strangers(engine, rng)])[0]
        verdict = verify_tree_greedy(tree, logits, eos_ids=frozenset(), remaining=n_new - len(got))
        cache.accept([0, *(1 + i for i in verdict.path)])
        got += verdict.verdict.tokens
        last = got[-1]
    assert got == want


def test_misuse_is_refused_with_a_clear_error(engines) -> None:
    engine = engines[1]
    with pytest.raises(ValueError, match="parent"):
        Rows(engine.new_cache(), [1, 2], 2, [-1, 1])
    with pytest.raises(ValueError, match="parents"):
        Rows(engine.new_cache(), [1, 2], 2, [-1])
    assert Rows(engine.new_cache(), [1, 2, 3], 3, [-1, 0, 1]).is_chain
    cache = _prefilled(engine, _ids(11, 6))
    with pytest.raises(ValueError, match="tree pass"):
        cache.accept([0])
    engine.forward([Rows(cache, [4, 5, 6, 7], 4, [-1, 0, 0, 2])])
    with pytest.raises(ValueError, match="pending"):
        engine.forward([Rows(cache, [8], 1)])
    with pytest.raises(ValueError, match="not a root-to-node path"):
        cache.accept([0, 1, 3])
    with pytest.raises(ValueError, match="crop to 8 of 6"):
        cache.crop(8)
    with pytest.raises(ValueError, match="prefix of 8"):
        engine.new_cache().copy_prefix_from(cache, 8)
    cache.crop(6)  # drops the tree, as a rejected chain round is cropped
    fresh = _prefilled(engine, _ids(11, 6))
    assert np.array_equal(engine.forward([Rows(cache, [8], 1)])[0], engine.forward([Rows(fresh, [8], 1)])[0])
