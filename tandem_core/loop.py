"""The speculative loop: draft -> verify -> commit, over two small interfaces. Every path runs it.

Notation as in `tandem_core.verify`: p is the target's distribution, q the drafter's
(Leviathan et al. 2023, arXiv 2211.17192).

Guarantees:
- Greedy mode emits exactly the target's greedy tokens (the verifier only ever keeps drafts that
  equal the target's argmax and adds the target's own next token), whatever the drafter does.
- Sampling mode emits tokens distributed as p, and with a seed the run is reproducible: round r
  draws from round_rng(seed, VERIFIER_STREAM, position) whatever process or machine verifies it.
- Both sides see the same commits, so the drafter's and the target's KV caches hold the committed
  tokens and nothing else between rounds.
- The loop is the same for the in-process pair (`TargetVerifier` over a local scorer) and the
  deployed edge (a remote verifier over gRPC, with deadlines and resume). A verifier that cannot
  answer raises `VerifierUnavailable` with a typed `SwitchCause`; the drafter then still holds
  an unsettled draft, which `DraftSession.rollback` drops, so a caller can fall back to the
  device from the last committed token (`edge_node.generation` does).

Pipelining (`pipeline=True`, with a `PipelinedVerifier` and an `AheadDraftSession`): while a
round's verdict is in flight, the drafter drafts the next round on the guess that every draft is
accepted and the target's own token is the drafter's choice there (`draft_ahead`), and the round
goes out at once, tagged with the position and last token it assumes. A verdict that confirms
the guess means the next round is already verified or under way; one that does not costs the
drafter a rewind, and the verifier drops the tagged round without a pass (`Verdict` of a dropped
round: None from `collect`). The rounds drafted are the ones sequential decoding would draft
after the same verdicts (the drafter's choices depend only on the committed tokens and, in
sampling mode, on per-position random keys), so greedy output is the target's token for token
and a seeded sampled run equals the sequential one, up to the rounding of the drafter's passes
(a rewound pass shape). A tagged round never commits a token unless its assumption held.
With `alternatives` and `early_verdicts` (greedy), a drafter that can (`draft_alternative`) also
prepares, in the time left before the verdict, the round that follows the likeliest verdict
other than the guess; when that verdict comes, the next round goes out without drafting
(Saguaro-style pre-drafting for more than one verdict).
`first_sent` says the caller already submitted round 1 with no drafts (the cloud's prefill
then yields the first token; the drafter drafts round 2 on a guess of it meanwhile). A drafter
that builds its cache lazily (`prefill(stop)`) builds it while round 1 is in flight and lets
round 1's verdict through as soon as it is in, before its cache is whole (round 1 either has no
drafts or was copied by retrieval, which needs no cache): round 2 is then drafted after the
verdict instead of ahead of it, with the same length (an empty round 1's verdict is what the
guess assumed in every way that sets the length; after a copied round nothing is drafted ahead)
and the same choices, so the answer does not depend on which came first.

The loop is pure: no I/O. Runtimes (ONNX Runtime, PyTorch, a gRPC peer) sit behind the
`DraftSession`, `ScoreSession` and `Verifier` protocols.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from tandem_core.sampling import VERIFIER_STREAM, SamplingParams, logits_to_probs, round_rng
from tandem_core.stats import RequestStats, RoundStats
from tandem_core.tree import DraftTree, verify_tree
from tandem_core.verify import Verdict, verify_greedy, verify_stochastic


@dataclass(frozen=True)
class Draft:
    """What one drafting step hands to verification: a chain of drafts, or a tree of them.

    A tree (`parents` set, `tandem_core.tree`'s convention) lists its nodes in topological
    order, and `q` then holds one row per sibling group. Its *chain* is the path of first
    children from the root: what the drafter's cache holds, and what a round drafted ahead
    assumes is accepted whole."""

    tokens: tuple[int, ...]  # (k,) drafted token ids, in order (a tree: its nodes)
    q: np.ndarray | None  # (k, V) float64 drafter probabilities (a tree: (groups, V)); None in greedy mode
    retrieved: int = 0  # 0, or k when retrieval copied the drafts (`tandem_core.lookup`)
    reason: str = ""  # why this length, a class for the stats (`tandem_core.stats.draft_reasons`)
    parents: tuple[int, ...] | None = None  # a tree: each node's parent, -1 the root; None: a chain

    @property
    def chain(self) -> tuple[int, ...]:
        """The drafts on the path of first children (all of them for a chain)."""
        if self.parents is None:
            return self.tokens
        out, node = [], -1
        while (child := next((i for i, a in enumerate(self.parents) if a == node), None)) is not None:
            out.append(self.tokens[child])
            node = child
        return tuple(out)

    @property
    def depth(self) -> int:
        """The longest root-to-node path: the most drafts a verdict can accept."""
        if self.parents is None:
            return len(self.tokens)
        depths: list[int] = []  # parents come before their children
        for a in self.parents:
            depths.append(0 if a < 0 else depths[a] + 1)
        return max(depths, default=-1) + 1

    def tree(self) -> DraftTree:
        """As a `DraftTree` (a chain as the chain tree); raises ValueError if malformed."""
        if self.parents is None:
            return DraftTree.chain(self.tokens, self.q)
        return DraftTree(self.tokens, self.parents, self.q)

    def kept(self, verdict: Verdict) -> int:
        """How many of the chain's drafts `verdict` commits, in place: what the drafter keeps."""
        chain, n = self.chain, 0
        while n < min(verdict.accepted, len(chain)) and verdict.tokens[n] == chain[n]:
            n += 1
        return n


class SwitchCause(StrEnum):
    """Why a round got no verdict, so that the answer continued on another route."""

    LATE_VERDICT = "late_verdict"    # no verdict within the round deadline
    BROKEN_STREAM = "broken_stream"  # the stream or the link failed
    CLOUD_REFUSED = "cloud_refused"  # the cloud is full or draining (RESOURCE_EXHAUSTED, ...)
    BAD_VERDICT = "bad_verdict"      # verdicts broke the protocol (`tandem_core.verdict_check`)


class VerifierUnavailable(Exception):
    """No verdict for this round; `cause` says why. The drafter holds an unsettled draft."""

    def __init__(self, cause: SwitchCause, message: str) -> None:
        super().__init__(message)
        self.cause = cause


class DraftSession(Protocol):
    """A drafter bound to one request. Its cache holds exactly the committed tokens."""

    def draft(self, k: int) -> Draft:
        """Propose up to k tokens after the committed ones."""
        ...

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        """Keep the first `accepted` drafts, then append `tokens[accepted:]` (the target's token)."""
        ...

    def rollback(self) -> None:
        """Drop the unsettled draft: the cache returns to the committed tokens."""
        ...


class AheadDraftSession(DraftSession, Protocol):
    """A drafter that can draft the next round before the unsettled one is verified."""

    def draft_ahead(self, k: int, stop: Callable[[], bool] | None = None) -> tuple[int, Draft]:
        """On the guess that every unsettled draft is accepted: the drafter's choice for the
        target's token after them, and up to k drafts after that (fewer, or none, once `stop()`
        says the verdict is in). `commit` with a verdict that equals the guess (all drafts, then
        that token) keeps these as the unsettled draft; any other verdict drops them."""
        ...


@dataclass(frozen=True)
class Assume:
    """What a round drafted ahead assumes: the session then holds `position` tokens (prompt +
    committed), the last of them `token`."""

    position: int
    token: int


class Verifier(Protocol):
    """The target side of one request: verifies a draft and commits the verdict's tokens."""

    def verify(self, draft: Draft) -> Verdict:
        """The verdict for `draft`; raises `VerifierUnavailable` when there is none."""
        ...


class PipelinedVerifier(Verifier, Protocol):
    """A verifier with rounds in flight: `submit` sends, `collect` answers them in order."""

    @property
    def position(self) -> int:
        """Tokens the verifier holds before the next round it will answer (prompt + committed)."""
        ...

    def submit(self, draft: Draft, assume: Assume | None = None) -> None:
        """Send a round; with `assume`, it is verified only if the assumption holds then (and
        the round before it, if a tree, accepted its chain: `Draft.chain`)."""
        ...

    def collect(self) -> Verdict | None:
        """The oldest round's verdict, committed; None if it was dropped (its assumption failed).
        Raises `VerifierUnavailable` when there is none."""
        ...

    def ready(self) -> bool:
        """Whether `collect` would answer now without waiting (a reply, or an error, is in)."""
        ...

    def expect_dropped(self) -> None:
        """The oldest round in flight not yet so marked was drafted on a guess that failed: it
        will be dropped, and `collect` consumes its reply silently before the next verdict."""
        ...


class ScoreSession(Protocol):
    """A target bound to one request. Between rounds its cache holds the committed tokens but
    the last one (a scorer may also hold that one with its logits, as a prefill leaves it)."""

    def score(self, draft_tokens: Sequence[int]) -> np.ndarray:
        """Logits (k+1, V): row i scores draft i, row k is the bonus position."""
        ...

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        """Drop the rejected drafts from the cache and record `tokens` as committed."""
        ...


class TreeScoreSession(ScoreSession, Protocol):
    """A target that also verifies draft trees (`Draft.parents`) in one pass."""

    def score_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        """Logits (n+1, V) laid out as `tandem_core.tree.verify_tree` takes them: row 0 after the
        last committed token, row 1 + i after node i."""
        ...

    def commit_path(self, path: Sequence[int], tokens: Sequence[int]) -> None:
        """Keep the cache of the accepted `path` (node indices, root to leaf), drop the rest of
        the tree, and record `tokens` (the path's tokens and the target's next) as committed."""
        ...


def verify_round(
    draft: Draft,
    target_logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    *,
    eos_ids: frozenset[int],
    remaining: int,
) -> Verdict:
    """One verification: greedy prefix match, or lossless rejection sampling."""
    if params.greedy:
        return verify_greedy(draft.tokens, target_logits, eos_ids=eos_ids, remaining=remaining)
    q = draft.q
    if q is None:
        if draft.tokens:
            raise ValueError("sampling mode needs the drafter's distributions q")
        q = np.zeros((0, target_logits.shape[-1]))  # no drafts: the round is one target sample
    p = logits_to_probs(target_logits, params)
    return verify_stochastic(draft.tokens, q, p, rng, eos_ids=eos_ids, remaining=remaining)


def target_round(scorer: ScoreSession, draft: Draft, params: SamplingParams, *, seed: int, position: int,
                 remaining: int, eos_ids: frozenset[int]) -> Verdict:
    """Score `draft` at `position` (tokens committed so far), verify it, commit the verdict.

    The one round every verifier runs, in process or in the cloud. A tree needs a
    `TreeScoreSession`: one pass over every node, then recursive rejection sampling (or the
    greedy path) down the tree, and the cache keeps the accepted path.
    """
    rng = round_rng(seed, VERIFIER_STREAM, position)
    if draft.parents is not None:
        tree = draft.tree()
        tree_logits = scorer.score_tree(tree.tokens, tree.parents)  # type: ignore[attr-defined]
        tv = verify_tree(tree, tree_logits, params, rng, eos_ids=eos_ids, remaining=remaining)
        scorer.commit_path(tv.path, tv.verdict.tokens)  # type: ignore[attr-defined]
        return tv.verdict
    logits = scorer.score(draft.tokens)
    verdict = verify_round(draft, logits, params, rng, eos_ids=eos_ids, remaining=remaining)
    scorer.commit(verdict.accepted, verdict.tokens)
    return verdict


class TargetVerifier:
    """A `Verifier` over a target scorer in this process."""

    def __init__(self, scorer: ScoreSession, params: SamplingParams, *, seed: int, start: int,
                 max_new_tokens: int, eos_ids: frozenset[int]) -> None:
        self.scorer, self.params, self.seed, self.eos_ids = scorer, params, seed, eos_ids
        self.position, self.end = start, start + max_new_tokens
        self.last: int | None = None  # the last committed token, once a round committed one
        self.off_chain = False  # the last verdict took a tree's side branch (no round ahead of it holds)
        self._rounds: deque[tuple[Draft, Assume | None]] = deque()
        self._expected = 0  # rounds at the head known to be dropped (`expect_dropped`)
        self.dropped = 0  # rounds dropped: their assumption failed

    def verify(self, draft: Draft) -> Verdict:
        verdict = target_round(self.scorer, draft, self.params, seed=self.seed, position=self.position,
                               remaining=self.end - self.position, eos_ids=self.eos_ids)
        self.position += len(verdict.tokens)
        if verdict.tokens:
            self.last = verdict.tokens[-1]
        self.off_chain = draft.kept(verdict) < verdict.accepted
        return verdict

    def submit(self, draft: Draft, assume: Assume | None = None) -> None:
        """Queue a round; `collect` verifies it (in process, nothing runs meanwhile)."""
        self._rounds.append((draft, assume))

    def expect_dropped(self) -> None:
        self._expected += 1

    def collect(self) -> Verdict | None:
        while True:
            draft, assume = self._rounds.popleft()
            if assume is not None and (self.off_chain or self.position != assume.position or self.last != assume.token):
                self.dropped += 1
                if self._expected:  # consumed silently: the caller knows
                    self._expected -= 1
                    continue
                return None
            if self._expected:
                raise AssertionError("a round expected to be dropped held its assumption")
            return self.verify(draft)


DraftLen = int | Callable[[RequestStats], int]  # fixed, or chosen per round from the request so far


class _Sequential:
    """A plain `Verifier` as a `PipelinedVerifier` that never gets a round ahead."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._rounds: deque[Draft] = deque()

    def submit(self, draft: Draft, assume: Assume | None = None) -> None:
        if assume is not None:
            raise ValueError("this verifier cannot take rounds ahead of a verdict")
        self._rounds.append(draft)

    def collect(self) -> Verdict | None:
        return self.verifier.verify(self._rounds.popleft())


def _if_whole(stats: RequestStats, draft: Draft) -> RequestStats:
    """The statistics as they will be if `draft` is accepted whole: what a round drafted ahead
    chooses its length from, as the round after that verdict would."""
    seen = copy.deepcopy(stats)
    n = len(draft.chain)
    seen.add_round(RoundStats(drafted=n, accepted=n, emitted=n + 1, retrieved=min(draft.retrieved, n),
                              reason=draft.reason))
    return seen


def _pipelines(drafter: DraftSession, verifier: Verifier) -> bool:
    return callable(getattr(drafter, "draft_ahead", None)) and callable(getattr(verifier, "submit", None))


def speculative_generate(
    drafter: DraftSession,
    verifier: Verifier,
    *,
    draft_len: DraftLen,
    max_new_tokens: int,
    stats: RequestStats | None = None,
    pipeline: bool = False,
    first_sent: bool = False,
    early_verdicts: bool = False,
    alternatives: bool = False,
) -> Iterator[Verdict]:
    """Yield each round's verdict until EOS or `max_new_tokens` tokens are committed.

    `stats`, when given, is filled in round by round, so a caller can read it while the stream
    is still running. `VerifierUnavailable` from the verifier propagates with the draft
    unsettled (rounds drafted ahead included: `DraftSession.rollback` drops them all); the
    tokens yielded before it are committed. `pipeline` drafts and sends each next round while
    the verdict is in flight, when the drafter and the verifier support it (see the module
    doc); `first_sent`: round 1, with no drafts, was already submitted to `verifier`.
    `early_verdicts` lets a verdict that arrives while the next round is drafted ahead cut
    that drafting short (the verifier's `ready`), so the answer goes on at once; the rounds'
    lengths then depend on timing, which never changes a greedy answer but would change which
    tokens a seeded sampled answer draws: greedy only. `alternatives` (with `early_verdicts`) lets
    the drafter prepare a round for the likeliest verdict other than the guess (module doc).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    stats = stats if stats is not None else RequestStats()
    ahead_ok = pipeline and _pipelines(drafter, verifier)
    stop = getattr(verifier, "ready", None) if early_verdicts else None
    rounds: PipelinedVerifier | _Sequential = (
        verifier if callable(getattr(verifier, "submit", None)) else _Sequential(verifier))  # type: ignore[assignment]
    if first_sent and not callable(getattr(verifier, "submit", None)):
        raise ValueError("first_sent needs a verifier that takes submitted rounds")

    def length(seen: RequestStats) -> int:
        wanted = draft_len(seen) if callable(draft_len) else draft_len
        if wanted < 0:
            raise ValueError(f"draft_len must be >= 0, got {wanted}")
        return wanted

    # The first verdict comes before a lazy drafter's cache is whole (see the module doc).
    prefill: Callable[[Callable[[], bool] | None], bool] | None = getattr(drafter, "prefill", None)
    produced = 0
    draft: Draft | None = Draft((), None) if first_sent else None  # the round in flight
    while produced < max_new_tokens:
        if draft is None:
            # Drafting past the budget is wasted work: the round emits at most k+1 tokens.
            k = min(length(stats), max_new_tokens - produced - 1)
            draft = drafter.draft(k) if k > 0 else Draft((), None)
            rounds.submit(draft)
        ahead: Draft | None = None
        guess = -1
        warm = prefill is None or prefill(getattr(rounds, "ready", None))
        prefill = None
        if ahead_ok and warm:
            # After a round that keeps every draft, tokens left for the next one: it drafts k2
            # and commits at most k2 + 1 of them.
            k2 = min(length(_if_whole(stats, draft)), max_new_tokens - produced - len(draft.chain) - 2)
            if k2 > 0:
                guess, ahead = drafter.draft_ahead(k2, stop)  # type: ignore[attr-defined]
                if ahead.tokens:
                    position = rounds.position + len(draft.chain) + 1  # type: ignore[union-attr]
                    rounds.submit(ahead, Assume(position, guess))
                    # Greedy (timing decides how far it gets): while the verdict is still out, the
                    # drafter may prepare the round after the likeliest other verdict.
                    alternative = getattr(drafter, "draft_alternative", None)
                    if alternatives and stop is not None and alternative is not None:
                        alternative(k2, stop)
                else:
                    ahead = None
        verdict = rounds.collect()
        if verdict is None:
            raise AssertionError("a round sent without an assumption was dropped")
        stats.add_round(RoundStats(drafted=draft.depth, accepted=verdict.accepted,
                                   emitted=len(verdict.tokens), retrieved=min(draft.retrieved, draft.depth),
                                   reason=draft.reason, nodes=len(draft.tokens) if draft.parents is not None else 0))
        produced += len(verdict.tokens)
        yield verdict
        if verdict.finished:
            return
        chain = draft.chain
        hit = (ahead is not None and verdict.accepted == len(chain) and tuple(verdict.tokens) == (*chain, guess))
        # The drafter holds the chain: it keeps the drafts committed in place (a verdict down a
        # tree's side branch keeps fewer than it accepts). On a hit it keeps `ahead` as unsettled.
        drafter.commit(draft.kept(verdict), verdict.tokens)
        if ahead is not None:
            stats.add_pipeline(hit)
            if not hit:  # the verifier drops it unverified; its reply is read with the next verdict's
                rounds.expect_dropped()  # type: ignore[union-attr]
        draft = ahead if hit else None
