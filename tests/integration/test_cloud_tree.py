"""Draft trees through the cloud verifier over real gRPC (plain grpcio server on port 0, the tiny fp32
target, the tiny drafter's distribution through transformers for q).

Checks: greedy tree rounds (the drafter's best-first trees, and random trees with the target's
tokens planted off the first-child chain) commit exactly the target-only greedy tokens; after a
tree round the session continues exactly as one that got the accepted path as a chain; seeded
sampling: every tree round's verdict equals `tandem_core.tree.verify_tree` on the logits of
chain passes over each root-to-leaf path, with `round_rng(seed, VERIFIER_STREAM, position)`;
every malformed tree is INVALID_ARGUMENT naming the problem and the server keeps serving; a
replica with max_tree_nodes=0 says so and refuses trees; drafts past the context are dropped;
pipelined tree rounds are verified or dropped as their assumption says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import numpy as np
import pytest

from cloud_node.verifier import Limits, VerifierCore
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2
from tandem_core.loop import Draft
from tandem_core.sampling import DRAFTER_STREAM, VERIFIER_STREAM, SamplingParams, round_rng
from tandem_core.tree import MAX_TREE_NODES, DraftTree, greedy_tree, sample_tree, verify_tree
from tests.support.cloud_client import CloudVerifierClient, draft_round
from tests.support.cloud_server import serving

PROMPTS = [[5, 17, 99, 3, 44], [300], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0, seed=11)
LIMITS = Limits(max_sessions=8, max_context=200, max_draft_len=8, max_new_tokens=64)
VOCAB = 512


# --- helpers (also used by test_cloud_tree_scorer.py and test_cloud_tree_batching.py) ---------

def spec_for(prompt: Sequence[int], params: SamplingParams, max_new: int, generated: Sequence[int] = (),
             session_id: str = "tree") -> cloud_pb2.SessionSpec:
    sampling = common_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        sampling.seed = params.seed
    return cloud_pb2.SessionSpec(session_id=session_id, prompt_tokens=list(prompt), sampling=sampling,
                                 max_new_tokens=max_new, generated_tokens=list(generated))


def tree_round(round_no: int, tree: DraftTree, **kw: int) -> cloud_pb2.DraftRound:
    """The wire form: parent + 1 per draft; q one sparse row per sibling group (sampling)."""
    msg = cloud_pb2.DraftRound(round=round_no, draft_tokens=list(tree.tokens),
                               draft_parents=[a + 1 for a in tree.parents], **kw)
    for row in (tree.q if tree.q is not None else ()):
        ids = np.flatnonzero(row)
        msg.q_rows.append(common_pb2.SparseDist(ids=ids.tolist(), probs=row[ids].tolist()))
    return msg


def as_received(tree: DraftTree) -> DraftTree:
    """The tree as the cloud reads it: q rows through float32, renormalized."""
    if tree.q is None:
        return tree
    q = np.zeros_like(tree.q)
    for g, row in enumerate(tree.q):
        ids = np.flatnonzero(row)
        probs = row[ids].astype(np.float32).astype(np.float64)
        q[g, ids] = probs / float(probs.sum())
    return DraftTree(tree.tokens, tree.parents, q)


def drafter_q(model, context: Sequence[int]) -> Callable[[tuple[int, ...]], np.ndarray]:
    """The drafter's softmax after context + path (transformers forward, float64)."""
    import torch

    memo: dict[tuple[int, ...], np.ndarray] = {}

    def q(path: tuple[int, ...]) -> np.ndarray:
        if path not in memo:
            with torch.inference_mode():
                logits = model(torch.tensor([[*context, *path]])).logits[0, -1].double()
            memo[path] = torch.softmax(logits, -1).numpy()
        return memo[path]

    return q


def planted_tree(rng: np.random.Generator, truth: Sequence[int], n: int, max_depth: int = 6) -> DraftTree:
    """A random tree of n nodes whose path to a random node holds a random-length prefix of
    `truth` (the target's next tokens), so acceptance often runs down a side branch."""
    parents: list[int] = []
    depth: list[int] = []
    for i in range(n):
        a = int(rng.choice([-1, *(j for j in range(i) if depth[j] < max_depth - 1)]))
        parents.append(a)
        depth.append(0 if a < 0 else depth[a] + 1)
    path = [int(rng.integers(n))]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    path.reverse()
    tokens: list[int | None] = [None] * n
    for d, node in enumerate(path[:int(rng.integers(0, min(len(path), len(truth)) + 1))]):
        tokens[node] = int(truth[d])
    for i in range(n):
        if tokens[i] is None:
            taken = {tokens[j] for j in range(n) if parents[j] == parents[i]}
            tokens[i] = next(t for t in (int(x) for x in rng.integers(3, VOCAB, 64)) if t not in taken)
    return DraftTree(tuple(tokens), tuple(parents))  # type: ignore[arg-type]


def target_only(core: VerifierCore, prompt: Sequence[int], max_new: int) -> list[int]:
    """Greedy target-only decoding on the cloud's own target."""
    session = core.target.new_session(prompt)
    return list(session.generate(GREEDY, np.random.default_rng(0), max_new_tokens=max_new, eos_ids=core.eos_ids))


def chain_logits(target, committed: Sequence[int], tree: DraftTree, prefix=None) -> np.ndarray:
    """(n+1, V) target rows for `tree` from chain passes, one per root-to-leaf path."""
    ref = target.new_session(committed, prefix=prefix)
    leaves = [i for i in range(len(tree)) if not tree.children(i)] or [None]
    rows = np.zeros((len(tree) + 1, target.vocab_size), np.float32)
    for leaf in leaves:
        path = () if leaf is None else tree.paths[leaf]
        logits = ref.score([tree.tokens[i] for i in path])
        ref.cache.crop(len(committed) - 1)
        rows[0] = logits[0]
        for d, i in enumerate(path):
            rows[1 + i] = logits[1 + d]
    return rows


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def core(tiny_models) -> VerifierCore:
    return VerifierCore.load(tiny_models.target_hf, dtype="fp32", limits=LIMITS, model_name="tiny")


@pytest.fixture(scope="module")
def address(core: VerifierCore) -> Iterator[str]:
    with serving(core) as a:
        yield a


@pytest.fixture(scope="module")
def drafter(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_models.drafter_hf)).eval()


def _wait_for_no_sessions(core: VerifierCore, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(core.store) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(core.store) == 0, core.store.keys()


# --- greedy ------------------------------------------------------------------------------------

def test_greedy_tree_rounds_over_grpc_commit_the_target_only_tokens(core, address, drafter) -> None:
    rng = np.random.default_rng(3)
    side, accepted = 0, 0
    for prompt in PROMPTS:
        expected = target_only(core, prompt, 40)
        with CloudVerifierClient(address, round_timeout_s=30) as c:
            assert c.open(spec_for(prompt, GREEDY, 40)).max_tree_nodes == MAX_TREE_NODES
            r = 0
            while not c.finished:
                context = [*prompt, *c.generated]
                if r % 2:
                    tree = planted_tree(rng, expected[len(c.generated):], int(rng.integers(1, 24)))
                else:
                    tree = greedy_tree(drafter_q(drafter, context), max_nodes=12, width=3, max_depth=6)
                verdict = c.verify(tree_round(r, tree))
                kept = Draft(tree.tokens, None, parents=tree.parents).kept(verdict)
                side += kept < verdict.accepted  # accepted down a branch other than the first children
                accepted += verdict.accepted
                r += 1
            assert c.generated == expected
            assert r < len(expected)  # trees were accepted: fewer rounds than tokens
    assert side > 0 and accepted > 0


def test_after_a_tree_round_the_session_goes_on_as_one_sent_the_accepted_path(core, address, drafter) -> None:
    """Greedy: B is sent each accepted path as a chain (all its drafts the target's argmax: all
    accepted), then both get the same chain drafts; every verdict is the same."""
    rng = np.random.default_rng(5)
    prompt = PROMPTS[2]
    expected = target_only(core, prompt, 30)
    with CloudVerifierClient(address, round_timeout_s=30) as a, CloudVerifierClient(address, round_timeout_s=30) as b:
        a.open(spec_for(prompt, GREEDY, 30, session_id="a"))
        b.open(spec_for(prompt, GREEDY, 30, session_id="b"))
        r = 0
        while not a.finished:
            tree = planted_tree(rng, expected[len(a.generated):], int(rng.integers(2, 20)))
            va = a.verify(tree_round(r, tree))
            vb = b.verify(draft_round(r, list(va.tokens[:va.accepted])))
            assert (vb.accepted, list(vb.tokens), vb.finished) == (va.accepted, list(va.tokens), va.finished)
            if a.finished:
                break
            chain = drafter_q(drafter, [*prompt, *a.generated])
            drafts = [int(np.argmax(chain(()))), int(rng.integers(3, VOCAB))]
            va, vb = a.verify(draft_round(r + 1, drafts)), b.verify(draft_round(r + 1, drafts))
            assert (vb.accepted, list(vb.tokens), vb.finished) == (va.accepted, list(va.tokens), va.finished)
            r += 2
        assert a.generated == b.generated == expected


# --- sampling ----------------------------------------------------------------------------------

def test_sampled_tree_rounds_equal_verify_tree_on_chain_pass_logits(core, address, drafter) -> None:
    seed, max_new, side, accepted, rounds = SAMPLED.seed, 40, 0, 0, 0
    for prompt in PROMPTS[:2]:
        with CloudVerifierClient(address, round_timeout_s=30) as c:
            c.open(spec_for(prompt, SAMPLED, max_new))
            while not c.finished:
                committed = [*prompt, *c.generated]
                widths = (3, 2, 1, 1)[:1 + rounds % 4]  # depths 1..4
                tree = sample_tree(drafter_q(drafter, committed), widths, drafter_streams(seed, len(committed)))
                verdict = c.verify(tree_round(rounds, tree))
                remaining = min(max_new - (len(committed) - len(prompt)), LIMITS.max_context - len(committed))
                want = verify_tree(as_received(tree), chain_logits(core.target, committed, tree), SAMPLED,
                                   round_rng(seed, VERIFIER_STREAM, len(committed)), eos_ids=core.eos_ids,
                                   remaining=remaining).verdict
                got = (verdict.accepted, tuple(verdict.tokens), verdict.finished)
                assert got == (want.accepted, want.tokens, want.finished), rounds
                side += Draft(tree.tokens, None, parents=tree.parents).kept(verdict) < verdict.accepted
                accepted += verdict.accepted
                rounds += 1
    assert accepted > 0 and side > 0, (accepted, side, rounds)


def drafter_streams(seed: int, position: int) -> Callable[[int], np.random.Generator]:
    """The drafter's stream for the tokens at each depth of a tree drafted at `position`."""
    return lambda depth: round_rng(seed, DRAFTER_STREAM, position + depth)


# --- bad trees, limits -------------------------------------------------------------------------

def _tree_msg(tokens: Sequence[int], parents: Sequence[int], rows: Sequence[tuple[list[int], list[float]]] = ()):
    msg = cloud_pb2.DraftRound(round=0, draft_tokens=list(tokens), draft_parents=list(parents))
    for ids, probs in rows:
        msg.q_rows.append(common_pb2.SparseDist(ids=ids, probs=probs))
    return cloud_pb2.VerifyRequest(round=msg)


GREEDY_OPEN = cloud_pb2.VerifyRequest(open=spec_for(PROMPTS[0], GREEDY, 10))
SAMPLED_OPEN = cloud_pb2.VerifyRequest(open=spec_for(PROMPTS[0], SAMPLED, 10))
FULL = (list(range(VOCAB)), [1.0 / VOCAB] * VOCAB)
BAD_TREES = {
    "length_mismatch": (GREEDY_OPEN, _tree_msg([5, 6], [0]), "draft_parents: 1 entries for 2"),
    "parent_not_earlier": (GREEDY_OPEN, _tree_msg([5, 6], [0, 2]), "draft_parents[1]"),
    "duplicate_siblings": (GREEDY_OPEN, _tree_msg([5, 6, 5], [0, 0, 0]), "siblings hold distinct tokens"),
    "too_many_nodes": (GREEDY_OPEN, _tree_msg(range(3, 4 + MAX_TREE_NODES), [0] * (MAX_TREE_NODES + 1)),
                       "max_tree_nodes"),
    "path_too_deep": (GREEDY_OPEN, _tree_msg(range(10, 27), range(17)), "a path of 17 drafts exceeds"),
    "outside_vocab": (GREEDY_OPEN, _tree_msg([5, VOCAB], [0, 0]), "draft_tokens"),
    "q_rows_in_greedy": (GREEDY_OPEN, _tree_msg([5], [0], [FULL]), "q_rows"),
    "q_rows_per_draft": (SAMPLED_OPEN, _tree_msg([5, 6, 7], [0, 0, 1], [FULL] * 3), "2 sibling groups"),
    "child_with_q_zero": (SAMPLED_OPEN, _tree_msg([5, 6], [0, 0], [([5, 7], [0.5, 0.5])]),
                          "draft 1 has probability 0"),
}


def test_every_malformed_tree_is_invalid_argument_and_the_server_keeps_serving(core, address) -> None:
    stub = cloud_pb2_grpc.CloudVerifierStub(grpc.insecure_channel(address))
    for name, (open_, bad, needle) in BAD_TREES.items():
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Verify(iter([open_, bad]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value.details())
        assert needle in info.value.details(), (name, info.value.details())
    _wait_for_no_sessions(core)
    expected = target_only(core, PROMPTS[1], 12)
    with CloudVerifierClient(address, round_timeout_s=30) as c:
        c.open(spec_for(PROMPTS[1], GREEDY, 12))
        while not c.finished:
            c.verify(tree_round(0, planted_tree(np.random.default_rng(len(c.generated)),
                                                expected[len(c.generated):], 8)))
        assert c.generated == expected


def test_a_replica_with_max_tree_nodes_0_says_so_and_refuses_trees(core) -> None:
    chains_only = VerifierCore(core.target, eos_ids=core.eos_ids, limits=Limits(max_sessions=2, max_tree_nodes=0),
                               bytes_per_token=core.store.bytes_per_token)
    with serving(chains_only) as address:
        with CloudVerifierClient(address, round_timeout_s=30) as c:
            assert c.open(spec_for(PROMPTS[0], GREEDY, 10)).max_tree_nodes == 0
            with pytest.raises(grpc.RpcError) as info:
                c.verify(tree_round(0, DraftTree((5, 6), (-1, -1))))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "verifies no trees" in info.value.details()
        with CloudVerifierClient(address, round_timeout_s=30) as c:
            c.open(spec_for(PROMPTS[0], GREEDY, 10))
            assert len(c.verify(draft_round(0, [5, 6])).tokens) >= 1  # chains as ever


def test_tree_drafts_past_the_context_and_max_draft_len_are_dropped_with_their_subtrees(core) -> None:
    context, prompt = 30, PROMPTS[2]
    small = VerifierCore(core.target, eos_ids=core.eos_ids,
                         limits=Limits(max_sessions=2, max_context=context, max_draft_len=3, max_new_tokens=64),
                         bytes_per_token=core.store.bytes_per_token)
    expected = target_only(core, prompt, context - len(prompt))
    rng = np.random.default_rng(8)
    with serving(small) as address, CloudVerifierClient(address, round_timeout_s=30) as c:
        c.open(spec_for(prompt, GREEDY, 64))
        while not c.finished:
            room = min(3, context - len(prompt) - len(c.generated) - 1)
            tree = planted_tree(rng, expected[len(c.generated):], 16, max_depth=6)
            verdict = c.verify(tree_round(0, tree))
            assert verdict.accepted <= room
        assert c.generated == expected and verdict.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_pipelined_tree_rounds_are_verified_or_dropped_by_their_assumption(core, address) -> None:
    prompt = PROMPTS[0]
    expected = target_only(core, prompt, 10)
    spec = spec_for(prompt, GREEDY, 10)
    spec.first_round = True
    tree = planted_tree(np.random.default_rng(2), expected[1:], 10)
    at = len(prompt) + 1
    requests = [cloud_pb2.VerifyRequest(open=spec),
                cloud_pb2.VerifyRequest(round=tree_round(2, tree, assume_position=at, assume_token=expected[0] + 1)),
                cloud_pb2.VerifyRequest(round=tree_round(3, tree, assume_position=at, assume_token=expected[0]))]
    stub = cloud_pb2_grpc.CloudVerifierStub(grpc.insecure_channel(address))
    replies = list(stub.Verify(iter(requests), timeout=60))
    first, dropped, kept = (r.verdict for r in replies[1:])
    assert list(first.tokens) == expected[:1]
    assert (dropped.round, dropped.dropped, list(dropped.tokens)) == (2, True, [])
    assert not kept.dropped and list(kept.tokens) == expected[1:1 + len(kept.tokens)]


def test_a_round_ahead_of_a_tree_verdict_that_left_the_chain_is_dropped(core, address) -> None:
    """Round 2 is the chain [t1, x] with the target's t2 as x's sibling; its verdict goes down
    the sibling: t1, t2, then the target's t3. Round 3 was sent ahead assuming the chain
    [t1, x] whole, then t3: the same position and last token as the session now holds, reached
    by another path. The cloud drops it, and verifies round 4, the same drafts untagged."""
    prompt = PROMPTS[0]
    expected = target_only(core, prompt, 12)
    t1, t2, t3 = expected[1:4]
    wrong = next(t for t in range(3, VOCAB) if t != t2)
    tree = DraftTree((t1, wrong, t2), (-1, 0, 0))  # the chain t1, wrong; t2 a sibling of wrong
    spec = spec_for(prompt, GREEDY, 12)
    spec.first_round = True
    at = len(prompt) + 1 + 3  # after round 2 accepts two drafts and adds its own token
    ahead = cloud_pb2.DraftRound(round=3, draft_tokens=[expected[4]], assume_position=at, assume_token=t3)
    requests = [cloud_pb2.VerifyRequest(open=spec), cloud_pb2.VerifyRequest(round=tree_round(2, tree)),
                cloud_pb2.VerifyRequest(round=ahead),
                cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(round=4, draft_tokens=[expected[4]]))]
    stub = cloud_pb2_grpc.CloudVerifierStub(grpc.insecure_channel(address))
    replies = list(stub.Verify(iter(requests), timeout=60))
    first, second, third, fourth = (r.verdict for r in replies[1:])
    assert list(first.tokens) == expected[:1]
    assert (second.accepted, list(second.tokens)) == (2, [t1, t2, t3])  # down the sibling
    assert third.dropped and list(third.tokens) == []
    assert not fourth.dropped and list(fourth.tokens)[:1] == [expected[4]]
