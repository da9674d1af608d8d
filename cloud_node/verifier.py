"""The cloud verifier, transport-free: sessions, validation, limits and verification rounds.

Notation as in `tandem_core.verify`: **p** is the target's distribution (computed here), **q** the
drafter's (sent by the edge, sparse). Verification is Leviathan et al. 2023 (arXiv 2211.17192):
greedy prefix matching at temperature 0, lossless rejection sampling otherwise.

Guarantees:
- A round's random stream is `round_rng(seed, VERIFIER_STREAM, position)`, position = tokens
  committed before the round (prompt + generated), exactly as `tandem_core.loop`; so a session
  resumed on another replica with its generated tokens reproduces the undisturbed run.
- Every input error raises `BadRequest` (a ValueError) whose message names the field; it never
  changes any session's state. Beyond `max_sessions` open sessions, `open` raises
  `ResourceExhausted`. Other sessions and the model are unaffected by either.
- One lock serializes the model's forward passes (one CPU model). `Timing.queue_ms` is the wait
  for that lock, `prefill_ms` the (re-)prefill and `verify_ms` the scoring pass + verification.
- A session whose KV cache was evicted (see `cloud_node.session_store`) is re-prefilled from its
  committed tokens before its next round; its output does not change.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud_node.session_store import (
    SessionLimit,
    SessionRecord,
    SessionStore,
    kv_bytes_per_token,
)
from tandem.limits import MAX_CONTEXT, MAX_DRAFT_LEN, MAX_NEW_TOKENS
from tandem_core.loop import Draft, target_round
from tandem_core.sampling import SamplingParams, resolve_seed
from tandem_core.verify import Verdict

log = logging.getLogger(__name__)

_Q_SUM_TOLERANCE = 1e-3  # q rows arrive as float32; renormalized after this check


class BadRequest(ValueError):
    """Invalid client input; the message names the field. Maps to INVALID_ARGUMENT."""


class ResourceExhausted(Exception):
    """A limit of the replica is reached (concurrent sessions). Maps to RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class Limits:
    """Per-replica limits."""

    max_sessions: int = 16
    max_context: int = MAX_CONTEXT  # prompt + generated tokens; capped by the model's own context
    max_draft_len: int = MAX_DRAFT_LEN
    max_new_tokens: int = MAX_NEW_TOKENS
    kv_budget_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_context", "max_draft_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_budget_bytes < 0:
            raise ValueError(f"kv_budget_bytes must be >= 0, got {self.kv_budget_bytes}")


@dataclass(frozen=True)
class SessionSpec:
    """What opens a session (the proto's SessionSpec, unvalidated)."""

    session_id: str = ""
    model: str = ""  # "" = the served model
    prompt_tokens: tuple[int, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); used when prompt_tokens is empty
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 0
    generated_tokens: tuple[int, ...] = ()  # resume: committed after the prompt


@dataclass(frozen=True)
class DraftRound:
    """One round from the edge. q_rows[i] = (ids, probs): the drafter's q at draft i, sparse."""

    round: int
    draft_tokens: tuple[int, ...]  # (k,)
    q_rows: tuple[tuple[Sequence[int], Sequence[float]], ...] = ()  # k rows in sampling mode


@dataclass(frozen=True)
class Timing:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    verify_ms: float = 0.0


@dataclass(frozen=True)
class Opened:
    session: str  # server-side key for verify/close (unique per open)
    model: str
    prompt_len: int  # prompt + generated tokens the session holds
    max_draft_len: int
    max_context: int
    replica: str
    timing: Timing


@dataclass(frozen=True)
class RoundVerdict:
    round: int
    accepted: int
    tokens: tuple[int, ...]  # accepted drafts, then the correction or bonus token
    finished: bool
    finish_reason: str | None  # "stop", "length" or None
    timing: Timing


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
        self.store = SessionStore(limits.max_sessions, limits.kv_budget_bytes, bytes_per_token)
        self._model_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str = "bf16", limits: Limits | None = None,
             model_name: str | None = None, replica: str = "local") -> VerifierCore:
        """Load the target, its tokenizer and EOS ids from a transformers folder."""
        from transformers import AutoTokenizer

        from cloud_node.scorer import TargetModel, read_eos_ids

        target = TargetModel(model_dir, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:  # token ids still work without one
            log.warning("no tokenizer in %s (%s); chat messages will be refused", model_dir, exc)
            tokenizer = None
        return cls(target, eos_ids=read_eos_ids(model_dir), limits=limits or Limits(),
                   bytes_per_token=kv_bytes_per_token(target.model.config, dtype), tokenizer=tokenizer,
                   model_name=model_name or Path(model_dir).name, replica=replica)

    # --- sessions -----------------------------------------------------------------------------

    def open(self, spec: SessionSpec) -> Opened:
        """Validate the spec, register the session and prefill its cache."""
        state, prompt, generated = self._check_spec(spec)
        try:
            record = self.store.add(spec.session_id, [*prompt, *generated], len(prompt), state)
        except SessionLimit as exc:
            raise ResourceExhausted(str(exc)) from exc
        try:
            t0 = time.perf_counter()
            with self._model_lock:
                queue_s = time.perf_counter() - t0
                prefill_ms = self._ensure_cache(record, 0)
        except BaseException:
            self.store.remove(record.key)
            raise
        log.info("opened %s: %d prompt + %d generated tokens, %s", record.key, len(prompt), len(generated),
                 "greedy" if state.params.greedy else f"T={state.params.temperature}")
        return Opened(record.key, self.model_name, len(record.committed), self.limits.max_draft_len,
                      self.max_context, self.replica, Timing(_ms(queue_s), prefill_ms, 0.0))

    def close(self, session: str) -> None:
        """Forget a session and free its cache. Idempotent."""
        if self.store.remove(session) is not None:
            log.info("closed %s", session)

    def verify(self, session: str, draft: DraftRound) -> RoundVerdict:
        """Score the drafts in one forward pass and verify them."""
        record = self._record(session)
        state: _SessionState = record.state
        tokens = self._check_drafts(draft.draft_tokens, len(record.committed))
        q = self._check_q_rows(draft.q_rows, tokens, state.params)
        verdict, timing = self._run_round(record, Draft(tuple(tokens), q))
        return RoundVerdict(draft.round, verdict.accepted, verdict.tokens, verdict.finished,
                            verdict.finish_reason, timing)

    def generate(self, spec: SessionSpec) -> Generator[GenerateChunk, None, None]:
        """Cloud-only decoding: validates and opens now (raising BadRequest/ResourceExhausted
        here), then yields one token per chunk. The session closes when the iterator ends or
        is closed."""
        opened = self.open(spec)
        record = self._record(opened.session)
        return self._generate(record, opened.timing)

    def _generate(self, record: SessionRecord, open_timing: Timing) -> Generator[GenerateChunk, None, None]:
        try:
            pending = open_timing
            while True:
                verdict, timing = self._run_round(record, Draft((), None))
                yield GenerateChunk(verdict.tokens, verdict.finished, verdict.finish_reason,
                                    Timing(timing.queue_ms + pending.queue_ms,
                                           timing.prefill_ms + pending.prefill_ms, timing.verify_ms))
                pending = Timing()
                if verdict.finished:
                    return
        finally:
            self.close(record.key)

    # --- the round ------------------------------------------------------------------------

    def _run_round(self, record: SessionRecord, draft: Draft) -> tuple[Verdict, Timing]:
        state: _SessionState = record.state
        position = len(record.committed)
        remaining = min(state.max_new_tokens - record.generated, self.max_context - position)
        t0 = time.perf_counter()
        with self._model_lock:
            t1 = time.perf_counter()
            try:
                prefill_ms = self._ensure_cache(record, len(draft.tokens))
                t2 = time.perf_counter()
                cache: Any = record.cache  # a local: close() may drop record.cache meanwhile
                verdict = target_round(cache, draft, state.params, seed=state.seed, position=position,
                                       remaining=remaining, eos_ids=self.eos_ids)
            except BaseException:
                record.cache = None  # never reuse a cache a failed pass may have left half-updated
                raise
            record.committed.extend(verdict.tokens)
            if verdict.finished:
                record.finished = True
                record.cache = None  # free the memory now; the stream is about to end
            t3 = time.perf_counter()
        return verdict, Timing(_ms(t1 - t0), prefill_ms, _ms(t3 - t2))

    def _ensure_cache(self, record: SessionRecord, drafts: int) -> float:
        """Make the session's cache resident (re-prefill if evicted); returns prefill ms.
        Caller holds the model lock."""
        self.store.reserve(record.key, len(record.committed) + drafts)
        if record.cache is not None:
            return 0.0
        t0 = time.perf_counter()
        record.cache = self.target.new_session(record.committed)
        if record.evictions:
            log.info("re-prefilled %s from %d committed tokens", record.key, len(record.committed))
        return _ms(time.perf_counter() - t0)

    def _record(self, session: str) -> SessionRecord:
        try:
            record = self.store.get(session)
        except KeyError:
            raise BadRequest(f"round: no open session {session!r} (send open first)") from None
        if record.finished:
            raise BadRequest(f"round: session {record.client_id!r} has already finished")
        return record

    # --- validation -------------------------------------------------------------------------

    def _check_spec(self, spec: SessionSpec) -> tuple[_SessionState, list[int], list[int]]:
        if spec.model and spec.model != self.model_name:
            raise BadRequest(f"model: unknown model {spec.model!r}; this server has {self.model_name!r}")
        try:
            params = SamplingParams(float(spec.temperature), int(spec.top_k), float(spec.top_p), None)
        except ValueError as exc:
            raise BadRequest(f"sampling: {exc}") from None
        limit = self.limits.max_new_tokens
        if not 1 <= spec.max_new_tokens <= limit:
            raise BadRequest(f"max_new_tokens: must be in [1, {limit}], got {spec.max_new_tokens}")
        prompt = self._prompt(spec)
        generated = self._check_ids("generated_tokens", spec.generated_tokens)
        if len(generated) >= spec.max_new_tokens:
            raise BadRequest(f"generated_tokens: {len(generated)} tokens already reach max_new_tokens="
                             f"{spec.max_new_tokens}; nothing is left to generate")
        if any(t in self.eos_ids for t in generated):
            raise BadRequest("generated_tokens: contains an end-of-sequence token; the answer is finished")
        if len(prompt) + len(generated) >= self.max_context:
            raise BadRequest(f"prompt_tokens: prompt of {len(prompt)} tokens (+{len(generated)} generated) "
                             f"is at or past max_context={self.max_context}")
        if spec.seed is not None and not 0 <= spec.seed < 2**63:
            raise BadRequest(f"sampling.seed: must be in [0, 2**63), got {spec.seed}")
        return _SessionState(params, resolve_seed(spec.seed), spec.max_new_tokens), prompt, generated

    def _prompt(self, spec: SessionSpec) -> list[int]:
        if spec.prompt_tokens:
            return self._check_ids("prompt_tokens", spec.prompt_tokens)
        if not spec.messages:
            raise BadRequest("prompt_tokens: empty prompt (send prompt_tokens or messages)")
        if self.tokenizer is None:
            raise BadRequest("messages: this server has no tokenizer; send prompt_tokens")
        from cloud_node.scorer import encode_prompt

        try:
            ids = encode_prompt(self.tokenizer, messages=[{"role": r, "content": c} for r, c in spec.messages])
        except Exception as exc:  # noqa: BLE001 - any template error is the client's input
            raise BadRequest(f"messages: the chat template rejected them: {exc}") from None
        return self._check_ids("messages", ids)

    def _check_ids(self, field: str, ids: Sequence[int]) -> list[int]:
        vocab = int(self.target.vocab_size)
        out = [int(t) for t in ids]
        bad = [t for t in out if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"{field}: token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return out

    def _check_drafts(self, draft_tokens: Sequence[int], position: int) -> list[int]:
        k = len(draft_tokens)
        if k > self.limits.max_draft_len:
            raise BadRequest(f"draft_tokens: {k} drafts exceed max_draft_len={self.limits.max_draft_len}")
        if position + k > self.max_context:
            raise BadRequest(f"draft_tokens: {k} drafts after {position} tokens pass max_context="
                             f"{self.max_context}")
        return self._check_ids("draft_tokens", draft_tokens)

    def _check_q_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[float]]], tokens: list[int],
                      params: SamplingParams) -> np.ndarray | None:
        """Dense (k, V) float64 q from the sparse rows, each row checked and renormalized."""
        if params.greedy:
            if rows:
                raise BadRequest("q_rows: must be empty in greedy mode (temperature 0)")
            return None
        if len(rows) != len(tokens):
            raise BadRequest(f"q_rows: got {len(rows)} rows for {len(tokens)} drafts (sampling mode "
                             "needs one per draft)")
        vocab = int(self.target.vocab_size)
        q = np.zeros((len(tokens), vocab), dtype=np.float64)
        for i, ((ids, probs), x) in enumerate(zip(rows, tokens, strict=True)):
            ids_a = np.asarray(ids, dtype=np.int64)
            probs_a = np.asarray(probs, dtype=np.float64)
            where = f"q_rows[{i}]"
            if ids_a.ndim != 1 or ids_a.shape != probs_a.shape or ids_a.size == 0:
                raise BadRequest(f"{where}: ids and probs must be non-empty and of equal length, "
                                 f"got {ids_a.size} and {probs_a.size}")
            if ids_a.min() < 0 or ids_a.max() >= vocab:
                raise BadRequest(f"{where}: ids outside the vocabulary [0, {vocab})")
            if np.unique(ids_a).size != ids_a.size:
                raise BadRequest(f"{where}: ids must not repeat")
            if not np.isfinite(probs_a).all() or probs_a.min() < 0:
                raise BadRequest(f"{where}: probabilities must be finite and non-negative (NaN or < 0 sent)")
            total = float(probs_a.sum())
            if not math.isclose(total, 1.0, abs_tol=_Q_SUM_TOLERANCE):
                raise BadRequest(f"{where}: probabilities must sum to 1, got {total:.6f}")
            q[i, ids_a] = probs_a / total
            if q[i, x] <= 0:
                raise BadRequest(f"{where}: draft token {x} has probability 0 in its own q row")
        return q
