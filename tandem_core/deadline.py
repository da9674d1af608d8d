"""Round deadlines that follow the measured rounds (issue 15, item 3): the link and the cloud's
verification learnt apart, and when to check that the link still answers. Pure: no I/O, no
threads, no clock reads; the caller passes every latency and ceiling.

A round's latency L is the time from the start of its wait (its send, or for a round sent ahead
the previous verdict) to its verdict, on the edge's clock. Each verdict also carries the cloud's
own time for the round (`ServerTiming`: queue + prefill + verification pass), so L splits into
a server part S (at most L) and a link part N = L - S: the round trip, the proxies and the
hand-offs. The two vary for different reasons (the link with its jitter; the pass with its rows
and the load on the cloud's CPU), and at RTT 0 the pass is nearly all of the round.
`RoundDeadline` keeps the last `window` rounds whose verdict came normally, except a stream's
first rounds (they also waited for the open and the prefill), each with the rows its pass scored
(drafts + 1), and the latencies C of the last answered link checks (below). For a round of
`rows` rows:

    S^_i     = S_i * max(1, (rows + row_base) / (rows_i + row_base))
    deadline = min(ceiling, max(floor, m_s * Q_q(S^) + m_n * max(Q_q(N), Q_q(C), fastest) + margin))

- Q_q is the nearest-rank quantile (the ceil(q n)-th smallest of n); at q = 0.99 the largest of
  up to 100 samples: the window's slowest pass and its slowest link part both count.
- S^ never predicts a pass faster than a measured one with more rows, and lets a longer round
  grow as if a pass cost `row_base` rows' worth plus its own rows (CPU bf16: 1 row 257 ms,
  5 rows 285 ms, i.e. about 36 rows' worth before the first): an over-estimate.
- Only a round that was not sent ahead, and a check, measure a whole round trip: a round sent
  ahead waits from the previous verdict, so its N is only the difference of two one-way delays.
  Until `min_trips` of those are held, the deadline is the ceiling, so that a window of rounds
  sent ahead cannot cut short the next round that is not.
- `fastest` (optional) is the smallest link part of a round not sent ahead on the caller's
  current stream, its first round included, or of a check answered on it: the link as it is now,
  which a window learnt on a faster link (RTT 40 ms, before the link slowed to 300 ms between
  answers) must not cut short.
- A cloud that reports no timing (S = 0) has all of L counted as link: the larger factor.

Link checks. The real pair's pass takes 220 to 480 ms on a quiet 2-core machine and twice that
under load, so no deadline lets every slow pass through and also gives up on a black-holed link
within ~0.5 s. A silent stream does not say which it is; a cheap request on the same connection
(the caller's: a call the cloud's front door answers at once) does. A round still unanswered
`check_floor` after its wait began is checked, and again each `check_after` after that while it
waits: a check unanswered within `check_timeout` means the link is dead and the round is given
up at once; an answered one means the cloud is slow, and the round waits on to its deadline.

    check_after   = min(deadline, max(check_floor, check_every))
    check_timeout = max(check_floor, m_n * max(Q_q(C), fastest) + margin)     C: answered checks' latencies

- The first check, early (`first_check`: `check_floor` once learnt), catches a link that died
  between two rounds after ~`check_floor` + `check_timeout`; one that dies later in a round is
  caught by a later check, after at most ~`check_after` + `check_timeout`. One check is out at a
  time, so on a link slower than `check_every` the checks follow each other back to back.
- `check_every` = 100 ms, not a share of the round: checked again only after the quickest
  quarter of rounds (~320 ms for the real pair at RTT 0), a link that died just after an
  answered check stalled the answer for that plus the check's timeout, up to 680 ms on a slow
  machine (`BENCHMARKS.md`). A check is one call the first server on the path answers at once,
  so a few more per round cost little.
- `check_timeout` is None before `min_checks` answered checks: a check then ends no wait early
  (the caller still checks, to learn C). `fastest` keeps checks learnt on a faster link from
  timing out on a link that slowed.

Guarantees:
- The deadline is never above `ceiling` and never below min(`floor`, `ceiling`): the configured
  deadline is the ceiling, and the ceiling wins over the floor.
- Before `min_samples` samples with `min_trips` round trips among them and the checks, and always
  when the policy is not `adaptive`, the deadline is the ceiling and `first_check` and
  `check_after` are the deadline (no check).
- `first_check` <= `check_after`, neither above the deadline nor below min(`check_floor`, deadline);
  `check_timeout` is None or at least `check_floor`.
- Monotone: more rows, a larger `fastest`, a sample with a longer latency (the same server part)
  or with a longer server part (the same link part) never shortens the deadline; a slower check
  or a larger `fastest` never shortens `check_timeout`.
- `missed()` (a verdict missed its deadline, or a check went unanswered) forgets every round
  sample: the ceiling (and no check) again until `min_samples` new rounds (`min_trips` round
  trips) are measured. A misfire on a link or a cloud that slowed down is not repeated at once; a
  black hole is no worse off than with the fixed deadline. The checks are kept: they time the
  link, not the rounds, and `fastest` guards them against a link that slowed.
- Deterministic: the same calls give the same results.
- Bad arguments raise ValueError (TypeError for a wrong type) naming the argument, and change
  nothing. The class does not lock: the caller serialises access.

The constants (`DeadlinePolicy`'s defaults). A misfire is not a correctness problem (the edge
resumes, or with fallback goes on on the device, losslessly), but with fallback the rest of the
answer is the drafter's, so each part gets the margin its own variation needs:
- q = 0.99 over 64 rounds: the slowest pass and the slowest link part of the window;
  min_samples = 8, min_trips = 3 (about one round in four is not sent ahead at RTT 0).
- m_s = 2: a pass may take twice the slowest of the last 64 (measured with the drafter drafting
  ahead on the same cores; a loaded 2-core machine doubles a pass), on top of the row growth,
  before a round on a link that still answers is given up: that misfire would cost the rest of
  the answer, while a dead link is caught by the check long before.
- m_n = 2: the link part is small at RTT 0 and jitters most where it is large.
- margin = 50 ms: scheduler and thread hand-offs, which scale with neither part.
- floor = 300 ms: ~50 times a tiny-model round on 127.0.0.1.
- check_floor = 100 ms, min_checks = 2: a check at RTT 0 takes a few ms (tens under load).
- Real pair at RTT 0 on a quiet machine (passes 220 to 480 ms, link part up to ~70 ms): deadline
  2 * 480 + 2 * 70 + 50, i.e. the 1000 ms ceiling; checked after 100 ms, then each 100 ms (or
  back to back), a dead link given up ~100 to 250 ms after the first check it does not answer.
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


def _quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile: the ceil(q n)-th smallest of `values` (not empty)."""
    rank = max(1, math.ceil(q * len(values) - 1e-9))  # 1-based; q n may round up (0.7 * 10)
    return sorted(values)[rank - 1]


@dataclass(frozen=True)
class DeadlinePolicy:
    """How the deadline and the checks follow the samples (the module docstring's formulas)."""

    adaptive: bool = True  # False: every round waits the ceiling, unchecked
    floor_s: float = FLOOR_MS / 1000
    quantile: float = 0.99  # q
    server_mult: float = 2.0  # m_s
    link_mult: float = 2.0  # m_n
    margin_s: float = 0.05
    window: int = 64  # samples kept (the most recent), and checks
    min_samples: int = 8  # fewer: the ceiling
    min_trips: int = 3  # fewer rounds not sent ahead and checks: the ceiling
    row_base: int = 32  # a pass costs at least `row_base` rows' worth before its own rows
    check_floor_s: float = 0.1  # check_after and check_timeout are at least this
    check_every_s: float = 0.1  # while a round waits, a check this long after the last one began
    min_checks: int = 2  # fewer answered checks: an unanswered one ends no wait early

    def __post_init__(self) -> None:
        _number("floor_s", self.floor_s, 0.0, open_low=True)
        _number("quantile", self.quantile, 0.0, 1.0, open_low=True)
        _number("server_mult", self.server_mult, 1.0)
        _number("link_mult", self.link_mult, 1.0)
        _number("margin_s", self.margin_s, 0.0)
        _count("min_samples", self.min_samples, 1)
        _count("min_trips", self.min_trips, 1)
        _count("window", self.window, max(self.min_samples, self.min_checks))
        _count("row_base", self.row_base, 0)
        _number("check_every_s", self.check_every_s, 0.0, open_low=True)
        _number("check_floor_s", self.check_floor_s, 0.0, open_low=True)
        _count("min_checks", self.min_checks, 1)


@dataclass(frozen=True)
class _Sample:
    rows: int
    server_s: float  # S
    link_s: float  # N = L - S
    trip: bool  # not sent ahead: N is a whole round trip


class RoundDeadline:
    """The next round's deadline and check from the last rounds and checks (module docstring)."""

    def __init__(self, policy: DeadlinePolicy | None = None) -> None:
        self.policy = policy if policy is not None else DeadlinePolicy()
        self._samples: deque[_Sample] = deque(maxlen=self.policy.window)
        self._checks: deque[float] = deque(maxlen=self.policy.window)  # C

    @property
    def samples(self) -> int:
        """Rounds held (at most `window`)."""
        return len(self._samples)

    @property
    def checks(self) -> int:
        """Answered checks held (at most `window`)."""
        return len(self._checks)

    def observe(self, rows: int, latency_s: float, server_s: float = 0.0, *, ahead: bool = False) -> None:
        """A verdict came normally `latency_s` after its round of `rows` rows started waiting; the
        cloud reported `server_s` of it as its own (clipped to `latency_s`). `ahead`: the round was
        sent ahead, and waited from the previous verdict."""
        _count("rows", rows, 1)
        latency = _number("latency_s", latency_s, 0.0)
        server = min(_number("server_s", server_s, 0.0), latency)
        if not isinstance(ahead, bool):
            raise TypeError(f"ahead must be a bool, got {type(ahead).__name__}")
        self._samples.append(_Sample(rows, server, latency - server, not ahead))

    def observe_check(self, latency_s: float) -> None:
        """A link check was answered `latency_s` after it was sent."""
        self._checks.append(_number("latency_s", latency_s, 0.0))

    def missed(self) -> None:
        """A verdict missed its deadline, or a check went unanswered: forget every round sample
        (the ceiling until `min_samples` more); the checks are kept."""
        self._samples.clear()

    def deadline_s(self, rows: int, ceiling_s: float, fastest_s: float | None = None) -> float:
        """Seconds to wait for the verdict of a round of `rows` rows, at most `ceiling_s`;
        `fastest_s` is the smallest link part of a round not sent ahead on the current stream."""
        _count("rows", rows, 1)
        ceiling = _number("ceiling_s", ceiling_s, 0.0, open_low=True)
        fastest = 0.0 if fastest_s is None else _number("fastest_s", fastest_s, 0.0)
        p = self.policy
        if not self._learnt():
            return ceiling
        server = _quantile([self._grown(s, rows) for s in self._samples], p.quantile)
        link = max(_quantile([s.link_s for s in self._samples] + list(self._checks), p.quantile), fastest)
        deadline = max(p.floor_s, p.server_mult * server + p.link_mult * link + p.margin_s)
        return min(deadline, ceiling)

    def check_after_s(self, deadline_s: float) -> float:
        """Seconds between two checks of a round still unanswered; its `deadline_s` (from
        `deadline_s()`) when there is no check to make."""
        deadline = _number("deadline_s", deadline_s, 0.0, open_low=True)
        if not self._learnt():
            return deadline
        p = self.policy
        return min(deadline, max(p.check_floor_s, p.check_every_s))

    def first_check_s(self, deadline_s: float) -> float:
        """Seconds after which a round still unanswered is first checked; its `deadline_s` (from
        `deadline_s()`) when there is no check to make."""
        deadline = _number("deadline_s", deadline_s, 0.0, open_low=True)
        return min(deadline, self.policy.check_floor_s) if self._learnt() else deadline

    def check_timeout_s(self, fastest_s: float | None = None) -> float | None:
        """Seconds a live link takes at most to answer a check; None before `min_checks` answers.
        `fastest_s` as for `deadline_s`."""
        fastest = 0.0 if fastest_s is None else _number("fastest_s", fastest_s, 0.0)
        p = self.policy
        if not p.adaptive or len(self._checks) < p.min_checks:
            return None
        slowest = max(_quantile(list(self._checks), p.quantile), fastest)
        return max(p.check_floor_s, p.link_mult * slowest + p.margin_s)

    def _learnt(self) -> bool:
        p, trips = self.policy, sum(s.trip for s in self._samples) + len(self._checks)
        return p.adaptive and len(self._samples) >= p.min_samples and trips >= p.min_trips

    def _grown(self, sample: _Sample, rows: int) -> float:
        """S^: the sample's server part grown to `rows` rows (never shrunk)."""
        base = self.policy.row_base
        return sample.server_s * max(1.0, (rows + base) / (sample.rows + base))
