"""Generation on the edge: speculative against the remote cloud verifier, or on the device alone.

Guarantees:
- Speculative: the drafter's KV cache stays here; each round sends drafts (and, in sampling
  mode, the sparse q rows) and commits exactly the verdict's tokens, so greedy output equals the
  target's and sampling follows the target's distribution.
- A broken link or a late verdict either resumes on a fresh stream carrying the committed
  tokens (up to `max_resumes` times per request with backoff; the same round is then
  re-verified), or, with `fallback_local`, continues on the device from the last committed
  token at once: the unsettled draft is rolled back and the drafter generates the rest. Either
  way no committed token is lost or repeated: `on_tokens` sees each token once, in order, and
  the wait for a broken round is bounded by the round deadline.
- A verdict that contradicts the drafts sent is never committed (`RemoteVerifier` checks each
  one, resumes, and gives up after a few with cause BAD_VERDICT, then falls back as above).
- Each round drafts within the cloud's limits (its max_draft_len and context, learnt from the
  session's SessionOpened), and an answer that reaches the cloud's context ends with finish
  reason "length", as on the cloud route.
- Cloud-only generation relays the target's stream; with `fallback_local` a break continues
  on the device from the tokens received, the drafter re-prefilling prompt + answer so far.
- Every result carries the statistics the edge service reports (`EdgeResult`), including each
  mid-answer route switch (`Switch`) and what building the KV caches cost: the drafter's prefill
  (tokens and seconds; each request prefills its whole history, nothing is kept across turns)
  and the tokens the cloud prefilled or reused, as its ServerTiming reports them.
- `cancelled` (every route): asked before each pass of a drafter prefill (the prompt, or the
  context after a fallback), and every 20 ms while the cloud's first reply is awaited; once true
  the generation raises `PrefillCancelled` (`edge_node.drafter`) or `RequestCancelled`
  (`edge_node.link_stream`), so a request cancelled during a long prefill or a slow open frees
  its slot at once.
- The cloud's first reply on either route is awaited with link checks
  (`edge_node.link_stream.FirstReplyWatch`): a link black-holed at the open falls back (or fails,
  without `fallback_local`) within about the round deadline, not the open deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from edge_node.cloud_link import CloudLink, LinkError, RemoteVerifier, cloud_generate
from edge_node.drafter import DrafterModel, DrafterSession
from protos.enums import finish_from_proto
from tandem.limits import MAX_DRAFT_LEN
from tandem_core.branching import DEFAULT_TREE_NODES
from tandem_core.lookup import MIN_MATCH, LookupDrafter, LookupPolicy
from tandem_core.loop import DraftLen, DraftSession, SwitchCause, VerifierUnavailable, speculative_generate
from tandem_core.sampling import SamplingParams
from tandem_core.stats import RequestStats
from tandem_core.suffix_index import SuffixIndex
from tandem_core.verify import FinishReason

log = logging.getLogger(__name__)

# (tokens, source): "verified" (accepted drafts), "target" (the target's correction or bonus token
# ending a speculative round), "cloud" (the cloud route) or "local" (generated on the device)
OnTokens = Callable[[Sequence[int], str], None]
Cancelled = Callable[[], bool] | None  # the request's consumer has gone (see the module doc)


@dataclass(frozen=True)
class Switch:
    """A change of route in the middle of an answer."""

    at_token: int     # tokens committed before the switch
    from_route: str
    to_route: str
    reason: str       # for people
    at_ms: float      # since the request started
    cause: SwitchCause


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
    finish_reason: FinishReason | None = None
    switches: list[Switch] = field(default_factory=list)
    drafter_prefill_s: float = 0.0  # building the drafter's KV cache (stats.drafter_prefill_tokens)


class _Clock:
    def __init__(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.first: float | None = None

    def elapsed_ms(self) -> float:
        return 1000 * (time.perf_counter() - self.t0)

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


def _continue_local(session: DrafterSession, eos_ids: frozenset[int], result: EdgeResult, max_new_tokens: int,
                    on_tokens: OnTokens | None, clock: _Clock, lookup: SuffixIndex | None) -> None:
    """Generate on the device until eos or `max_new_tokens` in all; sets the finish reason.

    With `lookup` (an index over the text so far), continuations it proposes are checked in
    batched passes (`DrafterSession.generate`)."""
    for token in session.generate(max_new_tokens=max_new_tokens - len(result.tokens), eos_ids=eos_ids,
                                  lookup=lookup):
        clock.mark_first()
        result.tokens.append(token)
        result.local_tokens += 1
        if on_tokens is not None:
            on_tokens((token,), "local")
    last = result.tokens[-1] if result.tokens else None
    result.finish_reason = FinishReason.STOP if last in eos_ids else FinishReason.LENGTH


def _fall_back(result: EdgeResult, clock: _Clock, exc: VerifierUnavailable) -> None:
    log.warning("%s route: link failed after %d tokens (%s: %s); continuing on the device",
                result.route, len(result.tokens), exc.cause, exc)
    result.switches.append(Switch(len(result.tokens), result.route, "local", f"link failed: {exc}",
                                  clock.elapsed_ms(), exc.cause))


def _prefill(drafter: DrafterModel, result: EdgeResult, ids: Sequence[int], params: SamplingParams, seed: int,
             max_length: int, lazy: bool = False, cancelled: Cancelled = None) -> DrafterSession:
    """A drafter session over `ids`, its prefill counted in `result` (only the tokens it computed:
    a greedy request may reuse an earlier request's KV for a shared prefix, see
    `edge_node.drafter`). A `lazy` session's prefill runs later: its caller adds its seconds."""
    session = drafter.new_session(ids, params, seed, max_length=max_length, lazy=lazy, cancelled=cancelled)
    if not lazy:
        result.drafter_prefill_s += session.prefill_s
    result.stats.add_drafter_prefill(len(ids) - session.reused)
    return session


def generate_local(drafter: DrafterModel, prompt_ids: Sequence[int], params: SamplingParams, seed: int, *,
                   max_new_tokens: int, on_tokens: OnTokens | None = None, lookup: bool = True,
                   cancelled: Cancelled = None) -> EdgeResult:
    """On-device generation with the drafter alone (with `lookup`, self-speculation on
    continuations of the prompt and the answer so far)."""
    clock, result = _Clock(), EdgeResult(route="local")
    session = _prefill(drafter, result, prompt_ids, params, seed, _max_length(prompt_ids, max_new_tokens, 0),
                       cancelled=cancelled)
    _continue_local(session, drafter.eos_ids, result, max_new_tokens, on_tokens, clock,
                    SuffixIndex.over(prompt_ids) if lookup else None)
    drafter.retain(session)
    result.stats.add_tokens(len(result.tokens))
    return clock.finish(result)


def generate_speculative(drafter: DrafterModel, link: CloudLink, prompt_ids: Sequence[int], params: SamplingParams,
                         seed: int, *, draft_len: DraftLen, max_new_tokens: int, on_tokens: OnTokens | None = None,
                         max_resumes: int = 3, backoff_s: float = 0.2, fallback_local: bool = False,
                         lookup: bool = True, pipeline: bool = True, alternatives: bool = False,
                         tree_nodes: int = DEFAULT_TREE_NODES, sampled_ahead: bool = False,
                         cancelled: Cancelled = None) -> EdgeResult:
    """Speculative decoding: `tandem_core.loop` with the cloud verifying over `link`.

    With `lookup` (and a fixed `draft_len`), each round drafts from the prompt and the answer so
    far when a copied span pays better than the model's drafts (`tandem_core.lookup`); such
    rounds may send up to the cloud's longest draft, the model's rounds send `draft_len`, or,
    with `draft_len` 0, the length the policy expects to pay best (adaptive, 0 to 16).
    With `pipeline`, round 1 goes out with the open and no drafts (the cloud's prefill yields the
    first token), and each next round is drafted and sent while the verdict is in flight
    (`tandem_core.loop`); without it, rounds run one after the other. With `alternatives` (greedy;
    off by default: its gain was not shown, see BENCHMARKS.md), the drafter also prepares the
    round after the likeliest other verdict meanwhile. With `tree_nodes` > 0, the model's rounds
    carry siblings where the drafter hesitates and they pay for their rows, up to that many
    nodes and what the cloud takes (`tandem_core.branching`; planned before SessionOpened as if
    the cloud took them: a replica that verifies chains only gets each tree's chain).
    In sampling mode no round is drafted ahead unless `sampled_ahead` (round 1 still goes out with
    the open): the guess (the drafter's draw equals the target's, after every draft accepted)
    held in 7-27% of rounds on prose and chat, and a round drafted ahead cannot be cut short by
    its verdict there (its length would then depend on timing), so drafting ahead cost more
    than it saved (BENCHMARKS.md).
    Fallback wraps the loop: when the verifier gives up (`VerifierUnavailable`), the unsettled
    draft is rolled back and the drafter goes on alone from the last committed token.
    """
    clock, result = _Clock(), EdgeResult(route="speculative")
    adaptive = draft_len == 0
    per_round = (lookup or adaptive) and isinstance(draft_len, int)
    verifier = RemoteVerifier(link, max_resumes=0 if fallback_local else max_resumes, backoff_s=backoff_s,
                              prompt_len=len(prompt_ids), vocab=drafter.vocab_size)
    # Retrieval over the prompt; where it already matches the prompt's tail, round 1 carries the
    # copy (its verdict brings many tokens at once), else the cloud answers round 1 with the open.
    index = SuffixIndex.over(prompt_ids) if lookup and per_round else None
    opening = index.propose(MAX_DRAFT_LEN) if index is not None else None
    copy_first = opening is not None and opening.match_len >= MIN_MATCH
    link.cancelled = cancelled  # the wait for SessionOpened ends when the consumer leaves
    first_sent = verifier.start(first_round=pipeline and not copy_first)  # the cloud's prefill overlaps the drafter's
    # Pipelined, the drafter's prefill waits for round 1 to go out (with the open, or copied by
    # retrieval) and lets its verdict (the first token) through (a lazy session, `tandem_core.loop`).
    lazy = pipeline and (first_sent or copy_first)
    try:
        session = _prefill(drafter, result, prompt_ids, params, seed,
                           _max_length(prompt_ids, max_new_tokens, MAX_DRAFT_LEN if per_round else _longest(draft_len)),
                           lazy=lazy, cancelled=cancelled)
    except BaseException:
        link.close()
        raise
    if params.greedy:  # a round drafted while the link is found dead is cut short (its drafts are never verified)
        session.give_up = link.link_failed
    drafts: DraftSession = session
    if per_round:
        assert isinstance(draft_len, int)
        drafts = LookupDrafter(session, index, LookupPolicy(), model_len=None if adaptive else draft_len,
                               vocab=None if params.greedy else drafter.vocab_size,
                               trees=_tree_room(verifier, tree_nodes) if tree_nodes > 0 else None)
        draft_len = MAX_DRAFT_LEN  # the loop's bound; the lookup drafter chooses each round's length
    try:
        for verdict in speculative_generate(drafts, verifier, draft_len=_within_cloud(draft_len, verifier),
                                            max_new_tokens=max_new_tokens, stats=result.stats,
                                            pipeline=pipeline and (params.greedy or sampled_ahead),
                                            first_sent=first_sent,
                                            early_verdicts=params.greedy, alternatives=alternatives):
            clock.mark_first()
            result.tokens.extend(verdict.tokens)
            result.verified_tokens += len(verdict.tokens)
            result.finish_reason = verdict.finish_reason
            if on_tokens is not None:  # the accepted drafts, then the target's own token(s)
                if verdict.accepted:
                    on_tokens(verdict.tokens[:verdict.accepted], "verified")
                if len(verdict.tokens) > verdict.accepted:
                    on_tokens(verdict.tokens[verdict.accepted:], "target")
    except VerifierUnavailable as exc:
        if not fallback_local:
            raise
        link.close()
        session.rollback()
        _fall_back(result, clock, exc)
        _continue_local(session, drafter.eos_ids, result, max_new_tokens, on_tokens, clock,
                        drafts.index if isinstance(drafts, LookupDrafter) else None)
    finally:
        link.close()
        if lazy:
            result.drafter_prefill_s += session.prefill_s
        result.stats.alt_tries += session.alt_tries
        result.stats.alt_hits += session.alt_hits
        drafter.retain(session)  # its KV serves the conversation's next turn (`edge_node.drafter`)
        result.bytes_up, result.bytes_down, result.resumes = link.bytes_up, link.bytes_down, link.resumes
        result.stats.add_cloud_prefill(link.prefill_tokens, link.reused_tokens)
    result.stats.add_tokens(result.local_tokens)
    # One target pass per round, plus the prefill of each (re)opened stream.
    result.stats.add_target_forwards(1 + result.resumes)
    return clock.finish(result)


def _tree_room(verifier: RemoteVerifier, tree_nodes: int) -> Callable[[], int]:
    """Tree nodes a round may hold: `tree_nodes`, within the cloud's bound once it is known."""
    return lambda: min(tree_nodes, verifier.max_tree_nodes) if verifier.link.opened is not None else tree_nodes


def _within_cloud(draft_len: DraftLen, verifier: RemoteVerifier) -> DraftLen:
    """`draft_len`, clamped each round to what the cloud verifies at the session's position."""
    def k(stats: RequestStats) -> int:
        return verifier.draft_len(draft_len(stats) if callable(draft_len) else draft_len)

    return k


def _longest(draft_len: DraftLen) -> int:
    return draft_len if isinstance(draft_len, int) else MAX_DRAFT_LEN


def generate_cloud(drafter: DrafterModel, channel: grpc.Channel, prompt_ids: Sequence[int], params: SamplingParams,
                   seed: int, *, max_new_tokens: int, on_tokens: OnTokens | None = None, first_timeout_s: float,
                   gap_timeout_s: float, max_resumes: int = 3, fallback_local: bool = False,
                   lookup: bool = True, cancelled: Cancelled = None) -> EdgeResult:
    """Cloud-only generation relayed through the edge (which detokenizes), falling back if asked."""
    clock, result = _Clock(), EdgeResult(route="cloud")
    counter: dict[str, int] = {}
    try:
        for response in cloud_generate(channel, prompt_ids, params, seed, max_new_tokens,
                                       first_timeout_s=first_timeout_s, gap_timeout_s=gap_timeout_s,
                                       max_resumes=0 if fallback_local else max_resumes, counter=counter,
                                       check_limit_s=gap_timeout_s, cancelled=cancelled):
            if response.tokens:
                clock.mark_first()
                result.tokens.extend(response.tokens)
                result.verified_tokens += len(response.tokens)
                if on_tokens is not None:
                    on_tokens(tuple(response.tokens), "cloud")
            if response.finished:
                result.finish_reason = finish_from_proto(response.finish_reason)
                break
    except LinkError as exc:
        if not fallback_local:
            raise
        _fall_back(result, clock, exc)
        context = list(prompt_ids) + result.tokens
        session = _prefill(drafter, result, context, params, seed, _max_length(prompt_ids, max_new_tokens, 0),
                           cancelled=cancelled)
        _continue_local(session, drafter.eos_ids, result, max_new_tokens, on_tokens, clock,
                        SuffixIndex.over(context) if lookup else None)
    finally:
        result.bytes_up, result.bytes_down = counter.get("up", 0), counter.get("down", 0)
        result.resumes = counter.get("resumes", 0)
    result.stats.add_tokens(len(result.tokens))
    result.stats.add_target_forwards(result.verified_tokens)
    return clock.finish(result)
