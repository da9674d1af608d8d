"""The batched engine on the tiny random target: matches transformers, and every session gets the
same bits alone, batched, chunked, resumed or started from a cached prefix.

Real parts: the tiny Qwen2 target (random weights) loaded with transformers, the real engine,
batcher, autotune and VerifierCore; sessions run on real threads. No fakes.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_node import autotune
from cloud_node.engine import Engine, Rows, TilePlan
from cloud_node.errors import BadRequest
from cloud_node.scorer import TargetModel, read_eos_ids, tune_weights
from cloud_node.validation import DraftRound, SessionSpec
from cloud_node.verifier import Limits, VerifierCore
from tandem_core.sampling import SamplingParams

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=11)


def _ids(seed: int, n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, 250, n)]


def _model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _plans(model) -> list[TilePlan]:
    """Every plan the autotune would consider here, plus fixed padded tiles of a few sizes."""
    found = autotune.candidates(tune_weights(model))
    assert found, "no tile plan passed the invariance checks on this CPU"
    return [*found, TilePlan(rows=4, min_rows=4, pad=True, att_rows=2, key_block=8),
            TilePlan(rows=16, min_rows=16, pad=True, att_rows=8, key_block=32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_matches_transformers(tiny_models, dtype: torch.dtype) -> None:
    model = _model(tiny_models.target_hf, dtype)
    ids = _ids(0, 70)
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    for plan in _plans(model):
        engine = Engine(model, plan)
        out = engine.forward([Rows(engine.new_cache(), ids, len(ids))])[0]
        if dtype == torch.float32:
            np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
        else:  # bf16 rounding differs from transformers' attention; the choices do not
            assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_are_bit_identical_however_they_are_batched(tiny_models, dtype: torch.dtype) -> None:
    model = _model(tiny_models.target_hf, dtype)
    ids = _ids(1, 90)
    for plan in _plans(model):
        engine = Engine(model, plan)
        rng = np.random.default_rng(5)

        def run(chunks: list[int], others: int, engine: Engine = engine, rng: np.random.Generator = rng) -> np.ndarray:
            cache, pos, outs = engine.new_cache(), 0, []
            strangers = [engine.new_cache() for _ in range(others)]
            for n in chunks:
                batch = [Rows(cache, ids[pos:pos + n], n)]
                batch += [Rows(c, _ids(int(rng.integers(1 << 30)), int(rng.integers(1, 20))), 1) for c in strangers]
                rng.shuffle(batch)  # the session's place in the pass must not matter either
                outs.append(engine.forward(batch)[batch.index(next(b for b in batch if b.cache is cache))])
                pos += n
            return np.concatenate(outs)

        alone = run([90], 0)
        assert np.array_equal(alone, run([1] * 90, 0)), plan
        assert np.array_equal(alone, run([7, 13, 5, 1, 17, 9, 8, 30], 3)), plan
        assert np.array_equal(alone, run([33, 57], 6)), plan


def test_a_cached_prefix_gives_the_same_bits_as_a_full_prefill(tiny_models) -> None:
    model = _model(tiny_models.target_hf, torch.bfloat16)
    engine = Engine(model, TilePlan())
    ids = _ids(2, 80)
    first = engine.new_cache()
    engine.forward([Rows(first, ids[:50], 0)])
    reused = engine.new_cache()
    reused.copy_prefix_from(first, 37)
    fresh = engine.new_cache()
    a = engine.forward([Rows(reused, ids[37:80], 43)])[0]
    b = engine.forward([Rows(fresh, ids[:80], 43)])[0]
    assert np.array_equal(a, b)


def test_autotune_caches_its_choice_and_honours_the_override(tiny_models, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    monkeypatch.delenv(autotune.ENV, raising=False)
    weights = tune_weights(_model(tiny_models.target_hf, torch.bfloat16))
    plan = autotune.choose_plan(weights, head_dim=16, group=2, dtype="bf16")
    assert plan.verified
    path = autotune.cache_path(weights, "bf16")
    saved = json.loads(path.read_text())
    assert TilePlan(**saved["plan"]) == plan and saved["times_ms"]
    assert autotune.choose_plan(weights, head_dim=16, group=2, dtype="bf16") == plan  # from the cache
    monkeypatch.setenv(autotune.ENV, "torch:8:8")
    assert autotune.choose_plan(weights, head_dim=16, group=2, dtype="bf16") == TilePlan(
        rows=8, min_rows=8, pad=True, verified=False)
    with pytest.raises(ValueError, match="torch:32:2"):
        autotune.parse_plan("fast")


# --- the verifier: concurrent sessions share passes ------------------------------------------

@pytest.fixture(scope="module")
def cores(tiny_models):
    """One target per dtype, with a batching window wide enough that threads really share passes."""
    made = {}
    for dtype in ("fp32", "bf16"):
        target = TargetModel(tiny_models.target_hf, dtype=dtype, batch_window_ms=20.0)
        made[dtype] = target
    yield made
    for target in made.values():
        target.close()


def _core(target, tiny_models, **limits) -> VerifierCore:
    return VerifierCore(target, eos_ids=read_eos_ids(tiny_models.target_hf), limits=Limits(**limits),
                        bytes_per_token=target.engine.kv_bytes_per_token())


def _spec(prompt: list[int], params: SamplingParams, n: int, generated: list[int] = ()) -> SessionSpec:
    return SessionSpec(session_id="t", prompt_tokens=tuple(prompt), temperature=params.temperature,
                       top_k=params.top_k, top_p=params.top_p, seed=params.seed, max_new_tokens=n,
                       generated_tokens=tuple(generated))


def _drafts(session_seed: int, step: int, k: int) -> list[int]:
    """Deterministic pseudo-drafts: the verdicts depend on them, so both runs must send the same."""
    return _ids(session_seed * 1000 + step, k)


def _run_session(core: VerifierCore, prompt: list[int], params: SamplingParams, n: int, seed: int,
                 draft_len: int, gate: threading.Barrier | None = None) -> tuple[list[int], int]:
    opened = core.open(_spec(prompt, params, n))
    if gate is not None:
        gate.wait()
    tokens, step, shared = [], 0, 0
    while True:
        k = draft_len if draft_len >= 0 else step % 5
        drafts = tuple(_drafts(seed, step, k))
        q_rows = () if params.greedy else tuple(([t], [1.0]) for t in drafts)  # a deterministic proposal
        verdict = core.verify(opened.session, DraftRound(step, drafts, q_rows))
        shared = max(shared, verdict.timing.batch_sessions)
        tokens += verdict.tokens
        step += 1
        if verdict.finished:
            core.close(opened.session)
            return tokens, shared


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_concurrent_sessions_get_exactly_what_they_get_alone(cores, tiny_models, dtype: str,
                                                              params: SamplingParams) -> None:
    core = _core(cores[dtype], tiny_models, max_draft_len=8)
    jobs = [(_ids(10 + i, 5 + 7 * i), 12 + 3 * i, i, [0, 1, 4, 8, -1, 3][i]) for i in range(6)]  # -1: 0..4 varying
    alone = [_run_session(core, p, params, n, seed, k)[0] for p, n, seed, k in jobs]
    gate = threading.Barrier(len(jobs))
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _run_session(core, j[0], params, j[1], j[2], j[3], gate), jobs))
    assert [t for t, _ in together] == alone
    assert max(s for _, s in together) >= 2  # they really shared passes
    assert len(core.store) == 0


def test_sessions_opening_closing_and_failing_mid_batch_do_not_disturb_the_others(cores, tiny_models) -> None:
    core = _core(cores["bf16"], tiny_models, max_draft_len=8)
    prompt = _ids(40, 9)
    reference = _run_session(core, prompt, GREEDY, 30, 1, 3)[0]
    stop = threading.Event()

    def churn() -> int:
        """Open sessions (long prompts: prefill chunks), send bad rounds, close mid-flight."""
        n = 0
        while not stop.is_set():
            opened = core.open(_spec(_ids(100 + n, 40), GREEDY, 20))
            with pytest.raises(BadRequest):
                core.verify(opened.session, DraftRound(0, (10**6,)))  # out of the vocabulary
            core.verify(opened.session, DraftRound(1, (5, 6)))
            core.close(opened.session)
            n += 1
        return n

    with ThreadPoolExecutor(3) as pool:
        churners = [pool.submit(churn) for _ in range(2)]
        got = pool.submit(_run_session, core, prompt, GREEDY, 30, 1, 3).result()[0]
        stop.set()
        assert sum(f.result() for f in churners) >= 1
    assert got == reference
    assert len(core.store) == 0


# --- the prefix cache -------------------------------------------------------------------------

def _greedy_run(core: VerifierCore, prompt: list[int], n: int, generated: list[int] = ()) -> tuple[list[int], object]:
    opened = core.open(_spec(prompt, GREEDY, n, generated))
    tokens, step = [], 0
    while True:
        verdict = core.verify(opened.session, DraftRound(step, tuple(_drafts(3, step, 2))))
        tokens += verdict.tokens
        step += 1
        if verdict.finished:
            core.close(opened.session)
            return tokens, opened.timing


def test_prefix_cache_hit_partial_hit_and_miss_give_identical_output(cores, tiny_models) -> None:
    target = cores["bf16"]
    cold = _core(target, tiny_models)
    warm = _core(target, tiny_models)
    turn1 = _ids(50, 40)
    answer1, t1 = _greedy_run(warm, turn1, 12)
    assert t1.reused_tokens == 0 and t1.prefill_tokens == len(turn1) - 1
    # Turn 2 of a conversation: the whole of turn 1 and its answer, then a new message.
    turn2 = [*turn1, *answer1, *_ids(51, 25)]
    got, t2 = _greedy_run(warm, turn2, 12)
    assert got == _greedy_run(cold, turn2, 12)[0]
    assert t2.reused_tokens >= len(turn1) + len(answer1) - 1
    assert t2.prefill_tokens == len(turn2) - 1 - t2.reused_tokens
    # A partial hit: shares only the first 30 tokens of turn 1.
    partial = [*turn1[:30], *_ids(52, 20)]
    got, t3 = _greedy_run(warm, partial, 10)
    assert got == _greedy_run(cold, partial, 10)[0] and t3.reused_tokens == 30
    # A miss: nothing in common.
    other = _ids(53, 35)
    got, t4 = _greedy_run(warm, other, 10)
    assert got == _greedy_run(cold, other, 10)[0] and t4.reused_tokens == 0
    assert warm.store.hits >= 2 and warm.store.misses >= 1


def test_prefix_cache_under_memory_pressure_and_a_resume_that_finds_its_prefix_evicted(cores, tiny_models) -> None:
    target = cores["bf16"]
    bpt = target.engine.kv_bytes_per_token()
    core = _core(target, tiny_models, kv_budget_bytes=200 * bpt)  # room for about two retained caches
    prompts = [_ids(60 + i, 70) for i in range(4)]
    answers = [_greedy_run(core, p, 10)[0] for p in prompts]  # each retains ~80 tokens; old ones go
    assert core.store.evicted_prefixes >= 1 and core.store.resident_bytes() <= 200 * bpt
    # The first conversation's prefix is gone: its next turn and a resume both prefill in full.
    again, timing = _greedy_run(core, [*prompts[0], *answers[0][:5]], 5)
    assert timing.reused_tokens == 0
    assert again == answers[0][5:10]
    # A resume (generated tokens sent back) of the newest one still finds its prefix.
    resumed, timing = _greedy_run(core, prompts[3], 10, generated=answers[3][:4])
    assert resumed == answers[3][4:] and timing.reused_tokens >= len(prompts[3])


def test_admission_follows_the_kv_budget_and_sheds_with_a_retry_hint(cores, tiny_models) -> None:
    from cloud_node.errors import ResourceExhausted

    target = cores["bf16"]
    bpt = target.engine.kv_bytes_per_token()
    core = _core(target, tiny_models, max_sessions=64, max_draft_len=4, kv_budget_bytes=16 * 40 * bpt)
    opened = []
    with pytest.raises(ResourceExhausted, match=r"retry after \d+ ms"):
        for i in range(64):  # 30-token prompts + 5 headroom: 18 fit in 640 tokens
            opened.append(core.open(_spec(_ids(70 + i, 30), GREEDY, 4)).session)
    assert 16 <= len(opened) <= 19
    for key in opened:
        core.close(key)
    assert core.open(_spec(_ids(200, 30), GREEDY, 4)).session  # room again
