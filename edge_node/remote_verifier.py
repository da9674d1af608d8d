"""The speculative loop's verifier in the cloud: rounds over a `CloudLink`, checked, resumed on a break.

Guarantees:
- `RemoteVerifier` is a `tandem_core.loop.PipelinedVerifier`: `submit` sends a round (or holds
  it, below), `collect` answers the rounds in the order sent and commits each verdict's tokens.
- It keeps the committed tokens, so a broken stream re-opens with all of them and every round
  in flight is sent again, up to `max_resumes` times per request with `backoff_delay` between
  tries; then the last `LinkError` (a `VerifierUnavailable` with its cause) propagates.
- Trusts nothing: a reply out of order, or a verdict that `tandem_core.verdict_check` rejects
  against the drafts sent (count, prefix (a tree's: a root-to-node path), budget of the
  session's max_new_tokens and of the cloud's context, vocabulary, finish), raises
  `ProtocolError` and nothing from it is committed: the session resumes at once and the same
  round is re-sent (the drafter never sees it); past `max_bad_verdicts` such resumes per request
  a `ProtocolError` (cause BAD_VERDICT) propagates.
- Drafts stay within the cloud's limits once its SessionOpened is known: `draft_len` gives the
  largest k it verifies (`CloudLink.draft_room`) and drafts past it are dropped here; before
  that the cloud drops them itself. A round drafted ahead is held until the cloud is known to
  take rounds ahead, and the rounds after a held one wait behind it (replies come in order).
- Trees (`Draft.parents`) go out only once the stream's SessionOpened is in: one submitted
  earlier (or re-sent after a resume, as a tree again) is held until then. A tree goes out
  within the cloud's limits (`within_limits`): nodes deeper than `draft_room` dropped with their
  subtrees, then the first `max_tree_nodes` nodes in index order. To a replica whose
  `max_tree_nodes` is 0 (chains only) it goes out as its chain (`chain_of`): the first children
  from the root, with the q rows of the sibling groups along it, which is how the drafter drew
  them (a caterpillar tree's groups are exactly its chain's nodes, so its q goes out whole).
  Either way the chain the drafter holds begins with the chain sent, so `Draft.kept` stays
  right; the verdict is checked against what went out.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_node.link_stream import CredentialRefused, LinkError, ProtocolError
from tandem_core.link_health import backoff_delay
from tandem_core.loop import Assume, Draft
from tandem_core.tree import DraftTree
from tandem_core.verdict_check import BadVerdict, check_verdict
from tandem_core.verify import Verdict

if TYPE_CHECKING:
    from edge_node.cloud_link import CloudLink

log = logging.getLogger(__name__)

_HELD = -2  # a round not sent yet: it waits for the cloud's SessionOpened (`RemoteVerifier._send`)


def chain_of(draft: Draft) -> Draft:
    """A tree's chain (the first children from the root) as a chain `Draft`, its q row j the
    row of the group whose first child is chain node j (the root, then each chain node)."""
    shape = DraftTree(draft.tokens, draft.parents or ())
    path, node = [], -1
    while kids := shape.children(node):
        path.append(kids[0])
        node = kids[0]
    q = None
    if draft.q is not None:
        q = draft.q[[shape.groups.index(a) for a in (-1, *path[:-1])] if path else []]
    return Draft(tuple(draft.tokens[i] for i in path), q, reason=draft.reason)


def within_limits(draft: Draft, depth: int, nodes: int) -> Draft:
    """Tree `draft` as it may go to a cloud that verifies root-to-node paths of at most `depth`
    drafts and trees of at most `nodes` (0: chains only, so its chain, cut at `depth`).

    Nodes `depth` deep or more go with their subtrees, then all but the first `nodes` in index
    order: a prefix of a topological order is a tree, and the siblings it cuts are the last
    drawn of their group, so those kept still follow their q row without replacement."""
    if nodes <= 0:
        chain = chain_of(draft)
        return Draft(chain.tokens[:depth], None if chain.q is None else chain.q[:depth], reason=draft.reason)
    shape = DraftTree(draft.tokens, draft.parents or ())
    keep = [i for i, d in enumerate(shape.depths) if d < depth][:nodes]
    if len(keep) == len(shape):
        return draft
    if not keep:
        return Draft((), None if draft.q is None else draft.q[:0], reason=draft.reason)
    new = {old: n for n, old in enumerate(keep)}
    parents = tuple(new.get(shape.parents[i], -1) for i in keep)
    tokens = tuple(draft.tokens[i] for i in keep)
    q = None
    if draft.q is not None:
        old = {-1: -1} | {n: i for i, n in new.items()}
        q = draft.q[[shape.groups.index(old[g]) for g in DraftTree(tokens, parents).groups]]
    return Draft(tokens, q, reason=draft.reason, parents=parents)


@dataclass
class _Sent:
    """A round in flight: the draft, what it assumes, the drafts sent and its round number."""

    draft: Draft
    assume: Assume | None
    keep: int = 0  # a chain: the drafts sent
    wire: Draft | None = None  # a tree: what went out (`within_limits`); None for a chain
    round_no: int = -1  # -1: not sent on the current stream
    doomed: bool = False  # its guess failed: the cloud drops it, and `collect` reads past its reply


class RemoteVerifier:
    """A `tandem_core.loop.Verifier` in the cloud: each round over `link`, resumed on a break
    (see the module doc). Token ids are checked below `vocab` when given."""

    def __init__(self, link: CloudLink, *, max_resumes: int, backoff_s: float, prompt_len: int,
                 vocab: int | None = None, max_bad_verdicts: int = 2) -> None:
        self.link, self.max_resumes, self.backoff_s = link, max_resumes, backoff_s
        self.prompt_len, self.vocab = prompt_len, vocab
        self.max_bad_verdicts = max_bad_verdicts
        self.bad_verdicts = 0
        self.committed: list[int] = []
        # The last verdict took a tree's side branch: a round ahead of it (which assumed the
        # tree's chain) is dropped even where its position and last token match.
        self.off_chain = False
        self._out: deque[_Sent] = deque()  # rounds sent and not yet answered, oldest first

    @property
    def position(self) -> int:
        """Tokens the cloud holds before the next round: prompt + committed."""
        return self.prompt_len + len(self.committed)

    def draft_len(self, wanted: int) -> int:
        """`wanted`, within the cloud's limits (see `CloudLink.draft_room`); for a tree, its depth."""
        return self.link.draft_room(wanted, self.position)

    @property
    def max_tree_nodes(self) -> int:
        """The most drafts a tree round may hold: 0 before this stream's SessionOpened and from
        a replica that verifies chains only (a tree submitted then goes as its chain)."""
        return self.link.max_tree_nodes

    def tree_room(self, wanted: int) -> int:
        """`wanted` tree nodes, within what the cloud takes now (0: send a chain)."""
        return max(0, min(wanted, self.max_tree_nodes))

    def start(self, first_round: bool = False) -> bool:
        """Open the stream now, so that the cloud prefills while the edge prefills its drafter and
        drafts the first round; with `first_round`, also send round 1 with no drafts (the cloud's
        prefill then yields the first token, as on the cloud-only route). Returns whether round 1
        was sent. A failure to open is left to the first round, which opens again with its
        resumes and causes."""
        if self.link.is_open:
            return False
        try:
            first = self.link.open(self.committed, first_round=first_round)
        except LinkError as exc:
            log.info("opening the cloud session early failed (%s); the first round retries", exc)
            return False
        if first is not None:  # answered with the open: the cloud's prefill yields the first token
            self._out.append(_Sent(Draft((), None), None, keep=0, round_no=first))
        return first is not None

    def verify(self, draft: Draft) -> Verdict:
        self.submit(draft)
        verdict = self.collect()
        assert verdict is not None  # a round without an assumption is never dropped
        return verdict

    def submit(self, draft: Draft, assume: Assume | None = None) -> None:
        """Send a round now; `collect` answers the rounds in the order sent."""
        if not self.link.is_open:
            self.link.open(self.committed)
        entry = _Sent(draft, assume)
        self._out.append(entry)
        try:
            self._send(entry)
        except LinkError:
            pass  # the stream is gone: `collect` resumes and sends it again

    def _send(self, entry: _Sent) -> None:
        # A round ahead waits until the cloud is known to take them (its SessionOpened), a tree
        # until the cloud is known to take trees, and rounds after a waiting one wait too
        # (replies come in the order sent).
        before = list(itertools.takewhile(lambda e: e is not entry, self._out))
        waiting = any(e.round_no == _HELD for e in before)
        tree_early = entry.draft.parents is not None and self.link.opened is None
        if waiting or tree_early or (entry.assume is not None and not self.link.pipelining):
            entry.round_no = _HELD
            return
        # Drafts past the cloud's limits are dropped here (the verdict accepts at most those
        # sent); the drafter's commit keeps only the accepted ones anyway.
        position = self.position if entry.assume is None else entry.assume.position
        draft = entry.draft
        if draft.parents is not None:
            depth = self.link.draft_room(len(draft.tokens), position)  # the cloud's bound on a path's drafts
            entry.wire = wire = within_limits(draft, depth, self.max_tree_nodes)
            if wire.parents is None:
                entry.round_no = self.link.send_round(wire.tokens, wire.q, entry.assume)
            else:
                entry.round_no = self.link.send_round(wire.tokens, wire.q, entry.assume, parents=wire.parents)
            return
        entry.keep = self.link.draft_room(len(draft.tokens), position)
        q = draft.q
        entry.round_no = self.link.send_round(draft.tokens[:entry.keep], None if q is None else q[:entry.keep],
                                              entry.assume)

    def expect_dropped(self) -> None:
        """The oldest round in flight not yet so marked will be dropped (its guess failed)."""
        next(e for e in self._out if e.assume is not None and not e.doomed).doomed = True

    def collect(self) -> Verdict | None:
        """The oldest round's verdict (committed here), or None if the cloud dropped it as it should
        (its assumption failed); replies of rounds marked by `expect_dropped` are read past. A
        break resumes and sends every round in flight again."""
        while True:
            entry = self._out[0]
            try:
                if entry.round_no == _HELD and not self._release(entry):
                    self._out.popleft()  # its assumption failed: an older cloud never sees it
                    if entry.doomed:
                        continue
                    return None
                if entry.round_no < 0:
                    raise LinkError("the round was never sent")
                verdict, dropped = self.link.recv_verdict(entry.round_no)
                holds = entry.assume is None or (not self.off_chain and self.position == entry.assume.position
                                                 and self.committed[-1:] == [entry.assume.token])
                if dropped != (not holds):
                    raise ProtocolError(f"the cloud {'dropped' if dropped else 'verified'} a round whose assumption "
                                        f"{'held' if holds else 'failed'}")
                if dropped and (verdict.accepted or verdict.tokens or verdict.finished):
                    raise ProtocolError("bad verdict: a dropped round with tokens or a finish")
                if not dropped and entry.wire is not None:  # a tree, sent after the SessionOpened came
                    self._check(entry.wire.tokens, verdict, entry.wire.parents)
                elif not dropped:
                    # A round sent before the SessionOpened came may hold more drafts than the cloud
                    # verifies: it dropped those past its limits, which are known now.
                    self._check(entry.draft.tokens[:self.draft_len(entry.keep)], verdict)
            except ProtocolError as exc:
                self._drop_bad_verdict(exc)
                self._resend()
                continue
            except LinkError as exc:
                if isinstance(exc, CredentialRefused):  # a new stream would be refused the same way
                    raise
                if self.link.resumes - self.bad_verdicts >= self.max_resumes:  # resumes after breaks
                    raise LinkError(f"cloud unreachable after {self.link.resumes} resumes: {exc}", exc.cause) from None
                time.sleep(backoff_delay(self.link.resumes, self.backoff_s))
                self.link.resume(self.committed)
                self._resend()
                continue
            self._out.popleft()
            self._flush()
            if dropped and entry.doomed:
                continue
            if entry.doomed:  # `holds` above was true: the caller's view and ours disagree
                raise AssertionError("a round expected to be dropped held its assumption")
            if dropped:
                return None
            self.committed.extend(verdict.tokens)
            self.off_chain = entry.draft.kept(verdict) < verdict.accepted
            return verdict

    def ready(self) -> bool:
        """Whether the next verdict `collect` returns is in (with the open's reply, for the first,
        and those of the dropped rounds before it), or an error (the link checks, which this
        advances, found the link dead)."""
        if not self._out or not self.link.is_open or self.link.link_failed():
            return True
        doomed = next((i for i, e in enumerate(self._out) if not e.doomed), len(self._out))
        return self.link.replies_waiting() >= doomed + (1 if self.link.opened is not None else 2)

    def _release(self, entry: _Sent) -> bool:
        """Send a waiting round now that it is the oldest; False when it need not go: a cloud
        without rounds ahead (its assumption is checked here) and a failed assumption. A tree
        first waits for the SessionOpened (nothing older is in flight: it is the next reply)."""
        if entry.draft.parents is not None and self.link.opened is None:
            self.link.await_opened()
        if not self.link.pipelining and entry.assume is not None:
            if not (self.position == entry.assume.position and self.committed[-1:] == [entry.assume.token]):
                return False
            entry.assume = None  # it holds: an ordinary round now
        entry.round_no = -1
        self._send(entry)
        return True

    def _flush(self) -> None:
        """Send the waiting rounds, in order, once the cloud is known to take rounds ahead."""
        if self.link.pipelining and self.link.is_open:
            for entry in self._out:
                if entry.round_no == _HELD:
                    entry.round_no = -1
                    self._send(entry)

    def _resend(self) -> None:
        """Send every round in flight again, in order, on the stream just opened (not those
        known to be dropped)."""
        kept = [entry for entry in self._out if not entry.doomed]
        self._out.clear()
        self._out.extend(kept)
        for entry in self._out:
            entry.round_no = -1
        for entry in self._out:
            self._send(entry)

    def _check(self, sent: Sequence[int], verdict: Verdict, parents: Sequence[int] | None = None) -> None:
        """Raise `ProtocolError` unless the cloud could have sent `verdict` for the drafts `sent`
        (a tree with `parents`)."""
        opened, remaining = self.link.opened, self.link.request.max_new_tokens - len(self.committed)
        if opened is not None:  # always, once a verdict has come
            remaining = min(remaining, opened.max_context - self.position)
        if remaining < 1:  # a SessionOpened whose context is below what the cloud already holds
            raise ProtocolError(f"a verdict with {remaining} tokens of room left")
        try:
            check_verdict(sent, verdict, remaining=remaining, vocab=self.vocab, parents=parents)
        except BadVerdict as exc:
            raise ProtocolError(f"bad verdict: {exc}") from None

    def _drop_bad_verdict(self, exc: ProtocolError) -> None:
        """Nothing from the reply is committed: resume the session, or give up past the limit."""
        self.bad_verdicts += 1
        log.warning("%s (%d of %d tolerated)", exc, self.bad_verdicts, self.max_bad_verdicts)
        if self.bad_verdicts > self.max_bad_verdicts:
            raise ProtocolError(f"{self.bad_verdicts} bad replies from the cloud, the last: {exc}") from None
        self.link.resume(self.committed)
