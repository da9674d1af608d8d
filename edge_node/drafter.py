"""The edge drafter: onnxruntime-genai over the int4 ONNX model, with KV cache and exact rollback.

Guarantees:
- A `DrafterSession`'s cache holds exactly the committed tokens between rounds, and the logits it
  keeps are those for the next position. `draft(k)` proposes k tokens with k-1 forward passes
  (the last draft is appended only once we know whether it was accepted).
- `commit(accepted, tokens)` rolls back exactly: rewind to the committed length plus the accepted
  drafts, then append the target's token. Appending after `rewind_to` refreshes the logits, which
  `rewind_to` alone leaves stale (checked against an undisturbed greedy run).
- Drafts are chosen with the one shared transform `tandem_core.sampling.logits_to_probs`, so q
  here and p in the verifier are computed the same way.
- `generate` is on-device generation through the same session.
- A hint (a continuation retrieval proposes, `tandem_core.lookup`) is checked in one batched
  pass: `draft(k, hint=...)` and `generate(lookup=...)` keep the drafter's own choices while
  they equal the hint (the same tokens and q rows as one pass per token, up to the rounding of
  a batched pass), then rewind the rest. `adopt` takes drafts made elsewhere without computing
  them; `commit` then appends the committed ones in one pass.
- Pipelining (`tandem_core.loop`): `draft_ahead(k)` extends an unsettled draft with the
  drafter's guess at the target's next token and k drafts after it, with the same choices and
  per-position keys a round drafted after that verdict would use. `commit` with a verdict equal
  to the guess keeps them as the next unsettled draft; any other verdict rewinds them away.
- Prefix reuse across requests (a chat's next turn): `DrafterModel.retain(session)` keeps an
  ended session's generator (at most `RETAIN` of them, least recently used dropped);
  `new_session` for a request whose prompt shares at least `MIN_REUSE` tokens with one rewinds
  that generator to the common prefix and appends only the rest, instead of prefilling the
  whole history. Only for requests whose answer cannot depend on it (`reuses_kv`): the drafts
  may differ in rounding from a fresh prefill, which never changes a greedy answer (the target
  decides every token) and never changes a sampled answer's distribution (rejection sampling
  keeps the target's for any q), but would change which tokens a *seeded* sampled answer draws,
  so a seeded sampled request always prefills afresh. Sessions that may be reused reserve room
  for their next turns (`REUSE_ROOM` tokens of KV beyond what the request needs).
- Cancel: a session's prompt goes in passes of at most `LONG_PREFILL_CHUNK` tokens, and
  `new_session(..., cancelled=f)` asks `f()` before each: once true, `PrefillCancelled` is
  raised, so a request cancelled during a long prefill frees its slot within one pass.
- A lazy session (`new_session(..., lazy=True)`) builds its cache only when asked:
  `prefill(stop)` appends the prompt in passes of `PREFILL_CHUNK` tokens and returns early when
  `stop()` says so between passes (the first verdict is in: it reaches the user without waiting
  for the drafter); every other call but `adopt` (a copied first round needs no cache) finishes
  the prefill first. The same fixed passes run whatever the timing, so a seeded answer does not
  depend on it.
- Draft trees (`tandem_core.branching`): `alternatives(draft)` names, for each draft of the round
  (unsettled or drafted ahead), the tokens a tree may add as its siblings; the cache holds only
  the chain, and the loop commits the chain's drafts kept in place (`Draft.kept`), so a verdict
  down a sibling costs the same rewind as a rejection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tandem_core.branching import MAX_WIDTH, Alternatives, greedy_alternatives, sampled_alternatives
from tandem_core.lookup import MIN_MATCH
from tandem_core.loop import Draft
from tandem_core.sampling import DRAFTER_STREAM, SamplingParams, cap_support, logits_to_probs, round_rng, sample
from tandem_core.suffix_index import SuffixIndex
from tandem_core.tree import sample_without_replacement

log = logging.getLogger(__name__)

# In sampling mode each draft is sampled from q capped to its most likely tokens, so a q row
# crosses the wire as at most this many (id, prob) pairs (see tandem_core.sampling.cap_support).
DEFAULT_Q_SUPPORT = 64
RETAIN = 2  # ended sessions whose KV a later request may reuse
MIN_REUSE = 16  # shorter common prefixes are prefilled anew
LOCAL_HINT = 32  # longest continuation on-device generation checks at a time
HINT_CHUNK = 4  # hint tokens checked in a draft's first batched pass (then 8, 16, ...)
REUSE_ROOM = 1024  # extra KV room a session that may be reused reserves for its conversation's next turns
# A lazy session's prompt goes in passes of this many tokens (fixed, so its numerics never depend
# on timing); onnxruntime-genai holds the GIL through a pass, so this bounds how long a verdict
# that came in waits to be seen (about 10 ms a token on one Xeon core: ~0.2 s).
PREFILL_CHUNK = 16
# Any other session's prompt goes in passes of this many tokens, so a request cancelled during a
# long prefill (tens of seconds for a few thousand tokens on a busy device) stops at the next
# pass; prompts up to this long still take one pass, as they always did.
LONG_PREFILL_CHUNK = 512
# What rebuilding the round ahead costs (one batched pass of its tokens) in drafting passes: a
# round is prepared for another verdict only when P(that verdict) * k exceeds this * P(the guess).
REBUILD_PASSES = 1.5


class PrefillCancelled(Exception):
    """The request was cancelled while its drafter session prefilled its prompt."""


class DrafterModel:
    """The loaded ONNX drafter; sessions share it and own their generators (KV caches)."""

    def __init__(self, model_dir: str | Path, threads: int = 0) -> None:
        """`threads` > 0 sets ONNX Runtime's intra-op threads (0: ONNX Runtime's default)."""
        import json

        import onnxruntime_genai as og

        self._og = og
        self.model_dir = str(model_dir)
        config = og.Config(str(model_dir))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.context_length, self.eos_ids, self.vocab_size = _read_config(model_dir)
        self._retained: list[DrafterSession] = []  # most recently retained first
        self._lock = threading.Lock()
        log.info("loaded drafter %s (context %d)", model_dir, self.context_length)

    def new_session(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        *,
        max_length: int | None = None,
        q_support: int = DEFAULT_Q_SUPPORT,
        lazy: bool = False,
        cancelled: Callable[[], bool] | None = None,
    ) -> DrafterSession:
        """A session over `prompt_ids` (see the module doc); `cancelled`, asked before each prefill
        pass, stops the prefill with `PrefillCancelled` once it says so."""
        reusing = reuses_kv(params)
        reuse = self._take_prefix(prompt_ids, max_length) if reusing else None
        if reusing and reuse is None:
            max_length = None if max_length is None else min(max_length + REUSE_ROOM, self.context_length)
        return DrafterSession(self, prompt_ids, params, seed, max_length=max_length, q_support=q_support,
                              reuse=reuse, lazy=lazy, cancelled=cancelled)

    def retain(self, session: DrafterSession) -> None:
        """Keep an ended session's KV for a later request's prefix (see the module doc)."""
        if not session.reusable:
            return
        with self._lock:
            self._retained = [session, *[s for s in self._retained if s is not session]][:RETAIN]

    def _take_prefix(self, prompt_ids: Sequence[int], max_length: int | None) -> tuple[DrafterSession, int] | None:
        """The retained session sharing the longest prefix with `prompt_ids` (taken out of the
        pool: a generator serves one session at a time) and that length."""
        need = min(max_length or self.context_length, self.context_length)
        with self._lock:
            best, best_len = None, 0
            for s in self._retained:
                n = _common_prefix(s.tokens, prompt_ids)
                if n > best_len and s.max_length >= need:
                    best, best_len = s, n
            if best is None or best_len < MIN_REUSE:
                return None
            self._retained.remove(best)
        return best, best_len

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids for a raw prompt, or for chat messages through the model's chat template."""
        import json

        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is not None:
            prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = [int(t) for t in self.tokenizer.encode(prompt)]
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray([t for t in ids if t not in self.eos_ids], dtype=np.int32))


def reuses_kv(params: SamplingParams) -> bool:
    """Whether a request may take a retained session's KV (see the module doc): greedy, or sampled
    without a seed (nothing to reproduce; the distribution does not depend on the drafts)."""
    return params.greedy or params.seed is None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _read_config(model_dir: str | Path) -> tuple[int, frozenset[int], int]:
    import json

    cfg = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
    eos = cfg["eos_token_id"]
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    return int(cfg["context_length"]), eos_ids, int(cfg["vocab_size"])


class DrafterSession:
    """One request's drafter state: an onnxruntime-genai Generator holding the KV cache."""

    def __init__(
        self,
        drafter: DrafterModel,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        *,
        max_length: int | None = None,
        q_support: int = DEFAULT_Q_SUPPORT,
        reuse: tuple[DrafterSession, int] | None = None,
        lazy: bool = False,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        if len(prompt_ids) < 1:
            raise ValueError("prompt must hold at least one token")
        og = drafter._og
        limit = min(max_length or drafter.context_length, drafter.context_length)
        if reuse is not None:
            limit = reuse[0].max_length
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_length {limit}")
        self._params = params
        self._seed = seed
        self._q_support = q_support
        self.max_length = limit
        self.committed_len = len(prompt_ids)
        self.tokens: list[int] = [int(t) for t in prompt_ids]  # committed, in order
        self._pending: tuple[int, ...] = ()  # drafts proposed but not yet settled by commit
        self._pending_cached = 0  # of which in the cache (draft: k-1; adopt: none)
        # A round drafted ahead (draft_ahead): the guessed target token, its drafts and q rows.
        self._ahead: tuple[int, Draft] | None = None
        # Greedy, a verdict other than the guess prepared for (`draft_alternative`): the drafts
        # it accepts, the target's token it assumes, and the round that follows it.
        self._alt: tuple[int, int, Draft] | None = None
        self._prepared: Draft | None = None  # that round, once its verdict came (`draft` sends it)
        # Asked before each pass of `draft`: True ends the draft short (the link is known dead, so
        # the round will not be verified on this stream: greedy answers only, whose text does not
        # depend on the rounds' lengths).
        self.give_up: Callable[[], bool] | None = None
        self._rows: dict[int, np.ndarray] = {}  # greedy: position -> the logits a draft was chosen from
        self.alt_tries = 0  # alternatives drafted
        self.alt_hits = 0  # of which the verdict was the one prepared for
        self._last = int(prompt_ids[-1])  # the last committed token
        self.reused = 0  # prompt tokens whose KV came from a retained session
        self.prefill_s = 0.0  # spent appending the prompt
        t0 = time.perf_counter()
        if reuse is not None:
            source, common = reuse
            keep = min(common, source.cached) - 1  # re-append at least one token: fresh logits
            self._gen, self.cached = source._gen, source.cached
            self._gen.rewind_to(keep)
            self.cached = keep
            self.reused = keep
        else:
            gen_params = og.GeneratorParams(drafter.model)
            gen_params.set_search_options(max_length=limit)
            self._gen = og.Generator(drafter.model, gen_params)
            self.cached = 0  # tokens in the generator's cache
            keep = 0
        self.prefill_s = time.perf_counter() - t0
        self._todo: list[int] = [int(t) for t in prompt_ids[keep:]]  # prompt tokens not yet in the cache
        self._lazy = lazy
        self.cancelled = cancelled
        if not lazy:
            self.prefill()
            self.prefill_s = time.perf_counter() - t0

    def prefill(self, stop: Callable[[], bool] | None = None) -> bool:
        """Build the cache over the prompt; True once it is whole. A lazy session's goes in passes
        of `PREFILL_CHUNK` tokens, and with `stop`, asked between them, it returns False early
        when that says so; any other in passes of `LONG_PREFILL_CHUNK`. Raises PrefillCancelled
        when the session's `cancelled` says so before a pass."""
        chunk = PREFILL_CHUNK if self._lazy else LONG_PREFILL_CHUNK
        while self._todo:
            if stop is not None and stop():
                return False
            if self.cancelled is not None and self.cancelled():
                raise PrefillCancelled(f"cancelled with {len(self._todo)} prompt tokens left to prefill")
            t0 = time.perf_counter()
            self._append(self._todo[:chunk])
            self._todo = self._todo[chunk:]
            self.prefill_s += time.perf_counter() - t0
        return True

    @property
    def reusable(self) -> bool:
        """It has a cache (in any mode: whether a later request may take it is that request's
        question, `reuses_kv`). Its first `len(tokens)` positions always hold its committed
        tokens (an unsettled draft, as the last round leaves it, only sits after them), and a
        reuse never keeps more than the common prefix with those."""
        return self.cached > 0

    def _append(self, ids: Sequence[int]) -> None:
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        self.cached += len(ids)
        self._logits = self._gen.get_logits()[0, -1]

    def _choose(self, logits: np.ndarray, position: int) -> tuple[int, np.ndarray | None]:
        if self._params.greedy:
            return int(np.argmax(logits)), None
        q = cap_support(logits_to_probs(logits, self._params), self._q_support)
        return sample(q, round_rng(self._seed, DRAFTER_STREAM, position)), q

    def draft(self, k: int, hint: Sequence[int] = (), min_len: int | None = None) -> Draft:
        """Propose up to k tokens; the cache grows by all but the last (which waits for the verdict).

        With `hint` (a guess at the continuation: retrieval's, `tandem_core.lookup`), the drafter
        checks the guess in one batched pass instead of one pass per token: while its own choice
        equals the hint the draft runs on, up to k; once the hint is spent or wrong it stops at
        `min_len` tokens (default k). The tokens are the drafter's own choices either way (argmax,
        or samples from q with the per-position keys), so the q rows sent are the ones it drew
        from; only a batched pass's rounding may differ from one pass per token.
        """
        self.prefill()
        if self._pending:
            raise RuntimeError("draft() called twice without commit()")
        # Never draft past the cache's capacity: commit may append the k-th draft plus one token.
        k = max(0, min(k, self.max_length - self.committed_len - 1))
        prepared = self._prepared
        if prepared is not None and not hint and k > 0:  # drafted while the verdict was in flight
            self._prepared = None
            n = min(k, len(prepared.tokens))  # its cache holds all but its last draft
            if n < len(prepared.tokens):
                self._gen.rewind_to(self.committed_len + n - 1)
                self.cached = self.committed_len + n - 1
            self._pending, self._pending_cached = prepared.tokens[:n], n - 1
            return Draft(prepared.tokens[:n], None)
        self._drop_prepared()
        stop = k if min_len is None else min(k, min_len)
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        if k > 0:
            self._pick(self._logits, tokens, qs)
        chunk = HINT_CHUNK
        while len(tokens) < k and not (self.give_up is not None and self.give_up()):
            n = len(tokens)
            alive = n < len(hint) and [int(t) for t in hint[:n]] == tokens
            if n >= stop and not alive:
                break
            # Append the last draft and, while the hint holds, the hint's next tokens: one pass
            # scores them all; keep the drafter's choices while they equal the hint. The batch
            # doubles while the hint keeps holding (a wrong hint costs a short pass, not a long one).
            ahead = [int(t) for t in hint[n:min(k, n + chunk)]] if alive else []
            chunk *= 2
            base = self.cached
            rows = self._append_rows([tokens[-1], *ahead])
            matched = 0
            while True:
                self._pick(rows[matched], tokens, qs)
                if matched < len(ahead) and tokens[-1] == ahead[matched]:
                    matched += 1
                    if len(tokens) < k:
                        continue
                break
            if base + 1 + matched < self.cached:  # drop the hint's tokens the drafter did not choose
                self._gen.rewind_to(base + 1 + matched)
                self.cached = base + 1 + matched
        self._pending = tuple(tokens)
        self._pending_cached = self.cached - self.committed_len
        return Draft(tuple(tokens), np.stack(qs) if qs else None)

    def _pick(self, logits: np.ndarray, tokens: list[int], qs: list[np.ndarray]) -> None:
        self._pick_at(logits, self.committed_len + len(tokens), tokens, qs)

    def _append_rows(self, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` in one pass; the logits after each of them, (len(ids), V)."""
        if len(ids) == 1:
            self._append(ids)
            return self._logits[None, :]
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        self.cached += len(ids)
        rows = np.asarray(self._gen.get_output("logits"))[0, -len(ids):]
        self._logits = rows[-1]
        return rows

    def adopt(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """Take drafts made elsewhere (retrieval, `tandem_core.lookup`) as the unsettled draft;
        returns those kept (as many as the cache has room for, like `draft`).

        Nothing is computed now (a lazy session's prefill too can wait): `commit` appends the
        committed tokens in one batched pass.
        """
        if self._pending:
            raise RuntimeError("adopt() called with a draft unsettled")
        self._drop_prepared()
        k = max(0, min(len(tokens), self.max_length - self.committed_len - 1))
        self._pending = tuple(int(t) for t in tokens[:k])
        self._pending_cached = 0
        return self._pending

    def draft_ahead(self, k: int, stop: Callable[[], bool] | None = None) -> tuple[int, Draft]:
        """On the guess that the unsettled draft is accepted whole: the drafter's choice for the
        target's next token, and up to k drafts after it (see the module doc). `stop`, asked
        before each pass, ends the drafting early (the verdict is in): fewer drafts, or none."""
        self.prefill()
        if stop is not None and stop():
            return -1, Draft((), None)
        if self._ahead is not None:
            raise RuntimeError("draft_ahead() called twice without commit()")
        if self._pending_cached < len(self._pending) - 1:
            raise RuntimeError("draft_ahead() needs the unsettled draft in the cache (not adopted)")
        base = self.committed_len + len(self._pending)  # the guessed token's position
        k = min(k, self.max_length - base - 2)
        if k <= 0:  # no room (or none asked): nothing ahead, and -1 matches no verdict
            return -1, Draft((), None)
        if self._pending:
            self._append(self._pending[-1:])
            if stop is not None and stop():  # the verdict came during that pass: its last draft is in the cache,
                self._pending_cached = len(self._pending)  # which commit handles like a rejected one
                return -1, Draft((), None)
        # The guess is the drafter's most likely token, in sampling mode too: it is only compared
        # with the target's (a hit is likelier than with a sample), never sent.
        guess = int(np.argmax(self._logits))
        if self._params.greedy:
            self._rows[base] = self._logits
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        self._append((guess,))
        self._pick_at(self._logits, base + 1, tokens, qs)
        while len(tokens) < k and not (stop is not None and stop()):
            self._append(tokens[-1:])
            self._pick_at(self._logits, base + 1 + len(tokens), tokens, qs)
        ahead = Draft(tuple(tokens), np.stack(qs) if qs else None)
        self._ahead = (guess, ahead)
        return guess, ahead

    def _pick_at(self, logits: np.ndarray, position: int, tokens: list[int], qs: list[np.ndarray]) -> None:
        if self._params.greedy:
            self._rows[position] = logits  # a reference: each pass returns a new array
        token, q = self._choose(logits, position)
        tokens.append(token)
        if q is not None:
            qs.append(q)

    def alternatives(self, draft: Draft, *, ahead: bool = False, width: int = MAX_WIDTH) -> list[Alternatives] | None:
        """The drafter's alternatives at each draft's position (`tandem_core.branching`) for the
        unsettled `draft` (with `ahead`: the round drafted ahead of it). Greedy: its next
        likeliest tokens under the logits the draft was chosen from; sampling: further draws
        without replacement from the q row sent, on the position's stream, whose first draw is
        the draft itself. None where that cannot be had (a copied draft has no logits)."""
        start = self.committed_len + (len(self._pending) + 1 if ahead else 0)
        out: list[Alternatives] = []
        for i, token in enumerate(draft.tokens):
            position = start + i
            if self._params.greedy:
                row = self._rows.get(position)
                if row is None:
                    return None
                z = np.exp(row - row.max(), dtype=np.float64)
                out.append(greedy_alternatives(z / z.sum(), int(token), width))
                continue
            if draft.q is None:
                return None
            draws = sample_without_replacement(draft.q[i], width + 1, round_rng(self._seed, DRAFTER_STREAM, position))
            if not draws or draws[0] != int(token):
                return None
            out.append(sampled_alternatives(draft.q[i], draws))
        return out

    @staticmethod
    def _top2(logits: np.ndarray) -> tuple[float, int, float]:
        """(p of the likeliest token, the second likeliest, its p) under the drafter's softmax."""
        top = np.argpartition(logits, -2)[-2:]
        first, second = (int(top[1]), int(top[0])) if logits[top[1]] >= logits[top[0]] else (int(top[0]), int(top[1]))
        z = np.exp(logits - logits[first], dtype=np.float64)
        total = float(z.sum())
        return 1.0 / total, second, float(z[second]) / total

    def draft_alternative(self, k: int, stop: Callable[[], bool] | None = None) -> bool:
        """Greedy, with a round drafted ahead and the verdict still in flight: prepare the round
        that follows the likeliest verdict other than the guess, and return whether one was.

        That verdict is taken as j drafts accepted and the drafter's second choice t at the next
        position (for j = every draft: the target's own token other than the guess), j chosen by
        the drafter's probabilities: prod_{i<j} p1_i * p2_j; none when that times k is below
        `REBUILD_PASSES` times the guess's own odds (prod p1_i over the round and the guess).
        The cache is rewound to keep the first j drafts, and t with up to k drafts after it are
        computed (`stop`, asked between passes, ends it early: fewer drafts). `commit` with that verdict keeps them as the next
        round, which `draft` then hands out without a pass; with the guessed verdict it rebuilds
        the round ahead in one batched pass; with another it rewinds as usual."""
        self.prefill()
        if not self._params.greedy or self._ahead is None or self._alt is not None or not self._pending:
            return False
        base, n = self.committed_len, len(self._pending)
        if self._pending_cached < n - 1 or self.cached < base + n:  # the whole draft is in the cache
            return False
        best: tuple[int, int] | None = None
        best_p, reach = 0.0, 1.0
        for j in range(n + 1):  # j drafts accepted, then the target's token at base + j
            row = self._rows.get(base + j)
            if row is None:
                break
            p1, second, p2 = self._top2(row)
            if second != (self._pending[j] if j < n else self._ahead[0]) and reach * p2 > best_p:
                best, best_p = (j, second), reach * p2
            reach *= p1
        k = min(k, self.max_length - (base + (best[0] if best else 0) + 1) - 2)
        # Worth it when the passes it may save beat the batched pass the guessed verdict would then
        # cost (rebuilding the round ahead), both weighed by the drafter's odds: after a confident
        # round the guess is likely and nothing is prepared.
        if best is None or k <= 0 or best_p * k <= REBUILD_PASSES * reach or (stop is not None and stop()):
            return False
        j, t = best
        self._gen.rewind_to(base + j)  # the first j drafts stay; the guess's branch goes
        self.cached = base + j
        self._append((t,))
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        self._pick_at(self._logits, base + j + 1, tokens, qs)
        while len(tokens) < k and not (stop is not None and stop()):
            self._append(tokens[-1:])
            self._pick_at(self._logits, base + j + 1 + len(tokens), tokens, qs)
        self._alt = (j, t, Draft(tuple(tokens), None))
        self.alt_tries += 1
        return True

    def _drop_prepared(self) -> None:
        """Forget a prepared round: the cache returns to the committed tokens, logits refreshed."""
        if self._prepared is not None:
            self._prepared = None
            self._gen.rewind_to(self.committed_len - 1)
            self.cached = self.committed_len - 1
            self._append((self._last,))

    @property
    def pending(self) -> tuple[int, ...]:
        """The unsettled draft's tokens (empty when settled)."""
        return self._pending

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        """Settle the last draft: keep `accepted` drafts, then append the target's token(s).

        A round drafted ahead whose guess the verdict confirms becomes the unsettled draft."""
        self.prefill()
        k = len(self._pending)
        if not 0 <= accepted <= k:
            raise ValueError(f"accepted={accepted} outside [0, {k}]")
        ahead, self._ahead = self._ahead, None
        alt, self._alt = self._alt, None
        self._rows = {p: v for p, v in self._rows.items() if p >= self.committed_len + len(tokens)}
        if alt is not None:
            j, t, prepared = alt
            said = tuple(int(x) for x in tokens)
            if accepted == j and said == (*self._pending[:j], t):  # the verdict prepared for
                self.committed_len += len(said)
                self.tokens.extend(said)
                self._last = t
                self._pending, self._pending_cached, self._prepared = (), 0, prepared
                self.alt_hits += 1
                return
            if ahead is not None and accepted == k and said == (*self._pending, ahead[0]):
                # The guess held after all: rebuild the round ahead in one batched pass.
                self._gen.rewind_to(self.committed_len + j)
                self.cached = self.committed_len + j
                self._append([*self._pending[j:], ahead[0], *ahead[1].tokens[:-1]])
            else:  # only the first j drafts are still in the cache
                self._pending_cached = min(self._pending_cached, j)
        if ahead is not None:
            guess, drafts = ahead
            if accepted == k and tuple(int(t) for t in tokens) == (*self._pending, guess):
                self.committed_len += len(tokens)
                self.tokens.extend(int(t) for t in tokens)
                self._last = guess
                self._pending = drafts.tokens
                self._pending_cached = self.cached - self.committed_len
                return
        appended = self._pending_cached  # drafts already in the cache
        if self.cached > self.committed_len + min(accepted, appended):  # rejected drafts, or a round ahead
            appended = min(accepted, appended)
            self._gen.rewind_to(self.committed_len + appended)
            self.cached = self.committed_len + appended
        # Append what the cache lacks of the committed tokens: the accepted k-th draft (if any)
        # and the target's correction or bonus token.
        new = [int(t) for t in tokens][min(accepted, appended):]
        self._pending, self._pending_cached = (), 0
        self.committed_len += len(tokens)
        self.tokens.extend(int(t) for t in tokens)
        if tokens:
            self._last = int(tokens[-1])
        if new:
            self._append(new)

    def rollback(self) -> None:
        """Drop the unsettled draft: the cache and logits return to the last committed token.

        Used when a round gets no verdict (the link broke) and generation goes on locally.
        Rewinding keeps stale logits, so rewind one further and re-append the last committed
        token, which recomputes them exactly.
        """
        self.prefill()
        self._pending, self._pending_cached, self._ahead = (), 0, None
        self._alt = self._prepared = None
        if self.cached > self.committed_len:
            self._gen.rewind_to(self.committed_len - 1)
            self.cached = self.committed_len - 1
            self._append((self._last,))

    def generate(self, *, max_new_tokens: int, eos_ids: frozenset[int], lookup: SuffixIndex | None = None
                 ) -> Iterator[int]:
        """On-device generation: the drafter's own choices, one forward pass per token.

        With `lookup` (a suffix index whose live stream is the text so far), a continuation the
        index proposes is checked in one batched pass and the tokens the drafter itself would
        choose are kept (self-speculation: the same tokens, fewer passes, up to a batched
        pass's rounding). The index is extended with every token.
        """
        self.prefill()
        self._drop_prepared()
        budget = min(max_new_tokens, self.max_length - self.committed_len)
        produced = 0
        while produced < budget:
            left = budget - produced
            proposal = lookup.propose(min(left, LOCAL_HINT)) if lookup is not None and left > 1 else None
            if proposal is not None and proposal.match_len >= MIN_MATCH:
                chunk = list(self.draft(left, hint=proposal.tokens, min_len=1).tokens)
                chunk = chunk[:next((i + 1 for i, t in enumerate(chunk) if t in eos_ids), len(chunk))]
                self.commit(len(chunk), chunk)
            else:
                token, _ = self._choose(self._logits, self.committed_len)
                chunk = [token]
                self.committed_len += 1
                self.tokens.append(token)
                self._last = token
            if lookup is not None:
                lookup.extend(chunk)
            produced += len(chunk)
            yield from chunk  # before the next pass: a token is out as soon as it is chosen
            if chunk[-1] in eos_ids:
                return
            if proposal is None or proposal.match_len < MIN_MATCH:
                self._append(chunk)
