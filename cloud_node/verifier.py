"""The cloud verifier, transport-free: sessions, limits and verification rounds.

Notation as in `tandem_core.verify`: **p** is the target's distribution (computed here), **q** the
drafter's (sent by the edge, sparse). Verification is Leviathan et al. 2023 (arXiv 2211.17192):
greedy prefix matching at temperature 0, lossless rejection sampling otherwise; a draft tree
(`DraftRound.draft_parents`) is verified in one pass by greedy path matching or recursive
rejection sampling (RSD, arXiv 2402.14160; `tandem_core.tree`), and the session's cache keeps
the accepted path only, as if that path had been sent as a chain.

Guarantees:
- A round's random stream is `round_rng(seed, VERIFIER_STREAM, position)`, position = tokens
  committed before the round (prompt + generated), exactly as `tandem_core.loop`; so a session
  resumed on another replica with its generated tokens reproduces the undisturbed run. Every
  round, chain or tree, goes through `tandem_core.loop.target_round`.
- `Limits.max_tree_nodes` (SessionOpened.max_tree_nodes) bounds a tree round's drafts; 0 makes
  the replica refuse trees with `BadRequest`. Pipelining (`assume_*`) works for tree rounds as
  for chains.
- Every input error raises `BadRequest` (see `cloud_node.validation` for every bound) whose
  message names the field; it never changes any session's state, and a bad round never
  reaches the batch (validation runs first). Beyond `max_sessions` open sessions, or when the
  open sessions' KV leaves no room for the new prompt in the budget, `open` raises
  `ResourceExhausted` whose message ends with a retry hint ("retry after N ms": the mean
  session lifetime seen here over the open sessions, 100 ms..30 s). Other sessions and the
  model are unaffected.
- A round tagged with an assumption (pipelining: `assume_position`, `assume_token`) that does
  not hold when its turn comes gets a verdict with `dropped` set: no pass, nothing committed.
  After a tree round whose verdict left the tree's chain of first children (the chain a round
  ahead assumes), no assumption holds: the same position and last token came by another path.
- The context is a limit, not an error: drafts past it are dropped, and a session whose
  committed tokens reach `max_context` ends with finish reason "length", on Verify and Generate.
- Sessions run concurrently: each round or prefill goes to the target's batcher, which packs
  the rows of every session waiting into one forward pass (`cloud_node.batcher`); by the
  engine's batch invariance a session's tokens do not depend on who shared its passes.
  `Timing.queue_ms` is the wait for a pass, `prefill_ms` the (re-)prefill, `verify_ms` the
  scoring pass + verification, `batch_sessions` the sessions that shared the pass,
  `prefill_tokens`/`reused_tokens` what the cache build computed and what it copied.
- A session whose KV cache was evicted (see `cloud_node.session_store`) is re-prefilled from its
  committed tokens before its next round, from the longest cached prefix when there is one (a
  finished session's cache, another session's); its output does not change.
- `close` is idempotent and may run from any thread at any time, even while the session is
  being opened or scored: the session leaves the store at once, and a call still running on it
  ends with `SessionGone` and leaves no cache in the store. A `GenerateStream` closes its
  session when closed, exhausted or failed, whether or not it was ever iterated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_node.errors import BadRequest, ResourceExhausted, SessionGone
from cloud_node.session_store import (
    SessionLimit,
    SessionRecord,
    SessionStore,
    kv_bytes_per_token,
)
from cloud_node.validation import Checker, DraftRound, SessionSpec
from tandem.limits import MAX_CONTEXT, MAX_DRAFT_LEN, MAX_NEW_TOKENS, SESSION_IDLE_S
from tandem_core.loop import Draft, target_round
from tandem_core.sampling import SamplingParams, resolve_seed
from tandem_core.tree import MAX_TREE_NODES
from tandem_core.verify import Verdict

__all__ = ["BadRequest", "DraftRound", "GenerateChunk", "GenerateStream", "Limits", "Opened", "ResourceExhausted",
           "RoundVerdict", "SessionGone", "SessionSpec", "Timing", "VerifierCore"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Per-replica limits."""

    max_sessions: int = 32  # a hard cap; admission is by the KV budget
    max_context: int = MAX_CONTEXT  # prompt + generated tokens; capped by the model's own context
    max_draft_len: int = MAX_DRAFT_LEN
    max_new_tokens: int = MAX_NEW_TOKENS
    kv_budget_bytes: int = 2 << 30
    max_batch_rows: int = 64  # a pass fills up to this many rows with prefill after its rounds
    batch_window_ms: float = 20.0  # longest wait of a pass for sessions expected back within it
    max_tree_nodes: int = MAX_TREE_NODES  # drafts a tree round may hold; 0: chains only
    idle_s: float = SESSION_IDLE_S  # a Verify stream with no request for this long is closed (SessionIdle)

    def __post_init__(self) -> None:
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if not 0 <= self.max_tree_nodes <= MAX_TREE_NODES:
            raise ValueError(f"max_tree_nodes must be in [0, {MAX_TREE_NODES}], got {self.max_tree_nodes}")
        for name in ("max_sessions", "max_context", "max_draft_len", "max_new_tokens", "max_batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_budget_bytes < 0:
            raise ValueError(f"kv_budget_bytes must be >= 0, got {self.kv_budget_bytes}")
        if not 0 < self.idle_s < float("inf"):
            raise ValueError(f"idle_s must be > 0 and finite, got {self.idle_s}")


@dataclass(frozen=True)
class Timing:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    verify_ms: float = 0.0
    prefill_tokens: int = 0  # tokens run through the target to (re)build the KV cache
    reused_tokens: int = 0  # tokens whose KV came from the prefix cache
    batch_sessions: int = 0  # sessions sharing the round's forward pass (0: no pass ran)


@dataclass(frozen=True)
class Opened:
    session: str  # server-side key for verify/close (unique per open)
    model: str
    prompt_len: int  # prompt + generated tokens the session holds
    max_draft_len: int
    max_context: int
    replica: str  # opaque: names the replica in its logs, reveals no pid, address or actor id
    timing: Timing
    max_tree_nodes: int = 0  # drafts a tree round may hold; 0: chains only


@dataclass(frozen=True)
class RoundVerdict:
    round: int
    accepted: int
    tokens: tuple[int, ...]  # accepted drafts, then the correction or bonus token
    finished: bool
    finish_reason: str | None  # "stop", "length" or None
    timing: Timing
    dropped: bool = False  # the round's assumption failed: nothing verified or committed


@dataclass(frozen=True)
class GenerateChunk:
    tokens: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    timing: Timing


@dataclass(frozen=True)
class _SessionState:
    params: SamplingParams
    seed: int
    max_new_tokens: int
    opened_at: float = 0.0  # time.monotonic() at open


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class VerifierCore:
    """Verification sessions over one target model. Thread-safe; one forward pass at a time."""

    def __init__(self, target: Any, *, eos_ids: frozenset[int], limits: Limits, bytes_per_token: int,
                 tokenizer: Any = None, model_name: str = "target", replica: str = "local") -> None:
        self.target = target  # has new_session(ids) -> ScorerSession, vocab_size, max_context
        self.eos_ids = eos_ids
        self.limits = limits
        self.max_context = min(limits.max_context, int(target.max_context))
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.replica = replica
        self.check = Checker(int(target.vocab_size), self.max_context, limits.max_draft_len, limits.max_new_tokens,
                             eos_ids, model_name, tokenizer, limits.max_tree_nodes)
        self.store = SessionStore(limits.max_sessions, limits.kv_budget_bytes, bytes_per_token,
                                  round_tokens=limits.max_draft_len + 1)
        self._lifetime_s = 0.0  # EWMA of session lifetimes, for the retry hint
        self._lifetime_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str = "bf16", limits: Limits | None = None,
             model_name: str | None = None, replica: str = "local") -> VerifierCore:
        """Load the target, its tokenizer and EOS ids from a transformers folder."""
        from transformers import AutoTokenizer

        from cloud_node.scorer import TargetModel, read_eos_ids

        limits = limits or Limits()
        target = TargetModel(model_dir, dtype=dtype, max_batch_rows=limits.max_batch_rows,
                             batch_window_ms=limits.batch_window_ms)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:  # token ids still work without one
            log.warning("no tokenizer in %s (%s); chat messages will be refused", model_dir, exc)
            tokenizer = None
        return cls(target, eos_ids=read_eos_ids(model_dir), limits=limits,
                   bytes_per_token=kv_bytes_per_token(target.model.config, dtype), tokenizer=tokenizer,
                   model_name=model_name or Path(model_dir).name, replica=replica)

    # --- sessions -----------------------------------------------------------------------------

    def open(self, spec: SessionSpec, cancelled: Callable[[], bool] | None = None) -> Opened:
        """Validate the spec, register the session and prefill its cache. `cancelled`: the
        caller has gone when it says so; the prefill then stops at its next chunk (SessionGone)."""
        checked = self.check.spec(spec)
        state = _SessionState(checked.params, resolve_seed(checked.seed), spec.max_new_tokens, time.monotonic())
        try:
            record = self.store.add(spec.session_id, [*checked.prompt, *checked.generated], len(checked.prompt), state)
        except SessionLimit as exc:
            raise ResourceExhausted(f"{exc}; retry after {self.retry_after_ms()} ms") from exc
        try:
            timing = self._ensure_cache(record, 0, cancelled)
        except BaseException:
            self.close(record.key)
            raise
        log.info("opened %s: %d prompt + %d generated tokens, %s", record.key, len(checked.prompt),
                 len(checked.generated), "greedy" if state.params.greedy else f"T={state.params.temperature}")
        return Opened(record.key, self.model_name, len(record.committed), self.limits.max_draft_len,
                      self.max_context, self.replica, timing, self.limits.max_tree_nodes)

    def close(self, session: str) -> None:
        """Forget a session; its cache stays as a prefix source (see `cloud_node.session_store`).
        Idempotent; safe from any thread."""
        try:
            cache = self.store.get(session).cache
        except KeyError:
            cache = None
        record = self.store.remove(session, retain=True)
        if record is not None:
            self._forget(record, cache)
            state: _SessionState = record.state
            lifetime = time.monotonic() - state.opened_at
            with self._lifetime_lock:
                self._lifetime_s = lifetime if not self._lifetime_s else 0.8 * self._lifetime_s + 0.2 * lifetime
            log.info("closed %s", session)

    def _forget(self, record: SessionRecord, cache: Any = None) -> None:
        """Tell the batcher this session sends no more rounds (it stops waiting for it)."""
        cache = cache if cache is not None else record.cache
        batcher = getattr(self.target, "batcher", None)
        if cache is not None and batcher is not None and hasattr(cache, "cache"):
            batcher.forget(cache.cache)

    def retry_after_ms(self) -> int:
        """When a slot is likely to free: the mean session lifetime over the open sessions."""
        with self._lifetime_lock:
            lifetime = self._lifetime_s
        if not lifetime:
            return 1000
        return int(min(30_000, max(100, 1000 * lifetime / max(1, len(self.store)))))

    def verify(self, session: str, draft: DraftRound) -> RoundVerdict:
        """Score the drafts (a chain or a tree) in one forward pass and verify them (drafts past
        the context are dropped)."""
        record = self._record(session)
        state: _SessionState = record.state
        checked = self.check.draft(draft, state.params, len(record.committed))
        if draft.assume_position and (record.off_chain or len(record.committed) != draft.assume_position
                                      or record.committed[-1] != draft.assume_token):
            return RoundVerdict(draft.round, 0, (), False, None, Timing(), dropped=True)
        verdict, timing = self._run_round(record, checked)
        return RoundVerdict(draft.round, verdict.accepted, verdict.tokens, verdict.finished,
                            verdict.finish_reason, timing)

    def generate(self, spec: SessionSpec, cancelled: Callable[[], bool] | None = None) -> GenerateStream:
        """Cloud-only decoding: validates and opens now (raising BadRequest/ResourceExhausted
        here; `cancelled` as for `open`); the stream then yields one token per chunk."""
        opened = self.open(spec, cancelled)
        try:
            return GenerateStream(self, self._record(opened.session), opened.timing)
        except BaseException:
            self.close(opened.session)
            raise

    # --- the round ------------------------------------------------------------------------

    def run_round(self, record: SessionRecord, draft: Draft) -> tuple[Verdict, Timing]:
        """One verification round on an open session (for `GenerateStream`)."""
        return self._run_round(record, draft)

    def _run_round(self, record: SessionRecord, draft: Draft) -> tuple[Verdict, Timing]:
        state: _SessionState = record.state
        position = len(record.committed)
        remaining = min(state.max_new_tokens - record.generated, self.max_context - position)
        try:
            built = self._ensure_cache(record, len(draft.tokens))
            t0 = time.perf_counter()
            cache: Any = record.cache  # a local: close() may drop record.cache meanwhile
            if cache is None:
                raise SessionGone(f"session {record.key} was closed")
            verdict = target_round(cache, draft, state.params, seed=state.seed, position=position,
                                   remaining=remaining, eos_ids=self.eos_ids)
        except BaseException:
            record.cache = None  # never reuse a cache a failed pass may have left half-updated
            raise
        record.committed.extend(verdict.tokens)
        record.off_chain = draft.kept(verdict) < verdict.accepted
        took = time.perf_counter() - t0
        if verdict.finished:
            record.finished = True
            record.cache = None  # the stream is about to end: keep the cache as a prefix source
            self.store.retain(record.committed, cache)
            self._forget(record, cache)
        used = cache.last_pass
        return verdict, Timing(_ms(used.queue_s), built.prefill_ms, _ms(took - used.queue_s),
                               built.prefill_tokens, built.reused_tokens, used.sessions)

    def _ensure_cache(self, record: SessionRecord, drafts: int, cancelled: Callable[[], bool] | None = None) -> Timing:
        """Make the session's cache resident (prefill if new or evicted, from the longest cached
        prefix); returns the prefill's timing. Raises SessionGone if the session was closed (or
        `cancelled` turned true) meanwhile: the prefill stops at its next chunk."""
        # Look up a prefix first: making room may evict the very cache that holds it (the lookup
        # keeps a reference, so the copy below still works).
        prefix = self.store.lookup(record.committed[:-1]) if record.cache is None else None
        try:
            self.store.reserve(record.key, len(record.committed) + drafts)
        except KeyError:
            raise SessionGone(f"session {record.key} was closed") from None
        if record.cache is not None:
            return Timing()
        t0 = time.perf_counter()
        def gone() -> bool:
            return record.key not in self.store or (cancelled is not None and cancelled())

        cache = self.target.new_session(record.committed, prefix=prefix, cancelled=gone)
        if not self.store.attach(record.key, cache):  # closed during the prefill: drop it
            raise SessionGone(f"session {record.key} was closed")
        record.cache = cache
        if record.evictions:
            log.info("re-prefilled %s from %d committed tokens (%d from a cached prefix)", record.key,
                     len(record.committed), cache.reused)
        used = cache.last_pass
        return Timing(_ms(used.queue_s), _ms(time.perf_counter() - t0 - used.queue_s), 0.0,
                      cache.prefilled, cache.reused, used.sessions)

    def _record(self, session: str) -> SessionRecord:
        try:
            record = self.store.get(session)
        except KeyError:
            raise BadRequest("round: no open session on this stream (send open first)") from None
        if record.finished:
            raise BadRequest("round: the session has already finished")
        return record


class GenerateStream(Iterator[GenerateChunk]):
    """Cloud-only decoding of one open session: one target token per chunk until it finishes.

    The session closes when the stream finishes, fails or is closed, even if it was never
    iterated (a plain generator would skip its `finally` then, and leak the session).
    """

    def __init__(self, core: VerifierCore, record: SessionRecord, open_timing: Timing) -> None:
        self._core, self._record = core, record
        self._pending = open_timing  # the open's queue and prefill time go with the first chunk
        self._done = False

    def __next__(self) -> GenerateChunk:
        if self._done:
            raise StopIteration
        try:
            verdict, timing = self._core.run_round(self._record, Draft((), None))
        except BaseException:
            self.close()
            raise
        pending, self._pending = self._pending, Timing()
        if verdict.finished:
            self.close()
        return GenerateChunk(verdict.tokens, verdict.finished, verdict.finish_reason,
                             Timing(timing.queue_ms + pending.queue_ms, timing.prefill_ms + pending.prefill_ms,
                                    timing.verify_ms, timing.prefill_tokens + pending.prefill_tokens,
                                    timing.reused_tokens + pending.reused_tokens, timing.batch_sessions))

    def close(self) -> None:
        """End the stream and close its session. Idempotent."""
        self._done = True
        self._core.close(self._record.key)
