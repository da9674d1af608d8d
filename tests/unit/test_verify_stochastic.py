"""Statistical and edge-case tests for lossless speculative sampling (`verify_stochastic`).

Setup: a 6-token vocabulary and context-independent p (target) and q (drafter), so every
committed token must be distributed as p, at the first position of a round and at every later
one. Each case runs ROUNDS rounds (so ROUNDS first tokens and, depending on acceptance, about 1k
to 70k later tokens) and compares the counts with p by Pearson's chi-square test (5 degrees of
freedom) at alpha = 1e-4, critical value 25.745. With 12k samples, a total-variation error of
0.03 (between tokens of mass ~0.2) has noncentrality ~100 and is caught with near certainty.
Seeds are fixed, so each run is deterministic; deliberately wrong verifiers must fail the same
check, which shows it has teeth. Rounds are bounded by time: one round is one ~50 us call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tandem_core.sampling import make_rngs, sample
from tandem_core.verify import Verdict, count_accepted, finalize, residual_probs, verify_stochastic

V = 6
ROUNDS = 12_000  # per case; each round is one verify_stochastic call (~50 us)
CHI2_CRITICAL = 25.745  # chi-square quantile at 1 - 1e-4 with V - 1 = 5 degrees of freedom
NO_EOS: frozenset[int] = frozenset()

P = np.random.default_rng(2023).dirichlet(np.full(V, 2.0))


def drafter(kind: str) -> np.ndarray:
    """q for each case; p is fixed (P)."""
    if kind == "close":  # a good drafter: acceptance around 0.85
        return 0.85 * P + 0.15 * np.random.default_rng(7).dirichlet(np.ones(V))
    if kind == "one_hot_rare":  # nearly all mass on the token p picks least
        q = np.full(V, 0.01)
        q[np.argmin(P)] = 1.0 - 0.01 * (V - 1)
        return q
    if kind == "zero_mass":  # no mass on p's two likeliest tokens
        q = P.copy()
        q[np.argsort(P)[-2:]] = 0.0
        return q / float(q.sum())
    raise AssertionError(kind)


Verifier = Callable[..., Verdict]


def always_accept(
    drafts: list[int], q: np.ndarray, p: np.ndarray, rng: np.random.Generator, **kw: object
) -> Verdict:
    """Wrong: keeps every draft, so the output follows q."""
    return finalize(len(drafts), [*drafts, sample(p[-1], rng)], NO_EOS, remaining=len(drafts) + 1)


def recover_from_p(
    drafts: list[int], q: np.ndarray, p: np.ndarray, rng: np.random.Generator, **kw: object
) -> Verdict:
    """Wrong, subtly: the right acceptance test, but the recovered token is drawn from p, not the residual."""
    k = len(drafts)
    rows = np.arange(k)
    accepted = count_accepted(p[rows, drafts], q[rows, drafts], rng.random(k))
    return finalize(accepted, [*drafts[:accepted], sample(p[accepted], rng)], NO_EOS, remaining=k + 1)


def run_rounds(verify: Verifier, q: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first token of each round and of the later ones, over ROUNDS rounds."""
    drafter_rng, verifier_rng = make_rngs(seed)
    p_rows, q_rows = np.tile(P, (k + 1, 1)), np.tile(q, (k, 1))
    first: list[int] = []
    later: list[int] = []
    # Context-independent drafts: draw them all from q at once to keep the loop cheap.
    for drafts in drafter_rng.choice(V, size=(ROUNDS, k), p=q).tolist():
        tokens = verify(drafts, q_rows, p_rows, verifier_rng, eos_ids=NO_EOS, remaining=k + 1).tokens
        first.append(tokens[0])
        later.extend(tokens[1:])
    return np.bincount(first, minlength=V), np.bincount(later, minlength=V)


def chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def tv(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


CASES = [
    ("close", 1),
    ("close", 2),
    ("close", 4),
    ("close", 7),
    ("one_hot_rare", 1),
    ("one_hot_rare", 7),
    ("zero_mass", 2),
    ("zero_mass", 4),
]


@pytest.mark.parametrize(("kind", "k"), CASES)
def test_committed_tokens_follow_p(kind: str, k: int) -> None:
    first, later = run_rounds(verify_stochastic, drafter(kind), k, seed=100 + k)
    for name, counts in [("first", first), ("later", later)]:
        stat = chi_square(counts, P)
        assert stat < CHI2_CRITICAL, (
            f"{name} tokens: chi2 {stat:.1f}, TV {tv(counts, P):.4f}, n {counts.sum()}"
        )


@pytest.mark.parametrize(
    ("wrong", "kind", "k"), [(always_accept, "close", 4), (recover_from_p, "zero_mass", 2)]
)
def test_wrong_verifier_fails_the_same_check(wrong: Verifier, kind: str, k: int) -> None:
    first, later = run_rounds(wrong, drafter(kind), k, seed=100 + k)
    assert max(chi_square(first, P), chi_square(later, P)) > CHI2_CRITICAL


def test_same_seed_same_tokens() -> None:
    q_rows, p_rows = np.tile(drafter("close"), (3, 1)), np.tile(P, (4, 1))

    def run(seed: int) -> list[tuple[int, ...]]:
        drafter_rng, verifier_rng = make_rngs(seed)
        drafts = drafter_rng.choice(V, size=(200, 3), p=q_rows[0]).tolist()
        return [
            verify_stochastic(d, q_rows, p_rows, verifier_rng, eos_ids=NO_EOS, remaining=9).tokens
            for d in drafts
        ]

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_each_round_draws_exactly_k_plus_one_numbers(k: int) -> None:
    rng, twin = np.random.default_rng(9), np.random.default_rng(9)
    q = np.tile(drafter("zero_mass"), (k, 1))
    verify_stochastic([0] * k, q, np.tile(P, (k + 1, 1)), rng, eos_ids=NO_EOS, remaining=9)
    twin.random(k + 1)
    assert rng.random() == twin.random()


def test_drafting_with_the_target_accepts_everything() -> None:
    rng = np.random.default_rng(11)
    p_rows = np.tile(P, (5, 1))
    for drafts in rng.choice(V, size=(200, 4), p=P).tolist():
        assert verify_stochastic(drafts, p_rows[:4], p_rows, rng, eos_ids=NO_EOS, remaining=9).accepted == 4


def test_eos_and_budget_truncate() -> None:
    p_rows, q_rows = np.tile(P, (4, 1)), np.tile(P, (3, 1))  # q == p: all drafts accepted
    rng = np.random.default_rng(0)
    assert verify_stochastic([1, 2, 3], q_rows, p_rows, rng, eos_ids=frozenset({2}), remaining=9) == Verdict(
        2, (1, 2), True, "stop"
    )
    assert verify_stochastic([1, 2, 3], q_rows, p_rows, rng, eos_ids=NO_EOS, remaining=1) == Verdict(
        1, (1,), True, "length"
    )


def test_count_accepted_rule() -> None:
    p = np.array([0.5, 0.2, 0.0])
    q = np.array([0.25, 0.4, 0.1])
    assert count_accepted(p, q, np.array([0.999, 0.49, 0.0])) == 2  # p/q >= 1 always passes; p = 0 fails
    assert count_accepted(p, q, np.array([0.0, 0.5, 0.0])) == 1  # 0.5 * 0.4 == 0.2 is not < 0.2
    assert count_accepted(np.array([1e-300]), np.array([0.0]), np.array([0.9])) == 1  # q = 0, p > 0
    assert count_accepted(np.array([1e-300]), np.array([1e-310]), np.array([0.999])) == 1  # tiny q
    assert count_accepted(np.array([]), np.array([]), np.array([])) == 0


@pytest.mark.parametrize(
    ("p", "q", "u"),
    [([0.5], [0.5, 0.5], [0.1]), ([-0.1], [0.5], [0.1]), ([np.nan], [0.5], [0.1]), ([0.5], [0.5], [1.0])],
)
def test_count_accepted_validation(p: list[float], q: list[float], u: list[float]) -> None:
    with pytest.raises(ValueError):
        count_accepted(np.array(p), np.array(q), np.array(u))


def test_residual_probs() -> None:
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.2, 0.5, 0.2, 0.1])
    np.testing.assert_allclose(residual_probs(p, q), [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(residual_probs(p, p), p)  # no residual mass: fall back to p
    with pytest.raises(ValueError, match="p_row"):
        residual_probs(np.array([0.5, 0.6]), np.array([0.5, 0.5]))


@pytest.mark.parametrize(
    ("drafts", "q_shape", "p_shape", "match"),
    [
        ([1, 2], (2, V), (2, V), "p must be"),
        ([1, 2], (1, V), (3, V), "q must be"),
        ([1, V], (2, V), (3, V), "draft"),
    ],
)
def test_shape_and_token_validation(
    drafts: list[int], q_shape: tuple[int, int], p_shape: tuple[int, int], match: str
) -> None:
    q, p = np.full(q_shape, 1.0 / V), np.full(p_shape, 1.0 / V)
    with pytest.raises(ValueError, match=match):
        verify_stochastic(drafts, q, p, np.random.default_rng(0), eos_ids=NO_EOS, remaining=5)


@pytest.mark.parametrize("bad", [np.nan, -0.1, np.inf])
def test_bad_probabilities_raise(bad: float) -> None:
    p, q = np.full((2, V), 1.0 / V), np.full((1, V), 1.0 / V)
    for target in (p, q):
        broken = target.copy()
        broken[0, 0] = bad
        args = (broken, p) if target is q else (q, broken)
        with pytest.raises(ValueError):
            verify_stochastic([1], *args, np.random.default_rng(0), eos_ids=NO_EOS, remaining=5)


def test_unnormalized_rows_raise() -> None:
    with pytest.raises(ValueError, match="sum"):
        verify_stochastic(
            [1],
            np.full((1, V), 0.2),
            np.full((2, V), 1.0 / V),
            np.random.default_rng(0),
            eos_ids=NO_EOS,
            remaining=5,
        )
