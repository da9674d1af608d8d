"""Speculative sampling through the real loop, with p and q that differ per row and per context.

Issue 14, item 1: the older chi-square test (`test_verify_stochastic.py`) uses one p and one q for
every row and every context, so a verifier that reads a neighbouring row, or a random stream that
is not keyed by position, passes it. Here the fake models of `tests.support.sampling_models`
(5 tokens; p depends on the last token and the parity of the position, and each fake drafter
disagrees with it in a known way) drive the real `tandem_core.loop.speculative_generate`, the
real `TargetVerifier` / `target_round` (per-position keyed streams) and the real
`verify_stochastic`. The fake drafter samples exactly as `edge_node.drafter` does: from
`cap_support(logits_to_probs(...))`, the capped q it hands on, with the stream
`round_rng(seed, DRAFTER_STREAM, position)`.

Each statistical case generates N answers of n tokens, one seed per answer (fixed, so every run
is the same), and compares them with the target's exact distribution over whole answers
(enumerated, see `exact_distribution`) by Pearson's chi-square test at ALPHA = 1e-8 per check:
over the five checks here and in the pipeline file, a correct implementation fails one with
probability 5e-8 whatever the seeds. N is sized from the mutation pass
(`tests/mutation/sampling_mutants.py`): each row or key bug it applies to the core gives at least
twice the critical value in case "shifted-plain-k2" alone, and most fail several cases.
Controls (a drafter that sends another q than it sampled from, a verifier whose stream ignores
the position) must fail the same check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest

from tandem_core.loop import Draft, DraftLen, TargetVerifier, speculative_generate, target_round
from tandem_core.sampling import (
    DRAFTER_STREAM,
    VERIFIER_STREAM,
    SamplingParams,
    cap_support,
    logits_to_probs,
    round_rng,
    sample,
)
from tandem_core.stats import RequestStats
from tandem_core.verify import Verdict, residual_probs
from tests.support.sampling_models import (
    DRAFTERS,
    TARGET,
    Logits,
    V,
    chi_square,
    drafter_logits,
    exact_distribution,
    reference_probs,
    target_logits,
    total_variation,
)

PROMPT = (1, 2)
ALPHA = 1e-8
PLAIN = SamplingParams(temperature=1.0)
TRANSFORMED = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
HOT_TOP_K = SamplingParams(temperature=1.3, top_k=3)


class FakeDraftSession:
    """A `DraftSession` over a fake drafter's logits, sampling the way `edge_node.drafter` does."""

    def __init__(self, logits: Logits, context: Sequence[int], params: SamplingParams, seed: int,
                 q_support: int) -> None:
        self.logits, self.context, self.params = logits, list(context), params
        self.seed, self.q_support = seed, q_support

    def q(self, context: Sequence[int]) -> np.ndarray:
        return cap_support(logits_to_probs(self.logits(context), self.params), self.q_support)

    def draft(self, k: int) -> Draft:
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        for _ in range(k):
            context = [*self.context, *tokens]
            q = self.q(context)
            tokens.append(sample(q, round_rng(self.seed, DRAFTER_STREAM, len(context))))
            qs.append(q)
        return Draft(tuple(tokens), np.stack(qs) if qs else None)

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        self.context.extend(tokens)

    def rollback(self) -> None:
        pass


class FakeScoreSession:
    """A `ScoreSession` over the fake target: row i scores the context after draft i."""

    def __init__(self, context: Sequence[int]) -> None:
        self.context = list(context)

    def score(self, draft_tokens: Sequence[int]) -> np.ndarray:
        return np.stack([target_logits([*self.context, *draft_tokens[:i]]) for i in range(len(draft_tokens) + 1)])

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        self.context.extend(tokens)


@dataclass(frozen=True)
class Case:
    drafter: str
    params: SamplingParams
    draft_len: DraftLen
    n: int  # tokens per answer
    q_support: int  # cap_support's n (0: q uncapped)
    answers: int  # N
    eos_ids: frozenset[int] = frozenset()


def alternating(stats: RequestStats) -> int:
    """Draft 3, then 1, then 3, ...: round boundaries move within the answer."""
    return 3 if stats.rounds % 2 == 0 else 1


def run_fake_pair(case: Case, seed: int, drafter: FakeDraftSession | None = None,
                  verifier_cls: type[TargetVerifier] = TargetVerifier, generated: Sequence[int] = (),
                  rounds: int | None = None) -> tuple[int, ...]:
    """One answer (after the prompt and `generated`): at most `rounds` rounds when given."""
    context = [*PROMPT, *generated]
    drafter = drafter or FakeDraftSession(drafter_logits(case.drafter), context, case.params, seed, case.q_support)
    verifier = verifier_cls(FakeScoreSession(context), case.params, seed=seed, start=len(context),
                            max_new_tokens=case.n - len(generated), eos_ids=case.eos_ids)
    out: list[int] = []
    loop = speculative_generate(drafter, verifier, draft_len=case.draft_len, max_new_tokens=case.n - len(generated))
    for i, verdict in enumerate(loop):
        out.extend(verdict.tokens)
        if rounds is not None and i + 1 == rounds:
            break
    return tuple(out)


CASES = {
    "shifted-plain-k2": Case("shifted", PLAIN, 2, 3, 0, 4000),
    "close-transformed-capped3-k3": Case("close", TRANSFORMED, 3, 4, 3, 2000),
    "avoids_favourite-topk-capped2-eos": Case("avoids_favourite", HOT_TOP_K, 2, 4, 2, 2000, frozenset({4})),
    "close-plain-alternating": Case("close", PLAIN, alternating, 4, 4, 2000),
}


def sampled_answers(case: Case, seed0: int, **kw: object) -> Counter[tuple[int, ...]]:
    return Counter(run_fake_pair(case, seed0 + i, **kw) for i in range(case.answers))  # type: ignore[arg-type]


def check(case: Case, answers: Counter[tuple[int, ...]]) -> tuple[float, int, float]:
    return chi_square(answers, exact_distribution(PROMPT, case.n, case.params, case.eos_ids))


def test_fake_models_differ_per_row_and_context() -> None:
    """What gives the statistical tests their teeth: every context has its own p, and the
    brute-force reference equals the shared transform on these logits."""
    for params in (PLAIN, TRANSFORMED, HOT_TOP_K):
        rows = [reference_probs(TARGET[parity, last], params) for parity in range(2) for last in range(V)]
        assert min(total_variation(a, b) for i, a in enumerate(rows) for b in rows[:i]) >= 0.2
        for parity in range(2):
            np.testing.assert_allclose(logits_to_probs(TARGET[parity], params),
                                       [reference_probs(row, params) for row in TARGET[parity]], atol=1e-12)
    context = [*PROMPT, 3]
    p = reference_probs(target_logits(context), PLAIN)
    for kind in DRAFTERS:  # each drafter disagrees with the target
        assert total_variation(p, reference_probs(drafter_logits(kind)(context), PLAIN)) > 0.05


def test_streams_are_keyed_by_seed_side_and_position() -> None:
    assert DRAFTER_STREAM != VERIFIER_STREAM
    first = {(seed, side, position): round_rng(seed, side, position).random()
             for seed in (0, 1, 2**62) for side in (DRAFTER_STREAM, VERIFIER_STREAM) for position in range(40)}
    assert len(set(first.values())) == len(first)  # every key its own stream
    assert all(round_rng(*key).random() == u for key, u in first.items())  # and the same one each time


def test_target_only_rounds_draw_from_the_stream_of_their_position_with_fake_models() -> None:
    """With no drafts every round is one target sample, from round_rng(seed, VERIFIER_STREAM,
    tokens before it): the cloud-only route, and the same numbers whoever verifies."""
    case = Case("close", PLAIN, 0, 6, 0, 0)
    for seed in range(30):
        answer = run_fake_pair(case, seed)
        for j, token in enumerate(answer):
            context = [*PROMPT, *answer[:j]]
            p = logits_to_probs(target_logits(context), PLAIN)
            assert token == sample(p, round_rng(seed, VERIFIER_STREAM, len(context))), (seed, j)


@pytest.mark.parametrize("case", [Case("shifted", PLAIN, 2, 10, 0, 0), Case("close", TRANSFORMED, 3, 10, 3, 0),
                                  Case("avoids_favourite", HOT_TOP_K, 1, 10, 2, 0)], ids=["plain", "transformed", "k1"])
def test_a_run_resumed_at_any_round_gives_the_same_tokens_with_fake_models(case: Case) -> None:
    """Resuming elsewhere (fresh drafter and verifier from the committed tokens) draws exactly
    the numbers of an undisturbed run, because every stream is keyed by the absolute position."""
    for seed in range(25):
        undisturbed = run_fake_pair(case, seed)
        for rounds in (1, 2, 3):
            head = run_fake_pair(case, seed, rounds=rounds)
            if len(head) < case.n:
                assert head + run_fake_pair(case, seed, generated=head) == undisturbed, (seed, rounds)


def test_the_target_drafting_for_itself_accepts_every_draft_with_fake_models() -> None:
    """q == p only when both sides apply the same transform (T = 0.8, top-k 4, top-p 0.95 here)."""
    case = Case("close", TRANSFORMED, 3, 8, 0, 0)
    stats = RequestStats()
    for seed in range(80):
        drafter = FakeDraftSession(target_logits, PROMPT, TRANSFORMED, seed, q_support=0)
        verifier = TargetVerifier(FakeScoreSession(PROMPT), TRANSFORMED, seed=seed, start=len(PROMPT),
                                  max_new_tokens=case.n, eos_ids=frozenset())
        for _ in speculative_generate(drafter, verifier, draft_len=3, max_new_tokens=case.n, stats=stats):
            pass
    # q is p rounded to float32 (cap_support): a rejection would need u within ~1e-7 of 1.
    assert stats.drafted > 300 and stats.accepted == stats.drafted


def test_cap_support_keeps_the_likeliest_tokens_float32_exact() -> None:
    q = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    capped = cap_support(q, 3)
    np.testing.assert_array_equal(np.flatnonzero(capped), [1, 3, 4])
    np.testing.assert_array_equal(capped, capped.astype(np.float32))  # the values the wire carries
    np.testing.assert_allclose(capped[[1, 3, 4]], np.array([0.4, 0.3, 0.15]) / 0.85, rtol=1e-7)
    np.testing.assert_array_equal(np.flatnonzero(cap_support(q, 0)), range(V))  # 0: uncapped


def test_an_empty_residual_falls_back_to_p() -> None:
    """p <= q everywhere happens only by rounding (rows sum to 1 within the tolerance); the
    recovered token then comes from p, which keeps the round's output p (see `residual_probs`)."""
    p, q = np.array([0.3, 0.69995, 0.0]), np.array([0.30003, 0.69997, 0.0])
    np.testing.assert_allclose(residual_probs(p, q), p / p.sum(), rtol=1e-12)


class BudgetCheckingDrafter(FakeDraftSession):
    def draft(self, k: int) -> Draft:
        produced = len(self.context) - len(PROMPT)
        assert k <= 3 - produced - 1, f"{k} drafts with {3 - produced} tokens of budget left"
        return super().draft(k)


def test_no_round_drafts_past_the_budget_with_fake_models() -> None:
    """A round emits at most k + 1 tokens, so drafts past budget - 1 would be wasted work."""
    case = Case("shifted", PLAIN, 5, 3, 0, 0)
    for seed in range(20):
        run_fake_pair(case, seed, drafter=BudgetCheckingDrafter(drafter_logits("shifted"), PROMPT, PLAIN, seed, 0))


@pytest.mark.parametrize("name", list(CASES))
def test_answers_follow_the_exact_target_distribution_with_fake_models(name: str) -> None:
    case = CASES[name]
    stat, df, pvalue = check(case, sampled_answers(case, seed0=1_000))
    assert pvalue > ALPHA, f"{name}: chi2 {stat:.1f} with {df} degrees of freedom, p-value {pvalue:.2e}"


class SendsUncappedQ(FakeDraftSession):
    """Wrong: samples from the capped q but hands on the uncapped one."""

    def draft(self, k: int) -> Draft:
        draft = super().draft(k)
        contexts = [[*self.context, *draft.tokens[:i]] for i in range(k)]
        q = [logits_to_probs(self.logits(context), self.params) for context in contexts]
        return Draft(draft.tokens, np.stack(q) if q else None)


class SameStreamEveryRound(TargetVerifier):
    """Wrong: every round draws from the stream of the first round (not keyed by position)."""

    def verify(self, draft: Draft) -> Verdict:
        first = self.end - CASES["shifted-plain-k2"].n  # the position of the first round
        verdict = target_round(self.scorer, draft, self.params, seed=self.seed, position=first,
                               remaining=self.end - self.position, eos_ids=self.eos_ids)
        self.position += len(verdict.tokens)
        return verdict


def test_the_check_fails_a_drafter_that_sends_another_q_than_it_sampled_with_fake_models() -> None:
    case = replace(CASES["avoids_favourite-topk-capped2-eos"], answers=1500)
    answers = Counter(
        run_fake_pair(case, seed, drafter=SendsUncappedQ(drafter_logits(case.drafter), PROMPT, case.params, seed,
                                                         case.q_support))
        for seed in range(1_000, 1_000 + case.answers)
    )
    assert check(case, answers)[2] < ALPHA


def test_the_check_fails_a_stream_not_keyed_by_position_with_fake_models() -> None:
    case = replace(CASES["shifted-plain-k2"], answers=1500)
    assert check(case, sampled_answers(case, seed0=1_000, verifier_cls=SameStreamEveryRound))[2] < ALPHA
