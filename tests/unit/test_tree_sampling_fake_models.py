"""Sampling with draft trees (`tandem_core.tree`, RSD-C): answers follow the target's exact distribution.

Setup: the fake context-dependent models of `tests.support.sampling_models` (5 tokens; p depends
on the last token and the parity of the length, so it differs per node of a tree and per round),
plus an *overconfident* drafter of our own: the target's logits with noise, times 3, so q is
peaked and wrong, which is where sibling handling matters most. Each answer is PROMPT + 3 tokens
made by tree rounds: the drafter's tree from `sample_tree` with streams keyed by position
(`round_rng(seed, DRAFTER_STREAM, position + depth)`), one verification with
`round_rng(seed, VERIFIER_STREAM, position)`, as `tandem_core.loop.target_round` keys a linear
round. N answers per case, one seed each (fixed, so every run is the same), are compared with
the exact distribution of answers (enumerated from the target alone, 125 answers) by Pearson's
chi-square test at ALPHA = 1e-8, as the linear sampler's tests do.

Controls that must fail the same check, each one change away from the real algorithm (a test
shows that `naive_round` without the change gives the real code's tokens seed for seed):
- children drawn WITH replacement (duplicates kept) but verified as if drawn without;
- q not renormalized after a tried sibling is removed.
Measured with N = 4000 (cells expected below 5 pooled): "overconfident-3x2" chi2 82.5 with
69 degrees of freedom (critical value 156.4 at 1e-8), "shifted-transformed-4x1-capped" 31.7 with
27 (critical 90.2), "close-2x2" 77.5 with 69; the controls on "overconfident-3x2": with
replacement 3053, without renormalization 1681.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
import pytest

from tandem_core.sampling import (
    DRAFTER_STREAM,
    VERIFIER_STREAM,
    SamplingParams,
    cap_support,
    logits_to_probs,
    round_rng,
    sample,
)
from tandem_core.tree import DraftTree, sample_tree, sample_without_replacement, verify_tree, verify_tree_stochastic
from tandem_core.verify import FinishReason, verify_stochastic
from tests.support.sampling_models import (
    TARGET,
    V,
    chi_square,
    drafter_logits,
    exact_distribution,
    target_logits,
)

PROMPT = (1, 2)
N_TOKENS = 3
ALPHA = 1e-8
NO_EOS: frozenset[int] = frozenset()
PLAIN = SamplingParams(temperature=1.0)
TRANSFORMED = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
_NOISE = np.random.default_rng(25).normal(0.0, 0.5, size=(2, V, V)).astype(np.float32)


def overconfident_logits(context: Sequence[int]) -> np.ndarray:
    return 3.0 * (TARGET[len(context) % 2, context[-1]] + _NOISE[len(context) % 2, context[-1]])


DRAFTER_LOGITS = {"overconfident": overconfident_logits, "shifted": drafter_logits("shifted"),
                  "close": drafter_logits("close")}


@cache
def _probs(model: str, params: SamplingParams, parity: int, last: int, q_support: int) -> np.ndarray:
    """p or q after a context; every fake model here depends on the parity and the last token only."""
    context = [last] if parity else [last, last]
    logits = (target_logits if model == "target" else DRAFTER_LOGITS[model])(context)
    probs = logits_to_probs(logits, params)
    return cap_support(probs, q_support) if q_support else probs


def dist(model: str, params: SamplingParams, context: Sequence[int], q_support: int = 0) -> np.ndarray:
    return _probs(model, params, len(context) % 2, context[-1], q_support)


class Case:
    def __init__(self, drafter: str, params: SamplingParams, widths: tuple[int, ...], q_support: int = 0) -> None:
        self.drafter, self.params, self.widths, self.q_support = drafter, params, widths, q_support

    def q(self, context: Sequence[int]) -> np.ndarray:
        return dist(self.drafter, self.params, context, self.q_support)

    def p(self, context: Sequence[int]) -> np.ndarray:
        return dist("target", self.params, context)


CASES = {
    "overconfident-3x2": Case("overconfident", PLAIN, (3, 2)),
    "shifted-transformed-4x1-capped": Case("shifted", TRANSFORMED, (4, 1), q_support=3),
    "close-2x2": Case("close", PLAIN, (2, 2)),
}

Round = Callable[[Case, tuple[int, ...], tuple[int, ...], int], tuple[int, ...]]  # case, context, widths, seed


def tree_round(case: Case, context: tuple[int, ...], widths: tuple[int, ...], seed: int) -> tuple[int, ...]:
    """One round as a verifier would run it: the drafter's tree, the target's rows, `verify_tree`."""
    position = len(context)
    tree = sample_tree(lambda path: case.q((*context, *path)), widths,
                       lambda d: round_rng(seed, DRAFTER_STREAM, position + d))
    logits = np.stack([target_logits([*context, *tree.path_tokens(i)]) for i in range(-1, len(tree))])
    result = verify_tree(tree, logits, case.params, round_rng(seed, VERIFIER_STREAM, position), eos_ids=NO_EOS,
                         remaining=99)
    return result.verdict.tokens


def naive_round(replacement: bool, renormalize: bool) -> Round:
    """The same round written out in full, with one change available: children drawn with
    replacement, or q left unnormalized after a tried sibling is removed. (False, True) is right."""
    def run(case: Case, context: tuple[int, ...], widths: tuple[int, ...], seed: int) -> tuple[int, ...]:
        position = len(context)
        tokens: list[int] = []
        parents: list[int] = []
        paths: dict[int, tuple[int, ...]] = {-1: ()}
        level = [-1]
        for depth, w in enumerate(widths):
            rng, below = round_rng(seed, DRAFTER_STREAM, position + depth), []
            for a in level:
                q = case.q((*context, *paths[a]))
                kids = [sample(q, rng) for _ in range(w)] if replacement else sample_without_replacement(q, w, rng)
                for t in kids:
                    paths[len(tokens)] = (*paths[a], t)
                    below.append(len(tokens))
                    tokens.append(t)
                    parents.append(a)
            level = below
        rng = round_rng(seed, VERIFIER_STREAM, position)
        u = rng.random(len(tokens)).tolist()
        node, out = -1, []
        while True:
            p = case.p((*context, *paths[node]))
            q = case.q((*context, *paths[node]))
            q = q / q.sum()
            kids = [c for c in range(len(tokens)) if parents[c] == node]
            accepted = None
            for j, c in enumerate(kids):
                x = tokens[c]
                if u[c] * q[x] < p[x]:
                    accepted = c
                    break
                r = np.maximum(p - q, 0.0)
                p = r / r.sum() if r.sum() > 0 else p / p.sum()
                if j + 1 < len(kids):
                    q = q.copy()
                    q[x] = 0.0
                    if renormalize:
                        q = q / q.sum()
            if accepted is None:
                return (*out, sample(p, rng))
            out.append(tokens[accepted])
            node = accepted
    return run


def answers(round_fn: Round, case: Case, n_answers: int, first_seed: int) -> Counter[tuple[int, ...]]:
    """n_answers answers of N_TOKENS tokens, one seed each; rounds shrink the tree to the budget."""
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(first_seed, first_seed + n_answers):
        answer: tuple[int, ...] = ()
        while len(answer) < N_TOKENS:
            widths = case.widths[: N_TOKENS - len(answer) - 1]  # as the loop drafts at most budget - 1
            answer = (*answer, *round_fn(case, (*PROMPT, *answer), widths, seed))[:N_TOKENS]
        counts[answer] += 1
    return counts


N_ANSWERS = 4000


def chi2_against_target(round_fn: Round, name: str, first_seed: int = 10_000) -> tuple[float, int, float]:
    case = CASES[name]
    return chi_square(answers(round_fn, case, N_ANSWERS, first_seed), exact_distribution(PROMPT, N_TOKENS, case.params))


# --- the statistical tests ------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_tree_answers_follow_the_exact_target_distribution_with_fake_models(name: str) -> None:
    stat, df, pvalue = chi2_against_target(tree_round, name)
    assert pvalue > ALPHA, f"chi2 {stat:.1f} with {df} degrees of freedom, p-value {pvalue:.2e}"


@pytest.mark.parametrize(("replacement", "renormalize"), [(True, True), (False, False)],
                         ids=["with-replacement", "no-renormalization"])
def test_a_wrong_tree_sampler_fails_the_same_check_with_fake_models(replacement: bool, renormalize: bool) -> None:
    stat, df, pvalue = chi2_against_target(naive_round(replacement, renormalize), "overconfident-3x2")
    assert pvalue < ALPHA, f"chi2 {stat:.1f} with {df} degrees of freedom, p-value {pvalue:.2e}"
    assert stat > 5 * df  # not a near miss: far past the critical value


@pytest.mark.parametrize("name", CASES)
def test_the_controls_are_one_change_away_from_the_real_sampler_with_fake_models(name: str) -> None:
    case, right = CASES[name], naive_round(replacement=False, renormalize=True)
    for seed in range(300):
        assert right(case, PROMPT, case.widths, seed) == tree_round(case, PROMPT, case.widths, seed), seed


def test_children_are_drawn_without_replacement_in_the_plackett_luce_law() -> None:
    """Ordered pairs (a, b) come with probability q(a) q(b) / (1 - q(a)); never a == b."""
    q = np.array([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(4)
    counts = Counter(tuple(sample_without_replacement(q, 2, rng)) for _ in range(20_000))
    exact = {(a, b): q[a] * q[b] / (1 - q[a]) for a in range(4) for b in range(4) if a != b}
    stat, df, pvalue = chi_square(counts, exact)
    assert pvalue > ALPHA, f"chi2 {stat:.1f} with {df} degrees of freedom"
    assert sample_without_replacement(q, 9, rng).__len__() == 4
    assert sample_without_replacement(np.array([0.0, 1.0, 0.0]), 3, rng) == [1]


# --- the linear special case and reproducibility --------------------------------------------

def test_a_chain_verifies_exactly_as_the_linear_sampler() -> None:
    """Same generator, same verdict, same numbers drawn: the chain is the linear round."""
    rng = np.random.default_rng(8)
    for trial in range(400):
        k = int(rng.integers(0, 6))
        vocab = int(rng.integers(2, 7))
        p = rng.dirichlet(np.full(vocab, 0.7), size=k + 1)
        q = rng.dirichlet(np.full(vocab, 0.7), size=k)
        if trial % 3 == 0:
            q = 0.5 * q + 0.5 * p[:k]
        drafts = [int(rng.choice(vocab, p=row)) for row in q]
        remaining = int(rng.integers(1, k + 3))
        eos = frozenset({int(rng.integers(0, vocab))}) if trial % 4 == 0 else NO_EOS
        mine, theirs = np.random.default_rng(trial), np.random.default_rng(trial)
        tree = verify_tree_stochastic(DraftTree.chain(drafts, q), p, mine, eos_ids=eos, remaining=remaining)
        assert tree.verdict == verify_stochastic(drafts, q, p, theirs, eos_ids=eos, remaining=remaining), trial
        assert tree.path == tuple(range(tree.verdict.accepted))
        assert mine.random() == theirs.random()


@pytest.mark.parametrize("name", CASES)
def test_a_width_one_tree_draws_the_linear_drafters_tokens_with_fake_models(name: str) -> None:
    """As the edge's drafter draws: token i from q after the context and i drafts, with the
    stream of its position."""
    case = CASES[name]
    for seed in range(50):
        tree = sample_tree(lambda path: case.q((*PROMPT, *path)), (1,) * 5,
                           lambda d, seed=seed: round_rng(seed, DRAFTER_STREAM, len(PROMPT) + d))
        linear: list[int] = []
        for i in range(5):
            context = (*PROMPT, *linear)
            linear.append(sample(case.q(context), round_rng(seed, DRAFTER_STREAM, len(context))))
            assert tree.q is not None
            np.testing.assert_allclose(tree.q[i], case.q(context) / case.q(context).sum(), rtol=1e-15)
        assert tree.is_chain and list(tree.tokens) == linear


def test_each_round_draws_exactly_n_plus_one_numbers() -> None:
    case = CASES["overconfident-3x2"]
    for seed in range(20):
        tree = sample_tree(lambda path: case.q((*PROMPT, *path)), (3, 2),
                           lambda d, seed=seed: np.random.default_rng([seed, d]))
        p = np.stack([case.p((*PROMPT, *tree.path_tokens(i))) for i in range(-1, len(tree))])
        rng, twin = np.random.default_rng(seed), np.random.default_rng(seed)
        verify_tree_stochastic(tree, p, rng, eos_ids=NO_EOS, remaining=9)
        twin.random(len(tree) + 1)
        assert rng.random() == twin.random()


def test_same_seed_same_answers_with_fake_models() -> None:
    case = CASES["overconfident-3x2"]
    def run(first_seed: int) -> list[tuple[int, ...]]:
        return [tree_round(case, PROMPT, case.widths, seed) for seed in range(first_seed, first_seed + 100)]
    assert run(0) == run(0)
    assert run(0) != run(1000)


def test_the_target_drafting_for_itself_accepts_every_tree_to_its_depth_with_fake_models() -> None:
    """q == p: the first child of every node passes (u q < p holds for u < 1), down to a leaf."""
    for seed in range(100):
        context = (*PROMPT, seed % V)
        tree = sample_tree(lambda path, context=context: dist("target", PLAIN, (*context, *path)), (3, 2, 2),
                           lambda d, seed=seed, context=context: round_rng(seed, DRAFTER_STREAM, len(context) + d))
        p = np.stack([dist("target", PLAIN, (*context, *tree.path_tokens(i))) for i in range(-1, len(tree))])
        result = verify_tree_stochastic(tree, p, round_rng(seed, VERIFIER_STREAM, len(context)), eos_ids=NO_EOS,
                                        remaining=9)
        assert result.verdict.accepted == 3
        assert result.path == tree.paths[tree.children(tree.children(tree.children(-1)[0])[0])[0]]


def test_eos_and_budget_truncate_the_path() -> None:
    q = np.full((1, 4), 0.25)
    tree = DraftTree((1, 2, 3), (-1, -1, -1), q)  # three siblings under the root
    p = np.tile(q[0], (4, 1))  # q == p: the first sibling passes, then a bonus token
    result = verify_tree_stochastic(tree, p, np.random.default_rng(0), eos_ids=frozenset({1}), remaining=9)
    assert result.verdict.tokens == (1,) and result.verdict.finish_reason is FinishReason.STOP
    assert result.path == (0,)
    chain = DraftTree.chain([1, 2, 3], np.full((3, 4), 0.25))
    result = verify_tree_stochastic(chain, p, np.random.default_rng(0), eos_ids=NO_EOS, remaining=2)
    assert result.verdict.tokens == (1, 2) and result.path == (0, 1)
    assert result.verdict.finish_reason is FinishReason.LENGTH


def test_sampling_input_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="needs the q"):
        verify_tree_stochastic(DraftTree((1,), (-1,)), np.full((2, 4), 0.25), rng, eos_ids=NO_EOS, remaining=3)
    tree = DraftTree((1,), (-1,), np.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="columns"):
        verify_tree_stochastic(tree, np.full((2, 5), 0.2), rng, eos_ids=NO_EOS, remaining=3)
    with pytest.raises(ValueError, match=r"\(2, V\)"):
        verify_tree_stochastic(tree, np.full((3, 4), 0.25), rng, eos_ids=NO_EOS, remaining=3)
    with pytest.raises(ValueError, match="sum"):
        verify_tree_stochastic(tree, np.full((2, 4), 0.3), rng, eos_ids=NO_EOS, remaining=3)
    empty = verify_tree_stochastic(DraftTree((), ()), np.array([[0.0, 1.0, 0.0, 0.0]]), rng, eos_ids=NO_EOS,
                                   remaining=3)
    assert empty.verdict.tokens == (1,) and empty.path == ()
