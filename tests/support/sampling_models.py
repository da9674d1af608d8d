"""Context-dependent toy models with exactly known distributions, for the sampling tests.

Notation as in `tandem_core.verify`: p is the target's distribution, q the drafter's.

Over a 5-token vocabulary, the target's logits depend on the context through its last token and
the parity of its length, so p differs per row of a round and per context (every pair of the ten
contexts differs by a total variation of at least 0.2 after each transform used here; a test
checks it). Each drafter disagrees with the target in a known way:

- "close": the target's logits plus noise (most drafts accepted: the bonus row is used often);
- "shifted": the target's logits for the neighbouring context (last token + 1, other parity):
  the drafter reads the wrong row, so about half of the drafts are rejected;
- "avoids_favourite": the target's logits with the target's likeliest token removed (-inf), so
  that token only ever comes from the residual norm(max(0, p - q)).

`exact_distribution` enumerates every answer with the product of the target's conditional
probabilities, using `reference_probs`, a brute-force transform written from its definition
(not `tandem_core.sampling.logits_to_probs`), so a bug in the shared transform cannot hide in
the expected values. `chi_square` compares sampled answers with it (Pearson's test; cells
expected below 5 are pooled) and returns an exact p-value (`chi2_sf`, closed forms, no scipy).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from tandem_core.sampling import SamplingParams

V = 5  # vocabulary
# [parity of the context's length, last token] -> logits over the next token. float32 as the
# runtimes produce them; every distribution below is computed from these exact float32 values.
# Seed 23 is the one of the first 200 whose ten contexts differ most (total variation >= 0.25).
TARGET = np.random.default_rng(23).normal(0.0, 1.2, size=(2, V, V)).astype(np.float32)
_NOISE = np.random.default_rng(24).normal(0.0, 0.5, size=(2, V, V)).astype(np.float32)

DRAFTERS = ("close", "shifted", "avoids_favourite")
Logits = Callable[[Sequence[int]], np.ndarray]


def target_logits(context: Sequence[int]) -> np.ndarray:
    """(V,) float32 logits of the target after `context` (prompt + generated tokens)."""
    return TARGET[len(context) % 2, context[-1]]


def drafter_logits(kind: str) -> Logits:
    """The logits function of drafter `kind` (see the module docstring)."""
    def close(context: Sequence[int]) -> np.ndarray:
        return TARGET[len(context) % 2, context[-1]] + _NOISE[len(context) % 2, context[-1]]

    def shifted(context: Sequence[int]) -> np.ndarray:
        return TARGET[(len(context) + 1) % 2, (context[-1] + 1) % V]

    def avoids_favourite(context: Sequence[int]) -> np.ndarray:
        row = target_logits(context).copy()
        row[int(np.argmax(row))] = -np.inf
        return row

    return {"close": close, "shifted": shifted, "avoids_favourite": avoids_favourite}[kind]


def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, top-k, softmax, top-p, from the definitions, over a full stable sort."""
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")  # value desc, ties to the lower id
    kept = np.full(z.shape, -np.inf)
    top = order[: params.top_k or z.size]
    kept[top] = z[top]
    e = np.exp(kept - kept.max())
    p: np.ndarray = e / e.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        n = int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1  # smallest prefix >= top_p
        nucleus = np.zeros(z.shape)
        nucleus[order[:n]] = p[order[:n]]
        p = nucleus / nucleus.sum()
    return p


def exact_distribution(prompt: Sequence[int], n: int, params: SamplingParams,
                       eos_ids: frozenset[int] = frozenset()) -> dict[tuple[int, ...], float]:
    """P(answer) for every answer of up to n tokens (ending early only at an EOS token)."""
    out: dict[tuple[int, ...], float] = {}

    def walk(answer: tuple[int, ...], prob: float) -> None:
        if len(answer) == n or (answer and answer[-1] in eos_ids):
            out[answer] = prob
            return
        p = reference_probs(target_logits([*prompt, *answer]), params)
        for token in np.flatnonzero(p).tolist():
            walk((*answer, token), prob * float(p[token]))

    walk((), 1.0)
    return out


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper gamma Q(df/2, x/2) in closed form."""
    if x <= 0:
        return 1.0
    y = x / 2
    if df % 2 == 0:  # Q(m, y) = sum_{j<m} y^j e^-y / j!
        return min(1.0, sum(math.exp(j * math.log(y) - y - math.lgamma(j + 1)) for j in range(df // 2)))
    # Q(m + 1/2, y) = erfc(sqrt(y)) + sum_{j<m} y^(j+1/2) e^-y / Gamma(j + 3/2)
    tail = sum(math.exp((j + 0.5) * math.log(y) - y - math.lgamma(j + 1.5)) for j in range(df // 2))
    return min(1.0, math.erfc(math.sqrt(y)) + tail)


def chi_square(observed: Counter[tuple[int, ...]], exact: dict[tuple[int, ...], float],
               min_expected: float = 5.0) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of Pearson's test of `observed` against `exact`.

    Cells expected below `min_expected` are pooled into one. An answer the target can never
    produce gives p-value 0.
    """
    if any(answer not in exact for answer in observed):
        return math.inf, 0, 0.0
    total = sum(observed.values())
    big = {a for a, prob in exact.items() if prob * total >= min_expected}
    small = [a for a in exact if a not in big]
    cells = [(observed[a], exact[a] * total) for a in big]
    if small:
        cells.append((sum(observed[a] for a in small), sum(exact[a] for a in small) * total))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    df = len(cells) - 1
    return stat, df, chi2_sf(stat, df)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())
