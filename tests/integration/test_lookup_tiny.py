"""Retrieval drafts on tiny random-weight models and the real runtimes (`tandem_core.lookup`).

A random model copies nothing by itself, so these tests hand the index a document that holds
the very continuation the model will produce (its own earlier answer, as a conversation's
earlier turn would): the index then proposes right continuations, long ones, and every path
that uses them is exercised: copies sent as they are, copies checked by the drafter in batched
passes, and self-speculation on the device. Outputs must equal plain decoding exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tandem.limits import MAX_DRAFT_LEN
from tandem.pair import LocalPair
from tandem_core.lookup import Choice, LookupDrafter, LookupPolicy
from tandem_core.loop import TargetVerifier, speculative_generate
from tandem_core.sampling import SamplingParams
from tandem_core.stats import RequestStats
from tandem_core.suffix_index import SuffixIndex

PROMPTS = [[5, 17, 99, 3, 44], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
GREEDY = SamplingParams()
N = 40


@pytest.fixture(scope="module")
def pair(tiny_models) -> LocalPair:
    return LocalPair(tiny_models.target_hf, tiny_models.drafter_onnx, dtype="fp32")


def index_with(document: Sequence[int], live: Sequence[int]) -> SuffixIndex:
    index = SuffixIndex()
    index.add_document(document)
    index.extend(live)
    return index


class CountingPasses:
    """Counts the drafter's forward passes (appends) by wrapping its generator."""

    def __init__(self, session) -> None:
        self.passes = 0
        gen = session._gen
        append = gen.append_tokens

        def counted(ids) -> None:
            self.passes += 1
            append(ids)

        session._gen = type("Spy", (), {"append_tokens": staticmethod(counted),
                                        "__getattr__": lambda _self, name: getattr(gen, name)})()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_self_speculation_on_the_device_gives_the_drafters_own_tokens_in_fewer_passes(pair: LocalPair,
                                                                                       prompt: list[int]) -> None:
    plain = list(pair.drafter.new_session(prompt, GREEDY, 0).generate(max_new_tokens=N, eos_ids=frozenset()))
    session = pair.drafter.new_session(prompt, GREEDY, 0, max_length=len(prompt) + N + MAX_DRAFT_LEN + 2)
    spy = CountingPasses(session)
    out = list(session.generate(max_new_tokens=N, eos_ids=frozenset(), lookup=index_with(prompt + plain, prompt)))
    assert out == plain
    assert spy.passes <= N // 4  # 16 tokens a pass while the copy holds, against one pass a token


class CheckOnly(LookupPolicy):
    """The policy with copies sent as they are ruled out: every round with a match is checked."""

    def choose(self, proposal, *, k_max: int, model_len: int) -> Choice:
        c = super().choose(proposal, k_max=k_max, model_len=model_len)
        return Choice("model", max(0, min(model_len, k_max)), c.why) if c.source == "retrieval" else c


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("how", ["copied", "checked"])
def test_greedy_output_with_retrieval_drafts_equals_the_target(pair: LocalPair, prompt: list[int], how: str) -> None:
    """A document holding the target's own answer: copied rounds are accepted whole; checked
    rounds carry what the drafter agrees with (a random drafter disagrees with the target, so
    its checked drafts are rejected early: output still equals the target's)."""
    target = pair.target_generate(prompt, GREEDY, max_new_tokens=N).tokens
    session = pair.drafter.new_session(prompt, GREEDY, 0, max_length=len(prompt) + N + MAX_DRAFT_LEN + 2)
    policy = LookupPolicy(draft_s=1e3) if how == "copied" else CheckOnly()
    drafts = LookupDrafter(session, index_with(prompt + list(target), prompt), policy, model_len=4, vocab=None)
    verifier = TargetVerifier(pair.target.new_session(prompt), GREEDY, seed=0, start=len(prompt), max_new_tokens=N,
                              eos_ids=pair.eos_ids)
    stats = RequestStats()
    out = tuple(t for v in speculative_generate(drafts, verifier, draft_len=MAX_DRAFT_LEN, max_new_tokens=N,
                                                stats=stats) for t in v.tokens)
    assert out == target
    if how == "copied":
        assert drafts.rounds_copied >= 2 and drafts.rounds_checked == 0
        assert stats.rounds <= N // 8 and stats.retrieval_draft_share == 1.0  # whole copies accepted
    else:
        assert drafts.rounds_checked >= 1 and drafts.rounds_copied == 0


def test_retrieval_on_the_pair_never_changes_the_answer_on_prompts_that_do_not_copy(pair: LocalPair) -> None:
    for prompt in PROMPTS:
        on = pair.speculative_generate(prompt, GREEDY, draft_len=3, max_new_tokens=N, lookup=True)
        off = pair.speculative_generate(prompt, GREEDY, draft_len=3, max_new_tokens=N, lookup=False)
        assert on.tokens == off.tokens == pair.target_generate(prompt, GREEDY, max_new_tokens=N).tokens
