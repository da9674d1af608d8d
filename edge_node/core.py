"""The edge node's transport-free core: validate a request, encode the prompt, run the route.

Guarantees:
- `EdgeCore.prepare` turns the request's fields into an `EdgeJob` or raises ValueError naming
  the field (exactly one of prompt, messages or prompt tokens; ids inside the vocabulary; limits
  from `tandem.limits`; the context of the drafter; a cloud route needs a cloud address).
- `EdgeCore.run` generates on the job's route in the calling thread (`edge_node.generation`),
  handing each committed piece to `on_tokens`; the cloud link's errors propagate typed
  (`CloudRejected`, `LinkError`).
- At most `max_concurrent` jobs run at once: `slot()` raises `Busy` beyond that.
The servicer (`edge_node.servicer`) only translates between this and the proto.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from edge_node.cloud_link import CloudLink, SessionRequest
from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel
from edge_node.generation import EdgeResult, OnTokens, generate_cloud, generate_local, generate_speculative
from tandem.limits import MAX_DRAFT_LEN, MAX_NEW_TOKENS
from tandem_core.routing import Route
from tandem_core.sampling import SamplingParams, resolve_seed

ROLES = ("system", "user", "assistant")


class Busy(Exception):
    """Every generation slot is taken."""


@dataclass(frozen=True)
class EdgeJob:
    """A validated request."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    route: Route
    draft_len: int
    max_new_tokens: int
    round_deadline_s: float
    open_deadline_s: float
    fallback_local: bool


class EdgeCore:
    def __init__(self, drafter: DrafterModel, config: EdgeConfig, channel: grpc.Channel | None) -> None:
        self.drafter, self.config, self.channel = drafter, config, channel
        self._slots = threading.BoundedSemaphore(config.max_concurrent)

    @property
    def default_route(self) -> Route:
        return Route.SPECULATIVE if self.channel is not None else Route.LOCAL

    def encode(self, prompt: str, messages: Sequence[tuple[str, str]], prompt_tokens: Sequence[int]) -> list[int]:
        """Token ids of exactly one of the three prompt forms."""
        if sum([bool(prompt), bool(messages), bool(prompt_tokens)]) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_tokens")
        if prompt_tokens:
            vocab = self.drafter.vocab_size
            if any(not 0 <= t < vocab for t in prompt_tokens):
                raise ValueError(f"prompt_tokens: ids must be in [0, {vocab})")
            return list(prompt_tokens)
        for i, (role, _) in enumerate(messages):
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        if messages:
            try:
                return self.drafter.encode(messages=[{"role": r, "content": c} for r, c in messages])
            except RuntimeError as exc:  # onnxruntime-genai: e.g. the model folder has no chat template
                raise ValueError(f"messages: cannot apply the drafter's chat template: {exc}") from None
        return self.drafter.encode(prompt=prompt)

    def prepare(self, prompt_ids: list[int], params: SamplingParams, *, route: Route, max_new_tokens: int,
                draft_len: int = 0, round_deadline_ms: int = 0, open_deadline_ms: int = 0,
                fallback_local: bool = False) -> EdgeJob:
        """Validate the rest of a request (0 means the configured default)."""
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
        if draft_len > MAX_DRAFT_LEN:
            raise ValueError(f"draft_len must be at most {MAX_DRAFT_LEN}, got {draft_len}")
        if len(prompt_ids) + max_new_tokens >= self.drafter.context_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens plus max_new_tokens exceeds the context "
                             f"length {self.drafter.context_length}")
        if route != Route.LOCAL and self.channel is None:
            raise ValueError(f"mode: {route} needs a cloud address, and this edge node has none")
        c = self.config
        return EdgeJob(tuple(prompt_ids), params, route, draft_len or c.draft_len, max_new_tokens,
                       (round_deadline_ms or c.round_deadline_ms) / 1000, (open_deadline_ms or c.open_deadline_ms) / 1000,
                       fallback_local)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the edge node already runs {self.config.max_concurrent} generations")
        try:
            yield
        finally:
            self._slots.release()

    def run(self, job: EdgeJob, on_tokens: OnTokens) -> EdgeResult:
        """Generate on the job's route in this thread."""
        seed = resolve_seed(job.params.seed)
        ids, n = list(job.prompt_ids), job.max_new_tokens
        if job.route == Route.LOCAL:
            return generate_local(self.drafter, ids, job.params, seed, max_new_tokens=n, on_tokens=on_tokens)
        assert self.channel is not None  # prepare() checked
        if job.route == Route.CLOUD:
            return generate_cloud(self.drafter, self.channel, ids, job.params, seed, max_new_tokens=n,
                                  on_tokens=on_tokens, first_timeout_s=job.open_deadline_s,
                                  gap_timeout_s=job.round_deadline_s, max_resumes=self.config.max_resumes,
                                  fallback_local=job.fallback_local)
        link = CloudLink(self.channel, SessionRequest(uuid.uuid4().hex, job.prompt_ids, job.params, seed, n),
                         round_timeout_s=job.round_deadline_s, open_timeout_s=job.open_deadline_s)
        return generate_speculative(self.drafter, link, ids, job.params, seed, draft_len=job.draft_len,
                                    max_new_tokens=n, on_tokens=on_tokens, max_resumes=self.config.max_resumes,
                                    fallback_local=job.fallback_local)
