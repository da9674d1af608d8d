"""Sampling parameters and the one logits -> probabilities transform shared by target and drafter.

Guarantees:
- `logits_to_probs` is the single transform both sides apply: the target's p and the drafter's q
  come out of the same function with the same `SamplingParams`, which is what makes speculative
  sampling lossless with respect to the *transformed* target distribution.
- The transform is deterministic, including ties: top-k and top-p keep tied tokens in order of
  increasing token id, like `np.argmax` (first index wins).
- Output is float64, has the input's shape ((V,) or (n, V)), and every row sums to 1.
- `sample` draws exactly one `rng.random()` per call, so a seeded run is reproducible.
- Nothing here does I/O or touches global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Candidates examined first when searching for the top-p nucleus; grown 8x until the nucleus fits.
_NUCLEUS_START = 256


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a distribution. temperature == 0 means greedy (top_k/top_p unused)."""

    temperature: float = 0.0  # 0 = greedy; otherwise logits are divided by it
    top_k: int = 0  # keep the k most likely tokens; 0 = disabled
    top_p: float = 1.0  # keep the smallest nucleus with mass >= top_p; 1 = disabled
    seed: int | None = None  # None = fresh entropy; else in [0, 2**63)

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p, then softmax; greedy gives the one-hot of the argmax.

    `logits` is (V,) or (n, V), any real dtype. -inf entries are allowed (probability 0); NaN,
    +inf, or a row without any finite logit raise ValueError.
    """
    x = np.asarray(logits)
    if x.dtype.kind not in "fiu" or x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"logits must be real with shape (V,) or (n, V), V >= 1; got {x.dtype} {x.shape}")
    rows = x.reshape(-1, x.shape[-1])
    n, v = rows.shape
    row_max = rows.max(axis=1, keepdims=True).astype(np.float64) if n else np.zeros((0, 1))
    if not np.isfinite(row_max).all():  # NaN propagates through max
        raise ValueError("logits must not be NaN or +inf, and each row needs a finite value")
    if params.greedy:
        out = np.zeros((n, v), dtype=np.float64)
        out[np.arange(n), np.argmax(rows, axis=1)] = 1.0
        return out.reshape(x.shape)
    # Work on the kept tokens only: (n, k) columns `ids` after top-k, else the whole row.
    ids = _top_k_ids(rows, params.top_k) if 0 < params.top_k < v else None
    z = rows.astype(np.float64) if ids is None else np.take_along_axis(rows, ids, axis=1).astype(np.float64)
    # Shift before scaling: (l - max) / T <= 0 never overflows, however small T is. The row
    # maximum survives top-k, so after the shift every row's maximum is exactly 0.
    z -= row_max
    z /= params.temperature
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    if params.top_p < 1.0:
        for i in range(n):
            z[i] = _nucleus(z[i], params.top_p)
    if ids is None:
        return z.reshape(x.shape)
    out = np.zeros((n, v), dtype=np.float64)
    np.put_along_axis(out, ids, z, axis=1)
    return out.reshape(x.shape)


def _top_k_ids(rows: np.ndarray, k: int) -> np.ndarray:
    """(n, k) ascending token ids of the k largest logits per row, ties to the lower token id."""
    v = rows.shape[1]
    ids = np.argpartition(rows, v - k, axis=1)[:, v - k :]
    kth = np.take_along_axis(rows, ids, axis=1).min(axis=1, keepdims=True)  # k-th largest value
    # argpartition picks arbitrarily among values equal to the k-th largest; redo rows where some
    # tied token was left out, keeping the lowest ids.
    picked_ties = (np.take_along_axis(rows, ids, axis=1) == kth).sum(axis=1)
    for i in np.flatnonzero(picked_ties != (rows == kth).sum(axis=1)):
        above = np.flatnonzero(rows[i] > kth[i])
        ids[i] = np.concatenate([above, np.flatnonzero(rows[i] == kth[i])[: k - above.size]])
    ids.sort(axis=1)  # ascending ids, so the top-p tie-break by position is a tie-break by id
    return ids


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Renormalized p restricted to the smallest prefix (by prob desc, position asc) with mass
    >= top_p. Positions are in ascending token-id order.

    Only tokens with probability >= the m-th largest are sorted, with m grown until their mass
    reaches top_p, so a peaked distribution over a large vocabulary costs one argpartition.
    Taking *every* token >= the m-th value keeps the candidate set a prefix of the full order.
    If rounding leaves the total mass just under top_p, every token with mass is kept.
    """
    v = p.shape[0]
    m = min(_NUCLEUS_START, v)
    while True:
        threshold = np.partition(p, v - m)[v - m] if m < v else -np.inf
        cand = np.flatnonzero((p >= threshold) & (p > 0))  # ascending ids; zero mass never helps
        order = cand[np.argsort(-p[cand], kind="stable")]  # prob desc, ties id asc
        mass = np.cumsum(p[order])
        if mass[-1] >= top_p or threshold <= 0:  # reached top_p, or every token with mass is in
            break
        m = min(8 * m, v)
    keep = min(int(np.searchsorted(mass, top_p, side="left")) + 1, order.shape[0])
    out = np.zeros_like(p)
    kept = order[:keep]
    out[kept] = p[kept] / mass[keep - 1]
    return out


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index from a 1-D probability vector by inverse CDF, using exactly one rng.random().

    The vector need not be exactly normalized (the CDF is scaled by its total); a token with
    probability 0 is never returned.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty 1-D vector, got shape {p.shape}")
    cdf = np.cumsum(p)
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0) or p.min() < 0:
        raise ValueError("probs must be finite, non-negative and have positive mass")
    u = rng.random()
    idx = int(cdf.searchsorted(u * total, side="right"))
    if idx >= p.shape[0]:  # u * total rounded up to total: take the last token with mass
        idx = int(np.flatnonzero(p > 0)[-1])
    return idx


def make_rngs(seed: int | None) -> tuple[np.random.Generator, np.random.Generator]:
    """(drafter_rng, verifier_rng): independent streams from one seed, or fresh entropy for None."""
    if seed is None:
        drafter_seq, verifier_seq = np.random.SeedSequence().spawn(2)
        return np.random.default_rng(drafter_seq), np.random.default_rng(verifier_seq)
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    return np.random.default_rng([int(seed), 0]), np.random.default_rng([int(seed), 1])


DRAFTER_STREAM = 0
VERIFIER_STREAM = 1


def resolve_seed(seed: int | None) -> int:
    """The seed a request runs with: the caller's, or a fresh one when it gave none."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    return int(seed)


def round_rng(seed: int, stream: int, position: int) -> np.random.Generator:
    """The random stream of one step, keyed by (seed, side, absolute position).

    `position` is the number of tokens committed before the step (prompt included). Keying by
    position instead of carrying one generator along makes a run that is interrupted and resumed
    elsewhere (another replica, a fallback to the device) draw exactly the same numbers as an
    undisturbed run, so seeded sampling is reproducible across failures.
    """
    return np.random.default_rng([seed, stream, position])


def cap_support(q: np.ndarray, n: int) -> np.ndarray:
    """Keep the n most likely tokens of a 1-D distribution and renormalize (n == 0: all of them).

    Used by the drafter in sampling mode so each q row crosses the wire as at most n (id, prob)
    pairs. Lossless either way: rejection sampling reproduces p for ANY drafter distribution,
    provided the drafts are sampled from exactly the q that verification sees (Leviathan et al.
    2023, Theorem 1); a capped q can only lower acceptance where p has mass outside the top n.
    The kept probabilities are rounded to float32 first, so the edge samples from exactly the
    values it sends.
    """
    if n <= 0 or np.count_nonzero(q) <= n:
        keep = np.flatnonzero(q)
    else:
        keep = np.argpartition(q, -n)[-n:]
    out = np.zeros(q.shape, dtype=np.float64)
    vals = q[keep].astype(np.float64)
    out[keep] = (vals / vals.sum()).astype(np.float32)  # float32-exact: what the wire carries
    return out
