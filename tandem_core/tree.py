"""Draft trees: several continuations checked in one verification pass, greedy or lossless sampling.

Notation as in `tandem_core.verify`: **p** is the target's distribution, **q** the drafter's. The
sampling rule is the recursive rejection sampling of Recursive Speculative Decoding (Jeon et al.,
"Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without Replacement",
arXiv 2402.14160), with a tree of constant or per-depth branching (their RSD-C).

**The tree.** n <= MAX_TREE_NODES nodes in topological order; node i holds a token and a parent
index (-1: a child of the *root*, the last committed token). Siblings hold distinct tokens and
are listed in the order they were drawn. A node's depth is its number of ancestors (0 under the
root), so its position in the sequence is (tokens committed) + depth, and a root-to-node path is
at most MAX_TREE_DEPTH tokens. A draft of k tokens is the chain with parents -1, 0, ..., k-2.
In sampling mode the tree carries q as one row per *sibling group*: row g is the distribution the
children of `groups[g]` were drawn from, without replacement; for a chain the rows are exactly
the linear `Draft.q`.

**Target rows.** Verification takes (n + 1, V) target rows laid out as `verify_greedy` lays out
a linear round: row 0 is the distribution after the root, row 1 + i the one after node i. For a
chain this is the linear (k + 1, V) layout.

**Greedy** (`verify_tree_greedy`): from the root, follow the child that holds the target's argmax
while there is one; commit that path, then the target's argmax after it. Greedy output equals the
target's greedy decoding, whatever the tree.

**Sampling** (`verify_tree_stochastic`): at the current node with target row p and the children
x_1..x_w drawn without replacement from q, let p_1 = p, q_1 = q and for i = 1..w:
  accept x_i if u_i * q_i(x_i) < p_i(x_i)   (u_i ~ U[0, 1), i.e. with probability min(1, p_i/q_i));
  else p_{i+1} = norm(max(0, p_i - q_i)) and q_{i+1}(x) = q_i(x) [x != x_i] / (1 - q_i(x_i)).
An accepted child becomes the current node; if all w are rejected, the recovered token is drawn
from p_{w+1}; at a leaf, the bonus token is drawn from its row of p.

Why the output follows p exactly. Claim: for any p' and q', if the next candidate is
distributed as q' given everything seen so far, the step above (then the steps after it) outputs
y with probability p'(y). By induction on the candidates left: with none left, the token is drawn
from p' itself. Otherwise P(accept, y) = q'(y) min(1, p'(y)/q'(y)) = min(p'(y), q'(y)), and
P(reject) = 1 - sum min(p', q') = sum max(0, p' - q'), which is the mass of the residual; given a
rejection of any x, p'' = norm(max(0, p' - q')) does not depend on x, and without replacement the
next candidate is distributed as q' less x, renormalized, which is q'' given the history, so by
induction the rest outputs p''. Together: min(p', q')(y) + max(0, p' - q')(y) = p'(y). Applied at
every node of the accepted path, each committed token follows p given the ones before it. The
renormalization is what sampling *without* replacement requires (SpecInfer's rule for i.i.d.
children keeps q_i = q). A rejected x_i had p_i(x_i) < q_i(x_i), so p_{i+1}(x_i) = 0: the
residual never proposes a token already tried.

Randomness: `verify_tree_stochastic` draws n uniforms at once (one per node, used only if the
node is tested) and then one number for the recovered or bonus token: n + 1 per round, as
`verify_stochastic` draws k + 1, and for a chain the two give the same verdict from the same
generator. Callers key the generator by (seed, position) with `tandem_core.sampling.round_rng`.
The drafter side, `sample_tree`, draws the children of each node by successive `sample` calls
(equivalent to Gumbel-top-w), one uniform per child, from the stream of the children's depth, so
a tree of width 1 is drawn exactly as the linear drafter draws its tokens.

Malformed input raises ValueError naming the problem.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from tandem_core.sampling import SamplingParams, logits_to_probs, sample
from tandem_core.verify import Verdict, _check_probs, _residual, finalize

MAX_TREE_NODES = 64  # nodes per tree (rows of one verification pass, besides the root's)
MAX_TREE_DEPTH = 16  # tokens on a root-to-node path (the protocol's MAX_DRAFT_LEN)

QFn = Callable[[tuple[int, ...]], np.ndarray]  # path tokens after the committed ones -> (V,) q


@dataclass(frozen=True)
class DraftTree:
    """A draft tree in topological order (see the module docstring)."""

    tokens: tuple[int, ...]  # (n,) token id of each node
    parents: tuple[int, ...]  # (n,) parent node index, < its own index; -1 = the root
    # (G, V) float64, sampling mode only: row g is the q the children of groups[g] were drawn
    # from without replacement, in index order. None in greedy mode.
    q: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(operator.index(t) for t in self.tokens))
        object.__setattr__(self, "parents", tuple(operator.index(a) for a in self.parents))
        n = len(self.tokens)
        if len(self.parents) != n:
            raise ValueError(f"tokens and parents must have equal length, got {n} and {len(self.parents)}")
        if n > MAX_TREE_NODES:
            raise ValueError(f"a tree has at most {MAX_TREE_NODES} nodes, got {n}")
        if any(t < 0 for t in self.tokens):
            raise ValueError(f"token ids must be >= 0, got {self.tokens}")
        for i, a in enumerate(self.parents):
            if not -1 <= a < i:
                raise ValueError(f"node {i}: parent must be -1 (the root) or an earlier node, got {a}")
        if n and max(self.depths) >= MAX_TREE_DEPTH:
            raise ValueError(f"a root-to-node path has at most {MAX_TREE_DEPTH} tokens, got {max(self.depths) + 1}")
        for a in self.groups:
            kids = [self.tokens[c] for c in self.children(a)]
            if len(set(kids)) != len(kids):
                raise ValueError(f"the children of node {a} must hold distinct tokens, got {kids}")
        if self.q is not None:
            object.__setattr__(self, "q", self._checked_q(self.q))

    def _checked_q(self, q_rows: np.ndarray) -> np.ndarray:
        q = np.asarray(q_rows, dtype=np.float64)
        if q.ndim != 2 or q.shape[0] != len(self.groups) or q.shape[1] == 0:
            raise ValueError(f"q must be ({len(self.groups)}, V): one row per sibling group, got {q.shape}")
        _check_probs(q, "q")
        vocab = q.shape[1]
        for g, a in enumerate(self.groups):
            for c in self.children(a):
                if not self.tokens[c] < vocab:
                    raise ValueError(f"node {c}: token {self.tokens[c]} is outside the vocabulary [0, {vocab})")
                if not q[g, self.tokens[c]] > 0:
                    raise ValueError(f"node {c}: token {self.tokens[c]} has q = 0, so it cannot have been drawn")
        return q

    @classmethod
    def chain(cls, tokens: Sequence[int], q: np.ndarray | None = None) -> DraftTree:
        """The linear draft x_1..x_k as a tree (parents -1, 0, ..., k-2); q is the linear (k, V)."""
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)), q)

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """(n,) number of ancestors of each node: its position is (committed tokens) + depth."""
        out: list[int] = []
        for a in self.parents:
            out.append(0 if a < 0 else out[a] + 1)
        return tuple(out)

    @cached_property
    def _children(self) -> dict[int, tuple[int, ...]]:
        kids: dict[int, list[int]] = {}
        for i, a in enumerate(self.parents):
            kids.setdefault(a, []).append(i)
        return {a: tuple(c) for a, c in kids.items()}

    def children(self, node: int) -> tuple[int, ...]:
        """Indices of the children of `node` (-1: the root), in index (= draw) order."""
        return self._children.get(node, ())

    @cached_property
    def groups(self) -> tuple[int, ...]:
        """The nodes that have children (-1 first if the root has), ascending: q's row order."""
        return tuple(sorted(self._children))

    @cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """For each node, the node indices from the root's child down to the node itself."""
        out: list[tuple[int, ...]] = []
        for i, a in enumerate(self.parents):
            out.append((*(out[a] if a >= 0 else ()), i))
        return tuple(out)

    def path_tokens(self, node: int) -> tuple[int, ...]:
        """The tokens from the root's child down to `node` (-1: none)."""
        return () if node < 0 else tuple(self.tokens[i] for i in self.paths[node])

    def ancestor_mask(self) -> np.ndarray:
        """(n, n) bool: [i, j] iff node j is node i or one of its ancestors (tree attention).

        A verification pass over [root, node 0, ..., node n-1] lets every node see the committed
        cache, the root, and the nodes this mask allows.
        """
        n = len(self)
        mask = np.eye(n, dtype=bool)
        for i, a in enumerate(self.parents):
            if a >= 0:
                mask[i] |= mask[a]
        return mask

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, len(self) - 1))


@dataclass(frozen=True)
class TreeVerdict:
    """A verification round over a tree."""

    verdict: Verdict  # what the round commits, as for a linear round
    path: tuple[int, ...]  # (verdict.accepted,) the accepted nodes, root to leaf: the KV rows to keep


def _target_rows(tree: DraftTree, rows: np.ndarray, name: str) -> np.ndarray:
    n = len(tree)
    if rows.ndim != 2 or rows.shape[0] != n + 1 or rows.shape[1] == 0:
        raise ValueError(f"{name} must be ({n + 1}, V) for a tree of {n} nodes, got {rows.shape}")
    if tree.tokens and max(tree.tokens) >= rows.shape[1]:
        raise ValueError(f"tree token ids must be in [0, {rows.shape[1]}), got {tree.tokens}")
    return rows


def _verdict(tree: DraftTree, path: list[int], nxt: int, eos_ids: frozenset[int], remaining: int) -> TreeVerdict:
    verdict = finalize(len(path), [*(tree.tokens[i] for i in path), nxt], eos_ids, remaining)
    return TreeVerdict(verdict, tuple(path[: verdict.accepted]))


def verify_tree_greedy(
    tree: DraftTree, target_logits: np.ndarray, *, eos_ids: frozenset[int], remaining: int
) -> TreeVerdict:
    """Follow the target's argmax down the tree; commit the path and the argmax after it.

    target_logits is (n + 1, V): row 0 after the root, row 1 + i after node i. Ties go to the
    lowest token id, as in `verify_greedy`.
    """
    logits = _target_rows(tree, np.asarray(target_logits), "target_logits")
    if np.isnan(logits).any():
        raise ValueError("target_logits contain NaN")
    best = np.argmax(logits, axis=1).tolist()
    path: list[int] = []
    node = -1
    while (nxt := next((c for c in tree.children(node) if tree.tokens[c] == best[node + 1]), None)) is not None:
        path.append(nxt)
        node = nxt
    return _verdict(tree, path, best[node + 1], eos_ids, remaining)


def _without(q: np.ndarray, x: int) -> np.ndarray:
    """q with token x removed, renormalized: the law of the next child drawn without replacement."""
    r = q.copy()
    r[x] = 0.0
    return r / float(r.sum())


def _recursive_rejection(p: np.ndarray, q: np.ndarray, xs: list[int], us: list[float]) -> tuple[int | None, np.ndarray]:
    """(index of the first accepted candidate or None, the row the next token comes from)."""
    for i, (x, u) in enumerate(zip(xs, us)):
        if u * q[x] < p[x]:  # u < min(1, p/q) without a division
            return i, p
        p = _residual(p, q)
        if i + 1 < len(xs):
            q = _without(q, x)
    return None, p


def verify_tree_stochastic(
    tree: DraftTree, p: np.ndarray, rng: np.random.Generator, *, eos_ids: frozenset[int], remaining: int
) -> TreeVerdict:
    """Recursive rejection sampling down the tree (module docstring); output distributed as p.

    p is (n + 1, V) target probabilities from `logits_to_probs`, laid out as in
    `verify_tree_greedy`; the tree must carry the q its children were drawn from. Draws exactly
    n + 1 numbers from `rng`.
    """
    p_rows = _target_rows(tree, np.asarray(p, dtype=np.float64), "p")
    _check_probs(p_rows, "p")
    if tree.q is None and len(tree):
        raise ValueError("sampling mode needs the q each sibling group was drawn from")
    if tree.q is not None and tree.q.shape[1] != p_rows.shape[1]:
        raise ValueError(f"q has {tree.q.shape[1]} columns but p has {p_rows.shape[1]}")
    q_rows = tree.q if tree.q is not None else np.zeros((0, p_rows.shape[1]))
    u = rng.random(len(tree)).tolist()
    row = {a: g for g, a in enumerate(tree.groups)}
    path: list[int] = []
    node = -1
    while True:
        kids = tree.children(node)
        p_row = p_rows[node + 1]
        if kids:
            picked, p_row = _recursive_rejection(
                p_row, q_rows[row[node]], [tree.tokens[c] for c in kids], [u[c] for c in kids]
            )
            if picked is not None:
                node = kids[picked]
                path.append(node)
                continue
        return _verdict(tree, path, sample(p_row, rng), eos_ids, remaining)


def verify_tree(
    tree: DraftTree,
    target_logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    *,
    eos_ids: frozenset[int],
    remaining: int,
) -> TreeVerdict:
    """One tree round: greedy path matching, or recursive rejection sampling on the transformed p."""
    if params.greedy:
        return verify_tree_greedy(tree, target_logits, eos_ids=eos_ids, remaining=remaining)
    p = logits_to_probs(np.asarray(target_logits), params)
    return verify_tree_stochastic(tree, p, rng, eos_ids=eos_ids, remaining=remaining)


def sample_without_replacement(q: np.ndarray, w: int, rng: np.random.Generator) -> list[int]:
    """min(w, |support q|) distinct tokens, x_i ~ q less x_1..x_{i-1}, renormalized, in draw order.

    One `sample` call (one uniform) per token. In law the same as the top w of log q + Gumbel
    noise, sorted (Gumbel-top-k), at O(w V) instead of V Gumbel draws and a partition.
    """
    row = np.array(q, dtype=np.float64)
    out: list[int] = []
    for _ in range(min(w, int(np.count_nonzero(row)))):
        out.append(sample(row, rng))
        row[out[-1]] = 0.0  # `sample` rescales by the remaining total
    return out


def sample_tree(q_fn: QFn, widths: Sequence[int], rng_at: Callable[[int], np.random.Generator]) -> DraftTree:
    """A tree for sampling mode (RSD-C): each node at depth d - 1 gets widths[d] children drawn
    without replacement from q_fn(its path tokens); the root's children are widths[0].

    Nodes come out level by level. `rng_at(d)` is the stream for the tokens at depth d, e.g.
    `round_rng(seed, DRAFTER_STREAM, committed + d)`: with all widths 1 this draws exactly the
    linear drafter's tokens. A group is narrower than asked where q has fewer tokens with mass.
    """
    if len(widths) > MAX_TREE_DEPTH or any(w < 0 for w in widths):
        raise ValueError(f"widths must be at most {MAX_TREE_DEPTH} counts >= 0, got {tuple(widths)}")
    if sum(int(np.prod(widths[: d + 1])) for d in range(len(widths))) > MAX_TREE_NODES:
        raise ValueError(f"widths {tuple(widths)} give more than {MAX_TREE_NODES} nodes")
    tokens: list[int] = []
    parents: list[int] = []
    rows: list[np.ndarray] = []
    level = [-1]
    paths: dict[int, tuple[int, ...]] = {-1: ()}
    for depth, w in enumerate(widths):
        rng, nxt = rng_at(depth), []
        for a in level:
            q = np.asarray(q_fn(paths[a]), dtype=np.float64)
            kids = sample_without_replacement(q, w, rng)
            if kids:
                rows.append(q / float(q.sum()))
            for t in kids:
                paths[len(tokens)] = (*paths[a], t)
                nxt.append(len(tokens))
                tokens.append(t)
                parents.append(a)
        level = nxt
    # Level order lists each parent's group in ascending parent index: q's row order.
    return DraftTree(tuple(tokens), tuple(parents), np.array(rows) if rows else None)


def _top(q: np.ndarray, w: int) -> list[int]:
    """The (at most) w likeliest tokens with mass, likeliest first (ties: lower id, except at the cut)."""
    cand = np.flatnonzero(q > 0) if w >= q.shape[0] else np.argpartition(q, -w)[-w:]
    cand = cand[q[cand] > 0]
    return cand[np.lexsort((cand, -q[cand]))][:w].tolist()


def greedy_tree(q_fn: QFn, *, max_nodes: int, width: int = 4, max_depth: int = MAX_TREE_DEPTH,
                min_prob: float = 0.0) -> DraftTree:
    """A tree for greedy mode: best-first by the drafter's probability of the whole path.

    Repeatedly adds the candidate with the highest product of q along its path (ties: the
    earlier candidate), where each added node proposes its `width` likeliest tokens. Where the
    drafter is sure, one candidate dominates and the tree grows a chain; where it hesitates, the
    runners-up enter as siblings. Stops at `max_nodes`, at `max_depth`, or below `min_prob`.
    q_fn should give the drafter's untruncated distribution (e.g. its softmax at temperature 1).
    """
    if not 0 <= max_nodes <= MAX_TREE_NODES or not 1 <= max_depth <= MAX_TREE_DEPTH or width < 1:
        raise ValueError(f"need 0 <= max_nodes <= {MAX_TREE_NODES}, 1 <= max_depth <= {MAX_TREE_DEPTH}, "
                         f"width >= 1; got {max_nodes}, {max_depth}, {width}")
    tokens: list[int] = []
    parents: list[int] = []
    paths: dict[int, tuple[int, ...]] = {-1: ()}
    heap: list[tuple[float, int, int, int]] = []  # (-path probability, order, parent, token)
    order = itertools.count()

    def expand(node: int, prob: float) -> None:
        if len(paths[node]) >= max_depth:
            return
        q = np.asarray(q_fn(paths[node]), dtype=np.float64)
        for t in _top(q, width):
            heapq.heappush(heap, (-prob * float(q[t]), next(order), node, t))

    expand(-1, 1.0)
    while heap and len(tokens) < max_nodes:
        neg_prob, _, parent, token = heapq.heappop(heap)
        if -neg_prob < min_prob:
            break
        node = len(tokens)
        tokens.append(token)
        parents.append(parent)
        paths[node] = (*paths[parent], token)
        if len(tokens) < max_nodes:
            expand(node, -neg_prob)
    return DraftTree(tuple(tokens), tuple(parents))
