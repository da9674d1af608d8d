"""Where a chain gets siblings (`tandem_core.branching`): the plan, the tree it builds, what it learns.

Pure functions, table-tested: the same inputs give the same plan; siblings go where the drafter
hesitates early in the chain, never past the node budget, never when a row costs more than the
token it may win; ranks enter in order at each depth; the tree is a valid `DraftTree` whose q
rows are the chain's; and in sampling mode no alternative's own draw decides whether it goes in.
"""

from __future__ import annotations

import numpy as np
import pytest

from tandem_core.branching import (
    Alternatives,
    Branching,
    SiblingRate,
    greedy_alternatives,
    plan,
    sampled_alternatives,
    sibling_outcome,
    with_siblings,
)
from tandem_core.loop import Draft
from tandem_core.sampling import DRAFTER_STREAM, round_rng
from tandem_core.tree import DraftTree, sample_without_replacement, verify_tree_greedy


def alt(p_chain: float, *masses: float) -> Alternatives:
    return Alternatives(p_chain, tuple(range(100, 100 + len(masses))), masses)


SURE, UNSURE = alt(0.98, 0.5, 0.3), alt(0.4, 0.5, 0.3, 0.1)


@pytest.mark.parametrize(("alts", "row_s", "max_nodes", "counts"), [
    ((SURE, SURE, SURE), 0.01, 64, (0, 0, 0)),          # sure everywhere: nothing worth a row
    ((UNSURE, SURE, SURE), 0.01, 64, (2, 0, 0)),        # hesitant first position: the alternatives worth a row
    ((UNSURE, UNSURE, UNSURE), 0.01, 5, (2, 0, 0)),     # the budget (chain included) takes the best first
    ((UNSURE, UNSURE, UNSURE), 10.0, 64, (0, 0, 0)),    # a row costs more than any token it may win
    ((SURE, UNSURE, UNSURE), 0.01, 64, (0, 2, 1)),      # deeper depths are reached less often
])
def test_plans_follow_the_gain_per_row(alts: tuple[Alternatives, ...], row_s: float, max_nodes: int,
                                       counts: tuple[int, ...]) -> None:
    chosen = plan(alts, rho=1.0, scale=1.0, row_s=row_s, token_s=0.1, max_nodes=max_nodes)
    assert chosen.counts == counts
    assert chosen == plan(alts, rho=1.0, scale=1.0, row_s=row_s, token_s=0.1, max_nodes=max_nodes)
    assert chosen.nodes + len(alts) <= max_nodes


def test_ranks_enter_in_order_even_when_a_later_rank_has_more_mass() -> None:
    odd = Alternatives(0.3, (7, 8), (0.01, 0.9))
    chosen = plan((odd,), rho=1.0, scale=1.0, row_s=0.0001, token_s=0.1, max_nodes=64)
    assert chosen.counts in ((0,), (1,), (2,))
    assert chosen.counts == (2,)  # the second only after the first: a prefix of the draws


def test_with_siblings_builds_a_valid_caterpillar_with_the_chains_q_rows() -> None:
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(12), size=3)
    chain = tuple(int(np.argmax(row)) for row in q)
    alts = [greedy_alternatives(row, t, 3) for row, t in zip(q, chain)]
    draft = with_siblings(Draft(chain, q), alts, (2, 0, 1))
    assert draft.chain == chain and draft.depth == 3
    tree = draft.tree()  # validates: topological order, distinct siblings, q per group, q > 0
    assert len(tree) == 6 and tree.parents == (-1, 0, 1, -1, -1, 1)
    assert tree.groups == (-1, 0, 1) and tree.q is not None and tree.q.shape == (3, 12)
    assert with_siblings(Draft(chain, q), alts, (0, 0, 0)) == Draft(chain, q)


def test_a_verdict_down_a_sibling_keeps_the_chain_up_to_it() -> None:
    alts = [Alternatives(0.5, (9,), (0.5,)), Alternatives(0.5, (8,), (0.5,))]
    draft = with_siblings(Draft((1, 2), None), alts, (0, 1))  # node 2: token 8, sibling of token 2
    logits = np.zeros((4, 12))
    logits[0, 1] = logits[1, 8] = logits[3, 5] = 1.0  # target: 1, then 8 (the sibling), then 5
    verdict = verify_tree_greedy(draft.tree(), logits, eos_ids=frozenset(), remaining=10).verdict
    assert verdict.tokens == (1, 8, 5) and verdict.accepted == 2
    assert draft.kept(verdict) == 1
    assert sibling_outcome(2, ((), (8,)), 1, verdict.tokens) is True
    assert sibling_outcome(2, ((), (7,)), 1, (1, 3)) is False
    assert sibling_outcome(2, ((9,), ()), 1, (1, 3)) is None  # no sibling where it was rejected


def test_sampled_alternatives_do_not_look_at_their_own_draw() -> None:
    q = np.array([0.5, 0.2, 0.2, 0.1])
    a = sampled_alternatives(q, [0, 1, 2])
    b = sampled_alternatives(q, [0, 1, 3])  # the second alternative drawn differently
    c = sampled_alternatives(q, [0, 2, 1])
    assert a.mass == b.mass  # rank 2's mass is set before its draw
    assert a.mass[0] == c.mass[0]  # so is rank 1's
    expected = (0.2 ** 2 + 0.2 ** 2 + 0.1 ** 2) / 0.5 / 0.5
    assert a.mass[0] == pytest.approx(expected)


def test_sampled_alternatives_continue_the_positions_stream() -> None:
    q = np.array([0.1, 0.4, 0.3, 0.2])
    first = sample_without_replacement(q, 1, round_rng(3, DRAFTER_STREAM, 17))
    more = sample_without_replacement(q, 3, round_rng(3, DRAFTER_STREAM, 17))
    assert more[0] == first[0]  # the chain's token is the stream's first draw


def test_the_rates_learn_from_what_verdicts_show() -> None:
    rate = SiblingRate()
    assert rate.rho == rate.scale == 1.0
    for _ in range(20):
        rate.learn_chain((0.9, 0.9, 0.9), 3)  # never rejected where 0.1 each was predicted
        rate.learn(0.5, True)
    assert rate.rho < 0.5 and rate.scale > 1.5


class FakeCosts:
    row_s = 0.001

    def token_s(self, k: int) -> float:
        return 0.1


class FakeModelWithAlternatives:
    def __init__(self, alts: list[Alternatives]) -> None:
        self.alts = alts

    def alternatives(self, draft: Draft, *, ahead: bool = False) -> list[Alternatives]:
        return self.alts[:len(draft.tokens)]


def test_branching_sends_trees_only_within_the_verifiers_room_with_a_fake_model() -> None:
    model = FakeModelWithAlternatives([UNSURE, UNSURE])
    room = [0]
    b = Branching(model, FakeCosts(), lambda: room[0])
    chain = Draft((1, 2), None)
    assert b.branch(chain) == chain  # a verifier that takes no tree
    room[0] = 4
    tree = b.branch(chain)
    assert tree.parents is not None and len(tree.tokens) == 4 and tree.chain == (1, 2)
    b.learn(0, (100, 7))  # rejected at depth 0, where the first alternative (100) was taken
    assert b.rate.hits > b.rate.predicted - 1  # a hit counted
    DraftTree(tree.tokens, tree.parents)  # valid


def test_the_edge_sends_trees_by_default_and_tree_nodes_bounds_or_turns_them_off() -> None:
    import argparse

    from edge_node.config import ENV_PREFIX, EdgeConfig
    from tandem.config import ConfigError, add_flags, load
    from tandem_core.branching import DEFAULT_TREE_NODES

    def config(argv: list[str], environ: dict[str, str]) -> EdgeConfig:
        parser = argparse.ArgumentParser()
        add_flags(parser, EdgeConfig, env_prefix=ENV_PREFIX)
        return load(EdgeConfig, parser.parse_args(argv), environ, env_prefix=ENV_PREFIX)

    assert config([], {}).tree_nodes == DEFAULT_TREE_NODES
    assert config(["--tree-nodes", "0"], {}).tree_nodes == 0
    assert config([], {"TANDEM_EDGE_TREE_NODES": "40"}).tree_nodes == 40
    for bad in ("65", "-1"):
        with pytest.raises(ConfigError, match="tree_nodes"):
            config(["--tree-nodes", bad], {})
