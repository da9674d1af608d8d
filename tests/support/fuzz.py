"""The hypothesis profiles of the unit property tests, the same two as the API fuzz tests, and a
guard that makes a loop that never ends fail fast inside a property test.

The quick one (the normal test command) runs `quick` examples per test with a fixed seed. The long
one runs when TANDEM_FUZZ_EXAMPLES is set: that many examples per test and fresh randomness each
run, e.g. `TANDEM_FUZZ_EXAMPLES=5000 bash scripts/test.sh -k fuzz`. `timeout_s` scales a test's
per-test timeout (pytest-timeout) with the examples.

pytest-timeout alone cannot stop a hypothesis test that hangs: its timeout is a pytest failure,
which hypothesis catches and then replays the example that hung, with no timer left (it would
wait forever, past the suite's 900 s timeout too). `cpu_limit` raises `Hung` instead, which
hypothesis lets through.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from hypothesis import HealthCheck, settings

LONG = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "0"))


def fuzz(quick: int) -> settings:
    return settings(max_examples=LONG or quick, deadline=None, database=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow])


def timeout_s(quick_s: float, quick: int) -> float:
    """`quick_s` for the quick profile; proportionally more for a long run."""
    return quick_s * max(1.0, LONG / quick)


class Hung(BaseException):
    """A call ran past its CPU time. Not an Exception, so that hypothesis does not catch it."""


@contextmanager
def cpu_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise `Hung` (naming `what`) once this process has spent `seconds` of CPU time in the block.
    CPU time, so a busy machine does not trip it; SIGVTALRM, since pytest-timeout owns SIGALRM."""

    def hung(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"{what} still ran after {seconds} s of CPU time: a loop that never ends?")

    previous = signal.signal(signal.SIGVTALRM, hung)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)
