"""In-process generation on one machine: prompt encoding and the four ways to generate.

Guarantees:
- `LocalPair` loads the target (transformers) and the drafter (onnxruntime-genai) once and runs
  `target` (transformers `generate`), `assisted` (transformers assisted generation, when a torch
  copy of the drafter is given), `drafter` (ONNX alone) and `tandem` (the speculative loop).
- Every method returns a `GenerationResult` with the same fields, measured the same way: wall time,
  time to first token, and process CPU seconds split between the edge side (drafter) and the
  cloud side (target). Runs are sequential in one process, so process CPU time is attributable.
- Greedy `tandem` output equals greedy `target` output in fp32 (tested); in bf16 a near-tie can
  flip, which the benchmark measures and reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_node.scorer import read_eos_ids
from tandem.limits import MAX_DRAFT_LEN
from tandem_core.branching import DEFAULT_TREE_NODES
from tandem_core.lookup import LookupDrafter
from tandem_core.loop import Draft, TargetVerifier, speculative_generate
from tandem_core.sampling import SamplingParams, resolve_seed
from tandem_core.stats import RequestStats
from tandem_core.suffix_index import SuffixIndex

OnTokens = Callable[[Sequence[int]], None]


@dataclass(frozen=True)
class GenerationResult:
    method: str
    tokens: tuple[int, ...]  # generated tokens, EOS included when emitted
    ttft_s: float  # from the call to the first generated token
    wall_s: float
    edge_cpu_s: float | None  # process CPU seconds spent in the drafter; None if unused
    cloud_cpu_s: float | None  # process CPU seconds spent in the target; None if unused
    stats: RequestStats | None  # speculative statistics; None where they do not apply
    target_forwards: int | None  # target forward passes, prefill included; None if no target
    bytes_up: int | None = None  # networked methods: message bytes edge -> cloud
    bytes_down: int | None = None  # networked methods: message bytes cloud -> edge
    messages: int | None = None  # cloud_stream: response messages (its "rounds")


class Meter:
    """Accumulates process CPU seconds and wall seconds over the calls it wraps."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> Meter:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_s += time.process_time() - self._cpu0
        self.wall_s += time.perf_counter() - self._wall0


class _Metered:
    """Calls to `inner`, metered; its optional methods (`OPTIONAL`, looked up with getattr by
    `tandem_core.loop`) are exposed exactly when `inner` has them, so wrapping changes no choice
    the loop makes."""

    OPTIONAL: frozenset[str] = frozenset()

    def __init__(self, inner: Any, meter: Meter) -> None:
        self.inner, self.meter = inner, meter

    def __getattr__(self, name: str) -> Any:
        if name not in type(self).OPTIONAL:
            raise AttributeError(name)
        method = getattr(self.inner, name)  # AttributeError when the inner lacks it

        def metered(*args: Any, **kwargs: Any) -> Any:
            with self.meter:
                return method(*args, **kwargs)

        return metered

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        with self.meter:
            self.inner.commit(accepted, tokens)


class _MeteredDraft(_Metered):
    """A `DraftSession`, metered: `draft_ahead`, `prefill`, `draft_alternative` and `adopt`
    pass through when the drafter has them."""

    OPTIONAL = frozenset({"draft_ahead", "prefill", "draft_alternative", "adopt"})

    def draft(self, k: int) -> Draft:
        with self.meter:
            return self.inner.draft(k)

    def rollback(self) -> None:
        with self.meter:
            self.inner.rollback()


class _MeteredScore(_Metered):
    """A `ScoreSession`, metered: `score_tree` and `commit_path` (a `TreeScoreSession`) pass
    through when the scorer has them."""

    OPTIONAL = frozenset({"score_tree", "commit_path"})

    def score(self, draft_tokens: Sequence[int]) -> Any:
        with self.meter:
            return self.inner.score(draft_tokens)


class _FirstTokenStreamer:
    """A transformers streamer that records when generated tokens arrive and forwards them."""

    def __init__(self, on_tokens: OnTokens | None) -> None:
        self.on_tokens = on_tokens
        self.first_at: float | None = None
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if self.on_tokens is not None:
            self.on_tokens([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


def hf_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    if params.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": params.temperature, "top_k": params.top_k or None,
            "top_p": params.top_p}


class LocalPair:
    """The drafter and the target in one process."""

    def __init__(self, target_dir: str | Path, drafter_onnx_dir: str | Path | None, *,
                 dtype: str = "bf16", drafter_hf_dir: str | Path | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cloud_node.scorer import TargetModel, torch_dtype
        from edge_node.drafter import DrafterModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
        self.target = TargetModel(target_dir, dtype=dtype)
        self.drafter = DrafterModel(drafter_onnx_dir) if drafter_onnx_dir else None
        self.assistant = None
        if drafter_hf_dir is not None:
            self.assistant = AutoModelForCausalLM.from_pretrained(str(drafter_hf_dir), dtype=torch_dtype(dtype)).eval()
        self.eos_ids = read_eos_ids(target_dir)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.eos_ids])

    def _hf_generate(self, method: str, prompt_ids: Sequence[int], params: SamplingParams,
                     max_new_tokens: int, on_tokens: OnTokens | None, **extra: Any) -> GenerationResult:
        import torch

        streamer = _FirstTokenStreamer(on_tokens)
        forwards = [0]
        hook = self.target.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        if params.seed is not None:
            torch.manual_seed(params.seed)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        t0, meter = time.perf_counter(), Meter()
        try:
            with meter, torch.inference_mode():
                out = self.target.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                    min_new_tokens=0, eos_token_id=sorted(self.eos_ids), pad_token_id=min(self.eos_ids),
                    streamer=streamer, **hf_sampling_kwargs(params), **extra)
        finally:
            hook.remove()  # a failed generate must not leave the counter on the shared model
        tokens = tuple(int(t) for t in out[0, len(prompt_ids):].tolist())
        first = streamer.first_at if streamer.first_at is not None else time.perf_counter()
        return GenerationResult(method, _strip_pad(tokens, self.eos_ids), first - t0, meter.wall_s,
                                None, meter.cpu_s, None, forwards[0])

    def target_generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, max_new_tokens: int,
                        on_tokens: OnTokens | None = None) -> GenerationResult:
        """Target alone, with transformers `generate`."""
        return self._hf_generate("target", prompt_ids, params, max_new_tokens, on_tokens)

    def assisted_generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, draft_len: int,
                          max_new_tokens: int, on_tokens: OnTokens | None = None) -> GenerationResult:
        """transformers assisted generation with the torch copy of the drafter."""
        if self.assistant is None:
            raise ValueError("assisted generation needs drafter_hf_dir")
        self.assistant.generation_config.num_assistant_tokens = draft_len
        return self._hf_generate("assisted", prompt_ids, params, max_new_tokens, on_tokens,
                                 assistant_model=self.assistant)

    def drafter_generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, max_new_tokens: int,
                         on_tokens: OnTokens | None = None, lookup: bool = True) -> GenerationResult:
        """The ONNX drafter alone: on-device generation (with `lookup`, self-speculation on
        continuations of the prompt and the answer so far, as on the edge's local route)."""
        assert self.drafter is not None
        seed = resolve_seed(params.seed)
        t0, meter = time.perf_counter(), Meter()
        with meter:
            session = self.drafter.new_session(prompt_ids, params, seed,
                                               max_length=len(prompt_ids) + max_new_tokens + 1)
            index = SuffixIndex.over(prompt_ids) if lookup else None
            tokens, first = _drain(session.generate(max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                                                    lookup=index), on_tokens, single=True)
            self.drafter.retain(session)  # as the edge does: the next method finds the same drafter KV
        return GenerationResult("drafter" if lookup else "drafter_model", tokens, first - t0, meter.wall_s,
                                meter.cpu_s, None, None, None)

    def cloud_only_generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, max_new_tokens: int,
                            on_tokens: OnTokens | None = None) -> GenerationResult:
        """The product's own target-only path (what the cloud's Generate runs): one target
        round with no drafts per token, through the same engine and verification code."""
        seed = resolve_seed(params.seed)
        cloud = Meter()
        t0 = time.perf_counter()
        with cloud:
            s = self.target.new_session(prompt_ids)
        verifier = TargetVerifier(_MeteredScore(s, cloud), params, seed=seed, start=len(prompt_ids),
                                  max_new_tokens=max_new_tokens, eos_ids=self.eos_ids)

        def rounds() -> Iterator[tuple[int, ...]]:
            while True:
                verdict = verifier.verify(Draft((), None))
                yield verdict.tokens
                if verdict.finished:
                    return

        tokens, first = _drain(rounds(), on_tokens, single=False)
        return GenerationResult("cloud_only", tokens, first - t0, time.perf_counter() - t0, None, cloud.cpu_s,
                                None, s.forwards)

    def speculative_generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, draft_len: int,
                             max_new_tokens: int, on_tokens: OnTokens | None = None,
                             lookup: bool = True, pipeline: bool = False,
                             tree_nodes: int = DEFAULT_TREE_NODES) -> GenerationResult:
        """Tandem speculative decoding, drafter and target in this process (with `lookup`,
        retrieval drafts as on the edge: `edge_node.generation.generate_speculative`).

        `pipeline` runs the edge's pipelined rounds (round 1 with no drafts, each next round
        drafted on a guess before the verdict; `tandem_core.loop`): the same rounds, so the same
        tokens as the edge with pipelining for a seed. In one process nothing runs while a round
        is verified, so it only reorders work (and drafts in vain where a guess fails): off by
        default here. `tree_nodes`: draft trees as on the edge (0: chains only)."""
        assert self.drafter is not None
        seed = resolve_seed(params.seed)
        edge, cloud, stats = Meter(), Meter(), RequestStats()
        t0 = time.perf_counter()
        with edge:
            per_round = lookup or draft_len == 0  # retrieval, or the adaptive length
            longest = MAX_DRAFT_LEN if per_round else draft_len
            d = self.drafter.new_session(prompt_ids, params, seed,
                                         max_length=len(prompt_ids) + max_new_tokens + longest + 2)
        with cloud:
            s = self.target.new_session(prompt_ids)
        stats.add_target_forwards(s.forwards)  # the prefill pass
        verifier = TargetVerifier(_MeteredScore(s, cloud), params, seed=seed, start=len(prompt_ids),
                                  max_new_tokens=max_new_tokens, eos_ids=self.eos_ids)
        inner: Any = d
        if per_round:
            inner = LookupDrafter.over(d, prompt_ids, model_len=draft_len or None,
                                       vocab=None if params.greedy else self.drafter.vocab_size, retrieval=lookup,
                                       trees=(lambda: tree_nodes) if tree_nodes > 0 else None)
        drafts = _MeteredDraft(inner, edge)
        if pipeline:
            verifier.submit(Draft((), None))
        rounds = speculative_generate(drafts, verifier, draft_len=MAX_DRAFT_LEN if per_round else draft_len,
                                      max_new_tokens=max_new_tokens, stats=stats, pipeline=pipeline,
                                      first_sent=pipeline)
        chunks = (verdict.tokens for verdict in rounds)
        tokens, first = _drain(chunks, on_tokens, single=False)
        self.drafter.retain(d)  # as the edge does
        wall = time.perf_counter() - t0
        return GenerationResult("tandem" if lookup else "tandem_model", tokens, first - t0, wall, edge.cpu_s, cloud.cpu_s, stats,
                                stats.target_forwards)


def _drain(items: Iterator[Any], on_tokens: OnTokens | None, *, single: bool) -> tuple[tuple[int, ...], float]:
    """Collect a token stream, forwarding each piece and noting when the first one arrived."""
    tokens: list[int] = []
    first: float | None = None
    for item in items:
        piece = [item] if single else list(item)
        if first is None:
            first = time.perf_counter()
        tokens.extend(piece)
        if on_tokens is not None:
            on_tokens(piece)
    return tuple(tokens), first if first is not None else time.perf_counter()


def _strip_pad(tokens: tuple[int, ...], eos_ids: frozenset[int]) -> tuple[int, ...]:
    """generate() pads after EOS in batches; keep up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens
