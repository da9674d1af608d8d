"""The cloud's checks of a tree round (`cloud_node.validation`), without a model: every malformed
tree is a BadRequest naming the field and the problem; drafts deeper than max_draft_len or past
the context are dropped with their subtrees and the q rows of the groups they empty; what remains
is the `Draft` the verifier runs (a chain when it is one), and it is a valid `DraftTree`."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_node.errors import BadRequest
from cloud_node.validation import Checker, DraftRound
from tandem_core.sampling import SamplingParams
from tandem_core.tree import MAX_TREE_NODES, DraftTree

CHECK = Checker(vocab=100, max_context=64, max_draft_len=4, max_new_tokens=16, eos_ids=frozenset({2}),
                model_name="tiny")
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0)
# A tree in the wire's convention (parent + 1): root -> 10, 11; 10 -> 12 -> 13 -> 14 -> 15; 11 -> 16.
TOKENS = (10, 11, 12, 13, 14, 15, 16)
WIRE = (0, 0, 1, 3, 4, 5, 2)
GROUPS = (-1, 0, 1, 2, 3, 4)  # the root and each draft with children, ascending


def _rows(groups: int = len(GROUPS)) -> tuple:
    """One q row per group, every token of the vocabulary with mass (so every child has some)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(groups):
        p = rng.random(100) + 0.01
        rows.append((tuple(range(100)), tuple(p / p.sum())))
    return tuple(rows)


def test_a_tree_round_is_checked_and_becomes_a_tree_draft() -> None:
    draft = CHECK.draft(DraftRound(0, TOKENS[:3], draft_parents=(0, 0, 1)), GREEDY, position=5)
    assert (draft.tokens, draft.parents, draft.q) == ((10, 11, 12), (-1, -1, 0), None)
    sampled = CHECK.draft(DraftRound(0, TOKENS[:3], _rows(2), draft_parents=(0, 0, 1)), SAMPLED, position=5)
    assert sampled.q is not None and sampled.q.shape == (2, 100) and np.allclose(sampled.q.sum(axis=1), 1)
    assert len(sampled.tree().groups) == 2  # a valid DraftTree with its q


def test_a_chain_round_is_unchanged() -> None:
    draft = CHECK.draft(DraftRound(0, (5, 6, 7)), GREEDY, position=5)
    assert (draft.tokens, draft.parents, draft.q) == ((5, 6, 7), None, None)


def test_drafts_past_max_draft_len_and_the_context_go_with_their_subtrees_and_their_groups_rows() -> None:
    draft = CHECK.draft(DraftRound(0, TOKENS, _rows(), draft_parents=WIRE), SAMPLED, position=5)
    # max_draft_len 4: depth 0..3 stay (10, 11, 12, 16, 13, 14); 15 at depth 4 goes.
    assert draft.tokens == (10, 11, 12, 13, 14, 16) and draft.parents == (-1, -1, 0, 2, 3, 1)
    assert draft.q is not None and np.array_equal(draft.q, np.asarray(
        CHECK.tree_q(_rows(), list(TOKENS), [a - 1 for a in WIRE], list(GROUPS), SAMPLED))[:5])  # group 4 emptied
    DraftTree(draft.tokens, draft.parents, draft.q)  # well formed
    near_end = CHECK.draft(DraftRound(0, TOKENS, _rows(), draft_parents=WIRE), SAMPLED, position=61)
    assert near_end.tokens == (10, 11, 12, 16) and near_end.parents == (-1, -1, 0, 1)  # room for 2 drafts
    assert near_end.q is not None and near_end.q.shape == (3, 100)
    one = CHECK.draft(DraftRound(0, TOKENS, _rows(), draft_parents=WIRE), SAMPLED, position=62)
    assert one.tokens == (10, 11) and one.parents == (-1, -1) and one.q is not None and one.q.shape == (1, 100)
    none = CHECK.draft(DraftRound(0, TOKENS, draft_parents=WIRE), GREEDY, position=63)
    assert none.tokens == () and none.parents is None  # nothing left: the chain of no drafts


def test_what_remains_a_chain_is_verified_as_one() -> None:
    # root -> 10 -> 11 -> 12 -> 13 -> {14, 15}: cut at depth 4, a chain remains.
    rows = _rows(5)
    draft = CHECK.draft(DraftRound(0, (10, 11, 12, 13, 14, 15), rows, draft_parents=(0, 1, 2, 3, 4, 4)),
                        SAMPLED, position=5)
    assert draft.parents is None and draft.tokens == (10, 11, 12, 13)
    assert draft.q is not None and draft.q.shape == (4, 100)  # the chain's linear q: one row per draft


MALFORMED = {
    "length_mismatch": (DraftRound(0, (10, 11), draft_parents=(0,)), GREEDY, "draft_parents: 1 entries for 2"),
    "parent_not_earlier": (DraftRound(0, (10, 11), draft_parents=(0, 2)), GREEDY, r"draft_parents\[1\]"),
    "self_parent": (DraftRound(0, (10,), draft_parents=(1,)), GREEDY, r"draft_parents\[0\]"),
    "duplicate_siblings": (DraftRound(0, (10, 11, 10), draft_parents=(0, 0, 0)), GREEDY, "sibling"),
    "too_many_nodes": (DraftRound(0, tuple(range(3, 4 + MAX_TREE_NODES)), draft_parents=(0,) * (MAX_TREE_NODES + 1)),
                       GREEDY, "max_tree_nodes"),
    "path_too_deep": (DraftRound(0, tuple(range(10, 27)), draft_parents=tuple(range(17))), GREEDY, "exceeds the"),
    "outside_vocab": (DraftRound(0, (10, 100), draft_parents=(0, 1)), GREEDY, "draft_tokens"),
    "q_rows_in_greedy": (DraftRound(0, (10,), (((10,), (1.0,)),), draft_parents=(0,)), GREEDY, "q_rows"),
    "q_rows_per_draft_not_per_group": (DraftRound(0, (10, 11, 12), _rows(3), draft_parents=(0, 0, 1)), SAMPLED,
                                       "2 sibling groups"),
    "child_with_no_mass": (DraftRound(0, (10, 11), (((10, 12), (0.5, 0.5)),), draft_parents=(0, 0)), SAMPLED,
                           r"q_rows\[0\]: draft 1 has probability 0"),
    "bad_q_row": (DraftRound(0, (10,), (((10,), (0.5,)),), draft_parents=(0,)), SAMPLED, r"q_rows\[0\]"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_tree_is_a_bad_request_naming_the_problem(case: str) -> None:
    round_, params, needle = MALFORMED[case]
    with pytest.raises(BadRequest, match=needle):
        CHECK.draft(round_, params, position=5)


def test_a_replica_without_trees_refuses_them_and_a_smaller_bound_holds() -> None:
    chains_only = Checker(100, 64, 4, 16, frozenset(), "tiny", max_tree_nodes=0)
    with pytest.raises(BadRequest, match="verifies no trees"):
        chains_only.draft(DraftRound(0, (10,), draft_parents=(0,)), GREEDY, position=5)
    assert chains_only.draft(DraftRound(0, (10,)), GREEDY, position=5).tokens == (10,)
    small = Checker(100, 64, 4, 16, frozenset(), "tiny", max_tree_nodes=3)
    with pytest.raises(BadRequest, match="max_tree_nodes=3"):
        small.draft(DraftRound(0, (10, 11, 12, 13), draft_parents=(0, 0, 0, 0)), GREEDY, position=5)
    # a tree may hold more drafts than the 16 of a chain (all siblings: shallow)
    wide = CHECK.draft(DraftRound(0, tuple(range(3, 23)), draft_parents=(0,) * 20), GREEDY, position=5)
    assert len(wide.tokens) == 20 and wide.parents == (-1,) * 20


def test_max_tree_nodes_is_a_cloud_knob_flag_env_default_and_checked(tmp_path) -> None:
    import argparse

    from cloud_node.cli import add_cloud_parser, config_from
    from cloud_node.verifier import Limits

    (tmp_path / "config.json").write_text("{}")

    def args(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_cloud_parser(parser.add_subparsers(dest="command"))
        return parser.parse_args(["cloud", "--model-dir", str(tmp_path), *argv])

    assert config_from(args(), {}).limits().max_tree_nodes == MAX_TREE_NODES == Limits().max_tree_nodes
    assert config_from(args(), {"TANDEM_CLOUD_MAX_TREE_NODES": "0"}).limits().max_tree_nodes == 0
    assert config_from(args("--max-tree-nodes", "8"), {"TANDEM_CLOUD_MAX_TREE_NODES": "0"}).max_tree_nodes == 8
    for bad in ("-1", str(MAX_TREE_NODES + 1)):
        with pytest.raises(ValueError, match="^max_tree_nodes:"):
            config_from(args("--max-tree-nodes", bad), {})
    with pytest.raises(ValueError, match="max_tree_nodes"):
        Limits(max_tree_nodes=MAX_TREE_NODES + 1)
