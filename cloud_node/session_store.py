"""Session bookkeeping for one replica: records, admission by KV budget, and a prefix cache.

Guarantees:
- At most `max_sessions` sessions are open at once, and a new one is admitted only while the
  KV its open sessions need (committed tokens plus a round of drafts each, resident or not)
  leaves room for its own prompt in `kv_budget_bytes`; otherwise `add` raises `SessionLimit`.
- Every session's record keeps its committed tokens (prompt + generated) whether or not its KV
  cache is resident, so a session whose cache was evicted can be re-prefilled from them.
- `reserve(key, tokens)` makes room for one session's cache to grow to `tokens` tokens: it drops
  the caches of the least recently used *other* sessions until the estimated KV bytes of all
  resident caches fit `kv_budget_bytes`. A single session larger than the budget on its own is
  allowed (its context is bounded by max_context); it is never evicted while it is being served.
- A removed session never gets a cache back (`attach` refuses), so a prefill that finishes after
  its session was closed holds no memory the store does not see.
- Prefix cache: a session that ends leaves its cache behind (`retain`), keyed by the tokens it
  holds. `lookup(tokens)` finds the longest common prefix of `tokens` among the retained caches
  and the open sessions' resident caches (only positions a session can no longer rewrite:
  fewer than its committed tokens), so a new session (a later chat turn, a shared system
  prompt, a resume) copies that KV instead of prefilling it. Retained caches count against the
  budget and go first, least recently used first, when `reserve` or `retain` needs room (at
  most `max_retained` are kept; one whose tokens a newer one extends is dropped); a
  lookup that misses (evicted, replica restarted) just means a full prefill, never a wrong one.
- The store is pure bookkeeping: no torch, no gRPC. A cache is any object with `cached_len`
  (a `cloud_node.scorer.ScorerSession` in production, a fake in unit tests). Thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if differ.size else n

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
    off_chain: bool = False  # the last round was a tree whose verdict left its chain of first children

    @property
    def generated(self) -> int:
        return len(self.committed) - self.prompt_len


@dataclass
class Retained:
    """A closed session's cache, kept as a prefix source."""

    tokens: tuple[int, ...]  # the tokens whose KV the cache holds (its first cached_len positions)
    cache: Cache


@dataclass
class SessionStore:
    """LRU of session records with a per-replica KV memory budget and a prefix cache."""

    max_sessions: int
    kv_budget_bytes: int
    bytes_per_token: int
    round_tokens: int = 17  # headroom per open session for one round (last token + max drafts)
    min_prefix: int = 16  # shorter common prefixes are not worth a copy
    max_retained: int = 64  # retained caches at most (each lookup scans them)
    _records: OrderedDict[str, SessionRecord] = field(default_factory=OrderedDict, init=False)
    _retained: OrderedDict[int, Retained] = field(default_factory=OrderedDict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _ids: itertools.count = field(default_factory=itertools.count, init=False)
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)
    evicted_prefixes: int = field(default=0, init=False)
    evicted_sessions: int = field(default=0, init=False)  # open sessions' caches dropped by `reserve`

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
            need = sum(len(r.committed) + self.round_tokens for r in self._records.values())
            need += len(committed) + self.round_tokens
            if need * self.bytes_per_token > self.kv_budget_bytes and self._records:
                raise SessionLimit(f"this replica's KV budget is taken by its {len(self._records)} open sessions")
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

    def remove(self, key: str, *, retain: bool = False) -> SessionRecord | None:
        """Forget a session; unknown keys are ignored (idempotent). With `retain`, its resident
        cache stays as a prefix source (see `retain`); else it is dropped."""
        with self._lock:
            record = self._records.pop(key, None)
        if record is not None:
            cache, record.cache = record.cache, None
            if retain and cache is not None:
                self.retain(record.committed, cache)
        return record

    def retain(self, committed: list[int], cache: Cache) -> None:
        """Keep `cache` (holding the KV of committed[:cache.cached_len]) as a prefix source,
        dropping the least recently used retained caches while over the budget."""
        length = int(cache.cached_len)
        if length < self.min_prefix or length * self.bytes_per_token > self.kv_budget_bytes:
            return
        compact = getattr(cache, "compact", None)
        if compact is not None:
            compact()  # no spare capacity held by a cache nobody appends to
        tokens = tuple(committed[:length])
        with self._lock:
            for key, old in list(self._retained.items()):  # an entry this one extends is redundant
                if len(old.tokens) <= length and tokens[:len(old.tokens)] == old.tokens:
                    del self._retained[key]
            self._retained[next(self._ids)] = Retained(tokens, cache)
            while len(self._retained) > self.max_retained:
                self._retained.popitem(last=False)
                self.evicted_prefixes += 1
            self._trim()

    def lookup(self, tokens: list[int]) -> tuple[Cache, int] | None:
        """The cache sharing the longest prefix with `tokens` (at least `min_prefix`), and that length."""
        best: tuple[Cache, int] | None = None
        best_key: int | None = None
        with self._lock:
            sources: list[tuple[int | None, tuple[int, ...] | list[int], Cache]] = [
                (k, r.tokens, r.cache) for k, r in self._retained.items()]
            for record in self._records.values():
                if record.cache is not None:  # positions below len(committed) - 1 never change
                    sources.append((None, record.committed[:max(0, len(record.committed) - 1)], record.cache))
            for key, held, cache in sources:
                n = min(_common_prefix(held, tokens), int(cache.cached_len))
                if n >= self.min_prefix and (best is None or n > best[1]):
                    best, best_key = (cache, n), key
            if best is None:
                self.misses += 1
            else:
                self.hits += 1
                if best_key is not None:
                    self._retained.move_to_end(best_key)
        return best

    def reserve(self, key: str, tokens: int) -> list[str]:
        """Evict other sessions' caches, least recently used first, so that this session's cache
        can hold `tokens` tokens within the budget. Returns the keys whose caches were dropped."""
        with self._lock:
            record = self._records[key]
            self._records.move_to_end(key)
            others = sum(self._cached_tokens(r) for k, r in self._records.items() if k != key)
            need = (others + tokens) * self.bytes_per_token
            self._trim(need)
            evicted: list[str] = []
            for other_key, other in self._records.items():  # oldest first
                if need <= self.kv_budget_bytes:
                    break
                if other_key == key or other.cache is None:
                    continue
                need -= self._cached_tokens(other) * self.bytes_per_token
                other.cache = None
                other.evictions += 1
                self.evicted_sessions += 1
                evicted.append(other_key)
            if need > self.kv_budget_bytes:
                log.warning("session %s alone needs %d KV bytes, over the budget of %d",
                            record.key, need, self.kv_budget_bytes)
        if evicted:
            log.info("evicted KV caches of %s to make room for %s", evicted, key)
        return evicted

    def _trim(self, live_bytes: int | None = None) -> None:
        """Under the lock: drop retained caches, least recently used first, until they fit the
        budget next to `live_bytes` (default: the open sessions' resident caches)."""
        if live_bytes is None:
            live_bytes = sum(self._cached_tokens(r) for r in self._records.values()) * self.bytes_per_token
        held = sum(int(r.cache.cached_len) for r in self._retained.values()) * self.bytes_per_token
        while self._retained and live_bytes + held > self.kv_budget_bytes:
            _, old = self._retained.popitem(last=False)
            held -= int(old.cache.cached_len) * self.bytes_per_token
            self.evicted_prefixes += 1

    @staticmethod
    def _cached_tokens(record: SessionRecord) -> int:
        return int(record.cache.cached_len) if record.cache is not None else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __contains__(self, key: object) -> bool:
        """Whether the session `key` is open."""
        with self._lock:
            return key in self._records

    def resident_bytes(self) -> int:
        """Estimated KV bytes of all resident caches, the retained ones included."""
        with self._lock:
            live = sum(self._cached_tokens(r) for r in self._records.values())
            return (live + sum(int(r.cache.cached_len) for r in self._retained.values())) * self.bytes_per_token

    def live_bytes(self) -> int:
        """Estimated KV bytes of the open sessions' resident caches."""
        with self._lock:
            return sum(self._cached_tokens(r) for r in self._records.values()) * self.bytes_per_token

    def retained_count(self) -> int:
        with self._lock:
            return len(self._retained)

    def keys(self) -> list[str]:
        """Open session keys, least recently used first."""
        with self._lock:
            return list(self._records)
