"""Verification of drafted tokens: greedy prefix matching and lossless speculative sampling.

Notation (fixed for the whole package): **p** is the target model's distribution, **q** the
drafter's, both after the same `tandem_core.sampling.logits_to_probs` transform. The drafter
proposes x_1..x_k with x_i ~ q_i; the target scores all of them in one forward pass, giving
p_1..p_{k+1} (row k+1 is the position after the last draft). The acceptance rule is the one of
Leviathan, Kalman and Matias, "Fast Inference from Transformers via Speculative Decoding" (ICML
2023, arXiv 2211.17192), Algorithm 1.

Tokens a round commits (names as in vLLM's rejection sampler):
- **accepted** tokens: the longest prefix of drafts that passes the test. Draft i passes when
  u_i < min(1, p_i(x_i) / q_i(x_i)) with u_i ~ U[0, 1) (greedy: when x_i == argmax p_i).
- **recovered** (correction) token: when draft i is rejected, one token sampled from the residual
  norm(max(0, p_i - q_i)) (greedy: argmax p_i). It replaces the rejected draft; later drafts are
  dropped.
- **bonus** token: when all k drafts are accepted, one extra token sampled from p_{k+1} for free.
So every round commits between 1 and k+1 tokens, then truncated after an EOS token and at the
request's remaining budget (`finalize`).

Guarantee: each committed token is distributed exactly as p given the tokens before it, whatever
q is (Leviathan et al., Theorem 1); greedy verification reproduces the target's greedy decoding.

On the wire (`protos/tandem/v1/cloud.proto`) the edge sends the drafts x_i and, in sampling mode,
each q_i row sparsely: the drafter samples from q capped to its most likely tokens
(`tandem_core.sampling.cap_support`), so a row is at most that many (id, probability) pairs,
and the cloud runs the whole of `verify_stochastic` in one round trip. `count_accepted` and
`residual_probs` are its two halves with their inputs checked, for callers that split the
sampler across machines (the edge keeping q, the cloud sending back p at the rejection).

Malformed input (shape mismatches, token ids outside [0, V), NaN, infinite or negative
probabilities) raises ValueError with a message naming the problem.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from tandem_core.sampling import sample

# How far a probability row's sum may drift from 1 (float32 rows over ~150k tokens stay within it).
_SUM_TOLERANCE = 1e-4


class FinishReason(StrEnum):
    """Why an answer ended."""

    STOP = "stop"      # an end-of-sequence token was committed
    LENGTH = "length"  # the token budget (or the context window) was reached


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification round."""

    accepted: int  # drafts accepted and kept (0..k), after truncation by `finalize`
    # Committed this round: the accepted drafts, then the recovered or bonus token; truncated
    # after the first EOS and at the remaining budget. Length 1..k+1.
    tokens: tuple[int, ...]
    finished: bool  # the request is done (EOS emitted or budget reached)
    finish_reason: FinishReason | None  # None while the request goes on


def finalize(accepted: int, proposed: Sequence[int], eos_ids: frozenset[int], remaining: int) -> Verdict:
    """Cut `proposed` (accepted drafts + next token) after its first EOS and to `remaining` tokens.

    finish_reason is "stop" when an EOS token is committed (even if it also uses the last of the
    budget), else "length" when exactly `remaining` tokens are committed, else None.
    """
    if remaining < 1:
        raise ValueError(f"remaining must be >= 1, got {remaining}")
    tokens = tuple(int(t) for t in proposed)
    if not tokens or not 0 <= accepted <= len(tokens):
        raise ValueError(
            f"need 0 <= accepted <= len(proposed) and a non-empty proposal, got {accepted}, {tokens}"
        )
    reason: FinishReason | None = None
    for i, t in enumerate(tokens[:remaining]):
        if t in eos_ids:
            tokens, reason = tokens[: i + 1], FinishReason.STOP
            break
    else:
        tokens = tokens[:remaining]
        if len(tokens) == remaining:
            reason = FinishReason.LENGTH
    return Verdict(
        accepted=min(accepted, len(tokens)),
        tokens=tokens,
        finished=reason is not None,
        finish_reason=reason,
    )


def _check_tokens(draft_tokens: Sequence[int], vocab: int) -> list[int]:
    tokens = [operator.index(t) for t in draft_tokens]  # k is small: plain Python is cheapest
    if any(not 0 <= t < vocab for t in tokens):
        raise ValueError(f"draft token ids must be in [0, {vocab}), got {tokens}")
    return tokens


def verify_greedy(
    draft_tokens: Sequence[int], target_logits: np.ndarray, *, eos_ids: frozenset[int], remaining: int
) -> Verdict:
    """Accept drafts while they equal the target's argmax, then add the target's next argmax.

    target_logits is (k+1, V): row i scores draft i, row k is the bonus position. Ties go to the
    lowest token id, as in `logits_to_probs` with temperature 0.
    """
    logits = np.asarray(target_logits)
    k = len(draft_tokens)
    if logits.ndim != 2 or logits.shape[0] != k + 1 or logits.shape[1] == 0:
        raise ValueError(f"target_logits must be ({k + 1}, V) for {k} drafts, got {logits.shape}")
    x = _check_tokens(draft_tokens, logits.shape[1])
    if np.isnan(logits).any():
        raise ValueError("target_logits contain NaN")
    best = np.argmax(logits, axis=1)
    best_ids = best.tolist()
    accepted = next((i for i in range(k) if x[i] != best_ids[i]), k)
    proposed = [*x[:accepted], best_ids[accepted]]
    return finalize(accepted, proposed, eos_ids, remaining)


def count_accepted(p_draft: np.ndarray, q_draft: np.ndarray, u: np.ndarray) -> int:
    """Index of the first rejected draft, or k if all pass.

    p_draft[i] = p_i(x_i), q_draft[i] = q_i(x_i), u[i] ~ U[0, 1). Draft i passes when
    u_i < min(1, p/q), tested as u_i * q < p: no division, so a tiny or zero q cannot overflow
    (q = 0 with p > 0 always passes; p = 0 always fails).
    """
    p_x = np.asarray(p_draft, dtype=np.float64)
    q_x = np.asarray(q_draft, dtype=np.float64)
    u_x = np.asarray(u, dtype=np.float64)
    if p_x.ndim != 1 or p_x.shape != q_x.shape or p_x.shape != u_x.shape:
        raise ValueError(
            f"p_draft, q_draft and u must be 1-D of equal length, got {p_x.shape}, {q_x.shape}, {u_x.shape}"
        )
    if p_x.size == 0:
        return 0
    if not (p_x.min() >= 0 and q_x.min() >= 0 and np.isfinite(p_x).all() and np.isfinite(q_x).all()):
        raise ValueError("p_draft and q_draft must be finite and non-negative")
    if not (u_x.min() >= 0 and u_x.max() < 1):
        raise ValueError("u must lie in [0, 1)")
    return _first_rejection(p_x.tolist(), q_x.tolist(), u_x.tolist())


def _first_rejection(p_x: list[float], q_x: list[float], u: list[float]) -> int:
    # k is small (<= ~16): a Python loop over floats beats several numpy calls here.
    for i, (p_i, q_i, u_i) in enumerate(zip(p_x, q_x, u, strict=True)):
        if not u_i * q_i < p_i:
            return i
    return len(p_x)


def residual_probs(p_row: np.ndarray, q_row: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): the distribution of the recovered token after a rejection.

    If the residual has no mass, p <= q everywhere; as both sum to 1, p == q (up to rounding).
    Then every draft passes, since P(accept x) = min(1, p(x)/q(x)) = 1, so a rejection can only
    come from rounding and the recovered token's distribution only matters at that level.
    Returning p keeps the round's output equal to p in that case: P(accept)·p + P(reject)·p = p.
    """
    p = np.asarray(p_row, dtype=np.float64)
    q = np.asarray(q_row, dtype=np.float64)
    if p.ndim != 1 or p.shape != q.shape or p.size == 0:
        raise ValueError(f"p_row and q_row must be non-empty 1-D of equal length, got {p.shape}, {q.shape}")
    _check_probs(p, "p_row")
    _check_probs(q, "q_row")
    return _residual(p, q)


def _residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    r = np.maximum(p - q, 0.0)
    mass = float(r.sum())
    return r / mass if mass > 0 else p / float(p.sum())


def _check_probs(probs: np.ndarray, name: str) -> None:
    """Finite, non-negative rows that each sum to 1 within _SUM_TOLERANCE."""
    if probs.size == 0:
        return
    # NaN or inf entries make a row sum NaN or inf, which fails the comparison. Rows are few
    # (k + 1), so the per-row test runs in Python after one numpy reduction.
    if not all(abs(s - 1.0) <= _SUM_TOLERANCE for s in probs.sum(axis=-1).reshape(-1).tolist()):
        raise ValueError(f"{name} must be finite with rows summing to 1 (within {_SUM_TOLERANCE})")
    if probs.min() < 0:
        raise ValueError(f"{name} must be non-negative")


def verify_stochastic(
    draft_tokens: Sequence[int],
    q: np.ndarray,
    p: np.ndarray,
    rng: np.random.Generator,
    *,
    eos_ids: frozenset[int],
    remaining: int,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1) for one round.

    q is (k, V) drafter probabilities, p is (k+1, V) target probabilities, both from
    `logits_to_probs`. Every round draws exactly k + 1 numbers from `rng` (k uniforms at once,
    then one for the recovered or bonus token), so a seeded run is reproducible.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    q_arr = np.asarray(q, dtype=np.float64)
    k = len(draft_tokens)
    if p_arr.ndim != 2 or p_arr.shape[0] != k + 1 or p_arr.shape[1] == 0:
        raise ValueError(f"p must be ({k + 1}, V) for {k} drafts, got {p_arr.shape}")
    vocab = p_arr.shape[1]
    if k == 0 and q_arr.size == 0:
        q_arr = np.zeros((0, vocab))
    if q_arr.shape != (k, vocab):
        raise ValueError(f"q must be ({k}, {vocab}) to match p {p_arr.shape}, got {q_arr.shape}")
    x = _check_tokens(draft_tokens, vocab)
    _check_probs(p_arr, "p")
    _check_probs(q_arr, "q")
    u = rng.random(k).tolist()
    accepted = _first_rejection(
        [p_arr.item(i, t) for i, t in enumerate(x)], [q_arr.item(i, t) for i, t in enumerate(x)], u
    )
    if accepted < k:
        nxt = sample(_residual(p_arr[accepted], q_arr[accepted]), rng)
    else:
        nxt = sample(p_arr[k], rng)
    return finalize(accepted, [*x[:accepted], nxt], eos_ids, remaining)
