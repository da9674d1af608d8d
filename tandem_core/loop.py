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

The loop is pure: no I/O. Runtimes (ONNX Runtime, PyTorch, a gRPC peer) sit behind the
`DraftSession`, `ScoreSession` and `Verifier` protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from tandem_core.sampling import VERIFIER_STREAM, SamplingParams, logits_to_probs, round_rng
from tandem_core.stats import RequestStats, RoundStats
from tandem_core.verify import Verdict, verify_greedy, verify_stochastic


@dataclass(frozen=True)
class Draft:
    """What one drafting step hands to verification."""

    tokens: tuple[int, ...]  # (k,) drafted token ids, in order
    q: np.ndarray | None  # (k, V) float64 drafter probabilities; None in greedy mode
    retrieved: int = 0  # 0, or k when retrieval copied the drafts (`tandem_core.lookup`)
    reason: str = ""  # why this length, a class for the stats (`tandem_core.stats.draft_reasons`)


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


class Verifier(Protocol):
    """The target side of one request: verifies a draft and commits the verdict's tokens."""

    def verify(self, draft: Draft) -> Verdict:
        """The verdict for `draft`; raises `VerifierUnavailable` when there is none."""
        ...


class ScoreSession(Protocol):
    """A target bound to one request. Its cache holds the committed tokens but the last one."""

    def score(self, draft_tokens: Sequence[int]) -> np.ndarray:
        """Logits (k+1, V): row i scores draft i, row k is the bonus position."""
        ...

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        """Drop the rejected drafts from the cache and record `tokens` as committed."""
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

    The one round every verifier runs, in process or in the cloud.
    """
    logits = scorer.score(draft.tokens)
    rng = round_rng(seed, VERIFIER_STREAM, position)
    verdict = verify_round(draft, logits, params, rng, eos_ids=eos_ids, remaining=remaining)
    scorer.commit(verdict.accepted, verdict.tokens)
    return verdict


class TargetVerifier:
    """A `Verifier` over a target scorer in this process."""

    def __init__(self, scorer: ScoreSession, params: SamplingParams, *, seed: int, start: int,
                 max_new_tokens: int, eos_ids: frozenset[int]) -> None:
        self.scorer, self.params, self.seed, self.eos_ids = scorer, params, seed, eos_ids
        self.position, self.end = start, start + max_new_tokens

    def verify(self, draft: Draft) -> Verdict:
        verdict = target_round(self.scorer, draft, self.params, seed=self.seed, position=self.position,
                               remaining=self.end - self.position, eos_ids=self.eos_ids)
        self.position += len(verdict.tokens)
        return verdict


DraftLen = int | Callable[[RequestStats], int]  # fixed, or chosen per round from the request so far


def speculative_generate(
    drafter: DraftSession,
    verifier: Verifier,
    *,
    draft_len: DraftLen,
    max_new_tokens: int,
    stats: RequestStats | None = None,
) -> Iterator[Verdict]:
    """Yield each round's verdict until EOS or `max_new_tokens` tokens are committed.

    `stats`, when given, is filled in round by round, so a caller can read it while the stream
    is still running. `VerifierUnavailable` from the verifier propagates with the draft
    unsettled; the tokens yielded before it are committed.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    stats = stats if stats is not None else RequestStats()
    produced = 0
    while produced < max_new_tokens:
        wanted = draft_len(stats) if callable(draft_len) else draft_len
        if wanted < 0:
            raise ValueError(f"draft_len must be >= 0, got {wanted}")
        # Drafting past the budget is wasted work: the round emits at most k+1 tokens.
        k = min(wanted, max_new_tokens - produced - 1)
        draft = drafter.draft(k) if k > 0 else Draft((), None)
        verdict = verifier.verify(draft)
        stats.add_round(RoundStats(drafted=len(draft.tokens), accepted=verdict.accepted,
                                   emitted=len(verdict.tokens), retrieved=draft.retrieved,
                                   reason=draft.reason))
        produced += len(verdict.tokens)
        yield verdict
        if verdict.finished:
            return
        drafter.commit(verdict.accepted, verdict.tokens)
