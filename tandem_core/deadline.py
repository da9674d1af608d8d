"""Round deadlines that follow the measured rounds (issue 15, item 3). Pure: no I/O, no threads,
no clock reads; the caller passes every latency and ceiling.

A round's latency is the time from sending its drafts to receiving its verdict, on the edge's
clock: the link's round trip, the cloud's queue and verification pass, and the hand-offs between.
`RoundDeadline` keeps the latencies of the last `window` rounds whose verdict came normally, each
with the rows its verification pass scored (drafts + 1). For a round of `rows` rows it gives

    L^_i     = L_i * max(1, (rows + row_base) / (rows_i + row_base))   per sample i
    deadline = min(ceiling, max(floor, mult * Q_q(L^) + margin, mult * fastest + margin))

- Q_q is the nearest-rank quantile (the ceil(q n)-th smallest of n samples): with few samples it
  is their maximum.
- L^ never predicts a round faster than a measured one with more rows, and lets a longer round
  grow as if a pass cost `row_base` rows' worth plus its own rows. The round trip and the pass
  itself cost more than that wherever measured (CPU bf16: 1 row 257 ms, 5 rows 285 ms, i.e.
  about 36 rows' worth before the first row), so this over-estimates the growth: only a longer
  wait.
- `fastest` (optional) is the quickest round measured on the caller's current stream, its first
  round included (which also waited for the cloud's prefill): the link as it is now. It keeps a
  window learnt on a faster link (say RTT 40 ms, before the link slowed to 300 ms between answers)
  from cutting a live stream short after its first round.

Guarantees:
- The deadline is never above `ceiling` and never below min(`floor`, `ceiling`): the configured
  deadline is the ceiling, and the ceiling wins over the floor.
- Before `min_samples` samples, and always when the policy is not `adaptive`, it is the ceiling.
- Monotone: more rows, a larger `fastest`, or any sample replaced by a slower one never shortens it.
- `missed()` (a verdict missed its deadline) forgets every sample: the ceiling again until
  `min_samples` new rounds are measured. A misfire on a link that slowed down is not repeated at
  once, and a black-holed link is no worse off than with the fixed deadline.
- Deterministic: the same calls give the same deadlines.
- Bad arguments raise ValueError (TypeError for a wrong type) naming the argument, and change
  nothing. The class does not lock: the caller serialises access.

The constants (`DeadlinePolicy`'s defaults): a misfire is not a correctness problem (the edge
resumes, or with fallback goes on on the device, losslessly), but it costs speed and, with
fallback, the rest of the answer is the drafter's. So a misfire must be very unlikely:
- q = 0.9 over 64 rounds: the 7th slowest; robust to a single outlier, quick to follow load.
- mult = 2.5: a round may take 2.5 times the 90th percentile (CPU contention on a shared 2-core
  machine makes a verification 2 to 3 times slower) before it misfires.
- margin = 100 ms: scheduler and thread hand-offs, which do not scale with the round.
- floor = 300 ms: ~50 times a tiny-model round on 127.0.0.1, and well within the fallback
  benchmark's 600 ms stall goal at RTT 0 on a fast verifier.
- At RTT 200 +- 50 ms jitter (rounds 100 to 300 ms): about 2.5 * 290 + 100 = 825 ms.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

FLOOR_MS = 300  # the default floor, in the configuration's unit


def _number(name: str, value: float, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value) if abs(value) < 1e308 else math.inf
    below = number <= low if open_low else number < low
    if not math.isfinite(number) or below or number > high:
        bounds = f"{'>' if open_low else '>='} {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be finite and {bounds}, got {value!r}")
    return number


def _count(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


@dataclass(frozen=True)
class DeadlinePolicy:
    """How the deadline follows the samples (see the module docstring for the formula)."""

    adaptive: bool = True  # False: every round waits the ceiling
    floor_s: float = FLOOR_MS / 1000
    quantile: float = 0.9  # q
    mult: float = 2.5
    margin_s: float = 0.1
    window: int = 64  # samples kept (the most recent)
    min_samples: int = 8  # fewer: the ceiling
    row_base: int = 32  # a round costs at least `row_base` rows' worth before its own rows

    def __post_init__(self) -> None:
        _number("floor_s", self.floor_s, 0.0, open_low=True)
        _number("quantile", self.quantile, 0.0, 1.0, open_low=True)
        _number("mult", self.mult, 1.0)
        _number("margin_s", self.margin_s, 0.0)
        _count("min_samples", self.min_samples, 1)
        _count("window", self.window, self.min_samples)
        _count("row_base", self.row_base, 0)


class RoundDeadline:
    """The next round's deadline from the latencies of the last rounds (module docstring)."""

    def __init__(self, policy: DeadlinePolicy | None = None) -> None:
        self.policy = policy if policy is not None else DeadlinePolicy()
        self._samples: deque[tuple[int, float]] = deque(maxlen=self.policy.window)  # (rows, latency s)

    @property
    def samples(self) -> int:
        """Latencies held (at most `window`)."""
        return len(self._samples)

    def observe(self, rows: int, latency_s: float) -> None:
        """A verdict came normally `latency_s` after its round of `rows` rows was sent."""
        self._samples.append((_count("rows", rows, 1), _number("latency_s", latency_s, 0.0)))

    def missed(self) -> None:
        """A verdict missed its deadline: forget every sample (the ceiling until `min_samples` more)."""
        self._samples.clear()

    def deadline_s(self, rows: int, ceiling_s: float, fastest_s: float | None = None) -> float:
        """Seconds to wait for the verdict of a round of `rows` rows, at most `ceiling_s`."""
        _count("rows", rows, 1)
        ceiling = _number("ceiling_s", ceiling_s, 0.0, open_low=True)
        fastest = None if fastest_s is None else _number("fastest_s", fastest_s, 0.0)
        p = self.policy
        if not p.adaptive or len(self._samples) < p.min_samples:
            return ceiling
        base = p.row_base
        predicted = sorted(latency * max(1.0, (rows + base) / (n + base)) for n, latency in self._samples)
        rank = max(1, math.ceil(p.quantile * len(predicted) - 1e-9))  # 1-based; q n may round up (0.7 * 10)
        high = predicted[rank - 1]
        deadline = max(p.floor_s, p.mult * high + p.margin_s)
        if fastest is not None:
            deadline = max(deadline, p.mult * fastest + p.margin_s)
        return min(deadline, ceiling)
