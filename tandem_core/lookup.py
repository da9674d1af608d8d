"""Each round's drafts: copied by retrieval, checked by the drafter, or drafted by the model.

`LookupDrafter` is a `tandem_core.loop.DraftSession` over the model drafter and a suffix index
(`tandem_core.suffix_index`) of the prompt and the answer so far. Each round the index proposes
a continuation of the committed text (r tokens, with the length of the match behind it), and
`LookupPolicy.choose` picks one of:
- **copy**: send the r tokens as they are. Free to draft; each is accepted with probability a_b,
  learnt online per match-length bucket b (longer matches are accepted further);
- **check**: the model drafter checks the r tokens in one batched pass and keeps its own choices
  while they equal them (`AdoptingDraftSession.draft(k, hint=...)`), then drafts on by itself
  up to its length: about HINT_COST of a drafting step per copied token, and the drafts are the
  model's, accepted like the model's;
- **model**: the drafter alone (also the choice when nothing matches).
On one cost model: a round with k drafts takes T(k) = t0 + c k (send, verify, receive; learnt
by a decayed least-squares fit) plus its drafting (k t_d for the model, learnt), and commits
1 + E[accepted] tokens. For a copy, E = a (1 - a^r) / (1 - a); for the model,
E = sum_{i<k} prod_{j<=i} a_j with a_j its acceptance at draft position j (learnt). The choice
with more expected tokens per second drafts the round. Copies may be longer than the model's
drafts: up to the verifier's limit (16 on the cloud).

The model's length is `model_len` when pinned; when it is None (`--draft-len 0`), the policy
chooses it each round in [0, 16] on the same model (`LookupPolicy.adaptive_len`); k = 0 is plain
target decoding, with a one-draft probe every PROBE_EVERY-th round so acceptance is still learnt.
Copies and the model's drafts are learnt separately.

Exactness:
- Greedy: the verifier keeps only drafts equal to its argmax, so the output is the target's
  whatever drafts the round (checked by the tests against target-only output).
- Sampling, copy: a retrieval draft is deterministic given the committed tokens, so its
  proposal distribution is one-hot and is sent as such (q_i(x_i) = 1). The rejection sampler
  (`verify`) accepts x_i with probability p_i(x_i) and otherwise samples norm(max(0, p_i - q_i))
  = p_i without x_i, renormalized: each committed token is distributed as p (Leviathan et al.,
  Theorem 1, holds for any q, including a q chosen from the past).
- Sampling, check: the drafts are the drafter's own draws from its q rows (the position-keyed
  draws it would make one pass per token), and those rows are sent: exact as any model draft.
- Mixing the three round by round is exact for the same reason: the choice depends only on
  committed tokens and on the measurements, never on the verifier's randomness for the round
  being drafted. The chi-square tests hold both copy and check rounds to the target's exact
  distribution.

The model drafter's cache must take tokens it did not draft: `AdoptingDraftSession.adopt`
marks copied tokens as the unsettled draft without computing them, and `commit` then appends
the committed ones in one batched pass.

Pure: numpy and the clock passed in; no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from tandem_core.branching import Branching
from tandem_core.loop import Draft
from tandem_core.suffix_index import Proposal, SuffixIndex

MIN_MATCH = 2  # a shorter match (one token) is too common to draft from
# Match-length buckets (lower bounds) and the prior per-token acceptance of a retrieval draft in
# each, before anything is learnt (weight PRIOR_WEIGHT pseudo-drafts).
BUCKETS = (2, 3, 4, 6, 10, 16, 32)
PRIOR_ACCEPT = (0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.9)
PRIOR_WEIGHT = 4.0
MODEL_PRIOR_ACCEPT = 0.7
DEFAULT_ROUND_S = 0.1      # verify round trip before one is measured
DEFAULT_DRAFT_S = 0.035    # model draft time per token before one is measured (0.5B int4, 2 cores)
DEFAULT_ROW_S = 0.01       # verification time per draft row before it is measured
MAX_K = 16                 # longest draft a policy considers (the cloud's limit)
PROBE_EVERY = 4            # at k = 0, every 4th round still drafts one token
EMA = 0.2                  # weight of a new timing sample
HINT_COST = 0.25           # a hint token checked in a batched pass, as a share of a drafting step


class AdoptingDraftSession(Protocol):
    """A model drafter that can also carry drafts it did not make (see the module doc)."""

    def draft(self, k: int, hint: Sequence[int] = (), min_len: int | None = None) -> Draft:
        """Up to k drafts; while its own choices equal `hint` it runs on (checking the hint in one
        batched pass), else it stops at `min_len` (see `edge_node.drafter.DrafterSession.draft`)."""
        ...

    def adopt(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """Take `tokens` (or as many as fit) as the unsettled draft, without computing them."""
        ...

    def commit(self, accepted: int, tokens: Sequence[int]) -> None: ...

    def rollback(self) -> None: ...


def bucket_of(match_len: int) -> int:
    """Index in BUCKETS of a match length (>= MIN_MATCH)."""
    b = 0
    while b + 1 < len(BUCKETS) and match_len >= BUCKETS[b + 1]:
        b += 1
    return b


def expected_accepted(a: float, n: int) -> float:
    """E[accepted] for n drafts each accepted with probability a, stopping at the first reject."""
    if n <= 0:
        return 0.0
    if a >= 1.0:
        return float(n)
    return a * (1.0 - a ** n) / (1.0 - a)


@dataclass(frozen=True)
class Choice:
    source: str  # "retrieval" or "model"
    k: int       # drafts to send
    why: str     # for logs
    kind: str = ""  # the reason's class, for stats: pinned, cost_model, low_acceptance, probe, retrieval


@dataclass
class _Rate:
    """Per-token acceptance as accepted / (accepted + rejections), with a prior."""

    accepted: float
    rejected: float

    @property
    def a(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def seen(self) -> bool:
        """Something was learnt beyond the prior."""
        return self.accepted + self.rejected > PRIOR_WEIGHT

    def learn(self, drafted: int, accepted: int) -> None:
        self.accepted += accepted
        self.rejected += 1 if accepted < drafted else 0


class LookupPolicy:
    """Chooses each round's source and, unless pinned, the model's draft length (module doc).

    The model's acceptance is learnt per draft position (a_j: accepted at j given that j was
    reached), so E[accepted | k] = sum_{i<k} prod_{j<=i} a_j; a round's time is learnt as
    T(k) = t0 + c * k (verification grows with the rows sent) by a decayed least-squares fit
    that starts from a prior. An adaptive round drafts the k in [0, k_max] with the most
    expected tokens per second, (1 + E[accepted | k]) / (T(k) + k * t_d); k = 0 is plain target
    decoding, and then every PROBE_EVERY-th round drafts one token so acceptance is still learnt.

    Deterministic: the same sequence of `learn`/`observe_*` calls gives the same choices.
    """

    def __init__(self, *, round_s: float = DEFAULT_ROUND_S, draft_s: float = DEFAULT_DRAFT_S,
                 row_s: float = DEFAULT_ROW_S) -> None:
        self.retrieval = [_Rate(PRIOR_WEIGHT * p, PRIOR_WEIGHT * (1 - p)) for p in PRIOR_ACCEPT]
        self.positions = [_Rate(PRIOR_WEIGHT * MODEL_PRIOR_ACCEPT, PRIOR_WEIGHT * (1 - MODEL_PRIOR_ACCEPT))
                          for _ in range(MAX_K)]
        self.draft_s = draft_s
        self._fit = _LineFit(round_s, row_s)
        self._zero_rounds = 0  # consecutive adaptive rounds that chose k = 0

    @property
    def round_s(self) -> float:
        """The learnt time of a round with no drafts, t0."""
        return self._fit.at(0)

    def round_time(self, k: int) -> float:
        return self._fit.at(k)

    @property
    def row_s(self) -> float:
        """The learnt cost of one more row in a round (the slope of T)."""
        return self._fit.at(1) - self._fit.at(0)

    def token_s(self, k: int) -> float:
        """Seconds per committed token of a model round of k drafts, as the policy expects it."""
        return (self.round_time(k) + k * self.draft_s) / (1 + self.model_expected(k))

    def model_expected(self, k: int) -> float:
        """E[accepted] for k model drafts, from the per-position acceptance (a position never
        drafted yet takes the acceptance of the deepest one that was)."""
        total, reach, a = 0.0, 1.0, self.positions[0].a
        for j in range(min(k, MAX_K)):
            if self.positions[j].seen:
                a = self.positions[j].a
            reach *= a
            total += reach
        return total

    def adaptive_len(self, k_max: int, *, peek: bool = False) -> tuple[int, str]:
        """The adaptive draft length and why. `peek`: without counting a round for the probe
        cadence (a round drafted ahead, which may never be sent)."""
        best, best_rate = 0, 1.0 / self.round_time(0)
        for k in range(1, max(0, min(k_max, MAX_K)) + 1):
            rate = (1 + self.model_expected(k)) / (self.round_time(k) + k * self.draft_s)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0 and k_max > 0:
            if peek:
                return 0, "acceptance too low to draft ahead"
            self._zero_rounds += 1
            if self._zero_rounds % PROBE_EVERY == 0:
                return 1, "probe: acceptance too low to draft, one draft keeps it measured"
            return 0, f"acceptance too low to draft (a0={self.positions[0].a:.2f}): plain target decoding"
        if not peek:
            self._zero_rounds = 0
        return best, f"k={best}: {best_rate:.1f} tok/s expected (a0={self.positions[0].a:.2f})"

    def choose(self, proposal: Proposal | None, *, k_max: int, model_len: int | None) -> Choice:
        if model_len is None:
            model_k, why = self.adaptive_len(k_max)
            kind = ("probe" if why.startswith("probe") else "low_acceptance" if model_k == 0 and k_max > 0
                    else "cost_model")
        else:
            model_k, why, kind = max(0, min(model_len, k_max)), "pinned", "pinned"
        if proposal is None or proposal.match_len < MIN_MATCH or k_max <= 0:
            return Choice("model", model_k, f"no match; {why}", kind)
        r = min(len(proposal.tokens), k_max)
        a_r = self.retrieval[bucket_of(proposal.match_len)].a
        copied = expected_accepted(a_r, r)  # hint tokens the drafter is expected to agree with
        rate_r = (1 + copied) / self.round_time(r)
        # The model checks the hint in a batched pass (about HINT_COST of a step per token) and
        # drafts on by itself once it disagrees.
        k_h = min(k_max, round(model_k + copied))
        cost_m = model_k * self.draft_s + copied * HINT_COST * self.draft_s
        rate_m = (1 + self.model_expected(k_h)) / (self.round_time(k_h) + cost_m)
        if rate_r > rate_m:
            return Choice("retrieval", r, f"match {proposal.match_len}: {r} copied drafts (a={a_r:.2f})", "retrieval")
        return Choice("model", model_k, f"match {proposal.match_len}: the drafter checks the copy; {why}", kind)

    def learn(self, choice: Choice, match_len: int, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        if choice.source == "retrieval":
            self.retrieval[bucket_of(match_len)].learn(drafted, accepted)
            return
        for j in range(min(accepted, MAX_K)):
            self.positions[j].accepted += 1
        if accepted < min(drafted, MAX_K):
            self.positions[accepted].rejected += 1

    def observe_round(self, seconds: float, rows: int = 0) -> None:
        """A round with `rows` drafts took `seconds` from sending to the verdict."""
        if np.isfinite(seconds) and seconds >= 0 and rows >= 0:
            self._fit.add(rows, seconds)

    def observe_draft(self, seconds_per_token: float) -> None:
        if np.isfinite(seconds_per_token) and seconds_per_token >= 0:
            self.draft_s += EMA * (seconds_per_token - self.draft_s)


class _LineFit:
    """y = t0 + c x by least squares over decayed samples, starting from a prior line
    (PRIOR_WEIGHT samples on it at x = 0 and x = 8), so one length alone still gives a slope."""

    def __init__(self, t0: float, c: float) -> None:
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        for x in (0.0, 8.0):
            self._add(x, t0 + c * x, PRIOR_WEIGHT)

    def _add(self, x: float, y: float, w: float) -> None:
        self.n += w
        self.sx += w * x
        self.sy += w * y
        self.sxx += w * x * x
        self.sxy += w * x * y

    def add(self, x: float, y: float) -> None:
        for name in ("n", "sx", "sy", "sxx", "sxy"):
            setattr(self, name, getattr(self, name) * (1 - EMA))
        self._add(x, y, 1.0)

    def at(self, x: float) -> float:
        var = self.n * self.sxx - self.sx * self.sx
        c = (self.n * self.sxy - self.sx * self.sy) / var if var > 1e-12 else 0.0
        c = max(c, 0.0)  # more rows never verify faster
        t0 = (self.sy - c * self.sx) / self.n
        return max(t0 + c * x, 1e-4)


class PriorCosts:
    """A policy's costs at their priors (no clock), with its learnt acceptance (`Branching`'s
    costs where the answer must not depend on timing)."""

    row_s = DEFAULT_ROW_S

    def __init__(self, policy: LookupPolicy) -> None:
        self.policy = policy

    def token_s(self, k: int) -> float:
        return (DEFAULT_ROUND_S + k * (DEFAULT_ROW_S + DEFAULT_DRAFT_S)) / (1 + self.policy.model_expected(k))


class LookupDrafter:
    """A DraftSession: each round copied, checked or drafted by the model (see the module doc)."""

    def __init__(self, model: AdoptingDraftSession, index: SuffixIndex | None, policy: LookupPolicy, *,
                 model_len: int | None, vocab: int | None, clock: Callable[[], float] = time.perf_counter,
                 trees: Callable[[], int] | None = None) -> None:
        self.model, self.index, self.policy = model, index, policy
        # Draft trees where they pay, within `trees()` nodes (0: none). A seeded sampled answer
        # with a pinned length must not depend on timing: its trees weigh the prior costs.
        costs = PriorCosts(policy) if vocab is not None and model_len is not None else policy
        self.branching = Branching(model, costs, trees) if trees is not None else None
        self.model_len = model_len
        self.vocab = vocab  # sampling mode: retrieval drafts carry one-hot q rows of this width
        self.clock = clock
        self._choice: Choice | None = None
        self._ahead: Choice | None = None  # the round drafted ahead, if any (`draft_ahead`)
        self._proposed = 0  # match length of the last round's retrieval proposal
        self._match = 0
        self._sent_at = 0.0
        self._rows = self._ahead_rows = 0  # rows the round in flight (the round ahead) sends
        self.rounds_copied = 0   # rounds that sent the index's continuation as it is
        self.rounds_checked = 0  # rounds whose drafter checked a continuation in batched passes

    @classmethod
    def over(cls, model: AdoptingDraftSession, prompt_ids: Sequence[int], *, model_len: int | None,
             vocab: int | None, retrieval: bool = True, trees: Callable[[], int] | None = None) -> LookupDrafter:
        """Retrieval from the prompt (which holds the conversation and any injected documents)
        and the answer as it is committed, with a fresh policy; without `retrieval`, only the
        adaptive draft length (`model_len` None)."""
        index = SuffixIndex.over(prompt_ids) if retrieval else None
        return cls(model, index, LookupPolicy(), model_len=model_len, vocab=vocab, trees=trees)

    def draft(self, k: int) -> Draft:
        proposal = self.index.propose(k) if k > 0 and self.index is not None else None
        self._proposed = proposal.match_len if proposal is not None else 0
        choice = self.policy.choose(proposal, k_max=k, model_len=self.model_len)
        t0 = self.clock()
        if choice.source == "retrieval" and proposal is not None:
            tokens = self.model.adopt(proposal.tokens[:choice.k])
            q = None if self.vocab is None else _one_hot(tokens, self.vocab)
            draft = Draft(tokens, q, retrieved=len(tokens), reason=choice.kind)
            self._match = proposal.match_len
            self.rounds_copied += 1
        else:
            hint = proposal.tokens if proposal is not None and proposal.match_len >= MIN_MATCH else ()
            draft = self.model.draft(k, hint=hint, min_len=choice.k) if hint else self.model.draft(choice.k)
            draft = replace(draft, reason="checked" if hint else choice.kind)
            if hint:
                draft = replace(draft, retrieved=_agreement(draft.tokens, hint))
                self.rounds_checked += 1
            elif draft.tokens:  # one pass per token: the cost the policy weighs for the model
                self.policy.observe_draft((self.clock() - t0) / len(draft.tokens))
            self._match = 0
            if self.branching is not None:
                draft = self.branching.branch(draft)
        self._choice = Choice(choice.source, len(draft.chain), choice.why, choice.kind)
        self._rows = len(draft.tokens)
        self._sent_at = self.clock()
        return draft

    def prefill(self, stop: Callable[[], bool] | None = None) -> bool:
        """The model's cache over the prompt, where the model builds it lazily; True once whole
        (see `speculative_generate`'s first round)."""
        build = getattr(self.model, "prefill", None)
        return True if build is None else bool(build(stop))

    def draft_ahead(self, k: int, stop: Callable[[], bool] | None = None) -> tuple[int, Draft]:
        """The next round, drafted by the model on the guess that this one is accepted whole
        (`tandem_core.loop`); only after a model round (a copied one is not in the model's cache),
        and never copied itself (the index has not seen this round's tokens yet)."""
        ahead_of = getattr(self.model, "draft_ahead", None)
        # After a model round, or after none (an empty first round: the cloud's prefill answers it).
        after_model = (self._choice.source == "model" if self._choice is not None
                       else not tuple(getattr(self.model, "pending", ())))
        # Where retrieval matches (this round's proposal, or one now), the next round is likely a
        # copy, which a model round drafted ahead would take the place of: none ahead.
        copying = self.index is not None and (
            self._proposed >= MIN_MATCH or (now := self.index.propose(k)) is not None and now.match_len >= MIN_MATCH)
        if not after_model or ahead_of is None or copying:
            return -1, Draft((), None)
        if self.model_len is None:
            k, why = self.policy.adaptive_len(k, peek=True)
            kind = "cost_model"
        else:
            k, why, kind = min(self.model_len, k), "pinned", "pinned"
        guess, draft = ahead_of(k, stop) if k > 0 else (-1, Draft((), None))
        if self.branching is not None:
            draft = self.branching.branch(draft, ahead=True)
        self._ahead = Choice("model", len(draft.chain), f"ahead; {why}", kind)
        self._ahead_rows = len(draft.tokens)
        return guess, replace(draft, reason=kind)

    def draft_alternative(self, k: int, stop: Callable[[], bool] | None = None) -> bool:
        """After a model round drafted ahead: the model prepares the round after the likeliest
        other verdict (`edge_node.drafter`), as long as the round ahead, which the next round's
        `draft` then takes if the policy picks the model."""
        prepare = getattr(self.model, "draft_alternative", None)
        if self._ahead is None or prepare is None or self._ahead.k <= 0:
            return False
        return bool(prepare(min(k, self._ahead.k), stop))

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        choice, self._choice = self._choice, None
        ahead, self._ahead = self._ahead, None
        if choice is not None:  # a round this drafter made (not one sent without drafts by its caller)
            self.policy.observe_round(self.clock() - self._sent_at, self._rows)
            self.policy.learn(choice, self._match, choice.k, accepted)
        if self.branching is not None:
            self.branching.learn(accepted, tokens)
        self.model.commit(accepted, tokens)
        if self.index is not None:
            self.index.extend(tokens)
        if ahead is not None and tuple(getattr(self.model, "pending", ())):  # the guess held: the round ahead is next
            self._choice, self._match, self._sent_at, self._proposed = ahead, 0, self.clock(), 0
            self._rows = self._ahead_rows
            if self.branching is not None:
                self.branching.promote()
        elif self.branching is not None:
            self.branching.forget_ahead()

    def rollback(self) -> None:
        self._choice = self._ahead = None
        if self.branching is not None:
            self.branching.forget()
        self.model.rollback()


def _agreement(tokens: Sequence[int], hint: Sequence[int]) -> int:
    n = 0
    while n < len(tokens) and n < len(hint) and tokens[n] == hint[n]:
        n += 1
    return n


def _one_hot(tokens: Sequence[int], vocab: int) -> np.ndarray:
    q = np.zeros((len(tokens), vocab))
    q[np.arange(len(tokens)), np.asarray(tokens, dtype=np.int64)] = 1.0
    return q

