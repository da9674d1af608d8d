"""Draft trees on the wire, edge side: `RemoteVerifier` over a real `CloudLink` and a real gRPC server
on loopback (port 0) running a fake cloud: the protocol's messages, a greedy target that is a
function of the context, and tree verification by `tandem_core.tree.verify_tree_greedy`.

What crosses the wire is read back from the server: each DraftRound's `draft_parents` (parent + 1)
and sparse q rows (one per sibling group), no tree to a replica whose SessionOpened says
max_tree_nodes 0 (it gets the chains), a tree again after a resume. The loop over the link gives
the target's greedy answer token for token, verdicts down side branches included.
A last test runs the real cloud node with the tiny target (skipped where it verifies chains only).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from edge_node.cloud_link import CloudLink, RemoteVerifier, SessionRequest
from protos.enums import finish_to_proto
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc
from tandem_core.loop import Draft, speculative_generate
from tandem_core.sampling import SamplingParams
from tandem_core.stats import RequestStats
from tandem_core.tree import DraftTree, verify_tree_greedy

V = 128
PROMPT = (5, 17, 99, 3)
GREEDY = SamplingParams()
N = 40


def target(context: Sequence[int]) -> int:
    return (7 * sum(context) + 3 * len(context)) % 90 + 10


def greedy_answer(prompt: Sequence[int], n: int) -> list[int]:
    context = list(prompt)
    for _ in range(n):
        context.append(target(context))
    return context[len(prompt):]


class FakeCloud(cloud_pb2_grpc.CloudVerifierServicer):
    """The Verify protocol over the fake target; it records what it received."""

    def __init__(self, max_tree_nodes: int, *, break_at: int = 0) -> None:
        self.max_tree_nodes, self.break_at = max_tree_nodes, break_at
        self.opens: list[cloud_pb2.SessionSpec] = []
        self.rounds: list[cloud_pb2.DraftRound] = []

    def Verify(self, request_iterator: Iterator[cloud_pb2.VerifyRequest], context: Any) -> Iterator[Any]:
        requests = iter(request_iterator)
        spec = next(requests).open
        self.opens.append(spec)
        held = [*spec.prompt_tokens, *spec.generated_tokens]
        left = spec.max_new_tokens - len(spec.generated_tokens)
        yield cloud_pb2.VerifyResponse(opened=cloud_pb2.SessionOpened(
            model="fake", prompt_len=len(held), max_draft_len=16, max_context=4096, pipelining=True,
            max_tree_nodes=self.max_tree_nodes))
        for request in requests:
            r = request.round
            self.rounds.append(r)
            if len(self.rounds) == self.break_at:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")
            parents = tuple(a - 1 for a in r.draft_parents) or tuple(range(-1, len(r.draft_tokens) - 1))
            tree = DraftTree(tuple(r.draft_tokens), parents)
            logits = np.zeros((len(tree) + 1, V))
            for row, path in enumerate(((), *(tree.path_tokens(i) for i in range(len(tree))))):
                logits[row, target([*held, *path])] = 1.0
            verdict = verify_tree_greedy(tree, logits, eos_ids=frozenset(), remaining=left).verdict
            held.extend(verdict.tokens)
            left -= len(verdict.tokens)
            yield cloud_pb2.VerifyResponse(verdict=cloud_pb2.Verdict(
                round=r.round, accepted=verdict.accepted, tokens=list(verdict.tokens), finished=verdict.finished,
                finish_reason=finish_to_proto(verdict.finish_reason)))


class CaterpillarDrafter:
    """A `DraftSession` that drafts caterpillar trees: a chain of guesses (the target's token two
    times in three), each with one sibling that holds the target's token where the guess is wrong."""

    def __init__(self, prompt: Sequence[int]) -> None:
        self.context = list(prompt)

    def draft(self, k: int) -> Draft:
        context, tokens, parents, node = list(self.context), [], [], -1
        for _ in range(k):
            good = target(context)
            guess = good if sum(context) % 3 else (good + 1) % V
            sibling = good if guess != good else (good + 2) % V
            tokens += [guess, sibling]
            parents += [node, node]
            node = len(tokens) - 2
            context.append(guess)
        return Draft(tuple(tokens), None, parents=tuple(parents))

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        self.context.extend(tokens)

    def rollback(self) -> None:
        pass


@pytest.fixture
def cloud(request: pytest.FixtureRequest) -> Iterator[tuple[FakeCloud, str]]:
    fake = FakeCloud(**request.param)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    cloud_pb2_grpc.add_CloudVerifierServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _verifier(channel: grpc.Channel, max_resumes: int = 0) -> RemoteVerifier:
    link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, PROMPT, GREEDY, 0, N), round_timeout_s=10.0)
    return RemoteVerifier(link, max_resumes=max_resumes, backoff_s=0.0, prompt_len=len(PROMPT), vocab=V)


def _answer(verifier: RemoteVerifier, stats: RequestStats, drafter: Any = None, n: int = N) -> list[int]:
    drafter = drafter if drafter is not None else CaterpillarDrafter(PROMPT)
    tokens: list[int] = []
    for verdict in speculative_generate(drafter, verifier, draft_len=4, max_new_tokens=n, stats=stats):
        tokens.extend(verdict.tokens)
    verifier.link.close()
    return tokens


@pytest.mark.parametrize("cloud", [{"max_tree_nodes": 64}], indirect=True)
def test_trees_go_out_with_their_parents_and_the_answer_is_the_targets(cloud) -> None:
    fake, address = cloud
    stats = RequestStats()
    with grpc.insecure_channel(address) as channel:
        tokens = _answer(_verifier(channel), stats)
    assert tokens == greedy_answer(PROMPT, N)
    trees = [r for r in fake.rounds if r.draft_tokens]
    assert trees and all(list(r.draft_parents) == [p + 1 for p in _caterpillar_parents(len(r.draft_tokens))]
                         for r in trees)
    assert stats.tree_rounds == len(trees) and stats.nodes == sum(len(r.draft_tokens) for r in trees)
    assert _sideways(fake.rounds) > 0  # some verdicts went down a sibling, and were committed right


@pytest.mark.parametrize("cloud", [{"max_tree_nodes": 0}], indirect=True)
def test_a_replica_without_trees_gets_chains(cloud) -> None:
    fake, address = cloud
    with grpc.insecure_channel(address) as channel:
        tokens = _answer(_verifier(channel), RequestStats())
    assert tokens == greedy_answer(PROMPT, N)
    assert fake.rounds and not any(r.draft_parents for r in fake.rounds)
    assert all(len(r.draft_tokens) <= 4 for r in fake.rounds)  # the chains: one draft per level


@pytest.mark.parametrize("cloud", [{"max_tree_nodes": 64, "break_at": 2}], indirect=True)
def test_a_resumed_stream_gets_the_same_tree(cloud) -> None:
    fake, address = cloud
    with grpc.insecure_channel(address) as channel:
        verifier = _verifier(channel, max_resumes=1)
        tokens = _answer(verifier, RequestStats())
        assert verifier.link.resumes == 1
    assert tokens == greedy_answer(PROMPT, N)
    assert len(fake.opens) == 2 and list(fake.opens[1].generated_tokens) == tokens[:len(fake.opens[1].generated_tokens)]
    broken, again = fake.rounds[1], fake.rounds[2]
    assert broken.draft_parents and (broken.draft_tokens, broken.draft_parents) == (again.draft_tokens,
                                                                                   again.draft_parents)


@pytest.mark.parametrize("cloud", [{"max_tree_nodes": 64}], indirect=True)
def test_a_trees_q_rows_go_out_one_per_sibling_group(cloud) -> None:
    fake, address = cloud
    tokens, parents = (30, 31, 40, 41, 50), (-1, -1, 0, 0, 2)
    groups = DraftTree(tokens, parents).groups  # the root, node 0, node 2
    q = np.zeros((len(groups), V))
    for g, kids in enumerate(((30, 31), (40, 41), (50,))):
        q[g, list(kids)] = 0.25
        q[g, 60 + g] = 1.0 - q[g].sum()
    with grpc.insecure_channel(address) as channel:
        verifier = _verifier(channel)
        verifier.verify(Draft(tokens, q, parents=parents))
        verifier.link.close()
    sent = fake.rounds[0]
    assert list(sent.draft_tokens) == list(tokens) and list(sent.draft_parents) == [0, 0, 1, 1, 3]
    assert len(sent.q_rows) == len(groups)
    for row, proto in zip(q, sent.q_rows, strict=True):
        assert list(proto.ids) == np.flatnonzero(row).tolist()
        np.testing.assert_allclose(proto.probs, row[np.flatnonzero(row)], rtol=1e-6)


def _caterpillar_parents(n: int) -> list[int]:
    parents, node = [], -1
    for _ in range(n // 2):
        parents += [node, node]
        node = len(parents) - 2
    return parents


def _sideways(rounds: Sequence[cloud_pb2.DraftRound]) -> int:
    """Rounds whose greedy path took a sibling (an odd node) somewhere: replayed from the records."""
    context, count = list(PROMPT), 0
    for r in rounds:
        tree = DraftTree(tuple(r.draft_tokens), tuple(a - 1 for a in r.draft_parents) or ())
        node, took_sibling = -1, False
        while (child := next((c for c in tree.children(node) if tree.tokens[c] == target(
                [*context, *tree.path_tokens(node)])), None)) is not None:
            took_sibling |= child % 2 == 1
            node = child
        count += int(took_sibling)
        context += [*tree.path_tokens(node), target([*context, *tree.path_tokens(node)])]
    return count


class OracleDrafter(CaterpillarDrafter):
    """Caterpillar trees from a known answer: the right token two times in three along the chain,
    the right one as the sibling where the chain is wrong."""

    def __init__(self, prompt: Sequence[int], answer: Sequence[int], vocab: int) -> None:
        super().__init__(prompt)
        self.start, self.answer, self.vocab = len(prompt), list(answer), vocab

    def draft(self, k: int) -> Draft:
        tokens, parents, node = [], [], -1
        for j in range(len(self.context) - self.start, len(self.context) - self.start + k):
            good = self.answer[j] if j < len(self.answer) else 0
            guess = good if j % 3 else (good + 1) % self.vocab
            tokens += [guess, good if guess != good else (good + 2) % self.vocab]
            parents += [node, node]
            node = len(tokens) - 2
        return Draft(tuple(tokens), None, parents=tuple(parents))


def test_the_cloud_node_verifies_the_edges_trees(tiny_models) -> None:
    """The real cloud node (tiny target, fp32): the answer is the target's, through trees where the
    cloud takes them (skipped, after the chains' answer is checked, where it verifies chains only)."""
    from cloud_node.verifier import VerifierCore
    from tandem.models.tiny import VOCAB
    from tandem.pair import LocalPair
    from tests.support.cloud_server import serving

    prompt = (5, 17, 99, 3, 44, 101, 7)
    reference = LocalPair(tiny_models.target_hf, None, dtype="fp32").target_generate(prompt, GREEDY, max_new_tokens=N)
    stats = RequestStats()
    with serving(VerifierCore.load(tiny_models.target_hf, dtype="fp32")) as address, \
            grpc.insecure_channel(address) as channel:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, prompt, GREEDY, 0, N), round_timeout_s=30.0)
        verifier = RemoteVerifier(link, max_resumes=0, backoff_s=0.0, prompt_len=len(prompt), vocab=VOCAB)
        tokens = _answer(verifier, stats, OracleDrafter(prompt, reference.tokens, VOCAB))
        takes_trees = link.max_tree_nodes
    assert tuple(tokens) == reference.tokens
    assert verifier.bad_verdicts == 0 and link.resumes == 0
    if not takes_trees:
        pytest.skip("this cloud node verifies chains only (SessionOpened.max_tree_nodes 0): the trees went as chains")
    assert stats.accepted > 0


@pytest.mark.parametrize("cloud", [{"max_tree_nodes": 0}, {"max_tree_nodes": 2}], indirect=True,
                         ids=["chains-only", "two-nodes"])
def test_the_link_refuses_to_send_a_tree_the_replica_does_not_take(cloud) -> None:
    fake, address = cloud
    with grpc.insecure_channel(address) as channel:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, PROMPT, GREEDY, 0, N), round_timeout_s=10.0)
        link.open()
        with pytest.raises(ValueError, match="tree"):  # before the SessionOpened: no tree at all
            link.send_round((10, 11), None, parents=(-1, -1))
        link.await_opened()
        assert link.max_tree_nodes == fake.max_tree_nodes
        with pytest.raises(ValueError, match="tree"):
            link.send_round((10, 11, 12), None, parents=(-1, -1, 0))
        link.send_round((10,), None, parents=())  # no parents: a chain, always
        link.close()
    assert all(not r.draft_parents for r in fake.rounds)
