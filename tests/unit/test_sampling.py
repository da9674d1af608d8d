"""Unit tests for tandem_core.sampling: the shared logits -> probabilities transform and sampling."""

from __future__ import annotations

import numpy as np
import pytest

from tandem_core.sampling import SamplingParams, logits_to_probs, make_rngs, sample


def softmax(x: np.ndarray) -> np.ndarray:
    e: np.ndarray = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Brute force over a full stable sort: the definition, not the fast path."""
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")  # value desc, ties to the lower id
    keep = np.zeros(z.shape, dtype=bool)
    keep[order[: params.top_k or z.size]] = True
    p = softmax(np.where(keep, z, -np.inf))
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        n = int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1
        mask = np.zeros(z.shape, dtype=bool)
        mask[order[:n]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def test_greedy_is_one_hot_of_first_argmax() -> None:
    logits = np.array([[1.0, 3.0, 3.0, -np.inf], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    probs = logits_to_probs(logits, SamplingParams())
    assert probs.dtype == np.float64
    np.testing.assert_array_equal(probs, [[0, 1, 0, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_matches_softmax(temperature: float) -> None:
    logits = np.random.default_rng(0).standard_normal(50) * 4
    probs = logits_to_probs(logits, SamplingParams(temperature=temperature))
    np.testing.assert_allclose(probs, softmax(logits / temperature), rtol=1e-12, atol=1e-15)


def test_tiny_temperature_and_huge_logits_stay_finite() -> None:
    logits = np.array([1e30, 1e30 - 1e16, -1e30])
    probs = logits_to_probs(logits, SamplingParams(temperature=1e-6))
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert probs[0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_keeps_exactly_k(k: int) -> None:
    logits = np.random.default_rng(1).standard_normal((3, 100))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=k))
    assert ((probs > 0).sum(axis=1) == k).all()
    for row, p in zip(logits, probs, strict=True):
        kept = np.flatnonzero(p > 0)
        np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-row)[:k]))
        np.testing.assert_allclose(p[kept], softmax(row[kept]), rtol=1e-12)


def test_top_k_ties_keep_lowest_ids() -> None:
    logits = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    np.testing.assert_array_equal(np.flatnonzero(probs), [1, 2, 5])


def test_top_k_larger_than_vocab_is_disabled() -> None:
    logits = np.arange(4.0)
    full = logits_to_probs(logits, SamplingParams(temperature=1.0))
    np.testing.assert_array_equal(logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=10)), full)


@pytest.mark.parametrize(("top_p", "kept"), [(0.01, 1), (0.5, 1), (0.75, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_minimal_nucleus(top_p: float, kept: int) -> None:
    logits = np.log([0.15, 0.5, 0.05, 0.3])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    order = [1, 3, 0, 2]  # by probability, descending
    assert set(np.flatnonzero(probs)) == set(order[:kept])
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)


def test_top_p_ties_at_boundary_keep_lowest_ids() -> None:
    probs = logits_to_probs(np.zeros(4), SamplingParams(temperature=1.0, top_p=0.5))
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.0, 0.0])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9),  # nucleus > 256 tokens: the grow path
        SamplingParams(temperature=1.3, top_p=0.3),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=3000),
    ],
)
def test_large_vocab_matches_brute_force(params: SamplingParams) -> None:
    logits = np.random.default_rng(2).standard_normal((2, 5000)).astype(np.float32)
    logits[0, :7] = logits[0, 7]  # a run of ties
    probs = logits_to_probs(logits, params)
    for row, p in zip(logits, probs, strict=True):
        np.testing.assert_allclose(p, reference_probs(row, params), rtol=1e-9, atol=1e-15)


def test_rows_sum_to_one_and_batch_equals_rows() -> None:
    logits = np.random.default_rng(3).standard_normal((9, 1000)) * 3
    for params in [SamplingParams(), SamplingParams(temperature=0.8, top_k=50, top_p=0.9)]:
        batch = logits_to_probs(logits, params)
        assert batch.shape == logits.shape
        np.testing.assert_allclose(batch.sum(axis=1), 1.0, rtol=1e-12)
        for row, p in zip(logits, batch, strict=True):
            np.testing.assert_array_equal(logits_to_probs(row, params), p)


def test_neg_inf_logits_get_zero_probability() -> None:
    logits = np.array([-np.inf, 0.0, -np.inf, 1.0])
    for params in [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=3, top_p=0.99)]:
        probs = logits_to_probs(logits, params)
        assert probs[0] == 0.0 and probs[2] == 0.0
        np.testing.assert_allclose(probs[[1, 3]], softmax(np.array([0.0, 1.0])))


@pytest.mark.parametrize("bad", [[np.nan, 0.0], [np.inf, 0.0], [-np.inf, -np.inf]])
def test_bad_logits_raise(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="logits"):
        logits_to_probs(np.array(bad), SamplingParams(temperature=1.0))


def test_bad_logits_shape_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        logits_to_probs(np.zeros((2, 2, 2)), SamplingParams())


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": float("nan")}),
        ("temperature", {"temperature": float("inf")}),
        ("top_k", {"top_k": -1}),
        ("top_k", {"top_k": 2.0}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_p", {"top_p": float("nan")}),
        ("seed", {"seed": -1}),
        ("seed", {"seed": 2**63}),
        ("seed", {"seed": "7"}),
    ],
)
def test_invalid_params_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_greedy_property() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.5).greedy


class FixedRng:
    """Stands in for a Generator: returns preset uniforms and counts the calls."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_sample_is_inverse_cdf_and_skips_zero_mass() -> None:
    probs = np.array([0.0, 0.25, 0.0, 0.75, 0.0])
    rng = FixedRng(0.0, 0.2499, 0.25, 0.999999)
    assert [sample(probs, rng) for _ in range(4)] == [1, 1, 3, 3]  # type: ignore[arg-type]


def test_sample_frequencies() -> None:
    probs = np.array([0.1, 0.6, 0.3])
    rng = np.random.default_rng(4)
    counts = np.bincount([sample(probs, rng) for _ in range(20_000)], minlength=3)
    # 20k draws: the standard error of each frequency is < 0.0035; allow 0.015.
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.015)


@pytest.mark.parametrize("bad", [[], [[0.5, 0.5]], [0.0, 0.0], [-0.1, 1.1], [np.nan, 1.0]])
def test_sample_rejects_bad_probs(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="probs"):
        sample(np.array(bad), np.random.default_rng(0))


def test_make_rngs_reproducible_and_independent() -> None:
    d1, v1 = make_rngs(42)
    d2, v2 = make_rngs(42)
    a, b = d1.random(8), v1.random(8)
    np.testing.assert_array_equal(a, d2.random(8))
    np.testing.assert_array_equal(b, v2.random(8))
    assert not np.array_equal(a, b)
    assert not np.array_equal(make_rngs(43)[0].random(8), a)
    fresh_d, fresh_v = make_rngs(None)
    assert not np.array_equal(fresh_d.random(8), fresh_v.random(8))
    with pytest.raises(ValueError, match="seed"):
        make_rngs(-5)
