"""Speculative decoding on tiny random-weight models, on the real runtimes (transformers fp32 for
the target, onnxruntime-genai for the drafter): the output must equal target-only decoding."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.models.tiny import EOS_ID
from tandem.pair import LocalPair
from tandem_core.sampling import SamplingParams

PROMPTS = [[5, 17, 99, 3, 44], [300], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def pair(tiny_models) -> LocalPair:
    return LocalPair(tiny_models.target_hf, tiny_models.drafter_onnx, dtype="fp32")


@pytest.fixture(scope="module")
def self_pair(tiny_models) -> LocalPair:
    """The target drafting for itself (its own ONNX export)."""
    return LocalPair(tiny_models.target_hf, tiny_models.target_onnx, dtype="fp32")


@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_greedy_speculative_equals_target_generate(pair: LocalPair, draft_len: int) -> None:
    drafted = accepted = 0
    for prompt in PROMPTS:
        target = pair.target_generate(prompt, GREEDY, max_new_tokens=40)
        spec = pair.speculative_generate(prompt, GREEDY, draft_len=draft_len, max_new_tokens=40)
        assert spec.tokens == target.tokens
        drafted += spec.stats.drafted
        accepted += spec.stats.accepted
    # The noisy drafter must exercise both full and partial acceptance (rollback paths).
    assert 0 < accepted < drafted


def test_target_as_its_own_drafter_accepts_nearly_everything(self_pair: LocalPair) -> None:
    for prompt in PROMPTS:
        target = self_pair.target_generate(prompt, GREEDY, max_new_tokens=30)
        spec = self_pair.speculative_generate(prompt, GREEDY, draft_len=4, max_new_tokens=30)
        assert spec.tokens == target.tokens
        # ONNX Runtime and PyTorch differ only by float rounding, so argmax agrees almost always.
        assert spec.stats.acceptance_rate >= 0.95
        assert spec.stats.target_forwards_per_token <= 0.3


def test_scorer_session_decoding_equals_transformers_generate(pair: LocalPair) -> None:
    rng = np.random.default_rng(0)
    for prompt in PROMPTS:
        target = pair.target_generate(prompt, GREEDY, max_new_tokens=25)
        session = pair.target.new_session(prompt)
        assert tuple(session.generate(GREEDY, rng, max_new_tokens=25, eos_ids=pair.eos_ids)) == target.tokens


def test_onnx_drafter_alone_equals_its_torch_twin(self_pair: LocalPair) -> None:
    """On-device generation: the ONNX export decodes like the torch model it came from."""
    for prompt in PROMPTS:
        onnx = self_pair.drafter_generate(prompt, GREEDY, max_new_tokens=25)
        torch_ = self_pair.target_generate(prompt, GREEDY, max_new_tokens=25)
        assert onnx.tokens == torch_.tokens


def test_drafter_rollback_after_partial_acceptance_is_exact(pair: LocalPair) -> None:
    """Commit random prefixes of each draft; the drafter must continue as if never rolled back."""
    prompt = PROMPTS[0]
    reference = list(pair.drafter.new_session(prompt, GREEDY, 0).generate(max_new_tokens=40, eos_ids=frozenset()))
    session = pair.drafter.new_session(prompt, GREEDY, 0)
    choose = np.random.default_rng(1)
    out: list[int] = []
    while len(out) < 30:
        draft = session.draft(4)
        assert draft.tokens == tuple(reference[len(out): len(out) + 4])
        accepted = int(choose.integers(0, 5))
        committed = reference[len(out): len(out) + accepted + 1]
        session.commit(accepted, committed)
        out += committed
    assert out[:30] == reference[:30]


def test_sampling_with_a_seed_is_reproducible(pair: LocalPair) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    first = pair.speculative_generate(PROMPTS[0], params, draft_len=3, max_new_tokens=30)
    again = pair.speculative_generate(PROMPTS[0], params, draft_len=3, max_new_tokens=30)
    other = pair.speculative_generate(PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.95, seed=99),
                                      draft_len=3, max_new_tokens=30)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens
    assert len(first.tokens) == 30 or first.tokens[-1] == EOS_ID


def test_max_new_tokens_is_exact_mid_round(pair: LocalPair) -> None:
    for n in (1, 2, 5, 7):
        spec = pair.speculative_generate(PROMPTS[1], GREEDY, draft_len=4, max_new_tokens=n)
        target = pair.target_generate(PROMPTS[1], GREEDY, max_new_tokens=n)
        assert spec.tokens == target.tokens
        assert len(spec.tokens) <= n
