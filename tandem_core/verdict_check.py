"""A verdict checked against the draft it answers: the edge trusts nothing the verifier sends.

The rules are those `tandem_core.verify.finalize` guarantees for an honest verifier, so every
verdict it can produce passes and a verdict that breaks one cannot have come from it:
- accepted: 0 <= accepted <= k, the number of drafts sent this round;
- prefix: the committed tokens start with exactly the first `accepted` drafts; for a tree
  (`parents`, `tandem_core.tree`'s convention), with the tokens of a root-to-node path of
  `accepted` drafts (followed child by child by token: siblings hold distinct tokens), so at
  most the tree's depth;
- count: len(tokens) == accepted + 1 while the request goes on; a finished round commits
  accepted or accepted + 1 tokens (cut after an EOS), at least one;
- finish: `finished` holds exactly when there is a finish reason;
- budget (when `remaining` is known): at most `remaining` tokens; a round that goes on commits
  fewer, and finish reason "length" means exactly `remaining` (tokens are cut only at a finish);
- vocab: every id in [0, vocab) (>= 0 when the vocabulary is not known);
- eos (when `eos_ids` are known): an EOS token only as the last token, with reason "stop", and
  reason "stop" only after one.

What it cannot see: which token the target chose after the accepted drafts (the recovered or
bonus token). Only an authenticated channel protects that one.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem_core.verify import FinishReason, Verdict


class BadVerdict(ValueError):
    """A verdict that no honest verifier sends for this draft; `rule` names the broken rule.
    Messages give positions and counts, never token ids (they are the user's text)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule


def check_verdict(draft_tokens: Sequence[int], verdict: Verdict, *, remaining: int | None = None,
                  vocab: int | None = None, eos_ids: frozenset[int] | None = None,
                  parents: Sequence[int] | None = None) -> None:
    """Raise `BadVerdict` unless `verdict` is one a verifier could give for `draft_tokens`.

    `remaining` is the request's budget before this round (tokens it may still commit, context
    included); `vocab` and `eos_ids` are checked only when given. With `parents` (one per draft:
    -1 or an earlier draft's index; ValueError otherwise) the drafts are a tree.
    """
    if remaining is not None and remaining < 1:
        raise ValueError(f"remaining must be >= 1, got {remaining}")
    k, a, tokens = len(draft_tokens), verdict.accepted, verdict.tokens
    if not 0 <= a <= k:
        raise BadVerdict("accepted", f"{a} accepted of {k} drafts sent")
    if parents is None:
        differ = next((i for i in range(min(a, len(tokens))) if tokens[i] != draft_tokens[i]), None)
        if differ is not None or len(tokens) < a:
            where = f"token {differ}" if differ is not None else f"only {len(tokens)} tokens"
            raise BadVerdict("prefix", f"{where}: the tokens do not start with the {a} accepted drafts")
    else:
        _check_path(draft_tokens, parents, a, tokens)
    _check_count(a, tokens, verdict)
    if remaining is not None:
        _check_budget(tokens, verdict, remaining)
    bound = vocab if vocab is not None else float("inf")
    outside = next((i for i, t in enumerate(tokens) if not 0 <= t < bound), None)
    if outside is not None:
        raise BadVerdict("vocab", f"token {outside}: id outside [0, {bound})")
    if eos_ids is not None:
        _check_eos(tokens, verdict, eos_ids)


def _check_path(draft_tokens: Sequence[int], parents: Sequence[int], accepted: int, tokens: Sequence[int]) -> None:
    """The first `accepted` tokens follow the tree from the root, child by child."""
    if len(parents) != len(draft_tokens) or any(not -1 <= p < i for i, p in enumerate(parents)):
        raise ValueError("parents must hold one entry per draft, each -1 or an earlier draft's index")
    children: dict[int, dict[int, int]] = {}
    depth: list[int] = []
    for i, p in enumerate(parents):
        if children.setdefault(p, {}).setdefault(draft_tokens[i], i) != i:
            raise ValueError(f"draft {i}: siblings must hold distinct tokens")
        depth.append(0 if p < 0 else depth[p] + 1)
    deepest = max(depth, default=-1) + 1
    if accepted > deepest:
        raise BadVerdict("prefix", f"{accepted} accepted beyond the tree's depth {deepest}")
    if len(tokens) < accepted:
        raise BadVerdict("prefix", f"only {len(tokens)} tokens: the tokens do not hold the {accepted} accepted drafts")
    node = -1
    for i in range(accepted):
        node = children.get(node, {}).get(tokens[i], -2)
        if node == -2:
            raise BadVerdict("prefix", f"token {i}: the {accepted} accepted tokens leave the tree there")


def _check_count(accepted: int, tokens: Sequence[int], verdict: Verdict) -> None:
    if verdict.finished != (verdict.finish_reason is not None):
        raise BadVerdict("finish", f"finished={verdict.finished} with finish reason {verdict.finish_reason}")
    n = len(tokens)
    if not verdict.finished and n != accepted + 1:
        raise BadVerdict("count", f"{n} tokens for {accepted} accepted drafts (expected {accepted + 1})")
    if verdict.finished and not max(1, accepted) <= n <= accepted + 1:
        raise BadVerdict("count", f"{n} tokens for {accepted} accepted drafts in the final round "
                                  f"(expected {max(1, accepted)}..{accepted + 1})")


def _check_budget(tokens: Sequence[int], verdict: Verdict, remaining: int) -> None:
    n = len(tokens)
    if n > remaining or (not verdict.finished and n == remaining):
        raise BadVerdict("budget", f"{n} tokens with {remaining} left, finished={verdict.finished}")
    if verdict.finish_reason == FinishReason.LENGTH and n != remaining:
        raise BadVerdict("budget", f"finish reason 'length' after {n} tokens with {remaining} left")


def _check_eos(tokens: Sequence[int], verdict: Verdict, eos_ids: frozenset[int]) -> None:
    eos_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    if eos_at is not None and (eos_at != len(tokens) - 1 or verdict.finish_reason != FinishReason.STOP):
        raise BadVerdict("eos", f"EOS at {eos_at} of {len(tokens)} tokens, finish reason {verdict.finish_reason}")
    if verdict.finish_reason == FinishReason.STOP and eos_at is None:
        raise BadVerdict("eos", "finish reason 'stop' without an EOS token")
