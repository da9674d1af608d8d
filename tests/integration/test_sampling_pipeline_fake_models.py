"""Seeded sampling through the deployed path, edge drafter to cloud verifier, on fake models.

Issue 14, item 1 (the pipeline-level test). Everything between the models is the real code:
the edge's `DrafterSession` (its sampling path: the capped q it samples from and sends, its
per-position stream, its cache and rollback), `generate_speculative` around the core's loop,
`RemoteVerifier` and `CloudLink` with their wire conversion (`q_rows_to_proto`) and verdict
checks, the cloud's protocol (`VerifyStream`, bytes in, bytes out), `VerifierCore` with its
validation and densification of the q rows, and `target_round` with the stream keyed by the
session's position. The fakes are the two models, whose distributions must be exactly known
(`tests.support.sampling_models`: a stand-in for onnxruntime-genai's generator on the edge, a
stand-in for the scorer session in the cloud), and the gRPC channel, which hands the serialized
messages to the cloud's `VerifyStream` in this process instead of over a socket.

Checks: drafts are sampled from exactly the q that goes on the wire; the deployed path gives
the same tokens as the in-process pair (`TargetVerifier`) for every seed, also across a broken
stream that resumes; the target drafting for itself accepts every draft after the transform;
and the answers follow the target's exact distribution (chi-square at ALPHA = 1e-8, fixed
seeds, see `test_sampling_rows_and_keys.py`).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from cloud_node.protocol import Admission, VerifyStream, round_from_proto
from cloud_node.verifier import Limits, VerifierCore
from edge_node import link_stream
from edge_node.cloud_link import CloudLink, SessionRequest, q_rows_to_proto
from edge_node.drafter import DrafterModel, DrafterSession
from edge_node.generation import EdgeResult, generate_speculative
from protos.tandem.v1 import cloud_pb2
from tandem.limits import MAX_DRAFT_LEN
from tandem_core.branching import DEFAULT_TREE_NODES
from tandem_core.lookup import LookupDrafter
from tandem_core.loop import Draft, TargetVerifier, speculative_generate
from tandem_core.sampling import DRAFTER_STREAM, SamplingParams, cap_support, logits_to_probs, round_rng, sample
from tandem_core.stats import RequestStats
from tandem_core.tree import DraftTree
from tests.support.sampling_models import (
    Logits,
    V,
    chi_square,
    drafter_logits,
    exact_distribution,
    target_logits,
)

PROMPT = (1, 2)
ALPHA = 1e-8
TRANSFORMED = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
PLAIN = SamplingParams(temperature=1.0)
GREEDY = SamplingParams()
Q_SUPPORT = 3  # of V = 5 tokens: the cap bites, as 64 of 151k does in production


# --- the fake models ------------------------------------------------------------------------

class FakeGenerator:
    """onnxruntime-genai's Generator over a fake model: the logits of the tokens in its cache."""

    def __init__(self, model: Any, params: Any) -> None:
        self.logits: Logits = model.logits
        self.tokens: list[int] = []

    def append_tokens(self, ids: np.ndarray) -> None:
        self.tokens.extend(int(t) for t in ids)
        self.appended = len(ids)

    def get_logits(self) -> np.ndarray:
        return self.logits(self.tokens)[None, None, :]

    def get_output(self, name: str) -> np.ndarray:
        """The last append's logits, one row per token appended (a batched pass)."""
        assert name == "logits"
        n = len(self.tokens)
        return np.stack([self.logits(self.tokens[:i]) for i in range(n - self.appended + 1, n + 1)])[None]

    def rewind_to(self, length: int) -> None:
        del self.tokens[length:]


class FakeGeneratorParams:
    def __init__(self, model: Any) -> None:
        pass

    def set_search_options(self, **options: Any) -> None:
        pass


class FakeOnnxDrafterModel(DrafterModel):
    """The edge's `DrafterModel` with a fake onnxruntime-genai underneath (nothing loaded)."""

    def __init__(self, logits: Logits, q_support: int) -> None:  # not super().__init__: it loads a model
        self._og = SimpleNamespace(Generator=FakeGenerator, GeneratorParams=FakeGeneratorParams)
        self.model = SimpleNamespace(logits=logits)
        self.model_dir, self.context_length, self.eos_ids, self.vocab_size = "fake", 64, frozenset(), V
        self._retained: list[DrafterSession] = []
        self._lock = threading.Lock()
        self.q_support = q_support

    def new_session(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int, *,
                    max_length: int | None = None, q_support: int = 0, lazy: bool = False,
                    cancelled: Callable[[], bool] | None = None) -> DrafterSession:
        return super().new_session(prompt_ids, params, seed, max_length=max_length, q_support=self.q_support,
                                   lazy=lazy, cancelled=cancelled)


@dataclass
class FakePass:
    queue_s: float = 0.0
    sessions: int = 1


class FakeTargetSession:
    """The cloud's `ScorerSession` over the fake target: its cache holds the committed tokens
    but the last one, and grows by the drafts while a round is scored."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.committed = [int(t) for t in ids]
        self.cached_len = len(self.committed) - 1
        self.last_pass, self.prefilled, self.reused = FakePass(), self.cached_len, 0

    def score(self, draft_tokens: Sequence[int]) -> np.ndarray:
        self.cached_len = len(self.committed) + len(draft_tokens)
        return np.stack([target_logits([*self.committed, *draft_tokens[:i]]) for i in range(len(draft_tokens) + 1)])

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        self.committed.extend(int(t) for t in tokens)
        self.cached_len = len(self.committed) - 1

    def score_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        """A draft tree: row 1 + i scores node i after its own path (`tandem_core.tree`)."""
        tree = DraftTree(tuple(tokens), tuple(parents))
        self.cached_len = len(self.committed) + len(tokens)
        return np.stack([target_logits(self.committed),
                         *(target_logits([*self.committed, *tree.path_tokens(i)]) for i in range(len(tokens)))])

    def commit_path(self, path: Sequence[int], tokens: Sequence[int]) -> None:
        self.commit(len(path), tokens)


class FakeTarget:
    vocab_size, max_context = V, 64

    def new_session(self, ids: Sequence[int], *, prefix: Any = None, cancelled: Any = None) -> FakeTargetSession:
        return FakeTargetSession(ids)


# --- the fake channel -----------------------------------------------------------------------

class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeVerifyCall:
    """One Verify call: each request, serialized, goes to a `VerifyStream`; its reply comes back
    serialized. A cloud error ends the call as the servicer's status would (INVALID_ARGUMENT)."""

    def __init__(self, channel: InProcessChannel, requests: Iterator[Any], serialize: Any, deserialize: Any) -> None:
        self.channel, self.requests, self.serialize, self.deserialize = channel, requests, serialize, deserialize
        self.stream = VerifyStream(channel.core, Admission())
        self.rounds = 0
        self.replies: list[Any] = []  # an open with first_round gets two

    def __iter__(self) -> FakeVerifyCall:
        return self

    def __next__(self) -> Any:
        if self.replies:
            return self.replies.pop(0)
        try:
            request = next(self.requests)
        except StopIteration:
            self.stream.close()
            raise
        data = self.serialize(request)
        if cloud_pb2.VerifyRequest.FromString(data).WhichOneof("kind") == "round":
            self.rounds += 1
            if self.channel.break_at_round == self.rounds:
                self.channel.break_at_round = None  # once
                self.stream.close()
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "fake link cut")
        if self.channel.old:  # a cloud from before pipelining: no first_round, no assume_*
            message = cloud_pb2.VerifyRequest.FromString(data)
            if message.HasField("open"):
                message.open.ClearField("first_round")
            else:
                message.round.ClearField("assume_position")
                message.round.ClearField("assume_token")
            data = message.SerializeToString()
        try:
            replies = self.stream.responses(data)
            for reply in replies:
                if self.channel.old and reply.HasField("opened"):
                    reply.opened.pipelining = False
        except Exception as exc:  # noqa: BLE001 - the servicer maps every error to a status
            self.stream.close()
            raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}") from None
        self.replies = [self.deserialize(reply.SerializeToString()) for reply in replies]
        return self.replies.pop(0)

    def cancel(self) -> None:
        self.stream.close()

    def done(self) -> bool:
        return False


class InProcessChannel:
    """A stand-in for a gRPC channel to the cloud: Verify streams served by `core` in this process."""

    def __init__(self, core: VerifierCore, break_at_round: int | None = None, old: bool = False) -> None:
        self.core, self.break_at_round, self.old = core, break_at_round, old

    def stream_stream(self, method: str, request_serializer: Any, response_deserializer: Any, **_: Any) -> Any:
        def call(requests: Iterator[Any], timeout: float | None = None) -> FakeVerifyCall:
            return FakeVerifyCall(self, requests, request_serializer, response_deserializer)
        return call

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return None  # Generate: not used here


@pytest.fixture(autouse=True)
def _no_send_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process channel has no sending thread: a request is taken only when a reply is
    read, and then verified at once. `VerifyStream.send`'s wait for gRPC to write the request
    would here wait for its verification, which decides the race between the verdict and the
    drafter's lazy prefill that these tests cover both ways (`SEND_WAIT_S`, `edge_node.link_stream`)."""
    monkeypatch.setattr(link_stream, "SEND_WAIT_S", 0.0)


@pytest.fixture(scope="module")
def core() -> VerifierCore:
    return VerifierCore(FakeTarget(), eos_ids=frozenset(), limits=Limits(max_sessions=4), bytes_per_token=1,
                        model_name="fake-target")


# --- the two paths --------------------------------------------------------------------------

def deployed(core: VerifierCore, drafter: FakeOnnxDrafterModel, params: SamplingParams, seed: int, *, draft_len: int,
             n: int, break_at_round: int | None = None, lookup: bool = False, pipeline: bool = True,
             old_cloud: bool = False, sampled_ahead: bool = True) -> EdgeResult:
    """An answer on the speculative route: edge drafter, wire, cloud verifier (`old_cloud`: one
    from before pipelining, which ignores first_round and assume_*). `sampled_ahead`: rounds
    drafted ahead in sampling mode too (not the edge's default), so that these tests cover them
    on the wire."""
    link = CloudLink(InProcessChannel(core, break_at_round, old_cloud),  # type: ignore[arg-type]
                     SessionRequest(f"seed-{seed}", PROMPT, params, seed, n), round_timeout_s=10.0)
    return generate_speculative(drafter, link, PROMPT, params, seed, draft_len=draft_len, max_new_tokens=n,
                                max_resumes=1, backoff_s=0.0, lookup=lookup, pipeline=pipeline,
                                sampled_ahead=sampled_ahead)


def in_process(drafter: FakeOnnxDrafterModel, params: SamplingParams, seed: int, *, draft_len: int,
               n: int, lookup: bool = False, pipeline: bool = False) -> tuple[int, ...]:
    """The same answer from the in-process pair (`tandem.pair`): the loop over a `TargetVerifier`
    (with `lookup`, retrieval drafts as `tandem.pair` and the edge make them; with `pipeline`,
    the pipelined rounds, round 1 sent with no drafts)."""
    verifier = TargetVerifier(FakeTargetSession(PROMPT), params, seed=seed, start=len(PROMPT), max_new_tokens=n,
                              eos_ids=frozenset())
    session: Any = drafter.new_session(PROMPT, params, seed, max_length=len(PROMPT) + n + MAX_DRAFT_LEN + 2)
    if lookup:
        session = LookupDrafter.over(session, PROMPT, model_len=draft_len, vocab=V,
                                     trees=lambda: DEFAULT_TREE_NODES)  # as the edge's default
    if pipeline:
        verifier.submit(Draft((), None))
    return tuple(t for v in speculative_generate(session, verifier, draft_len=MAX_DRAFT_LEN if lookup else draft_len,
                                                 max_new_tokens=n, pipeline=pipeline, first_sent=pipeline)
                 for t in v.tokens)


# --- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_drafts_are_sampled_from_the_q_sent_with_a_fake_onnx_drafter(core: VerifierCore, seed: int) -> None:
    """Each draft is the position-keyed draw from its q row, the row is the capped transform of
    the drafter's logits, and the probabilities on the wire are that row's values exactly."""
    drafter = FakeOnnxDrafterModel(drafter_logits("shifted"), Q_SUPPORT)
    draft = drafter.new_session(PROMPT, TRANSFORMED, seed).draft(3)
    assert draft.q is not None and draft.q.shape == (3, V)
    wire = cloud_pb2.DraftRound(round=1, draft_tokens=draft.tokens, q_rows=q_rows_to_proto(draft.q)).SerializeToString()
    received = cloud_pb2.DraftRound.FromString(wire)
    sent = received.q_rows
    dense = core.check.q_rows(round_from_proto(received).q_rows, list(draft.tokens), TRANSFORMED)
    for i, (token, q, row) in enumerate(zip(draft.tokens, draft.q, sent, strict=True)):
        context = [*PROMPT, *draft.tokens[:i]]
        np.testing.assert_array_equal(q, cap_support(logits_to_probs(drafter_logits("shifted")(context), TRANSFORMED),
                                                     Q_SUPPORT))
        assert token == sample(q, round_rng(seed, DRAFTER_STREAM, len(context)))
        assert list(row.ids) == np.flatnonzero(q).tolist()
        np.testing.assert_array_equal(np.asarray(row.probs, dtype=np.float64), q[list(row.ids)])
    # The drafter samples from the float32 values scaled by their total (`sample`); the cloud
    # verifies with exactly that distribution.
    assert dense is not None
    np.testing.assert_allclose(dense, draft.q / draft.q.sum(axis=1, keepdims=True), rtol=1e-15, atol=0)


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "sequential"])
@pytest.mark.parametrize("lookup", [False, True], ids=["model-drafts", "with-lookup"])
@pytest.mark.parametrize(("kind", "params", "draft_len"), [("shifted", TRANSFORMED, 2), ("close", PLAIN, 3)])
def test_the_deployed_path_gives_the_in_process_tokens_with_fake_models(
        core: VerifierCore, kind: str, params: SamplingParams, draft_len: int, lookup: bool, pipeline: bool) -> None:
    """Pipelined on the wire (rounds sent ahead, tagged, dropped by the cloud when the guess
    fails) against pipelined in process, and sequential against sequential: the same tokens."""
    drafter = FakeOnnxDrafterModel(drafter_logits(kind), Q_SUPPORT)
    tries = hits = 0
    for seed in range(100):
        result = deployed(core, drafter, params, seed, draft_len=draft_len, n=6, lookup=lookup, pipeline=pipeline)
        assert tuple(result.tokens) == in_process(drafter, params, seed, draft_len=draft_len, n=6, lookup=lookup,
                                                  pipeline=pipeline), seed
        tries, hits = tries + result.stats.pipeline_tries, hits + result.stats.pipeline_hits
    if pipeline:  # both outcomes of a guess went over the wire: used, and dropped by the cloud
        assert 0 < hits < tries, (hits, tries)
    else:
        assert tries == 0


@pytest.mark.parametrize("params", [TRANSFORMED, GREEDY], ids=["sampled", "greedy"])
def test_by_default_only_greedy_answers_draft_rounds_ahead_with_fake_models(core: VerifierCore,
                                                                           params: SamplingParams) -> None:
    """The edge's default: round 1 with the open either way; rounds drafted ahead in greedy mode
    only (in sampling mode one cannot be cut short by its verdict, and the guess seldom holds).
    The tokens are the in-process pipelined loop's (the same round 1, the same rounds)."""
    drafter = FakeOnnxDrafterModel(drafter_logits("close"), Q_SUPPORT)
    tries = 0
    for seed in range(30):
        result = deployed(core, drafter, params, seed, draft_len=3, n=8, sampled_ahead=False)
        assert tuple(result.tokens) == in_process(drafter, params, seed, draft_len=3, n=8, pipeline=True), seed
        tries += result.stats.pipeline_tries
    assert (tries == 0) if not params.greedy else (tries > 0)


@pytest.mark.parametrize("params", [TRANSFORMED, GREEDY], ids=["sampled", "greedy"])
def test_an_older_cloud_gets_the_same_rounds_without_rounds_ahead_with_fake_models(
        core: VerifierCore, params: SamplingParams) -> None:
    """Against a cloud that predates pipelining (SessionOpened without `pipelining`), the edge
    asks for round 1 itself and checks each guess locally, sending only rounds whose guess held:
    the same tokens as the pipelined in-process rounds, no resume, no bad verdict."""
    drafter = FakeOnnxDrafterModel(drafter_logits("close"), Q_SUPPORT)
    for seed in range(40):
        result = deployed(core, drafter, params, seed, draft_len=3, n=8, old_cloud=True)
        assert result.resumes == 0 and not result.switches
        assert tuple(result.tokens) == in_process(drafter, params, seed, draft_len=3, n=8, pipeline=True), seed


@pytest.mark.parametrize("break_at_round", [1, 2, 3])
def test_a_broken_stream_resumes_with_the_same_tokens_with_fake_models(core: VerifierCore, break_at_round: int) -> None:
    drafter = FakeOnnxDrafterModel(drafter_logits("shifted"), Q_SUPPORT)
    for seed in range(25):
        undisturbed = deployed(core, drafter, TRANSFORMED, seed, draft_len=2, n=8)
        resumed = deployed(core, drafter, TRANSFORMED, seed, draft_len=2, n=8, break_at_round=break_at_round)
        assert resumed.resumes == 1
        assert resumed.tokens == undisturbed.tokens, seed


def test_the_target_drafting_for_itself_accepts_every_draft_with_fake_models(core: VerifierCore) -> None:
    """q == p only if both sides apply the same transform (here T = 0.8, top-k 4, top-p 0.95)."""
    drafter = FakeOnnxDrafterModel(target_logits, V)  # the target as its own drafter, q uncapped
    drafted = accepted = 0
    for seed in range(60):
        stats = deployed(core, drafter, TRANSFORMED, seed, draft_len=3, n=8).stats
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert drafted > 200 and accepted == drafted  # q is p rounded to float32: a rejection needs u within 1e-7 of 1


def test_answers_follow_the_exact_target_distribution_through_edge_and_cloud_with_fake_models(
        core: VerifierCore) -> None:
    """The close drafter has most drafts accepted, where a draw shared between the drafts of a
    round shows most; 4 tokens in rounds of at most 3 take two rounds or more, so a stream keyed
    by anything but the position shows too. Applied to the edge or the cloud
    (`tests/mutation/sampling_mutants.py`), the drafter's stream keyed by the round gives 3.0
    times the critical value here, the cloud's keyed by the prompt length 2.4 times, a drafter
    that sends the uncapped q 1.4 times (each is also caught by a direct test above)."""
    drafter = FakeOnnxDrafterModel(drafter_logits("close"), Q_SUPPORT)
    n, answers = 4, 2500
    counts = Counter(tuple(deployed(core, drafter, TRANSFORMED, seed, draft_len=2, n=n).tokens)
                     for seed in range(50_000, 50_000 + answers))
    stat, df, pvalue = chi_square(counts, exact_distribution(PROMPT, n, TRANSFORMED))
    assert pvalue > ALPHA, f"chi2 {stat:.1f} with {df} degrees of freedom, p-value {pvalue:.2e}"


def test_tree_answers_follow_the_exact_target_distribution_through_edge_and_cloud_with_fake_models(
        core: VerifierCore) -> None:
    """Draft trees on the deployed path (the edge's default with a pinned length: siblings drawn
    without replacement on the position's stream, weighed at the policy's prior costs), through
    the wire (draft_parents, q rows per sibling group), the cloud's tree checks and recursive
    rejection sampling: the answers follow the target's exact distribution."""
    drafter = FakeOnnxDrafterModel(drafter_logits("shifted"), Q_SUPPORT)
    n, answers, tree_rounds = 4, 2500, 0
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(60_000, 60_000 + answers):
        result = deployed(core, drafter, TRANSFORMED, seed, draft_len=3, n=n, lookup=True)
        counts[tuple(result.tokens)] += 1
        tree_rounds += result.stats.tree_rounds
    assert tree_rounds > answers // 2
    stat, df, pvalue = chi_square(counts, exact_distribution(PROMPT, n, TRANSFORMED))
    assert pvalue > ALPHA, f"chi2 {stat:.1f} with {df} degrees of freedom, p-value {pvalue:.2e}"


@pytest.mark.parametrize(("how", "draft_s"), [("copied", 1e3), ("checked", 0.0)])
def test_answers_follow_the_exact_target_distribution_with_retrieval_drafts_with_fake_models(
        how: str, draft_s: float) -> None:
    """Retrieval drafts mixed into the real loop (`tandem_core.lookup`), on a prompt whose tail
    repeats so the index proposes from the first round. "copied": a costly drafter makes the
    policy send the index's continuation as it is, with one-hot q rows (a deterministic
    proposal); "checked": a free drafter makes it check the continuation in batched passes and
    send its own draws. Either way the answers follow the target's exact distribution."""
    from tandem_core.lookup import LookupPolicy
    from tandem_core.suffix_index import SuffixIndex

    prompt, n, answers = (1, 2, 3, 4, 1, 2), 4, 2500
    drafter = FakeOnnxDrafterModel(drafter_logits("close"), Q_SUPPORT)
    counts: Counter[tuple[int, ...]] = Counter()
    copied = checked = 0
    for seed in range(70_000, 70_000 + answers):
        verifier = TargetVerifier(FakeTargetSession(prompt), TRANSFORMED, seed=seed, start=len(prompt),
                                  max_new_tokens=n, eos_ids=frozenset())
        index = SuffixIndex()
        index.extend(prompt)
        drafts = LookupDrafter(drafter.new_session(prompt, TRANSFORMED, seed, max_length=len(prompt) + n + 18), index,
                               LookupPolicy(draft_s=draft_s), model_len=2, vocab=V)
        stats = RequestStats()
        counts[tuple(t for v in speculative_generate(drafts, verifier, draft_len=MAX_DRAFT_LEN, max_new_tokens=n,
                                                     stats=stats) for t in v.tokens)] += 1
        copied, checked = copied + drafts.rounds_copied, checked + drafts.rounds_checked
    if how == "copied":
        assert copied >= answers and checked == 0  # at least the first round of every answer
    else:
        assert checked >= answers and copied == 0
    stat, df, pvalue = chi_square(counts, exact_distribution(prompt, n, TRANSFORMED))
    assert pvalue > ALPHA, f"chi2 {stat:.1f} with {df} degrees of freedom, p-value {pvalue:.2e}"


@pytest.mark.parametrize("lookup", [False, True], ids=["model-drafts", "with-lookup"])
def test_a_first_round_past_the_clouds_draft_limit_is_cut_to_it_not_taken_for_a_bad_verdict_with_fake_models(
        lookup: bool) -> None:
    """The first round leaves before the SessionOpened (with the cloud's max_draft_len) has come,
    so it may hold more drafts than the cloud verifies (a copy of 16, or a pinned length above the
    cloud's); the cloud drops the rest and the edge checks the verdict against what the cloud kept.
    With the target drafting for itself every draft is right, the hardest case: the bonus token
    after the cloud's last verified draft equals the next draft sent."""
    small = VerifierCore(FakeTarget(), eos_ids=frozenset(), limits=Limits(max_sessions=4, max_draft_len=2),
                         bytes_per_token=1, model_name="fake-target")
    drafter = FakeOnnxDrafterModel(target_logits, V)
    greedy = SamplingParams()
    result = deployed(small, drafter, greedy, 0, draft_len=4, n=8, lookup=lookup)
    assert tuple(result.tokens) == in_process(drafter, greedy, 0, draft_len=2, n=8)
    assert result.resumes == 0
