"""What a client may send the cloud verifier, and the checks that enforce it (pure: numpy at most).

Notation as in `tandem_core.verify`: **p** is the target's distribution, **q** the drafter's.

Guarantees (each bound is also written next to its field in `protos/tandem/v1/cloud.proto`):
- Every check raises `BadRequest` whose message names the field and the bound; none changes any
  state. Counts are checked before elements, so a huge field costs no more than its length.
- Strings: `session_id` is empty or 1..`MAX_ID_CHARS` printable ASCII characters (it goes into
  logs); `model` is at most `MAX_ID_CHARS` characters and must name the served model; `messages`
  holds at most `MAX_MESSAGES` entries, each `role` at most `MAX_ID_CHARS` characters, and all
  roles and contents together at most `MESSAGE_CHARS_PER_TOKEN * max_context` characters.
- Token ids lie in [0, vocab). `prompt_tokens` + `generated_tokens` < max_context;
  `generated_tokens` < max_new_tokens and holds no end-of-sequence token.
- Sampling: temperature finite and >= 0, top_p in (0, 1], seed in [0, 2**63), max_new_tokens in
  [1, the replica's limit].
- A round: at most `tandem.limits.MAX_DRAFT_LEN` drafts (the protocol's bound; more is refused).
  Of those, drafts past the replica's `max_draft_len` or past the context are dropped, not
  refused: at most min(max_draft_len, max_context - position - 1) are verified (the round still
  emits a token), and the verdict says how many were accepted. An edge that drafts before it
  has read SessionOpened cannot know these limits, so dropping keeps its answer going. In
  sampling mode exactly one q row per draft, each 1..vocab distinct ids with finite,
  non-negative probabilities summing to 1 (within `Q_SUM_TOLERANCE`), the draft having mass in
  its own row; in greedy mode none.
- A tree round (`draft_parents` set, `tandem_core.tree`'s convention shifted by one): one
  parent + 1 per draft, each 0 or at most its own index; at most the replica's
  `max_tree_nodes` drafts (which replaces the 16-draft bound; 0: the replica refuses trees);
  each root-to-draft path at most `tandem_core.tree.MAX_TREE_DEPTH` drafts; siblings distinct.
  In sampling mode one q row per sibling group (the root, then each draft with children,
  ascending), each checked as a chain's, every child with mass in its group's row. Drafts
  deeper than max_draft_len or past the context are dropped with their subtrees (and the q
  rows of groups left without children); what remains may be a chain, verified as one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_node.errors import BadRequest, echo
from tandem.limits import MAX_DRAFT_LEN
from tandem_core.loop import Draft
from tandem_core.sampling import SamplingParams
from tandem_core.tree import MAX_TREE_DEPTH, MAX_TREE_NODES

MAX_ID_CHARS = 128  # session_id, model, a message's role
MAX_MESSAGES = 256
MESSAGE_CHARS_PER_TOKEN = 64  # chat text allowed per token of context, before templating
Q_SUM_TOLERANCE = 1e-3  # q rows arrive as float32; renormalized after this check


@dataclass(frozen=True)
class SessionSpec:
    """What opens a session (the proto's SessionSpec, unvalidated)."""

    session_id: str = ""
    model: str = ""  # "" = the served model
    prompt_tokens: tuple[int, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); used when prompt_tokens is empty
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 0
    generated_tokens: tuple[int, ...] = ()  # resume: committed after the prompt


@dataclass(frozen=True)
class DraftRound:
    """One round from the edge. q_rows[i] = (ids, probs): the drafter's q at draft i, sparse."""

    round: int
    draft_tokens: tuple[int, ...]  # (k,)
    q_rows: tuple[tuple[Sequence[int], Sequence[float]], ...] = ()  # k rows in sampling mode (a tree: groups)
    assume_position: int = 0  # pipelining: verify only if the session then holds this many tokens...
    assume_token: int = 0  # ...the last of them this one (see protos/tandem/v1/cloud.proto)
    draft_parents: tuple[int, ...] = ()  # (k,) a tree: parent index + 1 per draft (0: the root); () a chain


@dataclass(frozen=True)
class CheckedSpec:
    params: SamplingParams
    seed: int | None
    prompt: list[int]
    generated: list[int]


@dataclass(frozen=True)
class Checker:
    """The bounds of one replica, and the checks of what a client sends against them."""

    vocab: int
    max_context: int
    max_draft_len: int
    max_new_tokens: int
    eos_ids: frozenset[int]
    model_name: str
    tokenizer: Any = None  # for `messages`; None refuses them
    max_tree_nodes: int = MAX_TREE_NODES  # drafts a tree round may hold; 0: trees are refused

    def spec(self, spec: SessionSpec) -> CheckedSpec:
        check_session_id(spec.session_id)
        if len(spec.model) > MAX_ID_CHARS or (spec.model and spec.model != self.model_name):
            raise BadRequest(f"model: unknown model {echo(spec.model)}; this server has {self.model_name!r}")
        try:
            params = SamplingParams(float(spec.temperature), int(spec.top_k), float(spec.top_p), None)
        except ValueError as exc:
            raise BadRequest(f"sampling: {exc}") from None
        limit = self.max_new_tokens
        if not 1 <= spec.max_new_tokens <= limit:
            raise BadRequest(f"max_new_tokens: must be in [1, {limit}], got {spec.max_new_tokens}")
        if spec.seed is not None and not 0 <= spec.seed < 2**63:
            raise BadRequest(f"sampling.seed: must be in [0, 2**63), got {spec.seed}")
        if len(spec.generated_tokens) >= spec.max_new_tokens:
            raise BadRequest(f"generated_tokens: {len(spec.generated_tokens)} tokens already reach max_new_tokens="
                             f"{spec.max_new_tokens}; nothing is left to generate")
        prompt = self._prompt(spec)
        generated = self.ids("generated_tokens", spec.generated_tokens)
        if any(t in self.eos_ids for t in generated):
            raise BadRequest("generated_tokens: contains an end-of-sequence token; the answer is finished")
        self._fits_context(len(prompt), len(generated))
        return CheckedSpec(params, spec.seed, prompt, generated)

    def _fits_context(self, prompt: int, generated: int) -> None:
        if prompt + generated >= self.max_context:
            raise BadRequest(f"prompt_tokens: prompt of {prompt} tokens (+{generated} generated) "
                             f"is at or past max_context={self.max_context}")

    def _prompt(self, spec: SessionSpec) -> list[int]:
        if spec.prompt_tokens:
            self._fits_context(len(spec.prompt_tokens), len(spec.generated_tokens))
            return self.ids("prompt_tokens", spec.prompt_tokens)
        if not spec.messages:
            raise BadRequest("prompt_tokens: empty prompt (send prompt_tokens or messages)")
        check_messages(spec.messages, MESSAGE_CHARS_PER_TOKEN * self.max_context)
        if self.tokenizer is None:
            raise BadRequest("messages: this server has no tokenizer; send prompt_tokens")
        from cloud_node.scorer import encode_prompt

        try:
            ids = encode_prompt(self.tokenizer, messages=[{"role": r, "content": c} for r, c in spec.messages])
        except Exception as exc:  # noqa: BLE001 - any template error is the client's input
            raise BadRequest(f"messages: the chat template rejected them ({template_reason(exc)})") from None
        return self.ids("messages", ids)

    def ids(self, field: str, ids: Sequence[int]) -> list[int]:
        out = [int(t) for t in ids]
        bad = [t for t in out if not 0 <= t < self.vocab]
        if bad:
            raise BadRequest(f"{field}: token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}")
        return out

    def draft(self, draft: DraftRound, params: SamplingParams, position: int) -> Draft:
        """The round as the `Draft` to verify: a chain (`round`), or a tree (`tree_round`)."""
        if not draft.draft_parents:
            tokens, q = self.round(draft, params, position)
            return Draft(tuple(tokens), q)
        return self.tree_round(draft, params, position)

    def tree_round(self, draft: DraftRound, params: SamplingParams, position: int) -> Draft:
        """A tree round checked (module docstring), cut to max_draft_len and the context; a chain
        `Draft` when what remains is one."""
        k = len(draft.draft_tokens)
        if len(draft.draft_parents) != k:
            raise BadRequest(f"draft_parents: {len(draft.draft_parents)} entries for {k} draft_tokens "
                             "(one per draft for a tree, none for a chain)")
        if not self.max_tree_nodes:
            raise BadRequest("draft_parents: this replica verifies no trees (max_tree_nodes=0); send a chain")
        if k > self.max_tree_nodes:
            raise BadRequest(f"draft_parents: a tree of {k} drafts exceeds max_tree_nodes={self.max_tree_nodes}")
        tokens = self.ids("draft_tokens", draft.draft_tokens)
        if draft.assume_position:
            self.ids("assume_token", (draft.assume_token,))
        parents = tree_parents(draft.draft_parents, tokens)
        groups = sorted(set(parents))
        q = self.tree_q(draft.q_rows, tokens, parents, groups, params)
        keep = max(0, min(self.max_draft_len, self.max_context - position - 1))
        return cut_tree(tokens, parents, groups, q, keep)

    def tree_q(self, rows: Sequence[tuple[Sequence[int], Sequence[float]]], tokens: list[int], parents: list[int],
               groups: list[int], params: SamplingParams) -> np.ndarray | None:
        """Dense (groups, V) float64 q of a tree from the sparse rows, each checked and renormalized."""
        if params.greedy:
            if rows:
                raise BadRequest("q_rows: must be empty in greedy mode (temperature 0)")
            return None
        if len(rows) != len(groups):
            raise BadRequest(f"q_rows: got {len(rows)} rows for a tree of {len(groups)} sibling groups (sampling "
                             "mode needs one per group: the root, then each draft with children, ascending)")
        q = self._dense(rows)
        row = {a: g for g, a in enumerate(groups)}
        for i, (a, x) in enumerate(zip(parents, tokens, strict=True)):
            if q[row[a], x] <= 0:
                raise BadRequest(f"q_rows[{row[a]}]: draft {i} has probability 0 in its sibling group's q row")
        return q

    def _dense(self, rows: Sequence[tuple[Sequence[int], Sequence[float]]]) -> np.ndarray:
        """(len(rows), V) float64: each sparse row checked (`_q_row`) and renormalized."""
        q = np.zeros((len(rows), self.vocab), dtype=np.float64)
        for i, (ids, probs) in enumerate(rows):
            ids_a, probs_a = self._q_row(f"q_rows[{i}]", ids, probs)
            q[i, ids_a] = probs_a / float(probs_a.sum())
        return q

    def round(self, draft: DraftRound, params: SamplingParams, position: int) -> tuple[list[int], np.ndarray | None]:
        """The drafts to verify and their dense q, both cut to max_draft_len and the context."""
        k, most = len(draft.draft_tokens), max(MAX_DRAFT_LEN, self.max_draft_len)
        if k > most:
            raise BadRequest(f"draft_tokens: {k} drafts exceed the protocol's max_draft_len={most}")
        tokens = self.ids("draft_tokens", draft.draft_tokens)
        if draft.assume_position:  # one past the context can never hold: the round is dropped, not refused
            self.ids("assume_token", (draft.assume_token,))
        q = self.q_rows(draft.q_rows, tokens, params)
        keep = max(0, min(k, self.max_draft_len, self.max_context - position - 1))
        return tokens[:keep], (None if q is None else q[:keep])

    def q_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[float]]], tokens: list[int],
               params: SamplingParams) -> np.ndarray | None:
        """Dense (k, V) float64 q from the sparse rows, each row checked and renormalized."""
        if params.greedy:
            if rows:
                raise BadRequest("q_rows: must be empty in greedy mode (temperature 0)")
            return None
        if len(rows) != len(tokens):
            raise BadRequest(f"q_rows: got {len(rows)} rows for {len(tokens)} drafts (sampling mode "
                             "needs one per draft)")
        q = self._dense(rows)
        for i, x in enumerate(tokens):
            if q[i, x] <= 0:
                raise BadRequest(f"q_rows[{i}]: draft token {x} has probability 0 in its own q row")
        return q

    def _q_row(self, where: str, ids: Sequence[int], probs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        if not 0 < len(ids) <= self.vocab or len(ids) != len(probs):
            raise BadRequest(f"{where}: ids and probs must be non-empty, of equal length and at most the "
                             f"vocabulary ({self.vocab}) long, got {len(ids)} and {len(probs)}")
        ids_a = np.asarray(ids, dtype=np.int64)
        probs_a = np.asarray(probs, dtype=np.float64)
        if ids_a.min() < 0 or ids_a.max() >= self.vocab:
            raise BadRequest(f"{where}: ids outside the vocabulary [0, {self.vocab})")
        if np.unique(ids_a).size != ids_a.size:
            raise BadRequest(f"{where}: ids must not repeat")
        if not np.isfinite(probs_a).all() or probs_a.min() < 0:
            raise BadRequest(f"{where}: probabilities must be finite and non-negative (NaN, inf or < 0 sent)")
        total = float(probs_a.sum())
        if not math.isclose(total, 1.0, abs_tol=Q_SUM_TOLERANCE):
            raise BadRequest(f"{where}: probabilities must sum to 1, got {total:.6f}")
        return ids_a, probs_a


def tree_parents(draft_parents: Sequence[int], tokens: Sequence[int]) -> list[int]:
    """The wire's parent + 1 per draft as `tandem_core.tree` parents (-1: the root), checked:
    topological order, paths of at most MAX_TREE_DEPTH drafts, distinct siblings."""
    parents: list[int] = []
    depth: list[int] = []
    seen: dict[tuple[int, int], int] = {}  # (parent, token) -> the draft that holds it
    for i, p in enumerate(draft_parents):
        if not 0 <= p <= i:
            raise BadRequest(f"draft_parents[{i}]: must be 0 (a child of the last committed token) or an earlier "
                             f"draft's index + 1 (at most {i}), got {p}")
        a = int(p) - 1
        depth.append(0 if a < 0 else depth[a] + 1)
        if depth[i] >= MAX_TREE_DEPTH:
            raise BadRequest(f"draft_parents[{i}]: a path of {depth[i] + 1} drafts exceeds the protocol's "
                             f"{MAX_TREE_DEPTH}")
        twin = seen.setdefault((a, int(tokens[i])), i)
        if twin != i:
            raise BadRequest(f"draft_parents[{i}]: draft {i} repeats the token of its sibling, draft {twin} "
                             "(siblings hold distinct tokens)")
        parents.append(a)
    return parents


def cut_tree(tokens: list[int], parents: list[int], groups: list[int], q: np.ndarray | None, keep: int) -> Draft:
    """The drafts at depth < keep (each with its ancestors: a child lies one deeper), renumbered,
    with the q rows of the groups that keep children; a chain `Draft` when that is one."""
    depth: list[int] = []
    new: dict[int, int] = {-1: -1}  # old index -> new, for the drafts kept
    for i, a in enumerate(parents):
        depth.append(0 if a < 0 else depth[a] + 1)
        if depth[i] < keep:
            new[i] = len(new) - 1
    kept = [i for i in range(len(tokens)) if i in new]
    cut_parents = tuple(new[parents[i]] for i in kept)
    cut_tokens = tuple(tokens[i] for i in kept)
    live = {parents[i] for i in kept}
    rows = None if q is None else q[[g for g, a in enumerate(groups) if a in live]]
    if cut_parents == tuple(range(-1, len(kept) - 1)):  # a chain: its groups are the linear q's rows
        return Draft(cut_tokens, rows)
    return Draft(cut_tokens, rows, parents=cut_parents)


def check_session_id(session_id: str) -> None:
    if len(session_id) > MAX_ID_CHARS or not all("!" <= c <= "~" for c in session_id):
        raise BadRequest(f"session_id: must be at most {MAX_ID_CHARS} printable ASCII characters "
                         f"(no spaces), got {len(session_id)} characters")


def check_messages(messages: Sequence[tuple[str, str]], max_chars: int) -> None:
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"messages: {len(messages)} messages exceed the limit of {MAX_MESSAGES}")
    if any(len(role) > MAX_ID_CHARS for role, _ in messages):
        raise BadRequest(f"messages: a role is longer than {MAX_ID_CHARS} characters")
    chars = sum(len(role) + len(content) for role, content in messages)
    if chars > max_chars:
        raise BadRequest(f"messages: {chars} characters exceed the limit of {max_chars}")


def template_reason(exc: Exception) -> str:
    """What to tell a client about a chat-template error: the template's own message (jinja's
    `raise_exception`), first line only; never the text of another exception."""
    if type(exc).__module__.startswith("jinja2"):
        line = (str(exc).splitlines() or [""])[0]
        return line[:120]
    return type(exc).__name__
