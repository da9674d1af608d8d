"""A tree round batched with other sessions' chain rounds and a prefill, on the tiny target in fp32
and bf16 (real engine, real batcher, `VerifierCore`; no fakes): the same verdicts, and bit-equal
logits, as when each round runs alone.

The pass is made deterministic with a gate in front of the real engine: while one session's
round holds the engine, the tree rounds, the chain rounds and a new session's prefill queue up,
and the next pass takes them all.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from cloud_node.batcher import Batcher
from cloud_node.scorer import TargetModel, read_eos_ids
from cloud_node.validation import DraftRound, SessionSpec
from cloud_node.verifier import Limits, RoundVerdict, VerifierCore
from tandem_core.sampling import DRAFTER_STREAM, round_rng
from tandem_core.tree import sample_tree

VOCAB = 512


class GatedEngine:
    """The real engine behind a gate: while the gate is shut a pass waits for it. Records every
    pass's items as (ids, parents, logits)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.vocab_size = engine, engine.vocab_size
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.passes: list[list[tuple[tuple[int, ...], tuple[int, ...] | None, np.ndarray]]] = []

    def forward(self, batch: list[Any]) -> list[np.ndarray]:
        self.entered.set()
        assert self.gate.wait(60)
        out = self.engine.forward(batch)
        self.passes.append([(tuple(r.ids), None if r.parents is None else tuple(r.parents), o)
                            for r, o in zip(batch, out, strict=True)])
        return out


def _q(path: tuple[int, ...]) -> np.ndarray:
    """A drafter's q that depends on the path (any distribution will do here)."""
    return np.random.default_rng([7, len(path), *path]).dirichlet(np.ones(VOCAB))


def _rounds() -> dict[str, tuple[SessionSpec, DraftRound]]:
    """Per session: its spec and its round (two trees, two chains)."""
    def spec(prompt: list[int], temperature: float) -> SessionSpec:
        return SessionSpec(prompt_tokens=tuple(prompt), temperature=temperature, seed=3, max_new_tokens=32)

    sampled = sample_tree(_q, (3, 2, 1), lambda d: round_rng(3, DRAFTER_STREAM, 40 + d))
    sampled_q = tuple((tuple(np.flatnonzero(r).tolist()), tuple(r[np.flatnonzero(r)].tolist())) for r in sampled.q)
    wire = tuple(a + 1 for a in sampled.parents)
    chain_q = tuple((tuple(range(VOCAB)), tuple(_q((i,)).tolist())) for i in range(3))
    return {
        "sampled tree": (spec(list(range(3, 43)), 1.0), DraftRound(1, sampled.tokens, sampled_q, draft_parents=wire)),
        "greedy tree": (spec(list(range(100, 107)), 0.0),
                        DraftRound(2, (5, 6, 7, 8, 9, 10), draft_parents=(0, 0, 1, 1, 3, 2))),
        "greedy chain": (spec(list(range(200, 270)), 0.0), DraftRound(3, (11, 12, 13, 14))),
        "sampled chain": (spec([300, 301], 1.0), DraftRound(4, (15, 16, 17), chain_q)),
    }


PREFILL = SessionSpec(prompt_tokens=tuple(range(400, 500)), max_new_tokens=8)  # 99 rows of prefill


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def gated(request, tiny_models) -> tuple[VerifierCore, VerifierCore, GatedEngine]:
    """Two cores on one gated target: one for the rounds alone, one for them batched (so that
    the second finds no cached prefix of the first's prompts and really prefills)."""
    target = TargetModel(tiny_models.target_hf, dtype=request.param, batch_window_ms=0)
    engine = GatedEngine(target.engine)
    target.batcher.close()
    target.batcher = Batcher(engine, max_rows=64, window_ms=0)  # type: ignore[arg-type]
    cores = [VerifierCore(target, eos_ids=read_eos_ids(tiny_models.target_hf),
                          limits=Limits(max_sessions=16, batch_window_ms=0), bytes_per_token=1) for _ in range(2)]
    yield cores[0], cores[1], engine
    target.close()


def _alone(core: VerifierCore) -> tuple[dict[str, RoundVerdict], RoundVerdict]:
    verdicts = {}
    for name, (spec, round_) in _rounds().items():
        session = core.open(spec).session
        verdicts[name] = core.verify(session, round_)
        core.close(session)
    session = core.open(PREFILL).session
    first = core.verify(session, DraftRound(9, (1, 2)))
    core.close(session)
    return verdicts, first


def _batched(core: VerifierCore, engine: GatedEngine) -> tuple[dict[str, RoundVerdict], RoundVerdict, int]:
    """The rounds in one pass; the verdicts, the prefilled session's first, and that pass's index."""
    rounds = _rounds()
    sessions = {name: core.open(spec).session for name, (spec, _) in rounds.items()}
    holder = core.open(SessionSpec(prompt_tokens=(1, 2, 3), max_new_tokens=8)).session
    verdicts: dict[str, Any] = {}
    engine.gate.clear()
    engine.entered.clear()
    held = len(engine.passes)
    threads = [threading.Thread(target=lambda: core.verify(holder, DraftRound(0, (4,))))]
    threads[0].start()
    assert engine.entered.wait(30)
    for name, (_, round_) in rounds.items():
        threads.append(threading.Thread(target=lambda n=name, r=round_: verdicts.__setitem__(n, core.verify(sessions[n], r))))
    threads.append(threading.Thread(target=lambda: verdicts.__setitem__("prefill", core.open(PREFILL).session)))
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while core.target.batcher.queued() != (len(rounds), len(PREFILL.prompt_tokens) - 1) and time.monotonic() < deadline:
        time.sleep(0.005)
    engine.gate.set()
    for t in threads:
        t.join(60)
    first = core.verify(verdicts.pop("prefill"), DraftRound(9, (1, 2)))
    return verdicts, first, held + 1


def test_a_tree_round_batched_with_chains_and_a_prefill_equals_it_alone(gated) -> None:
    alone_core, core, engine = gated
    alone, alone_first = _alone(alone_core)
    logits = {(ids, parents): out for p in engine.passes for ids, parents, out in p}
    batched, batched_first, index = _batched(core, engine)
    shared = engine.passes[index]
    assert sum(parents is not None for _, parents, _ in shared) == 2 and len(shared) == 5  # 2 trees, 2 chains, prefill
    assert {name: (v.accepted, v.tokens, v.finished) for name, v in batched.items()} == \
           {name: (v.accepted, v.tokens, v.finished) for name, v in alone.items()}
    assert (batched_first.accepted, batched_first.tokens) == (alone_first.accepted, alone_first.tokens)
    rounds = [(ids, parents, out) for ids, parents, out in shared if len(out)]  # the prefill keeps no logits
    assert len(rounds) == 4
    for ids, parents, out in rounds:  # bit-equal to their passes alone
        assert np.array_equal(out, logits[(ids, parents)]), (ids, parents)
