"""Generation on the edge: speculative against the remote cloud verifier, or on the device alone.

Guarantees:
- Speculative: the drafter's KV cache stays here; each round sends drafts (and, in sampling
  mode, the sparse q rows) and commits exactly the verdict's tokens, so greedy output equals the
  target's and sampling follows the target's distribution.
- A broken link or a late verdict resumes on a fresh stream carrying the committed tokens,
  up to `max_resumes` times per request with backoff; the same round is then re-verified. No
  committed token is lost or repeated: `on_tokens` sees each token once, in order.
- Every result carries the statistics the edge service reports (`EdgeResult`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge_node.cloud_link import CloudLink, LinkError
from edge_node.drafter import DrafterModel
from tandem_core.loop import Draft
from tandem_core.sampling import SamplingParams
from tandem_core.stats import RequestStats, RoundStats
from tandem_core.verify import Verdict

OnTokens = Callable[[Sequence[int], str], None]  # (tokens, source) with source "verified" | "local"


@dataclass
class EdgeResult:
    route: str
    tokens: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    wall_s: float = 0.0
    edge_cpu_s: float = 0.0
    stats: RequestStats = field(default_factory=RequestStats)
    bytes_up: int = 0
    bytes_down: int = 0
    resumes: int = 0
    local_tokens: int = 0
    verified_tokens: int = 0
    finish_reason: str | None = None


class _Clock:
    def __init__(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.first: float | None = None

    def mark_first(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def finish(self, result: EdgeResult) -> EdgeResult:
        end = time.perf_counter()
        result.wall_s = end - self.t0
        result.ttft_s = (self.first or end) - self.t0
        result.edge_cpu_s = time.process_time() - self.cpu0
        return result


def _max_length(prompt_ids: Sequence[int], max_new_tokens: int, draft_len: int) -> int:
    return len(prompt_ids) + max_new_tokens + draft_len + 2


def generate_local(drafter: DrafterModel, prompt_ids: Sequence[int], params: SamplingParams, seed: int, *,
                   max_new_tokens: int, on_tokens: OnTokens | None = None) -> EdgeResult:
    """On-device generation with the drafter alone."""
    clock, result = _Clock(), EdgeResult(route="local")
    session = drafter.new_session(prompt_ids, params, seed, max_length=_max_length(prompt_ids, max_new_tokens, 0))
    for token in session.generate(max_new_tokens=max_new_tokens, eos_ids=drafter.eos_ids):
        clock.mark_first()
        result.tokens.append(token)
        if on_tokens is not None:
            on_tokens((token,), "local")
    result.local_tokens = len(result.tokens)
    result.stats.add_tokens(len(result.tokens))
    last = result.tokens[-1] if result.tokens else None
    result.finish_reason = "stop" if last in drafter.eos_ids else "length"
    return clock.finish(result)


def generate_speculative(drafter: DrafterModel, link: CloudLink, prompt_ids: Sequence[int], params: SamplingParams,
                         seed: int, *, draft_len: int, max_new_tokens: int, on_tokens: OnTokens | None = None,
                         max_resumes: int = 3, backoff_s: float = 0.2) -> EdgeResult:
    """Speculative decoding with the cloud verifying over `link`."""
    clock, result = _Clock(), EdgeResult(route="speculative")
    session = drafter.new_session(prompt_ids, params, seed,
                                  max_length=_max_length(prompt_ids, max_new_tokens, draft_len))
    try:
        link.open()
        while True:
            k = min(draft_len, max_new_tokens - len(result.tokens) - 1)
            draft = session.draft(k)
            verdict = _verify_with_resume(link, draft, result.tokens, max_resumes, backoff_s)
            result.stats.add_round(RoundStats(drafted=len(draft.tokens), accepted=verdict.accepted,
                                              emitted=len(verdict.tokens)))
            clock.mark_first()
            result.tokens.extend(verdict.tokens)
            if on_tokens is not None:
                on_tokens(verdict.tokens, "verified")
            if verdict.finished:
                result.finish_reason = verdict.finish_reason
                break
            session.commit(verdict.accepted, verdict.tokens)
    finally:
        link.close()
        result.bytes_up, result.bytes_down, result.resumes = link.bytes_up, link.bytes_down, link.resumes
    result.verified_tokens = len(result.tokens)
    # One target pass per round, plus the prefill of each (re)opened stream.
    result.stats.add_target_forwards(1 + result.resumes)
    return clock.finish(result)


def _verify_with_resume(link: CloudLink, draft: Draft, generated: list[int], max_resumes: int,
                        backoff_s: float) -> Verdict:
    """Verify one round; on a broken link, resume with the committed tokens and re-send it."""
    while True:
        try:
            return link.verify(draft.tokens, draft.q)
        except LinkError as exc:
            if link.resumes >= max_resumes:
                raise LinkError(f"cloud unreachable after {link.resumes} resumes: {exc}") from None
            time.sleep(backoff_s * 2**link.resumes)
            link.resume(generated)
