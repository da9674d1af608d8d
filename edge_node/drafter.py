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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tandem_core.loop import Draft
from tandem_core.sampling import DRAFTER_STREAM, SamplingParams, cap_support, logits_to_probs, round_rng, sample

log = logging.getLogger(__name__)

# In sampling mode each draft is sampled from q capped to its most likely tokens, so a q row
# crosses the wire as at most this many (id, prob) pairs (see tandem_core.sampling.cap_support).
DEFAULT_Q_SUPPORT = 64


class DrafterModel:
    """The loaded ONNX drafter; sessions share it and own their generators (KV caches)."""

    def __init__(self, model_dir: str | Path) -> None:
        import onnxruntime_genai as og

        self._og = og
        self.model = og.Model(str(model_dir))
        self.tokenizer = og.Tokenizer(self.model)
        self.context_length, self.eos_ids, self.vocab_size = _read_config(model_dir)
        log.info("loaded drafter %s (context %d)", model_dir, self.context_length)

    def new_session(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        *,
        max_length: int | None = None,
        q_support: int = DEFAULT_Q_SUPPORT,
    ) -> DrafterSession:
        return DrafterSession(self, prompt_ids, params, seed, max_length=max_length, q_support=q_support)

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
    ) -> None:
        if len(prompt_ids) < 1:
            raise ValueError("prompt must hold at least one token")
        og = drafter._og
        limit = min(max_length or drafter.context_length, drafter.context_length)
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_length {limit}")
        gen_params = og.GeneratorParams(drafter.model)
        gen_params.set_search_options(max_length=limit)
        self._gen = og.Generator(drafter.model, gen_params)
        self._params = params
        self._seed = seed
        self._q_support = q_support
        self.max_length = limit
        self.committed_len = len(prompt_ids)
        self._pending: tuple[int, ...] = ()  # drafts proposed but not yet settled by commit
        self._last = int(prompt_ids[-1])  # the last committed token
        self._append(prompt_ids)

    def _append(self, ids: Sequence[int]) -> None:
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        self._logits = self._gen.get_logits()[0, -1]

    def _choose(self, logits: np.ndarray, position: int) -> tuple[int, np.ndarray | None]:
        if self._params.greedy:
            return int(np.argmax(logits)), None
        q = cap_support(logits_to_probs(logits, self._params), self._q_support)
        return sample(q, round_rng(self._seed, DRAFTER_STREAM, position)), q

    def draft(self, k: int) -> Draft:
        """Propose k tokens; the cache grows by k-1 (the last draft waits for the verdict)."""
        if self._pending:
            raise RuntimeError("draft() called twice without commit()")
        # Never draft past the cache's capacity: commit may append the k-th draft plus one token.
        k = max(0, min(k, self.max_length - self.committed_len - 1))
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        for i in range(k):
            if i > 0:
                self._append((tokens[-1],))
            token, q = self._choose(self._logits, self.committed_len + i)
            tokens.append(token)
            if q is not None:
                qs.append(q)
        self._pending = tuple(tokens)
        return Draft(tuple(tokens), np.stack(qs) if qs else None)

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        """Settle the last draft: keep `accepted` drafts, then append the target's token(s)."""
        k = len(self._pending)
        if not 0 <= accepted <= k:
            raise ValueError(f"accepted={accepted} outside [0, {k}]")
        appended = max(k - 1, 0)  # drafts already in the cache
        if accepted < appended:
            self._gen.rewind_to(self.committed_len + accepted)
        # Append what the cache lacks of the committed tokens: the accepted k-th draft (if any)
        # and the target's correction or bonus token.
        new = [int(t) for t in tokens][min(accepted, appended):]
        self._pending = ()
        self.committed_len += len(tokens)
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
        appended = max(len(self._pending) - 1, 0)
        self._pending = ()
        if appended:
            self._gen.rewind_to(self.committed_len - 1)
            self._append((self._last,))

    def generate(self, *, max_new_tokens: int, eos_ids: frozenset[int]) -> Iterator[int]:
        """On-device generation: one forward pass per token, no verification."""
        budget = min(max_new_tokens, self.max_length - self.committed_len)
        for _ in range(budget):
            token, _ = self._choose(self._logits, self.committed_len)
            self.committed_len += 1
            self._last = token
            yield token
            if token in eos_ids:
                return
            self._append((token,))
