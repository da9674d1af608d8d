"""The target scorer: transformers weights, Tandem's batched engine, one KV cache per session.

Guarantees:
- A `ScorerSession`'s cache holds every committed token except the last one. `score(drafts)`
  runs [last committed token, *drafts] through the target and returns (k+1, V) float32 logits;
  `commit` crops the rejected drafts from the cache, so the next round starts exactly where a
  plain decoder would be. One exception, right after the prefill: the prefill runs the whole
  prompt and keeps its last row's logits, so the first round's row 0 costs no pass (round 1 with
  no drafts, the first token of every answer, is then answered from the prefill alone); by the
  engine's batch invariance that row is bit-equal to the one a round would compute. A tree as
  the first round drops the prompt's last token from the cache and scores it as usual.
- Draft trees (`tandem_core.loop.TreeScoreSession`): `score_tree(tokens, parents)` runs the last
  committed token and the n nodes through the target in ONE pass with tree attention and returns
  (n+1, V) float32 logits laid out as `tandem_core.tree.verify_tree` takes them; each row is
  bit-equal to the one a chain round over that node's path would give (`cloud_node.engine`).
  `commit_path(path, tokens)` keeps the cache of the accepted path only, so the cache is then
  exactly what a chain round over the path would have left. A tree left pending by a failed
  round (scored, never committed) is dropped by the next `score`, `score_tree` or `commit`, and
  a bad path drops it too: the cache never holds more than the committed tokens but the last
  (after a tree's first round; before it, all of them, as above).
- Every forward pass goes through `cloud_node.batcher`: the rows of all sessions scoring or
  prefilling at the same time share one pass of `cloud_node.engine`, whose results do not depend
  on the batch (see there). So a session's logits are the same alone, batched, chunked or resumed.
- A session may start from a prefix of another cache (`prefix=(cache, n)`): the KV of those n
  tokens is copied and only the rest is prefilled; by the same invariance the result equals a
  full prefill bit for bit.
- `generate` is plain target-only decoding through the same session machinery (cloud-only
  generation), so speculative and target-only runs share one numeric path.
- dtype is bf16 by default and fp32 on request. The tile plan comes from `cloud_node.autotune`
  (checked and timed on this CPU at the first start, then cached), or is given.
- transformers `generate` on `TargetModel.model` (the bench's "target" baseline) stays stock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cloud_node.batcher import Pass
from cloud_node.engine import Rows, TilePlan
from tandem_core.sampling import SamplingParams, logits_to_probs, sample

log = logging.getLogger(__name__)

DTYPES = ("bf16", "fp32")


def read_eos_ids(model_dir: str | Path) -> frozenset[int]:
    """End-of-sequence ids from the model's generation_config.json (else config.json)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset(eos if isinstance(eos, list) else [eos])
    raise ValueError(f"no eos_token_id in {model_dir}")


def encode_prompt(tokenizer: Any, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Chat messages go through the model's chat template; a plain prompt is encoded as is."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if messages is not None:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return [int(t) for t in ids]


def torch_dtype(name: str) -> Any:  # a torch.dtype
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return torch.bfloat16 if name == "bf16" else torch.float32


class TargetModel:
    """The loaded target model; sessions share its weights and batcher and own their caches."""

    def __init__(self, model_dir: str | Path, dtype: str = "bf16", *, plan: TilePlan | None = None,
                 max_batch_rows: int = 64, batch_window_ms: float = 20.0) -> None:
        from transformers import AutoModelForCausalLM

        from cloud_node.autotune import choose_plan
        from cloud_node.batcher import Batcher
        from cloud_node.engine import Engine

        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype))
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 32768))
        log.info("loaded target %s (%s, vocab %d)", model_dir, dtype, self.vocab_size)
        if plan is None:
            plan = choose_plan(tune_weights(self.model), head_dim=_head_dim(self.model.config),
                               group=_group(self.model.config), dtype=dtype)
        self.plan = plan
        self.engine = Engine(self.model, plan)
        self.batcher = Batcher(self.engine, max_rows=max(max_batch_rows, 17), window_ms=batch_window_ms)
        log.info("engine: %s; passes of at most %d rows", plan.describe(), self.batcher.max_rows)
        self.warmup()

    def warmup(self) -> float:
        """One throwaway prefill and round, so the first request does not pay torch's first-call
        costs (allocator growth, kernel selection); returns the seconds it took."""
        import time

        t0 = time.perf_counter()
        session = self.new_session([i % self.vocab_size for i in range(1, 33)])
        session.score([1, 2, 3, 4])
        took = time.perf_counter() - t0
        log.info("warm-up prefill + round took %.2f s", took)
        return took

    def new_session(self, prompt_ids: Sequence[int], *, prefix: tuple[Any, int] | None = None,
                    cancelled: Callable[[], bool] | None = None) -> ScorerSession:
        """A session over `prompt_ids`, prefilled; `cancelled` stops the prefill between chunks
        (SessionGone, see `cloud_node.batcher`)."""
        return ScorerSession(self, prompt_ids, prefix=prefix, cancelled=cancelled)

    def close(self) -> None:
        self.batcher.close()


def tune_weights(model: Any) -> list[Any]:
    """One decoder layer's linear weights and the output head's: the shapes every pass runs."""
    layer = model.model.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    return [att.q_proj.weight, att.k_proj.weight, att.o_proj.weight, mlp.gate_proj.weight,
            mlp.up_proj.weight, mlp.down_proj.weight, model.lm_head.weight]


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _group(cfg: Any) -> int:
    return int(cfg.num_attention_heads) // int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


class ScorerSession:
    """One request's view of the target: committed tokens plus a KV cache."""

    def __init__(self, target: TargetModel, prompt_ids: Sequence[int], *,
                 prefix: tuple[Any, int] | None = None, cancelled: Callable[[], bool] | None = None) -> None:
        """`prefix`: (a KVCache or ScorerSession, n) whose first n positions' KV this session reuses."""
        if len(prompt_ids) < 1:
            raise ValueError("prompt must hold at least one token")
        self._target = target
        self.committed: list[int] = [int(t) for t in prompt_ids]
        self._check_ids(self.committed)
        self.cache = target.engine.new_cache()
        self.forwards = 0  # passes this session took part in
        self.prefilled = 0  # tokens it ran through the target to build its cache
        self.reused = 0  # tokens whose KV it copied from a prefix
        self.last_pass = Pass()
        # The prefill's last row: logits after the last committed token, whose KV is then cached
        # (see the module doc); the first `score` uses it, anything else drops it.
        self._next: np.ndarray | None = None
        if prefix is not None:
            source, length = prefix
            if isinstance(source, ScorerSession):
                source = source.cache
            length = min(length, len(self.committed) - 1)
            if length > 0:
                self.cache.copy_prefix_from(source, length)
                self.reused = length
        ids = self.committed[self.reused:]  # at least the last token: its row is the first round's row 0
        logits, info = self._target.batcher.run(self.cache, ids, 1, prefill=True, cancelled=cancelled)
        self.forwards += info.passes
        self.prefilled += len(ids) - 1  # the last token is the first round's row, counted there before
        self.last_pass = info
        self._next = logits[-1].copy()

    def _drop_next(self) -> None:
        """Back to the usual state: the cache without the last committed token."""
        if self._next is not None:
            self._next = None
            self.cache.crop(len(self.committed) - 1)

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self._target.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self._target.vocab_size}): {bad[:5]}")

    @property
    def cached_len(self) -> int:
        return self.cache.length

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def compact(self) -> None:
        self.cache.compact()

    def score(self, draft_tokens: Sequence[int]) -> np.ndarray:
        """Logits (k+1, V) for [last committed, *drafts]."""
        drafts = [int(t) for t in draft_tokens]
        self._check_ids(drafts)
        self._drop_tree()
        if self._next is not None:  # row 0 came with the prefill: only the drafts need a pass
            first, self._next = self._next[None], None
            if not drafts:
                self.last_pass = Pass()
                return first
            logits, info = self._target.batcher.run(self.cache, drafts, len(drafts))
            self.forwards += info.passes
            self.last_pass = info
            return np.concatenate([first, logits])
        logits, info = self._target.batcher.run(self.cache, [self.committed[-1], *drafts], len(drafts) + 1)
        self.forwards += info.passes
        self.last_pass = info
        return logits

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        """After `score`: keep the accepted drafts' cache and record `tokens` as committed."""
        self._drop_next()
        if self.cache.tree is not None:
            self._drop_tree()
            raise ValueError("commit after score_tree: a tree's verdict is committed with commit_path")
        # Cache now covers committed + drafts; keep committed + the accepted drafts.
        surplus = self.cached_len - (len(self.committed) + accepted)
        if surplus > 0:
            self.cache.crop(self.cached_len - surplus)
        self.committed.extend(int(t) for t in tokens)

    def score_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        """Logits (n+1, V) for a draft tree (`tandem_core.tree`'s convention: parents[i] < i, -1 a
        child of the last committed token) in one pass: row 0 after the last committed token,
        row 1 + i after node i. The cache holds the tree until `commit_path`."""
        drafts = [int(t) for t in tokens]
        self._check_ids(drafts)
        self._drop_tree()
        self._drop_next()
        rows = Rows.for_tree(self.cache, self.committed[-1], drafts, parents)  # ValueError if malformed
        logits, info = self._target.batcher.run(self.cache, rows.ids, rows.keep, parents=rows.parents)
        self.forwards += info.passes
        self.last_pass = info
        return logits

    def commit_path(self, path: Sequence[int], tokens: Sequence[int]) -> None:
        """After `score_tree`: keep the cache of `path` (node indices, root to leaf, as in
        `TreeVerdict.path`), drop the rest of the tree and record `tokens` (the path's tokens and
        the target's next, possibly cut short by the verdict) as committed. On a bad path the
        tree is dropped and ValueError raised; nothing is committed."""
        nodes = [int(i) for i in path]
        try:
            if self.cache.tree is None:
                raise ValueError("commit_path needs a score_tree before it")
            if not len(nodes) <= len(tokens) <= len(nodes) + 1:
                raise ValueError(f"a path of {len(nodes)} nodes commits {len(nodes)} or {len(nodes) + 1} tokens, "
                                 f"got {len(tokens)}")
            self.cache.accept([0, *(1 + i for i in nodes)])
        except ValueError:
            self._drop_tree()
            raise
        self.committed.extend(int(t) for t in tokens)

    def _drop_tree(self) -> None:
        """Crop a tree scored but never committed (a failed round): back to the committed tokens."""
        if self.cache.tree is not None:
            self.cache.crop(self.cache.tree[0])

    def generate(
        self,
        params: SamplingParams,
        rng: np.random.Generator,
        *,
        max_new_tokens: int,
        eos_ids: frozenset[int],
    ) -> Iterator[int]:
        """Target-only decoding: one forward pass per token."""
        for _ in range(max_new_tokens):
            logits = self.score(())[0]
            token = int(np.argmax(logits)) if params.greedy else sample(logits_to_probs(logits, params), rng)
            self.commit(0, (token,))
            yield token
            if token in eos_ids:
                return
