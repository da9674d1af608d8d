"""The batcher's packing rules with a fake engine (pure scheduling logic; no model): rounds are
never split or held back, prefill fills the pass up to max_rows and always gets its share, a
failed pass fails only its own callers, and closing fails what waits."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from cloud_node.batcher import PREFILL_SHARE, Batcher, BatcherClosed


@dataclass
class FakeCache:
    length: int = 0


@dataclass
class FakeEngine:
    """Appends ids to the fake caches; logits row i holds the position of that row."""

    vocab_size: int = 4
    pass_s: float = 0.02
    passes: list[list[int]] = field(default_factory=list)  # rows per item, per pass
    fail_next: bool = False

    def forward(self, batch):  # the engine's duck type
        self.passes.append([len(r.ids) for r in batch])
        time.sleep(self.pass_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        out = []
        for r in batch:
            start = r.cache.length
            r.cache.length += len(r.ids)
            rows = np.arange(start, start + len(r.ids), dtype=np.float32)[-r.keep:] if r.keep else []
            out.append(np.repeat(np.asarray(rows, np.float32)[:, None], self.vocab_size, axis=1))
        return out


def test_fake_engine_prefill_is_chunked_and_rounds_are_never_split() -> None:
    engine = FakeEngine()
    batcher = Batcher(engine, max_rows=32, window_ms=0)  # type: ignore[arg-type]
    prompt, session = FakeCache(), FakeCache(length=10)
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("p", batcher.run(prompt, list(range(100)), 1,
                                                                            prefill=True)))
    t.start()
    logits, info = batcher.run(session, [1] * 40, 40)  # a round larger than max_rows: one piece
    t.join(10)
    assert logits.shape == (40, 4) and logits[0, 0] == 10
    assert prompt.length == 100 and results["p"][0][-1, 0] == 99  # keep rows from the last chunk
    assert max(sum(p) for p in engine.passes if 40 not in p) <= 32
    assert any(40 in p for p in engine.passes)  # the big round went whole
    assert info.passes == 1
    batcher.close()


def test_fake_engine_prefill_gets_its_share_when_rounds_fill_the_pass() -> None:
    engine = FakeEngine(pass_s=0.005)
    batcher = Batcher(engine, max_rows=16, window_ms=0)  # type: ignore[arg-type]
    stop = threading.Event()
    busy = [FakeCache() for _ in range(4)]

    def spin(cache: FakeCache) -> None:
        while not stop.is_set():
            batcher.run(cache, [1] * 5, 5)  # 4 x 5 rows: more than max_rows on their own

    threads = [threading.Thread(target=spin, args=(c,)) for c in busy]
    for t in threads:
        t.start()
    prompt = FakeCache()
    batcher.run(prompt, list(range(200)), 0, prefill=True)  # must finish despite the load
    stop.set()
    for t in threads:
        t.join(10)
    assert prompt.length == 200
    assert any(PREFILL_SHARE in p for p in engine.passes)  # chunks of the share ran beside the rounds
    batcher.close()


def test_fake_engine_failed_pass_fails_its_callers_only_and_close_fails_waiters() -> None:
    engine = FakeEngine(pass_s=0.05)
    batcher = Batcher(engine, max_rows=64, window_ms=0)  # type: ignore[arg-type]
    engine.fail_next = True
    with pytest.raises(RuntimeError, match="boom"):
        batcher.run(FakeCache(), [1, 2], 2)
    assert batcher.run(FakeCache(), [1, 2], 2)[0].shape == (2, 4)  # the next pass is fine
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.run(FakeCache(), [1], 1)


def test_fake_engine_sessions_that_come_back_fast_share_passes() -> None:
    engine = FakeEngine(pass_s=0.03)
    batcher = Batcher(engine, max_rows=64, window_ms=100)  # type: ignore[arg-type]  # >> scheduling jitter
    caches = [FakeCache(), FakeCache()]

    def session(cache: FakeCache) -> None:
        for _ in range(12):
            batcher.run(cache, [1] * 3, 3)

    threads = [threading.Thread(target=session, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    shared = sum(len(p) == 2 for p in engine.passes)
    assert shared >= 8, engine.passes  # in step after the first rounds, not alternating
    batcher.close()
