"""Where a draft chain gets siblings: the draft tree a round sends, greedy or sampled (RSD-C).

Notation as in `tandem_core.verify`: p is the target's distribution, q the drafter's.

The drafter proposes a chain x_1..x_k (its first choices, or its draws in sampling mode). At
each depth i it also names *alternatives*: in greedy mode its next likeliest tokens, in sampling
mode further draws without replacement from q_i, continuing the position's random stream, so
that x_i is that stream's first draw (`DrafterSession.alternatives`). The round's tree is the
chain plus some alternatives as leaf siblings of x_i (children of x_{i-1}, after it in draw
order): a *caterpillar*. Its q rows are the chain's (the sibling groups are the chain's nodes),
so the sampled tree is one RSD-C draws (Jeon et al., arXiv 2402.14160) with per-depth widths,
and `tandem_core.tree.verify_tree` keeps the output distributed as p.

Gain and cost. A sibling s at depth i commits one token more than the chain alone when the
chain is accepted up to i, rejected at i, and the target takes s (it then commits s and its
own token after it, instead of its correction at i):
    g(i, r) = R_i r_i * lambda * m_r,   r_i = min(1, rho (1 - q_i(x_i))),   R_i = prod_{j<i} (1 - r_j),
with r_i the chance the chain is rejected at i, from the drafter's confidence in x_i (as EAGLE-2
ranks its tree by the drafter's confidence), m_r the drafter's mass of the r-th alternative
relative to what is left once x_i is out, and rho, lambda learnt calibrations (`SiblingRate`:
rejections over predicted rejections at the depths verified, siblings taken over predicted, each
from a prior of 1). A sibling adds one row
to the verification pass, `row_s` seconds (the slope of the learnt round time), and a token is
worth `token_s` seconds at the round's plan, so the r-th alternative at depth i goes in while
g(i, r) * token_s > row_s, best first, up to `max_nodes` nodes, ranks in order at each depth.

Exactness (sampling). Whether the r-th alternative goes in may depend on the chain and on the
alternatives drawn before it, never on its own draw or later ones: then, given everything the
verifier has seen when it reaches that candidate, the candidate is still distributed as q less
the tokens tried (the condition of RSD's proof, `tandem_core.tree`). So in sampling mode m_r is
its *expected* mass before the draw, sum_{y not drawn} q(y)^2 / (1 - q(drawn)), over (1 - q(x_i));
in greedy mode (exact for any tree) it is the drafter's own probability q(s_r) / (1 - q(x_i)).

Pure: numpy only; deterministic given its inputs.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from tandem_core.loop import Draft
from tandem_core.tree import MAX_TREE_NODES

PRIOR_WEIGHT = 4.0  # pseudo-observations behind lambda = 1
MAX_WIDTH = 3  # alternatives a depth may get besides the chain's token
DEFAULT_TREE_NODES = 24  # nodes a tree may hold by default: with the root, within one 32-row tile of the cloud's pass


class Costs(Protocol):
    """What a plan weighs rows against (`tandem_core.lookup.LookupPolicy`)."""

    @property
    def row_s(self) -> float: ...

    def token_s(self, k: int) -> float: ...


@dataclass(frozen=True)
class Alternatives:
    """What the drafter offers at one depth besides its chain token x_i."""

    p_chain: float  # q_i(x_i): greedy, the drafter's softmax; sampling, the q row sent
    tokens: tuple[int, ...]  # alternatives in draw order (greedy: likeliest first), none equal to x_i
    mass: tuple[float, ...]  # m_r for each (the module doc): its own in greedy mode, expected in sampling

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.mass):
            raise ValueError(f"{len(self.tokens)} alternatives but {len(self.mass)} masses")
        if not 0.0 <= self.p_chain <= 1.0 or any(not 0.0 <= m <= 1.0 for m in self.mass):
            raise ValueError("probabilities must lie in [0, 1]")


def greedy_alternatives(probs: np.ndarray, chain_token: int, width: int = MAX_WIDTH) -> Alternatives:
    """The `width` likeliest tokens other than `chain_token` under `probs` (a (V,) distribution)."""
    probs = np.asarray(probs, dtype=np.float64)
    top = np.argpartition(probs, -(width + 1))[-(width + 1):] if probs.shape[0] > width + 1 else np.arange(probs.shape[0])
    order = sorted((int(t) for t in top if int(t) != chain_token and probs[t] > 0), key=lambda t: (-probs[t], t))[:width]
    p_c = float(probs[chain_token])
    rest = max(1.0 - p_c, 1e-12)
    return Alternatives(p_c, tuple(order), tuple(min(1.0, float(probs[t]) / rest) for t in order))


def sampled_alternatives(q: np.ndarray, draws: Sequence[int]) -> Alternatives:
    """`draws` (the chain token first, then the alternatives, without replacement from q) with
    each alternative's expected mass before it was drawn (the module doc)."""
    q = np.asarray(q, dtype=np.float64)
    chain_token, alts = int(draws[0]), [int(t) for t in draws[1:]]
    p_c = float(q[chain_token])
    rest = max(1.0 - p_c, 1e-12)
    # On q's support only (a capped row: at most the drafter's q support, not the vocabulary),
    # and without BLAS: a dot product over the whole row cost ~20 ms on a one-core edge.
    support = np.flatnonzero(q)
    left = q[support]
    left[support == chain_token] = 0.0
    mass = []
    for t in alts:
        total = float(left.sum())
        mass.append(min(1.0, float((left * left).sum()) / total / rest) if total > 0 else 0.0)
        left[support == t] = 0.0
    return Alternatives(p_c, tuple(alts), tuple(mass))


class SiblingRate:
    """The two calibrations of the module doc: rho (chain rejections observed over those the
    drafter's confidence predicts, at every depth a verdict tested) and lambda (siblings taken
    over those predicted, at each depth where the chain was rejected and had siblings)."""

    def __init__(self) -> None:
        self.rejected, self.rejected_predicted = PRIOR_WEIGHT, PRIOR_WEIGHT
        self.hits, self.predicted = PRIOR_WEIGHT, PRIOR_WEIGHT

    @property
    def rho(self) -> float:
        return self.rejected / self.rejected_predicted

    @property
    def scale(self) -> float:
        return self.hits / self.predicted

    def learn_chain(self, p_chain: Sequence[float], kept: int) -> None:
        """A verdict kept the chain's first `kept` drafts of those whose confidences are `p_chain`."""
        tested = p_chain[:kept + 1]
        self.rejected_predicted += sum(1.0 - p for p in tested)
        self.rejected += float(kept < len(p_chain))

    def learn(self, predicted: float, hit: bool) -> None:
        """The chain was rejected where siblings predicted to be taken with `predicted` stood."""
        self.predicted += max(0.0, predicted)
        self.hits += float(hit)


@dataclass(frozen=True)
class Plan:
    """Siblings per depth: counts[i] alternatives of depth i go in (the first ones, in order)."""

    counts: tuple[int, ...]
    predicted: tuple[float, ...]  # per depth, the predicted P(a sibling is taken | rejected there)

    @property
    def nodes(self) -> int:
        return sum(self.counts)


def plan(alts: Sequence[Alternatives], *, rho: float, scale: float, row_s: float, token_s: float,
         max_nodes: int) -> Plan:
    """The siblings worth their rows (module doc); `max_nodes` bounds the whole tree, chain included."""
    k = len(alts)
    counts, predicted = [0] * k, [0.0] * k
    room = min(max_nodes, MAX_TREE_NODES) - k
    reach = 1.0
    heap: list[tuple[float, int, float]] = []  # (-gain of the depth's next alternative, depth, weight)
    for i, alt in enumerate(alts):
        r_i = min(1.0, rho * (1.0 - alt.p_chain))
        weight = reach * r_i * scale
        if alt.tokens:
            heapq.heappush(heap, (-weight * alt.mass[0], i, weight))
        reach *= 1.0 - r_i
    while heap and room > 0:
        neg_gain, i, weight = heapq.heappop(heap)
        if -neg_gain * token_s <= row_s:
            break
        counts[i] += 1
        predicted[i] += alts[i].mass[counts[i] - 1] * scale
        room -= 1
        if counts[i] < len(alts[i].tokens):
            heapq.heappush(heap, (-weight * alts[i].mass[counts[i]], i, weight))
    return Plan(tuple(counts), tuple(min(1.0, p) for p in predicted))


def with_siblings(draft: Draft, alts: Sequence[Alternatives], counts: Sequence[int]) -> Draft:
    """`draft` (a chain) with counts[i] alternatives of depth i as leaf siblings of its token i,
    after the chain's nodes; the draft itself when there are none."""
    k = len(draft.tokens)
    if draft.parents is not None or len(alts) != k or len(counts) != k:
        raise ValueError("with_siblings takes a chain and one entry per draft")
    extra = [(i, t) for i in range(k) for t in alts[i].tokens[:counts[i]]]
    if not extra:
        return draft
    tokens = (*draft.tokens, *(t for _, t in extra))
    parents = (*range(-1, k - 1), *(i - 1 for i, _ in extra))
    return replace(draft, tokens=tokens, parents=parents)


def sibling_outcome(chain_len: int, siblings: Sequence[Sequence[int]], kept: int,
                    tokens: Sequence[int]) -> bool | None:
    """Whether a verdict committing `tokens` (the chain's first `kept` in place) took a sibling at
    the depth where the chain was rejected; None when that depth had none (or nothing was
    rejected)."""
    if kept >= chain_len or kept >= len(tokens) or not siblings[kept]:
        return None
    return int(tokens[kept]) in {int(t) for t in siblings[kept]}


class Branching:
    """Model rounds sent as draft trees where siblings pay (`tandem_core.branching`): it plans
    each round from the drafter's alternatives and the policy's costs, and learns from verdicts.

    `room()` says how many nodes the verifier takes now (0: chains only). The round in flight
    and the round drafted ahead each keep their chain's confidences and siblings per depth."""

    def __init__(self, model: object, policy: Costs, room: Callable[[], int]) -> None:
        self.model, self.policy, self.room = model, policy, room
        self.rate = SiblingRate()
        self._sent: tuple[tuple[float, ...], tuple[tuple[int, ...], ...], tuple[float, ...]] | None = None
        self._ahead: tuple[tuple[float, ...], tuple[tuple[int, ...], ...], tuple[float, ...]] | None = None
        self.tree_rounds = 0

    def branch(self, draft: Draft, *, ahead: bool = False) -> Draft:
        """`draft` (a model chain) with the siblings that pay; the chain itself otherwise."""
        alternatives = getattr(self.model, "alternatives", None)
        room = self.room()
        alts = alternatives(draft, ahead=ahead) if draft.tokens and room > 0 and alternatives is not None else None
        record = None
        if alts is not None:
            p = self.policy
            chosen = plan(alts, rho=self.rate.rho, scale=self.rate.scale, row_s=p.row_s,
                          token_s=p.token_s(len(draft.tokens)), max_nodes=room)
            draft = with_siblings(draft, alts, chosen.counts)
            record = (tuple(a.p_chain for a in alts), tuple(a.tokens[:c] for a, c in zip(alts, chosen.counts)),
                      chosen.predicted)
            self.tree_rounds += int(chosen.nodes > 0)
        if ahead:
            self._ahead = record
        else:
            self._sent = record
        return draft

    def learn(self, kept: int, tokens: Sequence[int]) -> None:
        """The verdict of the round in flight: it kept the chain's first `kept` drafts."""
        sent, self._sent = self._sent, None
        if sent is None:
            return
        p_chain, siblings, predicted = sent
        self.rate.learn_chain(p_chain, min(kept, len(p_chain)))
        hit = sibling_outcome(len(p_chain), siblings, kept, tokens)
        if hit is not None:
            self.rate.learn(predicted[kept], hit)

    def promote(self) -> None:
        """The round drafted ahead is now the round in flight."""
        self._sent, self._ahead = self._ahead, None

    def forget_ahead(self) -> None:
        self._ahead = None

    def forget(self) -> None:
        self._sent = self._ahead = None
