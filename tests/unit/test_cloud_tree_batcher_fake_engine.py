"""The batcher with draft trees, on a fake engine (pure scheduling logic; no model): a tree round
reaches the engine whole with its parents, counted as its n + 1 rows against the round cap; a
tree that does not fit beside the rounds queued before it waits for the next pass, and one bigger
than the cap runs as the only round of its pass; malformed tree calls fail at once, before any
pass (where they would fail every caller of that pass)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from cloud_node import batcher as batcher_module
from cloud_node.batcher import Batcher


@dataclass
class FakeCache:
    length: int = 0
    tree: tuple | None = None


@dataclass
class FakeEngine:
    """Appends ids to the fake caches; records each pass as (rows, parents) per item. While
    `gate` is clear, a pass waits for it (so that the test can queue calls behind it)."""

    vocab_size: int = 4
    passes: list[list[tuple[int, tuple | None]]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def forward(self, batch):  # the engine's duck type
        self.entered.set()
        self.gate.wait(10)
        self.passes.append([(len(r.ids), None if r.parents is None else tuple(r.parents)) for r in batch])
        out = []
        for r in batch:
            r.cache.length += len(r.ids)
            out.append(np.zeros((min(r.keep, len(r.ids)), self.vocab_size), np.float32))
        return out


def _call(batcher: Batcher, results: dict, name: str, *args, **kw) -> threading.Thread:
    t = threading.Thread(target=lambda: results.setdefault(name, batcher.run(*args, **kw)))
    t.start()
    return t


def _queued(batcher: Batcher, rounds: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while batcher.queued()[0] < rounds and time.monotonic() < deadline:
        time.sleep(0.005)
    assert batcher.queued()[0] == rounds


def _held(engine: FakeEngine, batcher: Batcher, results: dict) -> threading.Thread:
    """A first round that holds the engine until the gate opens."""
    t = _call(batcher, results, "first", FakeCache(), [1], 1)
    assert engine.entered.wait(5)
    return t


def test_fake_engine_tree_goes_whole_with_its_parents_beside_chains_and_prefill() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, max_rows=32, window_ms=0)  # type: ignore[arg-type]
    results: dict = {}
    threads = [_held(engine, batcher, results)]
    tree = [-1, *([0] * 64)]  # the root and 64 nodes: 65 rows, more than max_rows
    threads.append(_call(batcher, results, "tree", FakeCache(length=7), list(range(65)), 65, parents=tree))
    threads.append(_call(batcher, results, "chain", FakeCache(length=3), [1, 2, 3], 3))
    _queued(batcher, 2)
    threads.append(_call(batcher, results, "prefill", FakeCache(), list(range(40)), 0, prefill=True))
    time.sleep(0.05)
    engine.gate.set()
    for t in threads:
        t.join(10)
    assert results["tree"][0].shape == (65, 4) and results["tree"][1].passes == 1
    assert engine.passes[1][:2] == [(65, tuple(tree)), (3, None)]  # whole, with its parents
    assert engine.passes[1][2][0] == batcher_module.PREFILL_SHARE  # prefill still gets its share
    batcher.close()


def test_fake_engine_tree_that_does_not_fit_the_round_cap_waits_and_one_over_it_runs_alone(monkeypatch) -> None:
    monkeypatch.setattr(batcher_module, "ROUND_ROWS_CAP", 10)
    engine = FakeEngine()
    batcher = Batcher(engine, max_rows=32, window_ms=0)  # type: ignore[arg-type]
    results: dict = {}
    threads = [_held(engine, batcher, results)]
    threads.append(_call(batcher, results, "chain", FakeCache(), [1] * 4, 4))
    _queued(batcher, 1)
    threads.append(_call(batcher, results, "tree6", FakeCache(), [1] * 7, 7, parents=[-1, 0, 0, 0, 1, 1, 2]))
    _queued(batcher, 2)
    threads.append(_call(batcher, results, "big", FakeCache(), [1] * 12, 12, parents=[-1, *([0] * 11)]))
    _queued(batcher, 3)
    threads.append(_call(batcher, results, "after", FakeCache(), [1] * 2, 2))
    _queued(batcher, 4)
    engine.gate.set()
    for t in threads:
        t.join(10)
    rounds = [[rows for rows, _ in p] for p in engine.passes[1:]]
    # 4 + 7 > 10: the tree waits; 12 > 10 alone: the only round of its pass; then the rest.
    assert rounds == [[4], [7], [12], [2]]
    assert all(results[k][1].passes == 1 for k in ("chain", "tree6", "big", "after"))
    batcher.close()


def test_fake_engine_malformed_tree_calls_fail_before_any_pass() -> None:
    engine = FakeEngine()
    engine.gate.set()
    batcher = Batcher(engine, max_rows=32, window_ms=0)  # type: ignore[arg-type]
    for ids, parents in (([1, 2], [-1]), ([1, 2], [-1, 1]), ([1, 2], [-2, 0])):
        with pytest.raises(ValueError, match="parents"):
            batcher.run(FakeCache(), ids, 2, parents=parents)
    with pytest.raises(ValueError, match="parents"):
        batcher.run(FakeCache(), [1, 2], 0, prefill=True, parents=[-1, 0])
    with pytest.raises(ValueError, match="tree not yet accepted"):
        batcher.run(FakeCache(length=3, tree=(2, (-1,))), [1], 1)
    assert engine.passes == []
    assert batcher.run(FakeCache(), [1, 2], 2, parents=[-1, 0])[0].shape == (2, 4)
    batcher.close()
