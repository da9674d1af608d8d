"""`check_verdict` with a draft tree (`parents`): every verdict an honest tree verifier gives passes
(greedy and recursive rejection sampling, many random trees), and forged ones fail with the rule
they break, their messages naming positions and counts, never token ids."""

from __future__ import annotations

import numpy as np
import pytest

from tandem_core.tree import DraftTree, sample_tree, verify_tree_greedy, verify_tree_stochastic
from tandem_core.verdict_check import BadVerdict, check_verdict
from tandem_core.verify import FinishReason, Verdict

V = 8
EOS = frozenset({2})
# root -> 101 -> 102 -> 103 (the chain), root -> 104 (a sibling of 101), 101 -> 105 (a sibling of 102)
TOKENS = (101, 102, 103, 104, 105)
PARENTS = (-1, 0, 1, -1, 0)
IDS = [str(t) for t in (*TOKENS, 99, 98)]


def _random_tree(rng: np.random.Generator) -> DraftTree:
    """Up to 10 nodes, each under a random earlier node (or the root), siblings distinct."""
    tokens: list[int] = []
    parents: list[int] = []
    for i in range(int(rng.integers(0, 11))):
        for _ in range(20):
            parent = int(rng.integers(-1, i))
            free = sorted(set(range(V)) - {tokens[c] for c in range(i) if parents[c] == parent})
            if free:
                tokens.append(int(rng.choice(free)))
                parents.append(parent)
                break
    return DraftTree(tuple(tokens), tuple(parents))


def _logits_towards(tree: DraftTree, rng: np.random.Generator) -> np.ndarray:
    """Random target logits, pushed down the path to a random node so that long paths are common."""
    logits = rng.normal(size=(len(tree) + 1, V))
    if len(tree) and rng.random() < 0.8:
        for node in tree.paths[int(rng.integers(0, len(tree)))]:
            logits[tree.parents[node] + 1, tree.tokens[node]] += 6.0
    return logits


def test_every_greedy_tree_verdict_passes() -> None:
    rng = np.random.default_rng(0)
    accepted = []
    for _ in range(3000):
        tree = _random_tree(rng)
        remaining = int(rng.integers(1, 14))
        tv = verify_tree_greedy(tree, _logits_towards(tree, rng), eos_ids=EOS, remaining=remaining)
        check_verdict(tree.tokens, tv.verdict, remaining=remaining, vocab=V, eos_ids=EOS, parents=tree.parents)
        accepted.append(tv.verdict.accepted)
    assert max(accepted) >= 5 and np.mean(accepted) > 1  # deep paths were checked, not only the root


def test_every_sampled_tree_verdict_passes() -> None:
    rng = np.random.default_rng(1)
    for _ in range(1000):
        widths = [int(w) for w in rng.integers(1, 4, size=int(rng.integers(1, 4)))]
        if sum(int(np.prod(widths[: d + 1])) for d in range(len(widths))) > 30:
            continue
        q_rows: dict[tuple[int, ...], np.ndarray] = {}
        tree = sample_tree(lambda path, rows=q_rows: rows.setdefault(path, rng.dirichlet(np.full(V, 0.5))),
                           widths, lambda _depth: rng)
        p = rng.dirichlet(np.full(V, 0.5), size=len(tree) + 1)
        remaining = int(rng.integers(1, 8))
        tv = verify_tree_stochastic(tree, p, rng, eos_ids=EOS, remaining=remaining)
        check_verdict(tree.tokens, tv.verdict, remaining=remaining, vocab=V, eos_ids=EOS, parents=tree.parents)


def test_a_chain_as_a_tree_is_checked_as_the_chain() -> None:
    """The chain tree's parents change no outcome: pass, or the same broken rule."""
    rng = np.random.default_rng(2)
    for _ in range(3000):
        k = int(rng.integers(0, 6))
        drafts = tuple(int(t) for t in rng.integers(0, 6, size=k))
        a = int(rng.integers(-1, k + 2))
        n = int(rng.integers(0, k + 3))
        tokens = tuple(drafts[i] if i < k and rng.random() < 0.8 else int(rng.integers(0, 7)) for i in range(n))
        finished = bool(rng.random() < 0.3)
        verdict = Verdict(a, tokens, finished, FinishReason.LENGTH if finished else None)
        outcomes = []
        for parents in (None, tuple(range(-1, k - 1))):
            try:
                check_verdict(drafts, verdict, remaining=6, vocab=6, parents=parents)
                outcomes.append(None)
            except BadVerdict as exc:
                outcomes.append(exc.rule)
        assert outcomes[0] == outcomes[1], (drafts, verdict)


@pytest.mark.parametrize(("verdict", "remaining"), [
    (Verdict(0, (99,), False, None), 10),                        # the first draft rejected
    (Verdict(1, (104, 99), False, None), 10),                    # down the root's second child
    (Verdict(2, (101, 105, 99), False, None), 10),               # down a sibling of the chain
    (Verdict(3, (101, 102, 103, 99), False, None), 10),          # the whole chain, then the bonus token
    (Verdict(2, (101, 102), True, FinishReason.LENGTH), 2),      # cut by the budget
], ids=["first-rejected", "second-root-child", "sibling", "whole-chain", "budget-cut"])
def test_honest_verdicts_down_any_branch_pass(verdict: Verdict, remaining: int) -> None:
    check_verdict(TOKENS, verdict, remaining=remaining, vocab=200, parents=PARENTS)


@pytest.mark.parametrize(("verdict", "rule"), [
    (Verdict(2, (104, 102, 99), False, None), "prefix"),        # jumps from one branch to another
    (Verdict(2, (101, 104, 99), False, None), "prefix"),        # a root child where a grandchild must be
    (Verdict(1, (98, 99), False, None), "prefix"),              # a token that is no draft at all
    (Verdict(2, (101, 103, 99), False, None), "prefix"),        # skips a level
    (Verdict(2, (104, 99, 98), False, None), "prefix"),         # accepted beyond the path (104 is a leaf)
    (Verdict(4, (101, 102, 103, 99, 98), False, None), "prefix"),  # beyond the tree's depth (3)
    (Verdict(3, (101, 102), True, FinishReason.STOP), "prefix"),  # fewer tokens than accepted
    (Verdict(6, (101,) * 7, False, None), "accepted"),          # more accepted than drafts sent
    (Verdict(2, (101, 105, 99, 98), False, None), "count"),     # a token too many
    (Verdict(2, (101, 105), False, None), "count"),             # cut short, yet going on
    (Verdict(1, (104, 99), True, None), "finish"),
    (Verdict(2, (101, 105, 99), False, None), "budget"),        # with 3 left (below)
], ids=["branch-jump", "root-child-below", "no-draft", "skips-a-level", "beyond-the-path", "beyond-the-depth",
        "too-few-tokens", "accepted", "count-more", "count-fewer", "finish", "budget"])
def test_forged_tree_verdicts_name_the_broken_rule(verdict: Verdict, rule: str) -> None:
    remaining = 3 if rule == "budget" else 10
    with pytest.raises(BadVerdict) as err:
        check_verdict(TOKENS, verdict, remaining=remaining, vocab=200, parents=PARENTS)
    assert err.value.rule == rule
    assert not any(i in str(err.value) for i in IDS), str(err.value)  # positions and counts only


def test_forged_paths_on_random_trees_fail_as_prefix() -> None:
    """An honest verdict with one accepted token changed to one its node's parent has no child for."""
    rng = np.random.default_rng(3)
    forged = 0
    for _ in range(3000):
        tree = _random_tree(rng)
        tv = verify_tree_greedy(tree, _logits_towards(tree, rng), eos_ids=frozenset(), remaining=20)
        v = tv.verdict
        if not v.accepted:
            continue
        i = int(rng.integers(0, v.accepted))
        above = tree.parents[tv.path[i]]
        taken = {tree.tokens[c] for c in tree.children(above)}
        wrong = next(t for t in range(V + 1) if t not in taken)
        tokens = (*v.tokens[:i], wrong, *v.tokens[i + 1:])
        with pytest.raises(BadVerdict) as err:
            check_verdict(tree.tokens, Verdict(v.accepted, tokens, v.finished, v.finish_reason), remaining=20,
                          parents=tree.parents)
        assert err.value.rule == "prefix" and f"token {i}:" in str(err.value)
        forged += 1
    assert forged > 1000


@pytest.mark.parametrize("parents", [(-1, 0), (-1, 0, 2, 1, 0), (-1, -2, 0, 1, 0), (-1, 0, 1, -1, 0, 0)],
                         ids=["too-few", "not-earlier", "below-root", "too-many"])
def test_a_malformed_tree_is_the_callers_error(parents: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="parents"):
        check_verdict(TOKENS, Verdict(0, (99,), False, None), parents=parents)


def test_siblings_with_the_same_token_are_the_callers_error() -> None:
    with pytest.raises(ValueError, match="distinct"):
        check_verdict((101, 101), Verdict(0, (99,), False, None), parents=(-1, -1))
