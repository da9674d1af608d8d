"""Session bookkeeping for one replica: records, a concurrent-session limit and a KV budget.

Guarantees:
- At most `max_sessions` sessions are open at once; `add` beyond that raises `SessionLimit`.
- Every session's record keeps its committed tokens (prompt + generated) whether or not its KV
  cache is resident, so a session whose cache was evicted can be re-prefilled from them.
- `reserve(key, tokens)` makes room for one session's cache to grow to `tokens` tokens: it drops
  the caches of the least recently used *other* sessions until the estimated KV bytes of all
  resident caches fit `kv_budget_bytes`. A single session larger than the budget on its own is
  allowed (its context is bounded by max_context); it is never evicted while it is being served.
- A removed session never gets a cache back (`attach` refuses), so a prefill that finishes after
  its session was closed holds no memory the store does not see.
- The store is pure bookkeeping: no torch, no gRPC. A cache is any object with `cached_len`
  (a `cloud_node.scorer.ScorerSession` in production, a fake in unit tests). Thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class SessionLimit(Exception):
    """The replica already serves its maximum number of concurrent sessions."""


class Cache(Protocol):
    """What the store needs to know of a session's KV cache."""

    @property
    def cached_len(self) -> int: ...


def kv_bytes_per_token(config: Mapping[str, Any] | Any, dtype: str) -> int:
    """Estimated KV-cache bytes per cached token: layers * 2 (K and V) * kv_heads * head_dim * dtype.

    `config` is a transformers config object or its dict (config.json).
    """
    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    layers = int(get("num_hidden_layers"))
    heads = int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or int(get("hidden_size")) // heads)
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    return layers * 2 * kv_heads * head_dim * _DTYPE_BYTES[dtype]


@dataclass
class SessionRecord:
    """One open session. `committed` is authoritative; `cache` is None when evicted or not built."""

    key: str  # server-side key, unique per open (a resumed session gets a new one)
    client_id: str  # the session id the client chose, for logs
    committed: list[int]  # prompt + generated tokens, in order
    prompt_len: int  # tokens of the original prompt (generated = committed[prompt_len:])
    state: Any = None  # the owner's per-session data (sampling params, budget, ...)
    cache: Cache | None = None
    evictions: int = 0  # how many times this session's cache was dropped
    finished: bool = False

    @property
    def generated(self) -> int:
        return len(self.committed) - self.prompt_len


@dataclass
class SessionStore:
    """LRU of session records with a per-replica KV memory budget."""

    max_sessions: int
    kv_budget_bytes: int
    bytes_per_token: int
    _records: OrderedDict[str, SessionRecord] = field(default_factory=OrderedDict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _ids: itertools.count = field(default_factory=itertools.count, init=False)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.kv_budget_bytes < 0 or self.bytes_per_token < 1:
            raise ValueError("kv_budget_bytes must be >= 0 and bytes_per_token >= 1")

    def add(self, client_id: str, committed: list[int], prompt_len: int, state: Any = None) -> SessionRecord:
        """Register a new session (most recently used); raises SessionLimit when full."""
        with self._lock:
            if len(self._records) >= self.max_sessions:
                raise SessionLimit(f"this replica already serves {len(self._records)} sessions "
                                   f"(max_sessions={self.max_sessions})")
            key = f"{client_id or 'session'}#{next(self._ids)}"
            record = SessionRecord(key, client_id, list(committed), prompt_len, state)
            self._records[key] = record
            return record

    def get(self, key: str) -> SessionRecord:
        """The record for `key` (KeyError if unknown), marked most recently used."""
        with self._lock:
            record = self._records[key]
            self._records.move_to_end(key)
            return record

    def attach(self, key: str, cache: Cache) -> bool:
        """Give an open session its cache; False (and nothing kept) if the session was removed."""
        with self._lock:
            record = self._records.get(key)
            if record is None:
                return False
            record.cache = cache
            return True

    def remove(self, key: str) -> SessionRecord | None:
        """Forget a session and drop its cache; unknown keys are ignored (idempotent)."""
        with self._lock:
            record = self._records.pop(key, None)
        if record is not None:
            record.cache = None
        return record

    def reserve(self, key: str, tokens: int) -> list[str]:
        """Evict other sessions' caches, least recently used first, so that this session's cache
        can hold `tokens` tokens within the budget. Returns the keys whose caches were dropped."""
        with self._lock:
            record = self._records[key]
            self._records.move_to_end(key)
            others = sum(self._cached_tokens(r) for k, r in self._records.items() if k != key)
            need = (others + tokens) * self.bytes_per_token
            evicted: list[str] = []
            for other_key, other in self._records.items():  # oldest first
                if need <= self.kv_budget_bytes:
                    break
                if other_key == key or other.cache is None:
                    continue
                need -= self._cached_tokens(other) * self.bytes_per_token
                other.cache = None
                other.evictions += 1
                evicted.append(other_key)
            if need > self.kv_budget_bytes:
                log.warning("session %s alone needs %d KV bytes, over the budget of %d",
                            record.key, need, self.kv_budget_bytes)
        if evicted:
            log.info("evicted KV caches of %s to make room for %s", evicted, key)
        return evicted

    @staticmethod
    def _cached_tokens(record: SessionRecord) -> int:
        return int(record.cache.cached_len) if record.cache is not None else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def resident_bytes(self) -> int:
        """Estimated KV bytes of all resident caches."""
        with self._lock:
            return sum(self._cached_tokens(r) for r in self._records.values()) * self.bytes_per_token

    def keys(self) -> list[str]:
        """Open session keys, least recently used first."""
        with self._lock:
            return list(self._records)
