"""Link health for the orchestrator: RTT estimate, circuit breaker, acceptance tracking, and a
cheap prompt-category guess. Pure: no I/O, no threads, no clock reads.

Guarantees:
- Every clock is a float passed in by the caller (seconds, monotonic), so behaviour is a function
  of the calls alone and tests are deterministic.
- `RttEstimator` is TCP's smoothed RTT (RFC 6298 section 2): the first sample R sets SRTT = R and
  RTTVAR = R / 2; each later one sets RTTVAR = (1 - beta) RTTVAR + beta |SRTT - R|, then
  SRTT = (1 - alpha) SRTT + alpha R, with alpha = 1/8, beta = 1/4. `jitter_ms` is RTTVAR.
- `CircuitBreaker` moves closed -> open after `failure_threshold` consecutive failures,
  open -> half_open once the open period has passed, half_open -> closed on one success and
  half_open -> open on one failure, with the open period doubled (capped at `max_open_s`). Closing
  resets the period to `open_s`. Results recorded while open (late answers to requests sent
  before it opened) are counted but change no state.
- `AcceptanceTracker` keeps an exponentially weighted mean per key and one over all
  observations; values stay in [0, 1]; it forgets the least recently updated key past `max_keys`.
- `backoff_delay(attempt, base_s)` is the one resume backoff of every stream the edge re-opens:
  base_s * 2**attempt, capped at `cap_s`.
- Bad arguments raise ValueError (TypeError for a wrong type) naming the argument, and change
  nothing. Every float must be finite: a NaN or infinite clock is refused before it touches the
  breaker, so it can neither open the circuit nor keep it open; an int past the float range
  counts as infinite.
None of these classes lock: the caller serialises access (one owner, or its own lock).
"""

from __future__ import annotations

import math
import re

CIRCUIT_CLOSED = "closed"
CIRCUIT_OPEN = "open"
CIRCUIT_HALF_OPEN = "half_open"
CIRCUIT_STATES = (CIRCUIT_CLOSED, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN)

CATEGORY_CODE = "code"
CATEGORY_CHAT = "chat"
CATEGORY_PROSE = "prose"
CATEGORIES = (CATEGORY_CODE, CATEGORY_CHAT, CATEGORY_PROSE)


def show_value(value: object) -> str:
    """`value` for an error message: short, and safe for an int of any size (whose decimal text
    Python refuses past 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"{'a negative' if value < 0 else 'an'} int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_finite(name: str, value: float, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {show_value(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int past the float range
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be finite and {bounds}, got {show_value(value)}")
    return number


def backoff_delay(attempt: int, base_s: float, cap_s: float = 5.0) -> float:
    """Seconds to wait before resume number `attempt` (0-based): exponential, capped."""
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise TypeError(f"attempt must be an int >= 0, got {show_value(attempt)}")
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {show_value(attempt)}")
    base = _check_finite("base_s", base_s, 0.0)
    cap = _check_finite("cap_s", cap_s, 0.0)
    try:  # base * 2**attempt exactly; past 4096 doublings every positive base overflows anyway
        return min(math.ldexp(base, min(attempt, 4096)), cap)
    except OverflowError:
        return cap


class RttEstimator:
    """Smoothed round-trip time and its mean deviation from probe samples (RFC 6298)."""

    def __init__(self, alpha: float = 1 / 8, beta: float = 1 / 4) -> None:
        self._alpha = _check_finite("alpha", alpha, 0.0, 1.0)
        self._beta = _check_finite("beta", beta, 0.0, 1.0)
        if self._alpha == 0.0 or self._beta == 0.0:
            raise ValueError("alpha and beta must be > 0")
        self._srtt: float | None = None
        self._rttvar: float | None = None
        self.samples = 0  # samples observed

    def observe(self, rtt_ms: float) -> None:
        r = _check_finite("rtt_ms", rtt_ms, 0.0)
        self.samples += 1
        if self._srtt is None or self._rttvar is None:
            self._srtt, self._rttvar = r, r / 2
            return
        self._rttvar = (1 - self._beta) * self._rttvar + self._beta * abs(self._srtt - r)
        self._srtt = (1 - self._alpha) * self._srtt + self._alpha * r

    @property
    def rtt_ms(self) -> float | None:
        """SRTT in ms; None before the first sample."""
        return self._srtt

    @property
    def jitter_ms(self) -> float | None:
        """RTTVAR in ms (mean deviation of the samples from SRTT); None before the first sample."""
        return self._rttvar


class CircuitBreaker:
    """Stops sending requests over a failing link and lets a prober find when it is back."""

    def __init__(
        self, failure_threshold: int = 3, open_s: float = 5.0, max_open_s: float = 60.0
    ) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int):
            raise TypeError(f"failure_threshold must be an int >= 1, got {show_value(failure_threshold)}")
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be an int >= 1, got {show_value(failure_threshold)}")
        self.failure_threshold = failure_threshold
        self.open_s = _check_finite("open_s", open_s, 0.0)
        self.max_open_s = _check_finite("max_open_s", max_open_s, self.open_s)
        self.consecutive_failures = 0  # failures since the last success
        self._state = CIRCUIT_CLOSED
        self._opened_at = 0.0  # when it last opened (caller's clock, s)
        self._period_s = self.open_s  # how long the current (or next) open period lasts

    @property
    def open_period_s(self) -> float:
        """The length of the current open period (or of the next one, when closed)."""
        return self._period_s

    def state(self, now: float) -> str:
        """The state at time `now`: "closed", "open" or "half_open"."""
        self._advance(now)
        return self._state

    def allow_probe(self, now: float) -> bool:
        """Whether a health probe may be sent now: yes unless open (the prober serialises its own
        probes; in half_open its next result decides the state)."""
        return self.state(now) != CIRCUIT_OPEN

    def seconds_until_half_open(self, now: float) -> float:
        """How long the circuit stays open from `now`; 0 when it is not open."""
        if self.state(now) != CIRCUIT_OPEN:
            return 0.0
        return self._opened_at + self._period_s - now

    def record_success(self, now: float) -> None:
        self._advance(now)
        if self._state == CIRCUIT_OPEN:
            return  # a late answer to a request sent before the circuit opened
        self.consecutive_failures = 0
        if self._state == CIRCUIT_HALF_OPEN:
            self._state = CIRCUIT_CLOSED
            self._period_s = self.open_s

    def record_failure(self, now: float) -> None:
        self._advance(now)
        self.consecutive_failures += 1
        if self._state == CIRCUIT_HALF_OPEN:
            self._open(now, min(self._period_s * 2, self.max_open_s))
        elif self._state == CIRCUIT_CLOSED and self.consecutive_failures >= self.failure_threshold:
            self._open(now, self.open_s)

    def _open(self, now: float, period_s: float) -> None:
        self._state = CIRCUIT_OPEN
        self._opened_at = now
        self._period_s = period_s

    def _advance(self, now: float) -> None:
        _check_finite("now", now, -math.inf)
        if self._state == CIRCUIT_OPEN and now >= self._opened_at + self._period_s:
            self._state = CIRCUIT_HALF_OPEN


class AcceptanceTracker:
    """EWMA of the speculative acceptance rate per key (a category or a session) and overall."""

    def __init__(self, alpha: float = 0.3, max_keys: int = 1024) -> None:
        self.alpha = _check_finite("alpha", alpha, 0.0, 1.0)
        if self.alpha == 0.0:
            raise ValueError("alpha must be > 0")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int):
            raise TypeError(f"max_keys must be an int >= 1, got {show_value(max_keys)}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be an int >= 1, got {show_value(max_keys)}")
        self.max_keys = max_keys
        self._by_key: dict[str, float] = {}  # insertion order = least recently updated first
        self._overall: float | None = None

    def observe(self, key: str, rate: float) -> None:
        """Fold one request's (or round's) acceptance rate in [0, 1] into `key` and the overall."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a non-empty string, got {show_value(key)}")
        if not key:
            raise ValueError(f"key must be a non-empty string, got {show_value(key)}")
        r = _check_finite("rate", rate, 0.0, 1.0)
        old = self._by_key.pop(key, None)
        self._by_key[key] = r if old is None else self._mix(old, r)
        self._overall = r if self._overall is None else self._mix(self._overall, r)
        while len(self._by_key) > self.max_keys:
            del self._by_key[next(iter(self._by_key))]

    def get(self, key: str) -> float | None:
        return self._by_key.get(key)

    def overall(self) -> float | None:
        """The EWMA over every observation, whatever its key; None before the first."""
        return self._overall

    def snapshot(self) -> dict[str, float]:
        return dict(self._by_key)

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new


# classify_prompt: a heuristic, not a classifier. It only picks which acceptance EWMA to use, so
# a wrong guess costs a slightly worse speed estimate, never a wrong answer.
_CODE_WORDS = re.compile(
    r"\b(def|class|function|functions|python|import|regex|regexp|sql|javascript|typescript|"
    r"java|rust|golang|bash|shell script|code|coding|compile|compiler|debug|bug|stack ?trace|"
    r"algorithm|implement|refactor|unit test|api|json|yaml|html|css|lambda|struct|async|await|"
    r"printf|println|console\.log)\b",
    re.IGNORECASE,
)
_SQL = re.compile(r"\bselect\b.+\bfrom\b", re.IGNORECASE | re.DOTALL)
_CODE_PUNCT = re.compile(r"[{}]|;\s*$|==|!=|=>|->|::|\w\(.*?\)|^\s{4}\S", re.MULTILINE)
_PROSE_WORDS = re.compile(
    r"\b(essay|story|poem|article|summari[sz]e|summary|explain|describe|letter|paragraph|"
    r"report|review|blog)\b",
    re.IGNORECASE,
)
_CHAT_MAX_WORDS = 20


def classify_prompt(text: str) -> str:
    """Guess "code", "chat" or "prose" for a prompt (heuristic, deterministic, no model).

    - "code": a fenced block (```), a programming keyword as a whole word (def, class, function,
      python, import, regex, SQL, ...), a SELECT ... FROM, or at least two code-like marks
      (braces, a line ending in ;, ==, ->, calls like f(x), 4-space indented lines).
    - "chat": otherwise, a short turn (at most 20 words) that asks for no written piece.
    - "prose": everything else (long text, or a request for an essay, story, summary, ...).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if "```" in text or _CODE_WORDS.search(text) or _SQL.search(text):
        return CATEGORY_CODE
    if len(_CODE_PUNCT.findall(text)) >= 2:
        return CATEGORY_CODE
    if len(text.split()) <= _CHAT_MAX_WORDS and not _PROSE_WORDS.search(text):
        return CATEGORY_CHAT
    return CATEGORY_PROSE
