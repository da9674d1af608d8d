"""The target scorer: transformers + PyTorch, one KV cache per session.

Guarantees:
- A `ScorerSession`'s cache holds every committed token except the last one. `score(drafts)`
  runs ONE forward pass over [last committed token, *drafts] and returns (k+1, V) float32 logits;
  `commit` crops the rejected drafts from the cache, so the next round starts exactly where a
  plain decoder would be.
- `generate` is plain target-only decoding through the same session machinery (cloud-only
  generation), so speculative and target-only runs share one numeric path.
- dtype is bf16 by default (fast on CPUs with AVX-512 BF16) and fp32 on request; the exactness
  tests use fp32, where batched and one-at-a-time scoring agree.
- With `small_m_kernel` (the default), the session's own forward passes run Linear layers on 2..16
  rows (verification of 1..15 drafts) through the native kernel in `cloud_node.kernels` (fp32
  accumulation, one read of each weight); everything else, including transformers `generate` on
  `TargetModel.model`, stays stock PyTorch.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem_core.sampling import SamplingParams, logits_to_probs, sample

log = logging.getLogger(__name__)

PREFILL_CHUNK = 16  # rows per prefill pass when the small-M kernel is installed (its max_rows)

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


def torch_dtype(name: str):  # -> torch.dtype
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return torch.bfloat16 if name == "bf16" else torch.float32


class TargetModel:
    """The loaded target model; sessions share its weights and own their caches."""

    def __init__(self, model_dir: str | Path, dtype: str = "bf16", small_m_kernel: bool | None = None) -> None:
        """`small_m_kernel`: None picks by CPU (on where the CPU has no native bf16 matmul),
        True forces it where it can load, False keeps torch everywhere."""
        from transformers import AutoModelForCausalLM

        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype))
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 32768))
        log.info("loaded target %s (%s, vocab %d)", model_dir, dtype, self.vocab_size)
        self.small_m_layers = self._install_small_m_kernel(bool(small_m_kernel)) if small_m_kernel is not False else 0
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

    def _install_small_m_kernel(self, forced: bool) -> int:
        """Number of Linear layers the sessions' forwards may route to the small-M kernel."""
        from cloud_node.kernels import install_small_m_linear
        from cloud_node.kernels.build import native_bf16_matmul

        if not forced and native_bf16_matmul():
            log.info("small-M kernel not installed: this CPU has native bf16 matmuls (AVX512-BF16/AMX), "
                     "where torch's are faster; prefill runs in one pass")
            return 0

        patched = install_small_m_linear(self.model)
        if patched:
            log.info("small-M kernel: %d Linear layers patched (active only in scorer forwards)", patched)
        else:
            log.info("small-M kernel not installed (unavailable here, see the warning above); using torch")
        return patched

    def new_session(self, prompt_ids: Sequence[int]) -> ScorerSession:
        return ScorerSession(self, prompt_ids)


class ScorerSession:
    """One request's view of the target: committed tokens plus a KV cache."""

    def __init__(self, target: TargetModel, prompt_ids: Sequence[int]) -> None:
        from transformers import DynamicCache

        if len(prompt_ids) < 1:
            raise ValueError("prompt must hold at least one token")
        self._target = target
        self.committed: list[int] = [int(t) for t in prompt_ids]
        self._check_ids(self.committed)
        self._cache = DynamicCache(config=target.model.config)
        self.forwards = 0
        self._prefill(self.committed[:-1])

    def _prefill(self, ids: Sequence[int]) -> None:
        """Fill the cache with `ids`. With the kernel, in chunks it handles (each chunk reads the
        weights once), since stock bf16 matmuls on CPUs without AVX-512 BF16 cost about one
        single-token pass PER ROW; each chunk counts as one target forward pass."""
        step = PREFILL_CHUNK if self._target.small_m_layers else max(len(ids), 1)
        for start in range(0, len(ids), step):
            self._forward(ids[start:start + step], keep=1)  # logits unused

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self._target.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self._target.vocab_size}): {bad[:5]}")

    def _forward(self, ids: Sequence[int], keep: int) -> np.ndarray:
        import torch

        from cloud_node.kernels import small_m_kernel_enabled

        kernel = small_m_kernel_enabled() if self._target.small_m_layers else contextlib.nullcontext()
        with torch.inference_mode(), kernel:
            out = self._target.model(
                input_ids=torch.tensor([list(ids)], dtype=torch.long),
                cache=self._cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        self.forwards += 1
        return out.logits[0].float().numpy()

    @property
    def cached_len(self) -> int:
        return int(self._cache.get_seq_length())

    def score(self, draft_tokens: Sequence[int]) -> np.ndarray:
        """Logits (k+1, V) for [last committed, *drafts], in one forward pass."""
        drafts = [int(t) for t in draft_tokens]
        self._check_ids(drafts)
        return self._forward([self.committed[-1], *drafts], keep=len(drafts) + 1)

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        # Cache now covers committed + drafts; keep committed + the accepted drafts.
        surplus = self.cached_len - (len(self.committed) + accepted)
        if surplus > 0:
            self._cache.crop(-surplus)  # transformers 5: a negative value removes that many
        self.committed.extend(int(t) for t in tokens)

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
