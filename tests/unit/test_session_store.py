"""SessionStore with fake caches: session limit, LRU eviction under a KV budget, bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cloud_node.session_store import SessionLimit, SessionStore, kv_bytes_per_token


@dataclass
class FakeCache:
    cached_len: int


def _store(max_sessions: int = 4, budget_tokens: int = 100, bpt: int = 8) -> SessionStore:
    return SessionStore(max_sessions=max_sessions, kv_budget_bytes=budget_tokens * bpt, bytes_per_token=bpt,
                        round_tokens=0)


def test_fake_session_limit_and_unique_keys() -> None:
    store = _store(max_sessions=2)
    a = store.add("same", [1, 2], 2)
    b = store.add("same", [3], 1)
    assert a.key != b.key  # a resumed session never collides with its predecessor
    with pytest.raises(SessionLimit, match="max_sessions=2"):
        store.add("c", [1], 1)
    store.remove(a.key)
    store.remove(a.key)  # idempotent
    assert store.add("c", [1], 1).client_id == "c"
    assert len(store) == 2


def test_fake_reserve_evicts_least_recently_used_other_sessions() -> None:
    store = _store(budget_tokens=100)
    recs = [store.add(f"s{i}", [0] * 10, 10) for i in range(3)]
    for r in recs:
        r.cache = FakeCache(40)
    store.get(recs[0].key)  # s0 is now the most recently used; s1 is the oldest
    evicted = store.reserve(recs[2].key, 50)  # 40 (s0) + 40 (s1) + 50 > 100: drop s1 only
    assert evicted == [recs[1].key]
    assert recs[1].cache is None and recs[1].evictions == 1
    assert recs[1].committed == [0] * 10  # the record keeps its tokens for re-prefill
    assert recs[0].cache is not None and recs[2].cache is not None
    assert store.keys()[-1] == recs[2].key  # reserve marks it most recently used


def test_fake_reserve_never_evicts_the_session_itself() -> None:
    store = _store(budget_tokens=10)
    a, b = store.add("a", [1], 1), store.add("b", [1], 1)
    a.cache, b.cache = FakeCache(30), FakeCache(5)
    assert store.reserve(a.key, 40) == [b.key]  # over budget alone: allowed, others dropped
    assert a.cache is not None
    assert store.reserve(a.key, 40) == []


def test_fake_resident_bytes_follow_the_caches() -> None:
    store = _store(bpt=8)
    a = store.add("a", [1, 2, 3], 3)
    assert store.resident_bytes() == 0
    a.cache = FakeCache(2)
    assert store.resident_bytes() == 16
    store.remove(a.key)
    assert a.cache is None and store.resident_bytes() == 0
    with pytest.raises(KeyError):
        store.get(a.key)


def test_fake_generated_count() -> None:
    store = _store()
    r = store.add("a", [5, 6, 7], 2)
    assert r.generated == 1
    r.committed.extend([8, 9])
    assert r.generated == 3


def test_kv_bytes_per_token_from_config() -> None:
    cfg = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896}
    assert kv_bytes_per_token(cfg, "bf16") == 24 * 2 * 2 * 64 * 2
    assert kv_bytes_per_token({**cfg, "head_dim": 128}, "fp32") == 24 * 2 * 2 * 128 * 4
    with pytest.raises(ValueError, match="dtype"):
        kv_bytes_per_token(cfg, "int3")


def test_invalid_store_parameters() -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        SessionStore(max_sessions=0, kv_budget_bytes=1, bytes_per_token=1)
