"""Draft trees through `RemoteVerifier` over a fake link (pure protocol logic, no gRPC): a tree waits
for the SessionOpened, goes out as a tree where the replica takes trees (cut to its limits, q rows
kept per sibling group) and as its chain where it does not, is re-sent as a tree after a resume,
and a forged tree verdict is dropped. Also `within_limits` and `chain_of` on random trees."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_node.link_stream import LinkError
from edge_node.remote_verifier import RemoteVerifier, chain_of, within_limits
from tandem_core.loop import Draft
from tandem_core.tree import DraftTree, sample_tree, verify_tree_greedy
from tandem_core.verify import Verdict

V = 64
PROMPT_LEN = 3


def target(context: Sequence[int]) -> int:
    """The fake target's greedy token after `context` (never an EOS: none is set)."""
    return (7 * sum(context) + 3 * len(context)) % 50 + 10


class TreeLink:
    """The part of `CloudLink` that `RemoteVerifier` uses. Its SessionOpened is known once awaited
    (or once a verdict is read); each verdict is the fake target's greedy one for what was sent."""

    def __init__(self, tree_nodes: int, *, max_draft_len: int = 16, breaks: int = 0, forge: int = 0) -> None:
        self.tree_nodes, self.max_draft_len, self.breaks, self.forge = tree_nodes, max_draft_len, breaks, forge
        self.opened: Any = None
        self.is_open, self.resumes = False, 0
        self.sent: list[tuple[tuple[int, ...], Any, tuple[int, ...] | None]] = []
        self.opens: list[list[int]] = []
        self.request = SimpleNamespace(max_new_tokens=40)
        self.cloud: list[int] = []  # the tokens the cloud holds after the prompt

    @property
    def pipelining(self) -> bool:
        return self.opened is not None

    @property
    def max_tree_nodes(self) -> int:
        return self.opened.max_tree_nodes if self.opened is not None else 0

    def open(self, generated: list[int], first_round: bool = False) -> None:
        self.opens.append(list(generated))
        self.is_open, self.opened, self.cloud = True, None, list(generated)

    def resume(self, generated: list[int]) -> None:
        self.resumes += 1
        self.open(generated)

    def await_opened(self) -> None:
        self.opened = SimpleNamespace(max_context=1000, max_draft_len=self.max_draft_len, pipelining=True,
                                      max_tree_nodes=self.tree_nodes)

    def draft_room(self, wanted: int, position: int) -> int:
        if self.opened is None:
            return wanted
        return max(0, min(wanted, self.opened.max_draft_len, self.opened.max_context - position - 1))

    def replies_waiting(self) -> int:
        return 0

    def link_failed(self) -> bool:
        return False

    def send_round(self, tokens: Sequence[int], q: Any, assume: Any = None, parents: Any = None) -> int:
        assert not parents or len(tokens) <= self.max_tree_nodes, "a tree the replica does not take"
        self.sent.append((tuple(tokens), q, None if parents is None else tuple(parents)))
        return len(self.sent)

    def recv_verdict(self, round_no: int) -> tuple[Verdict, bool]:
        self.await_opened()
        if self.breaks:
            self.breaks -= 1
            raise LinkError("the stream broke")
        tokens, _, parents = self.sent[round_no - 1]
        tree = DraftTree(tokens, parents if parents is not None else tuple(range(-1, len(tokens) - 1)))
        context = [0] * PROMPT_LEN + self.cloud
        logits = np.zeros((len(tree) + 1, V))
        for row, path in enumerate(((), *(tree.path_tokens(i) for i in range(len(tree))))):
            logits[row, target([*context, *path])] = 1.0
        verdict = verify_tree_greedy(tree, logits, eos_ids=frozenset(), remaining=100).verdict
        if self.forge and verdict.accepted >= 1:  # the first accepted token swapped for a sibling's
            self.forge -= 1
            other = next(tree.tokens[c] for c in tree.children(-1) if tree.tokens[c] != verdict.tokens[0])
            return Verdict(verdict.accepted, (other, *verdict.tokens[1:]), False, None), False
        self.cloud.extend(verdict.tokens)
        return verdict, False


def greedy_answer(n: int) -> list[int]:
    context = [0] * PROMPT_LEN
    for _ in range(n):
        context.append(target(context))
    return context[PROMPT_LEN:]


def caterpillar(committed: Sequence[int], right: int, k: int = 4, q: bool = False) -> Draft:
    """A chain of k drafts (the target's first `right`, then wrong ones), each with one sibling
    leaf: groups are the root and the chain's nodes but the last, one q row each."""
    context, tokens, parents, chain = [0] * PROMPT_LEN + list(committed), [], [], -1
    for j in range(k):
        good = target(context)
        token = good if j < right else (good + 1) % V
        tokens += [token, (token + 2) % V]
        parents += [chain, chain]
        chain = len(tokens) - 2
        context.append(token)
    rows = None
    if q:
        groups = DraftTree(tuple(tokens), tuple(parents)).groups
        rows = np.full((len(groups), V), 1e-3)
        for g in range(len(groups)):
            rows[g, g] += 0.5  # distinct rows, so a misplaced one shows
        rows /= rows.sum(axis=1, keepdims=True)
    return Draft(tuple(tokens), rows, parents=tuple(parents))


def test_a_tree_waits_for_the_session_opened_then_goes_out_as_a_tree() -> None:
    link = TreeLink(tree_nodes=16)
    verifier = RemoteVerifier(link, max_resumes=0, backoff_s=0, prompt_len=PROMPT_LEN, vocab=V)  # type: ignore[arg-type]
    assert verifier.max_tree_nodes == 0 and verifier.tree_room(8) == 0  # before the SessionOpened
    draft = caterpillar([], right=2)
    verifier.submit(draft)
    assert link.sent == []  # held: the replica might take chains only
    verdict = verifier.collect()
    assert link.sent == [(draft.tokens, None, draft.parents)]
    assert verdict is not None and verdict.accepted == 2 and verifier.committed == greedy_answer(3)
    assert verifier.max_tree_nodes == 16 and verifier.tree_room(8) == 8 and verifier.tree_room(40) == 16


def test_a_replica_without_trees_gets_the_chain_and_its_q_rows() -> None:
    link = TreeLink(tree_nodes=0)
    verifier = RemoteVerifier(link, max_resumes=0, backoff_s=0, prompt_len=PROMPT_LEN, vocab=V)  # type: ignore[arg-type]
    draft = caterpillar([], right=4, q=True)
    verdict = verifier.verify(draft)
    tokens, q, parents = link.sent[0]
    assert parents is None and tokens == draft.chain and len(tokens) == 4
    np.testing.assert_array_equal(q, draft.q)  # a caterpillar's groups are its chain's nodes
    assert verdict.accepted == 4 and verifier.committed == greedy_answer(5)
    assert draft.kept(verdict) == 4


def test_trees_are_cut_to_the_replicas_limits() -> None:
    link = TreeLink(tree_nodes=3, max_draft_len=2)
    verifier = RemoteVerifier(link, max_resumes=0, backoff_s=0, prompt_len=PROMPT_LEN, vocab=V)  # type: ignore[arg-type]
    draft = caterpillar([], right=4, q=True)
    verdict = verifier.verify(draft)
    tokens, q, parents = link.sent[0]
    assert parents == (-1, -1, 0) and tokens == draft.tokens[:3]  # depth 2, then 3 nodes
    np.testing.assert_array_equal(q, draft.q[:2])  # the root's row and the first chain node's
    assert verdict.accepted == 2 and verifier.committed == greedy_answer(3)


def test_a_resumed_session_gets_the_tree_again() -> None:
    link = TreeLink(tree_nodes=16, breaks=1)
    verifier = RemoteVerifier(link, max_resumes=1, backoff_s=0, prompt_len=PROMPT_LEN, vocab=V)  # type: ignore[arg-type]
    draft = caterpillar([], right=3)
    verdict = verifier.verify(draft)
    assert link.resumes == 1 and link.opens == [[], []]
    assert [s[2] for s in link.sent] == [draft.parents, draft.parents]  # a tree both times
    assert verdict.accepted == 3 and verifier.committed == greedy_answer(4)


def test_a_forged_tree_verdict_is_dropped_and_the_round_sent_again() -> None:
    link = TreeLink(tree_nodes=16, forge=1)
    verifier = RemoteVerifier(link, max_resumes=0, backoff_s=0, prompt_len=PROMPT_LEN, vocab=V)  # type: ignore[arg-type]
    draft = caterpillar([], right=2)
    verdict = verifier.verify(draft)
    assert verifier.bad_verdicts == 1 and link.resumes == 1 and link.opens == [[], []]
    assert len(link.sent) == 2 and link.sent[1][2] == draft.parents
    assert verdict.accepted == 2 and verifier.committed == greedy_answer(3)


def test_rounds_of_trees_follow_the_target_answer() -> None:
    link = TreeLink(tree_nodes=6, max_draft_len=3)
    verifier = RemoteVerifier(link, max_resumes=0, backoff_s=0, prompt_len=PROMPT_LEN, vocab=V)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    while len(verifier.committed) < 30:
        draft = caterpillar(verifier.committed, right=int(rng.integers(0, 5)), q=bool(rng.integers(0, 2)))
        verifier.verify(draft)
    assert verifier.committed[:30] == greedy_answer(30)


def _sampled(rng: np.random.Generator) -> Draft:
    widths = [int(w) for w in rng.integers(1, 4, size=int(rng.integers(1, 4)))]
    rows: dict[tuple[int, ...], np.ndarray] = {}
    tree = sample_tree(lambda path: rows.setdefault(path, rng.dirichlet(np.full(12, 0.3))), widths, lambda _d: rng)
    return Draft(tree.tokens, tree.q, parents=tree.parents)


def _any_shape(rng: np.random.Generator) -> Draft:
    """Up to 20 nodes, each under a random earlier node (so groups need not come level by level)."""
    tokens: list[int] = []
    parents: list[int] = []
    for i in range(int(rng.integers(1, 21))):
        parent = int(rng.integers(-1, i))
        siblings = {tokens[c] for c in range(i) if parents[c] == parent}
        tokens.append(int(rng.choice(sorted(set(range(12)) - siblings))))
        parents.append(parent)
    groups = DraftTree(tuple(tokens), tuple(parents)).groups
    return Draft(tuple(tokens), rng.dirichlet(np.ones(12), size=len(groups)), parents=tuple(parents))


@pytest.mark.parametrize("seed", range(3))
def test_within_limits_keeps_a_tree_with_its_own_q_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in range(300):
        draft = _sampled(rng) if n % 2 else _any_shape(rng)
        if len(draft.tokens) > 40:
            continue
        depth, nodes = int(rng.integers(0, 5)), int(rng.integers(1, 12))
        wire = within_limits(draft, depth, nodes)
        assert wire.depth <= depth and len(wire.tokens) <= nodes
        assert draft.chain[:len(wire.chain)] == wire.chain  # the drafter's chain begins with it
        if wire.tokens:
            wire.tree()  # a valid tree whose every child has q > 0 in its own group's row
            original = draft.tree()
            for g, a in enumerate(wire.tree().groups):  # each row is the original row of that group
                node = -1 if a < 0 else next(i for i, p in enumerate(original.paths)
                                              if original.path_tokens(i) == wire.tree().path_tokens(a))
                np.testing.assert_array_equal(wire.q[g], draft.q[original.groups.index(node)])
        if depth >= draft.depth and nodes >= len(draft.tokens):
            assert wire is draft


def test_chain_of_takes_the_first_children_and_their_groups_rows() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        draft = _sampled(rng)
        chain = chain_of(draft)
        assert chain.parents is None and chain.tokens == draft.chain
        tree = draft.tree()
        node, rows = -1, []
        for _token in chain.tokens:
            rows.append(draft.q[tree.groups.index(node)])
            node = tree.children(node)[0]
        np.testing.assert_array_equal(chain.q, np.array(rows))
        assert within_limits(draft, 2, 0).tokens == draft.chain[:2]
