"""The speculative loop: draft -> score -> verify -> commit, over two small interfaces.

Guarantees:
- Greedy mode emits exactly the target's greedy tokens (the verifier only ever keeps drafts that
  equal the target's argmax and adds the target's own next token), whatever the drafter does.
- Sampling mode emits tokens distributed as the target's sampling distribution p (Leviathan et
  al. 2023, arXiv 2211.17192; see `tandem_core.verify`), and with a seed the run is reproducible.
- Both sessions see the same commits, so the drafter's and the target's KV caches always hold the
  committed tokens and nothing else between rounds.

Notation as in `tandem_core.verify`: p is the target's distribution, q the drafter's.
The loop is pure: it does no I/O; runtimes (ONNX Runtime, PyTorch, a gRPC peer) sit behind the
`DraftSession` and `ScoreSession` protocols.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


class DraftSession(Protocol):
    """A drafter bound to one request. Its cache holds exactly the committed tokens."""

    def draft(self, k: int) -> Draft:
        """Propose k tokens after the committed ones."""
        ...

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        """Keep the first `accepted` drafts, then append `tokens[accepted:]` (the target's token)."""
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


def speculative_generate(
    drafter: DraftSession,
    scorer: ScoreSession,
    params: SamplingParams,
    *,
    seed: int,
    start: int,
    draft_len: int,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    stats: RequestStats | None = None,
) -> Iterator[tuple[int, ...]]:
    """Yield the tokens committed by each round until EOS or `max_new_tokens`.

    `seed` keys the verifier's random streams and `start` is the number of tokens committed
    before this call (prompt plus any earlier output), so round r draws from
    round_rng(seed, VERIFIER_STREAM, position) whatever process runs it. `stats`, when given, is
    filled in round by round, so a caller can read it while the stream is still running.
    """
    if draft_len < 0 or max_new_tokens < 1:
        raise ValueError("draft_len must be >= 0 and max_new_tokens >= 1")
    stats = stats if stats is not None else RequestStats()
    produced = 0
    while produced < max_new_tokens:
        remaining = max_new_tokens - produced
        # Drafting past the budget is wasted work: the round emits at most k+1 tokens.
        k = min(draft_len, remaining - 1)
        draft = drafter.draft(k) if k > 0 else Draft((), None)
        logits = scorer.score(draft.tokens)
        rng = round_rng(seed, VERIFIER_STREAM, start + produced)
        verdict = verify_round(draft, logits, params, rng, eos_ids=eos_ids, remaining=remaining)
        stats.add_round(RoundStats(drafted=k, accepted=verdict.accepted, emitted=len(verdict.tokens)))
        produced += len(verdict.tokens)
        yield verdict.tokens
        if verdict.finished:
            return
        drafter.commit(verdict.accepted, verdict.tokens)
        scorer.commit(verdict.accepted, verdict.tokens)
