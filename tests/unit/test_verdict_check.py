"""`check_verdict`: every verdict an honest verifier gives passes, and each broken rule is named.

Also the edge's use of it (`RemoteVerifier` over a fake link: pure protocol logic, no gRPC) and
the new switch cause's proto mapping.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edge_node.cloud_link import ProtocolError, RemoteVerifier
from protos.enums import cause_from_proto, cause_to_proto
from protos.tandem.v1 import common_pb2
from tandem_core.loop import Draft, SwitchCause
from tandem_core.verdict_check import BadVerdict, check_verdict
from tandem_core.verify import FinishReason, Verdict, finalize

EOS = frozenset({2})
STOP, LENGTH = FinishReason.STOP, FinishReason.LENGTH
DRAFTS = (10, 11, 12, 13)


def _going_on(accepted: int, tokens: tuple[int, ...]) -> Verdict:
    return Verdict(accepted, tokens, False, None)


def test_every_verdict_finalize_gives_passes() -> None:
    """Honest verdicts, drawn widely: any prefix accepted, EOS anywhere, any budget."""
    rng = np.random.default_rng(0)
    for _ in range(3000):
        k = int(rng.integers(0, 6))
        drafts = tuple(int(t) for t in rng.integers(0, 6, size=k))  # ids 0..5: EOS (2) is common
        accepted = int(rng.integers(0, k + 1))
        nxt = int(rng.integers(0, 6))
        remaining = int(rng.integers(1, 9))
        verdict = finalize(accepted, [*drafts[:accepted], nxt], EOS, remaining)
        check_verdict(drafts, verdict, remaining=remaining, vocab=6, eos_ids=EOS)


@pytest.mark.parametrize(("drafts", "verdict", "remaining"), [
    (DRAFTS, _going_on(4, (*DRAFTS, 99)), 10),                  # all accepted, then the bonus token
    (DRAFTS, _going_on(0, (99,)), 10),                          # the first draft rejected
    ((), _going_on(0, (99,)), 10),                              # no drafts: one target token
    ((10, 2, 12, 13), Verdict(2, (10, 2), True, STOP), 10),     # EOS among the drafts ends it there
    (DRAFTS, Verdict(1, (10, 2), True, STOP), 10),              # EOS as the recovered token
    (DRAFTS, Verdict(2, (10, 11), True, LENGTH), 2),            # the budget cuts accepted drafts
    (DRAFTS, Verdict(2, (10, 11, 99), True, LENGTH), 3),        # the budget ends at the bonus token
    (DRAFTS, Verdict(2, (10, 11, 2), True, STOP), 3),           # EOS on the last token of the budget
], ids=["bonus", "first-rejected", "no-drafts", "eos-mid-draft", "eos-recovered", "budget-cut",
        "budget-at-bonus", "eos-at-budget"])
def test_valid_edge_cases_pass(drafts: tuple[int, ...], verdict: Verdict, remaining: int) -> None:
    check_verdict(drafts, verdict, remaining=remaining, vocab=100, eos_ids=EOS)


@pytest.mark.parametrize(("verdict", "remaining", "rule"), [
    (_going_on(5, (*DRAFTS, 99, 98)), 10, "accepted"),            # more accepted than sent
    (_going_on(-1, (99,)), 10, "accepted"),
    (_going_on(2, (10, 12, 99)), 10, "prefix"),                   # an accepted draft changed
    (_going_on(2, (11, 10, 99)), 10, "prefix"),
    (Verdict(3, (10, 11), True, STOP), 10, "prefix"),             # fewer tokens than accepted drafts
    (_going_on(1, (10, 99, 98)), 10, "count"),                    # a token too many
    (_going_on(2, (10, 11)), 10, "count"),                        # cut short, yet going on
    (_going_on(0, ()), 10, "count"),
    (Verdict(0, (), True, LENGTH), 10, "count"),                  # a final round commits one at least
    (Verdict(1, (10, 99, 98), True, LENGTH), 10, "count"),
    (Verdict(1, (10, 99), True, None), 10, "finish"),             # finished without a reason
    (Verdict(1, (10, 99), False, STOP), 10, "finish"),            # a reason, yet going on
    (_going_on(4, (*DRAFTS, 99)), 4, "budget"),                   # 5 tokens with 4 left
    (_going_on(2, (10, 11, 99)), 3, "budget"),                    # all of the budget, yet going on
    (Verdict(1, (10, 99), True, LENGTH), 3, "budget"),            # "length" with budget left
    (_going_on(1, (10, 100)), 10, "vocab"),
    (_going_on(0, (-1,)), 10, "vocab"),
    (_going_on(1, (10, 2)), 10, "eos"),                           # EOS committed, yet going on
    (Verdict(1, (10, 2), True, LENGTH), 2, "eos"),                # EOS with reason "length"
    (Verdict(1, (10, 99), True, STOP), 10, "eos"),                # "stop" without EOS
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_broken_rule_is_named(verdict: Verdict, remaining: int, rule: str) -> None:
    with pytest.raises(BadVerdict) as err:
        check_verdict(DRAFTS, verdict, remaining=remaining, vocab=100, eos_ids=EOS)
    assert err.value.rule == rule
    assert "99" not in str(err.value) and "10," not in str(err.value)  # positions, never token ids


def test_without_vocab_only_negative_ids_fail_and_without_eos_stop_is_not_checked() -> None:
    check_verdict(DRAFTS, _going_on(1, (10, 10**9)))
    check_verdict(DRAFTS, Verdict(1, (10, 99), True, STOP))
    with pytest.raises(BadVerdict, match="vocab"):
        check_verdict(DRAFTS, _going_on(1, (10, -5)))


def test_a_budget_below_one_is_the_callers_error() -> None:
    with pytest.raises(ValueError, match="remaining"):
        check_verdict(DRAFTS, _going_on(0, (99,)), remaining=0)


def test_the_bad_verdict_cause_maps_to_the_proto_and_back() -> None:
    assert cause_to_proto(SwitchCause.BAD_VERDICT) == common_pb2.SWITCH_CAUSE_BAD_VERDICT
    for cause in SwitchCause:
        assert cause_from_proto(cause_to_proto(cause)) == cause
    assert len({cause_to_proto(c) for c in SwitchCause}) == len(SwitchCause)


class _FakeLink:
    """The part of `CloudLink` that `RemoteVerifier` uses, answering from a list of verdicts."""

    def __init__(self, verdicts: list[Verdict]) -> None:
        self.verdicts, self.sent, self.opens = verdicts, [], []
        self.resumes, self.is_open = 0, False
        self.opened = SimpleNamespace(max_context=1000, max_draft_len=16, pipelining=True)
        self.pipelining = True
        self.request = SimpleNamespace(max_new_tokens=20)

    def open(self, generated: list[int]) -> None:
        self.opens.append(list(generated))
        self.is_open = True

    def resume(self, generated: list[int]) -> None:
        self.resumes += 1
        self.open(generated)

    def draft_room(self, wanted: int, position: int) -> int:
        return wanted

    def send_round(self, tokens: tuple[int, ...], q: object, assume: object = None) -> int:
        self.sent.append(tokens)
        return len(self.sent)

    def recv_verdict(self, round_no: int) -> tuple[Verdict, bool]:
        return self.verdicts.pop(0), False


def test_fake_link_bad_verdicts_are_dropped_and_resumed_with_the_committed_tokens() -> None:
    good = _going_on(2, (10, 11, 99))
    link = _FakeLink([good, _going_on(2, (10, 12, 99)), _going_on(5, (1,)), good])
    verifier = RemoteVerifier(link, max_resumes=0, backoff_s=0, prompt_len=3, vocab=100)  # type: ignore[arg-type]
    assert verifier.verify(Draft(DRAFTS, None)) == good
    assert verifier.verify(Draft(DRAFTS, None)) == good  # after two bad verdicts, each resumed
    assert verifier.committed == [10, 11, 99] * 2
    assert link.opens == [[], [10, 11, 99], [10, 11, 99]]  # nothing from a bad verdict was committed
    assert link.sent == [DRAFTS] * 4  # the same round re-sent


def test_fake_link_past_max_bad_verdicts_gives_up_with_its_cause() -> None:
    link = _FakeLink([_going_on(1, (10, 99, 98))] * 3)
    verifier = RemoteVerifier(link, max_resumes=5, backoff_s=0, prompt_len=3, max_bad_verdicts=2)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as err:
        verifier.verify(Draft(DRAFTS, None))
    assert err.value.cause == SwitchCause.BAD_VERDICT and "count" in str(err.value)
    assert verifier.committed == [] and link.resumes == 2
