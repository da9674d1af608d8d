"""The edge node's transport-free core: validate a request, admit it, run it, drain.

Guarantees:
- `EdgeCore.encode` and `EdgeCore.prepare` turn a request's fields into an `EdgeJob` or raise
  `BadRequest` (a ValueError) whose message starts with the field's name; every field is
  bounded (the limits below, `tandem.limits` and the drafter's context; they are documented in
  `protos/tandem/v1/edge.proto`), and no message echoes more than a few characters of the
  client's input back.
- `EdgeCore.start` admits a job or raises `Draining` (after `drain()`) or `Busy` (every one of
  `max_concurrent` slots taken). A slot is held from admission until the generation's worker
  thread has ended, whatever ends it (the answer, an error, `Generation.cancel()`), so
  `running` counts exactly the generations still using the drafter.
- A `Generation` runs on its own worker thread (`edge_node.generation` on the job's route)
  and hands out `Piece`s whose texts concatenate to the decoded answer, then the `EdgeResult`.
  The worker's error is raised to the consumer; the cloud link's errors stay typed
  (`CloudRejected`, `LinkError`). After `cancel()` the worker stops at its next token (or its
  drafter prefill's next pass, or within 20 ms while it waits for the cloud's SessionOpened or
  first reply) and the consumer's iteration ends quietly.
- `drain()` stops admitting for good; `wait_idle` waits, bounded, until nothing runs.
- Speculative answers share one learnt round deadline for the link to the cloud
  (`EdgeCore.deadline`, per `config.adaptive_deadline` and `round_deadline_floor_ms`); each
  request's `round_deadline_ms` (or the configured one) is its ceiling.
The servicer (`edge_node.servicer`) only translates between this and the proto.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from edge_node.cloud_link import CloudLink, LinkDeadline, RequestCancelled, SessionRequest
from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel, PrefillCancelled
from edge_node.generation import EdgeResult, generate_cloud, generate_local, generate_speculative
from edge_node.text import TextStream
from tandem.limits import MAX_DEADLINE_MS, MAX_DRAFT_LEN, MAX_NEW_TOKENS
from tandem_core.deadline import DeadlinePolicy, RoundDeadline
from tandem_core.routing import Route
from tandem_core.sampling import SamplingParams, resolve_seed

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 262_144  # a prompt, or all the messages' contents together
MAX_MESSAGES = 1024
_ECHO_CHARS = 24  # at most this much of a bad value is quoted back to the client


class BadRequest(ValueError):
    """A request field is invalid; the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Busy(Exception):
    """Every generation slot is taken."""


class Draining(Exception):
    """The node is shutting down and admits no new generation."""


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


@dataclass(frozen=True)
class Piece:
    """Committed tokens and the text they add to the answer (the final piece may have no tokens)."""

    tokens: tuple[int, ...]
    text: str
    source: str  # "verified" (accepted drafts), "target" (the target's token ending a round), "cloud" or "local"


def _echo(value: str) -> str:
    return repr(value if len(value) <= _ECHO_CHARS else value[:_ECHO_CHARS] + "...")


def _check_text(field: str, text: str) -> None:
    # The tokenizer reads C strings: a NUL would silently cut the text short.
    if "\x00" in text:
        raise BadRequest(field, "must not contain NUL characters")


class EdgeCore:
    def __init__(self, drafter: DrafterModel, config: EdgeConfig, channel: grpc.Channel | None) -> None:
        self.drafter, self.config, self.channel = drafter, config, channel
        # One learnt round deadline for the link to the cloud, shared by every answer over it.
        self.deadline = LinkDeadline(RoundDeadline(DeadlinePolicy(
            adaptive=config.adaptive_deadline, floor_s=config.round_deadline_floor_ms / 1000)))
        self._lock = threading.Condition()
        self._running = 0
        self._draining = False

    @property
    def default_route(self) -> Route:
        return Route.SPECULATIVE if self.channel is not None else Route.LOCAL

    @property
    def running(self) -> int:
        """Generations admitted whose worker has not ended yet."""
        with self._lock:
            return self._running

    @property
    def draining(self) -> bool:
        return self._draining

    def encode(self, prompt: str, messages: Sequence[tuple[str, str]], prompt_tokens: Sequence[int]) -> list[int]:
        """Token ids of exactly one of the three prompt forms."""
        if sum([bool(prompt), bool(messages), bool(prompt_tokens)]) != 1:
            raise BadRequest("prompt", "give exactly one of prompt, messages or prompt_tokens")
        if prompt_tokens:
            return self._check_ids(prompt_tokens)
        if messages:
            return self._encode_messages(messages)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        _check_text("prompt", prompt)
        try:
            return self.drafter.encode(prompt=prompt)
        except ValueError:  # it encodes to no tokens
            raise BadRequest("prompt", "encodes to no tokens") from None

    def _check_ids(self, prompt_tokens: Sequence[int]) -> list[int]:
        if len(prompt_tokens) >= self.drafter.context_length:
            raise BadRequest("prompt_tokens", f"at most {self.drafter.context_length - 1} ids")
        vocab = self.drafter.vocab_size
        if any(not 0 <= t < vocab for t in prompt_tokens):
            raise BadRequest("prompt_tokens", f"ids must be in [0, {vocab})")
        return list(prompt_tokens)

    def _encode_messages(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if len(messages) > MAX_MESSAGES:
            raise BadRequest("messages", f"more than {MAX_MESSAGES} messages")
        if sum(len(content) for _, content in messages) > MAX_PROMPT_CHARS:
            raise BadRequest("messages", f"contents longer than {MAX_PROMPT_CHARS} characters in all")
        for i, (role, content) in enumerate(messages):
            if role not in ROLES:
                raise BadRequest(f"messages[{i}].role", f"must be system, user or assistant, got {_echo(role)}")
            _check_text(f"messages[{i}].content", content)
        try:
            return self.drafter.encode(messages=[{"role": r, "content": c} for r, c in messages])
        except (RuntimeError, ValueError):  # onnxruntime-genai: e.g. the model folder has no chat template
            raise BadRequest("messages", "the drafter's chat template cannot be applied to them") from None

    def prepare(self, prompt_ids: list[int], params: SamplingParams, *, route: Route, max_new_tokens: int,
                draft_len: int = 0, round_deadline_ms: int = 0, open_deadline_ms: int = 0,
                fallback_local: bool = False) -> EdgeJob:
        """Validate the rest of a request (0 means the configured default)."""
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise BadRequest("max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
        if draft_len > MAX_DRAFT_LEN:
            raise BadRequest("draft_len", f"must be at most {MAX_DRAFT_LEN}, got {draft_len}")
        for name, value in (("round_deadline_ms", round_deadline_ms), ("open_deadline_ms", open_deadline_ms)):
            if not 0 <= value <= MAX_DEADLINE_MS:
                raise BadRequest(name, f"must be in [0, {MAX_DEADLINE_MS}] (0: the default), got {value}")
        if len(prompt_ids) + max_new_tokens >= self.drafter.context_length:
            raise BadRequest("max_new_tokens", f"the prompt's {len(prompt_ids)} tokens plus max_new_tokens exceed "
                                               f"the context length {self.drafter.context_length}")
        if route != Route.LOCAL and self.channel is None:
            raise BadRequest("mode", f"{route} needs a cloud address, and this edge node has none")
        c = self.config
        return EdgeJob(tuple(prompt_ids), params, route, draft_len or c.draft_len, max_new_tokens,
                       (round_deadline_ms or c.round_deadline_ms) / 1000, (open_deadline_ms or c.open_deadline_ms) / 1000,
                       fallback_local)

    def start(self, job: EdgeJob) -> Generation:
        """Admit `job` and start generating it; raises Draining or Busy."""
        with self._lock:
            if self._draining:
                raise Draining("the edge node is draining (shutting down) and admits no new generation")
            if self._running >= self.config.max_concurrent:
                raise Busy(f"the edge node already runs {self.config.max_concurrent} generations")
            self._running += 1
        try:
            return Generation(self, job, self._release)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        with self._lock:
            self._running -= 1
            self._lock.notify_all()

    def drain(self) -> None:
        """Admit nothing from now on; running generations go on."""
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Wait until no generation runs (True), or `timeout_s` passed or `stop` is set (False)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return False
                self._lock.wait(min(left, 0.05))
        return True

    def run(self, job: EdgeJob, on_tokens: Callable[[Sequence[int], str], None],
            cancelled: Callable[[], bool] | None = None) -> EdgeResult:
        """Generate on the job's route in this thread (no admission: see `start`); `cancelled` stops
        a drafter prefill between its passes (`PrefillCancelled`)."""
        seed = resolve_seed(job.params.seed)
        ids, n = list(job.prompt_ids), job.max_new_tokens
        lookup = self.config.lookup
        if job.route == Route.LOCAL:
            return generate_local(self.drafter, ids, job.params, seed, max_new_tokens=n, on_tokens=on_tokens,
                                  lookup=lookup, cancelled=cancelled)
        assert self.channel is not None  # prepare() checked
        if job.route == Route.CLOUD:
            return generate_cloud(self.drafter, self.channel, ids, job.params, seed, max_new_tokens=n,
                                  on_tokens=on_tokens, first_timeout_s=job.open_deadline_s,
                                  gap_timeout_s=job.round_deadline_s, max_resumes=self.config.max_resumes,
                                  fallback_local=job.fallback_local, lookup=lookup, cancelled=cancelled)
        link = CloudLink(self.channel, SessionRequest(uuid.uuid4().hex, job.prompt_ids, job.params, seed, n),
                         round_timeout_s=job.round_deadline_s, open_timeout_s=job.open_deadline_s,
                         deadline=self.deadline)
        return generate_speculative(self.drafter, link, ids, job.params, seed, draft_len=job.draft_len,
                                    max_new_tokens=n, on_tokens=on_tokens, max_resumes=self.config.max_resumes,
                                    fallback_local=job.fallback_local, lookup=lookup,
                                    pipeline=self.config.pipeline, tree_nodes=self.config.tree_nodes,
                                    cancelled=cancelled)


class _Cancelled(Exception):
    pass


_DONE = object()


class Generation:
    """One admitted job on its worker thread; iterate for `Piece`s, then the `EdgeResult`."""

    def __init__(self, core: EdgeCore, job: EdgeJob, release: Callable[[], None]) -> None:
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._text = TextStream(core.drafter.decode)
        self._source = "local" if job.route == Route.LOCAL else "verified"
        threading.Thread(target=self._work, args=(core, job, release), daemon=True, name="edge-generate").start()

    def cancel(self) -> None:
        """Stop the worker at its next token (idempotent)."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[Piece | EdgeResult]:
        while (item := self._events.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _on_tokens(self, tokens: Sequence[int], source: str) -> None:
        if self._cancelled.is_set():
            raise _Cancelled()
        self._source = source
        self._events.put(Piece(tuple(tokens), self._text.push(tokens), source))

    def _work(self, core: EdgeCore, job: EdgeJob, release: Callable[[], None]) -> None:
        try:
            result = core.run(job, self._on_tokens, self._cancelled.is_set)
            tail = self._text.flush()
            if tail:
                self._events.put(Piece((), tail, self._source))
            self._events.put(result)
        except (_Cancelled, PrefillCancelled, RequestCancelled):
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._events.put(exc)
        finally:
            release()  # before _DONE: a client that saw the end of its stream finds the slot free
            self._events.put(_DONE)
