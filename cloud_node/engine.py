"""Batched, batch-invariant forward passes of the target over packed rows from many sessions.

A verification round is a few rows per session. `Engine.forward` runs the rows of many sessions
(verification rounds and prefill chunks alike) through the decoder in ONE pass: every linear
layer reads its weights once for all of them, while attention stays per session, each row against
its own session's KV cache (the packed-rows, "varlen" idea).

Guarantees:
- **Batch invariance.** A row's logits, and the K/V it writes, depend only on its token, its
  position and its own session's cached K/V: not on how many rows or sessions share the pass, on
  the draft length, or on how a prompt was chunked. Every reduction runs on a fixed shape, so
  the same arithmetic happens in the same order whatever the batch:
  - linear layers and norms run on tiles of `plan.min_rows`..`plan.rows` rows (shorter ones
    zero-padded), a range the autotune showed to give every row the same bits on this CPU;
  - attention runs per session on query tiles of exactly `plan.att_rows` rows against key
    blocks of `plan.key_block` positions; the softmax max is exact and block sums are added
    in block order, so blocks past a row's position add exact zeros;
  - rotary tables are computed once for every position.
  `TilePlan.verified` says whether the start-up self-check confirmed, on this CPU and with these
  weights, that the kernels behave as that requires; `cloud_node.autotune` picks the plan.
- **Draft trees.** A `Rows` item may carry `parents` (a tree, see `Rows`): its nodes are verified
  in the same pass, node i at position (cached length) + depth(i), attending to the cache, its
  ancestors and itself only. Each node's logits and K/V are bit-equal to those of the same token
  at the same position in a chain pass over its root-to-node path, because the node sums the
  same key blocks in the same order: the prefix's whole blocks in shared query tiles (the tree's
  nodes in order, read once per tree), then the rest in its own tiles, the tree cut into
  vertical segments (one per leaf) whose tiles read the prefix's last partial block and the
  path's keys laid out as that chain's would be. A masked tile over the whole tree would change
  the blocks and the order of the sums, hence the bits. Until `KVCache.accept(path)` keeps one
  root-to-node path (exactly as if it had been run as a chain) or `crop` drops the tree, the
  cache takes no other pass.
  Cost: the linear layers are the chain's for the same rows; attention adds one query tile per
  leaf (a chain of R rows has R / att_rows), each over at most two key blocks past the shared
  ones, plus the shared tiles' (R / att_rows) reads of the prefix.
- Numerics: bf16 (or fp32) weights and activations as the model's own, attention scores and
  softmax in fp32; close to transformers' forward (checked in tests) but not bit-equal to it.
  Attention probabilities below e^-64 of their row's max are flushed to exact zeros: they cannot
  change the fp32 sums, and as denormals (0.6% of layer 0's at 2k random tokens of the 1.5B
  target) they slow the matmul that reads them some 50x on this CPU.
- The engine is the only code that runs the target for Tandem's sessions; transformers
  `generate` on the same weights (the bench's "target" baseline) stays stock.
- One caller at a time: `Engine.forward` is not thread-safe; `cloud_node.batcher` serializes it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SUPPORTED = ("qwen2", "llama", "mistral")


@dataclass(frozen=True)
class TilePlan:
    """How every pass is cut into fixed shapes (see the module's guarantees)."""

    linear: str = "torch"  # "torch" (F.linear) or "smallm" (cloud_node.kernels)
    rows: int = 32  # most rows per linear/norm tile
    min_rows: int = 1  # fewest: a shorter tile is zero-padded to this many (== rows: fixed tiles)
    pad: bool = False  # True when min_rows == rows (every tile has exactly `rows` rows)
    att_rows: int = 8  # queries per attention tile (always padded)
    key_block: int = 64  # key positions per attention block
    verified: bool = False  # the self-check confirmed the invariance this plan relies on

    def __post_init__(self) -> None:
        if self.linear not in ("torch", "smallm"):
            raise ValueError(f"linear must be 'torch' or 'smallm', got {self.linear!r}")
        if min(self.rows, self.min_rows, self.att_rows, self.key_block) < 1 or self.min_rows > self.rows:
            raise ValueError("rows, att_rows and key_block must be >= 1 and 1 <= min_rows <= rows")
        if self.pad != (self.min_rows == self.rows):
            raise ValueError("pad must be True exactly when min_rows == rows")

    def describe(self) -> str:
        size = f"{self.rows}" if self.pad else f"{self.min_rows}..{self.rows}"
        return (f"{self.linear} linears on {size}-row tiles, "
                f"attention on {self.att_rows}-query tiles x {self.key_block}-key blocks, invariance "
                f"{'verified' if self.verified else 'NOT verified'}")


class KVCache:
    """One session's K/V for every layer: [kv_heads, capacity, head_dim] per layer, grown in key blocks.

    Positions >= `length` hold stale values that attention masks out. Copy-free crop.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: Any, block: int) -> None:
        self.layers, self.kv_heads, self.head_dim, self.dtype, self.block = layers, kv_heads, head_dim, dtype, block
        self.k: list[Any] = []
        self.v: list[Any] = []
        self.length = 0
        self.capacity = 0
        self.tree: tuple[int, tuple[int, ...]] | None = None  # (length before, parents) of a tree not yet accepted

    @property
    def cached_len(self) -> int:
        return self.length

    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in (*self.k, *self.v))

    def reserve(self, tokens: int) -> None:
        """Capacity for `tokens` positions, a whole number of key blocks (grows by half again)."""
        import torch

        if tokens <= self.capacity:
            return
        want = max(tokens, self.capacity + self.capacity // 2)
        cap = -(-want // self.block) * self.block
        shape = (self.kv_heads, cap, self.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.layers)]
        v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.layers)]
        for i in range(len(self.k)):
            k[i][:, :self.length] = self.k[i][:, :self.length]
            v[i][:, :self.length] = self.v[i][:, :self.length]
        self.k, self.v, self.capacity = k, v, cap

    def compact(self) -> None:
        """Shrink the capacity to the blocks `length` needs (for a cache kept but not grown)."""
        cap = max(1, -(-self.length // self.block)) * self.block
        if cap < self.capacity:
            self.k = [t[:, :cap].clone() for t in self.k]
            self.v = [t[:, :cap].clone() for t in self.v]
            self.capacity = cap

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (with a tree pending: at most the positions before it)."""
        top = self.length if self.tree is None else self.tree[0]
        if not 0 <= length <= top:
            raise ValueError(f"crop to {length} of {top} cached positions")
        self.length, self.tree = length, None

    def accept(self, path: Sequence[int]) -> None:
        """After a tree pass: keep the K/V of the nodes on `path` (tree node indices, root to
        leaf: the first a child of the cached positions, each next a child of the one before) at
        positions L, L+1, ... (L = the length before the tree) and drop the rest. The cache is
        then exactly what a chain pass over the path's tokens would have left."""
        import torch

        if self.tree is None:
            raise ValueError("accept needs a tree pass to accept from")
        base, parents = self.tree
        path = [int(i) for i in path]
        for j, node in enumerate(path):
            if not 0 <= node < len(parents) or parents[node] != (path[j - 1] if j else -1):
                raise ValueError(f"{path} is not a root-to-node path of the tree {parents}")
        if path != list(range(len(path))):  # the path's slots move down to base, base+1, ...
            with torch.inference_mode():  # the engine's passes made these inference tensors
                slots = torch.tensor(path, dtype=torch.long) + base
                for t in (*self.k, *self.v):
                    t[:, base:base + len(path)] = t[:, slots]
        self.length, self.tree = base + len(path), None

    def copy_prefix_from(self, other: KVCache, length: int) -> None:
        """Make this (empty) cache hold `other`'s first `length` positions."""
        if self.length:
            raise ValueError("copy_prefix_from needs an empty cache")
        if not 0 <= length <= (other.length if other.tree is None else other.tree[0]):
            raise ValueError(f"prefix of {length} from a cache of {other.length} (a tree pending: {other.tree is not None})")
        self.reserve(length)
        for i in range(self.layers):
            self.k[i][:, :length] = other.k[i][:, :length]
            self.v[i][:, :length] = other.v[i][:, :length]
        self.length = length


@dataclass
class Rows:
    """One session's rows in a pass: `ids` appended at the cache's end; logits of the last `keep`.

    `parents` makes the rows a tree: parents[i] < i is the row whose token comes just before row
    i's, or -1 for a row that comes right after the cached positions. Row i then sits at position
    (cached length) + depth(i), depth being its number of ancestors among the rows; its K/V goes
    to slot (cached length) + i, and the cache takes no other pass until `KVCache.accept` keeps
    one path (or `crop` drops the tree). None is an ordinary pass; the chain (-1, 0, 1, ...)
    gives the same bits and leaves a tree to accept. `Rows.for_tree` lays out a
    `tandem_core.tree.DraftTree`.
    """

    cache: KVCache
    ids: Sequence[int]
    keep: int
    parents: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.parents is None:
            return
        parents = tuple(int(a) for a in self.parents)
        if len(parents) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids but {len(parents)} parents")
        for i, a in enumerate(parents):
            if not -1 <= a < i:
                raise ValueError(f"row {i}: parent must be -1 or an earlier row, got {a}")
        self.parents = parents

    @property
    def is_chain(self) -> bool:
        return self.parents is None or tuple(self.parents) == tuple(range(-1, len(self.ids) - 1))

    @classmethod
    def for_tree(cls, cache: KVCache, root: int, tokens: Sequence[int], parents: Sequence[int]) -> Rows:
        """A verification round over a draft tree in `tandem_core.tree`'s convention (parent -1:
        a child of `root`, the last committed token, which the cache does not hold yet): row 0 is
        `root`, row 1 + i is node i, and all n + 1 logits rows are kept, laid out as
        `verify_tree` takes them. Accept a `TreeVerdict.path` p with
        `cache.accept([0, *(1 + i for i in p)])`: the cache then holds the root and p's tokens."""
        return cls(cache, [root, *tokens], len(tokens) + 1, [-1, *(a + 1 for a in parents)])

    def depths(self) -> list[int]:
        """(n,) each row's position minus the cached length."""
        if self.parents is None:
            return list(range(len(self.ids)))
        out: list[int] = []
        for a in self.parents:
            out.append(0 if a < 0 else out[a] + 1)
        return out


@dataclass(frozen=True)
class _Tile:
    """Up to `att_rows` queries of one item that read the same keys: positions lo .. pos[-1]."""

    rows: list[int]  # packed row of each query
    pos: list[int]  # its position, ascending (a shared tile: its last key's, for every query)
    cache: KVCache
    lo: int = 0  # first key position, a whole number of key blocks
    slots: list[int] | None = None  # a tree's own tile: the cache slot of each key (None: slot = position)


def _item_tiles(b: Rows, r0: int, start: int, ta: int, kb: int) -> tuple[list[_Tile], list[_Tile]]:
    """Cut an item's rows (packed from r0, cache length `start`) into query tiles: (shared, own).

    A chain has only its own tiles, cut in order, each reading keys 0 .. its last position. A
    tree's nodes all read the prefix's whole key blocks alike: shared tiles, nodes in order,
    read those (keys 0 .. lo - 1). Then each node reads from lo on the rest of the prefix and its
    own path: the tree is cut into vertical segments, one per leaf (the part of its
    root-to-leaf path no earlier segment took), each cut in order, and a tile's keys are the
    path down to its last query. Either way a node sees, block for block, exactly the keys a
    chain pass over its path would see."""
    n, parents = len(b.ids), b.parents
    cuts = range(0, n, ta)
    if parents is None or b.is_chain:
        return [], [_Tile(list(range(r0 + t0, r0 + min(n, t0 + ta))), list(range(start + t0, start + min(n, t0 + ta))),
                          b.cache) for t0 in cuts]
    lo = start // kb * kb
    shared = [_Tile(list(range(r0 + t0, r0 + min(n, t0 + ta))), [lo - 1] * min(ta, n - t0), b.cache)
              for t0 in cuts] if lo else []
    depth, has_child = b.depths(), {a for a in parents if a >= 0}
    taken: set[int] = set()
    own = []
    for leaf in (i for i in range(n) if i not in has_child):
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        segment = [i for i in path if i not in taken]
        taken.update(segment)
        for t0 in range(0, len(segment), ta):
            part = segment[t0:t0 + ta]
            slots = [*range(lo, start), *(start + i for i in path[:depth[part[-1]] + 1])]
            own.append(_Tile([r0 + i for i in part], [start + depth[i] for i in part], b.cache, lo, slots))
    return shared, own


@dataclass(frozen=True)
class _TileSet:
    """Tiles that go through the attention's matmuls together, and their index tensors."""

    kind: str  # "shared" (trees' prefix blocks), "own" (trees' own blocks, after those) or "chain"
    tiles: list[_Tile]
    nblocks: int  # key blocks every tile reads from its lo (past a row's position: masked)
    queries: Any  # LongTensor [tiles * att_rows]: packed rows, short tiles padded with their last
    hidden: Any  # bool [tiles, group * att_rows, nblocks * key_block]: keys past each query's position
    rows: Any  # LongTensor: the packed rows of the real queries
    real: Any  # LongTensor: where they sit among the tiles * att_rows padded queries
    # trees' own tiles, per item: (first tile, end tile, LongTensor [tiles * span] of cache slots:
    # each tile's keys, then its first key's slot again where it reads no more: masked)
    gathers: list[tuple[int, int, Any]]


def _tile_set(kind: str, tiles: list[_Tile], ta: int, kb: int, group: int) -> _TileSet:
    import torch

    nblocks = max((t.pos[-1] - t.lo) // kb + 1 for t in tiles)
    queries = torch.tensor([r for t in tiles for r in t.rows + [t.rows[-1]] * (ta - len(t.rows))], dtype=torch.long)
    pos = torch.tensor([t.pos + [t.pos[-1]] * (ta - len(t.pos)) for t in tiles], dtype=torch.long)
    rowpos = pos.repeat(1, group)  # [tiles, group * ta], the order of the attention's query rows
    lo = torch.tensor([t.lo for t in tiles], dtype=torch.long)
    hidden = (torch.arange(nblocks * kb)[None, None, :] + lo[:, None, None]) > rowpos[:, :, None]
    rows = torch.tensor([r for t in tiles for r in t.rows], dtype=torch.long)
    real = torch.tensor([i * ta + j for i, t in enumerate(tiles) for j in range(len(t.rows))], dtype=torch.long)
    span, gathers = nblocks * kb, []
    mine = [(i, id(t.cache), t.slots) for i, t in enumerate(tiles) if t.slots is not None]
    for _, same_cache in itertools.groupby(mine, key=lambda it: it[1]):  # one tree's tiles
        run = list(same_cache)
        idx = [k for _, _, slots in run for k in (*slots, *[slots[0]] * (span - len(slots)))]
        gathers.append((run[0][0], run[-1][0] + 1, torch.tensor(idx, dtype=torch.long)))
    return _TileSet(kind, tiles, nblocks, queries, hidden, rows, real, gathers)


def _layout(items: Sequence[Rows], starts: Sequence[int], ta: int, kb: int, group: int) -> list[_TileSet]:
    """A pass's tile sets, in the order their key blocks are summed: trees' shared prefix blocks,
    then trees' own blocks, then chains' (each with its own span: short tree tiles never pay for
    a long chain's keys)."""
    shared: list[_Tile] = []
    own: list[_Tile] = []
    chains: list[_Tile] = []
    r0 = 0
    for b, s in zip(items, starts, strict=True):
        sh, mine = _item_tiles(b, r0, s, ta, kb)
        shared += sh
        (chains if b.parents is None or b.is_chain else own).extend(mine)
        r0 += len(b.ids)
    kinds = (("shared", shared), ("own", own), ("chain", chains))
    return [_tile_set(kind, tiles, ta, kb, group) for kind, tiles in kinds if tiles]


class Engine:
    """The decoder of a transformers Llama-family model (Qwen2, Llama, Mistral) over packed rows."""

    def __init__(self, model: Any, plan: TilePlan) -> None:
        import torch

        cfg = model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            raise ValueError(f"the batched engine supports {SUPPORTED}, not {getattr(cfg, 'model_type', None)!r}")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported by the batched engine")
        self.plan = plan
        self.model = model
        inner = model.model
        self.dtype = inner.embed_tokens.weight.dtype
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.group = self.heads // self.kv_heads
        self.layers = len(inner.layers)
        self.eps = float(cfg.rms_norm_eps)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.vocab_size = int(cfg.vocab_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 32768))
        self._embed = inner.embed_tokens.weight
        self._layers = [self._layer_weights(layer) for layer in inner.layers]
        self._norm = inner.norm.weight
        self._head_w, self._head_b = model.lm_head.weight, getattr(model.lm_head, "bias", None)
        with torch.inference_mode():
            positions = torch.arange(self.max_positions)[None, :]
            probe = torch.zeros(1, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, positions)
        self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()  # [positions, head_dim]
        self._smallm = None
        if plan.linear == "smallm":
            from cloud_node.kernels.linear import small_m_linear

            self._smallm = small_m_linear
        self.forwards = 0  # passes run

    @staticmethod
    def _layer_weights(layer: Any) -> dict[str, Any]:
        att, mlp = layer.self_attn, layer.mlp

        def wb(lin: Any) -> tuple[Any, Any]:
            w = lin.weight if lin.weight.is_contiguous() else lin.weight.contiguous()
            return w, lin.bias

        return {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                "q": wb(att.q_proj), "k": wb(att.k_proj), "v": wb(att.v_proj), "o": wb(att.o_proj),
                "gate": wb(mlp.gate_proj), "up": wb(mlp.up_proj), "down": wb(mlp.down_proj)}

    def new_cache(self) -> KVCache:
        return KVCache(self.layers, self.kv_heads, self.head_dim, self.dtype, self.plan.key_block)

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self._embed.element_size()

    # --- fixed-shape building blocks ------------------------------------------------------------

    def _tiles(self, x: Any, fn: Any) -> Any:
        """fn over the rows of `x` in tiles of plan.min_rows..plan.rows rows (short ones zero-padded)."""
        import torch

        t, lo = self.plan.rows, self.plan.min_rows
        outs = []
        for i in range(0, x.shape[0], t):
            tile = x[i:i + t]
            n = tile.shape[0]
            if n < lo:
                outs.append(fn(torch.cat([tile, tile.new_zeros(lo - n, *tile.shape[1:])]))[:n])
            else:
                outs.append(fn(tile))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def linear(self, x: Any, wb: tuple[Any, Any]) -> Any:
        import torch.nn.functional as F

        w, b = wb
        if self._smallm is not None:
            return self._tiles(x, lambda tile: self._smallm(tile, w, b))
        return self._tiles(x, lambda tile: F.linear(tile, w, b))

    def rms_norm(self, x: Any, weight: Any) -> Any:
        import torch

        def norm(tile: Any) -> Any:
            h = tile.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return weight * h.to(tile.dtype)

        return self._tiles(x, norm)

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        """x [R, heads, d]; cos/sin [R, d] (transformers' rotate-half convention)."""
        import torch

        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    def _scores(self, q: Any, ts: _TileSet, layer: int) -> tuple[Any, Any]:
        """A tile set's masked scores [tiles, kv_heads, group, ta, span] and values
        [tiles * kv_heads, nblocks, key_block, d], fp32, keys gathered per tile (past the last one
        a tile reads: any finite values, masked)."""
        import torch

        ta, kb, n_t = self.plan.att_rows, self.plan.key_block, len(ts.tiles)
        span, g, d = ts.nblocks * kb, self.group, self.head_dim
        kk = torch.empty(n_t, self.kv_heads, span, d, dtype=torch.float32)
        vv = torch.empty_like(kk)
        for a, e, idx in ts.gathers:  # a tree's own tiles: one gather
            cache = ts.tiles[a].cache
            kk[a:e] = cache.k[layer][:, idx].view(self.kv_heads, e - a, span, d).transpose(0, 1)
            vv[a:e] = cache.v[layer][:, idx].view(self.kv_heads, e - a, span, d).transpose(0, 1)
        for i, t in enumerate(ts.tiles):
            if t.slots is None:  # keys lo .. its last position straight from the cache, zeros after
                kc, vc, end = t.cache.k[layer], t.cache.v[layer], t.pos[-1] + 1
                kk[i, :, :end - t.lo], vv[i, :, :end - t.lo] = kc[:, t.lo:end], vc[:, t.lo:end]
                kk[i, :, end - t.lo:], vv[i, :, end - t.lo:] = 0.0, 0.0
        # [tiles, ta, heads, d] -> [tiles * kv_heads, group * ta, d]; head h reads kv head h // group
        qg = q[ts.queries].float().view(n_t, ta, self.heads, d).permute(0, 2, 1, 3)
        qg = qg.reshape(n_t * self.kv_heads, g * ta, d) * self.scale
        scores = torch.bmm(qg, kk.view(n_t * self.kv_heads, span, d).transpose(1, 2))
        scores = scores.view(n_t, self.kv_heads, g * ta, span).masked_fill(ts.hidden[:, None], float("-inf"))
        return scores.view(n_t, self.kv_heads, g, ta, span), vv.view(n_t * self.kv_heads, ts.nblocks, kb, d)

    def _attention(self, q: Any, sets: Sequence[_TileSet], layer: int) -> Any:
        """Attention of every query (rows of q [R, heads, d]; their K/V already in the caches) ->
        [R, heads*d]. All sessions' query tiles go through the same ops at once: tiles of exactly
        `plan.att_rows` queries (padded with copies of the last row) against blocks of
        `plan.key_block` keys. A tree node's keys are split between two tile sets (the shared
        prefix blocks, then its own); its softmax max is exact over both, and its block sums are
        added block by block in position order, continuing from the first set into the second, so
        that it sums what a chain row sums, in the same order (blocks past a row's position, or
        a set's blocks past a row's part of it, add exact zeros)."""
        import torch

        ta, g, kvh, d, rows = self.plan.att_rows, self.group, self.kv_heads, self.head_dim, q.shape[0]
        parts = [self._scores(q, ts, layer) for ts in sets]
        top = torch.full((rows, kvh, g), float("-inf"))  # trees' rows: the max over both sets
        for ts, (scores, _) in zip(sets, parts, strict=True):
            if ts.kind != "chain":
                m = scores.amax(-1).permute(0, 3, 1, 2).reshape(-1, kvh, g)[ts.real]
                top[ts.rows] = torch.maximum(top[ts.rows], m)
        denom, acc = torch.zeros(rows, kvh, g), torch.zeros(rows, kvh, g, d)  # trees' shared-part sums
        result = q.new_zeros(rows, self.heads * d)
        for ts, (scores, vv) in zip(sets, parts, strict=True):
            n_t, nb = len(ts.tiles), ts.nblocks
            if ts.kind == "chain":
                m = scores.amax(-1, keepdim=True)
            else:
                m = top[ts.queries].view(n_t, ta, kvh, g).permute(0, 2, 3, 1)[..., None]
            shifted = scores - m
            # Below e^-64 of the row's max a probability cannot change these fp32 sums (whose largest
            # term is 1); as a denormal it would slow the matmul some 50x. Flushed to exact zeros.
            probs = torch.exp(shifted.masked_fill(shifted < -64.0, float("-inf"))).view(n_t * kvh, g * ta, nb, -1)
            block_sums = probs.sum(-1)  # [.., group*ta, nblocks]: fixed-length sums
            partial = torch.matmul(probs.permute(0, 2, 1, 3), vv)  # [.., nblocks, group*ta, d]
            if ts.kind == "own":  # go on from the shared part (zeros for a tree with none)
                dn = denom[ts.queries].view(n_t, ta, kvh, g).permute(0, 2, 3, 1).reshape(n_t * kvh, g * ta)
                ac = acc[ts.queries].view(n_t, ta, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(n_t * kvh, g * ta, d)
                first = 0
            else:
                dn, ac, first = block_sums[..., 0], partial[:, 0], 1
            for blk in range(first, nb):  # in order: blocks past a row's position add exact zeros
                dn, ac = dn + block_sums[..., blk], ac + partial[:, blk]
            if ts.kind == "shared":
                denom[ts.rows] = dn.view(n_t, kvh, g, ta).permute(0, 3, 1, 2).reshape(-1, kvh, g)[ts.real]
                acc[ts.rows] = ac.view(n_t, kvh, g, ta, d).permute(0, 3, 1, 2, 4).reshape(-1, kvh, g, d)[ts.real]
            else:
                out = (ac / dn[..., None]).view(n_t, kvh, g, ta, d).permute(0, 3, 1, 2, 4)
                result[ts.rows] = out.reshape(n_t * ta, -1)[ts.real].to(self.dtype)
        return result

    # --- the pass -------------------------------------------------------------------------------

    def forward(self, batch: Sequence[Rows]) -> list[np.ndarray]:
        """Append each item's ids to its cache and return each item's last `keep` logits rows,
        float32 (keep may be 0). One pass over all rows: every weight is read once per tile."""
        import torch

        items = [b for b in batch if len(b.ids)]
        if not items:
            return [np.zeros((0, self.vocab_size), np.float32) for _ in batch]
        with torch.inference_mode():
            ids = torch.tensor([int(i) for b in items for i in b.ids], dtype=torch.long)
            starts = [b.cache.length for b in items]
            for b, s in zip(items, starts, strict=True):
                if b.cache.tree is not None:
                    raise ValueError("a cache with a tree pending takes no pass before accept or crop")
                if s + len(b.ids) > self.max_positions:
                    raise ValueError(f"{s + len(b.ids)} positions exceed the model's {self.max_positions}")
                b.cache.reserve(s + len(b.ids))
            positions = torch.tensor([s + d for b, s in zip(items, starts, strict=True) for d in b.depths()])
            sets = _layout(items, starts, self.plan.att_rows, self.plan.key_block, self.group)
            rows = ids.shape[0]
            h = self._embed[ids]
            cos, sin = self._cos[positions], self._sin[positions]
            for li, w in enumerate(self._layers):
                x = self.rms_norm(h, w["ln1"])
                q = self._rope(self.linear(x, w["q"]).view(rows, self.heads, self.head_dim), cos, sin)
                k = self._rope(self.linear(x, w["k"]).view(rows, self.kv_heads, self.head_dim), cos, sin)
                v = self.linear(x, w["v"]).view(rows, self.kv_heads, self.head_dim)
                r0 = 0
                for b, s in zip(items, starts, strict=True):
                    n = len(b.ids)
                    b.cache.k[li][:, s:s + n] = k[r0:r0 + n].transpose(0, 1)
                    b.cache.v[li][:, s:s + n] = v[r0:r0 + n].transpose(0, 1)
                    r0 += n
                att = self._attention(q, sets, li)
                h = h + self.linear(att, w["o"])
                x = self.rms_norm(h, w["ln2"])
                gate, up = self.linear(x, w["gate"]), self.linear(x, w["up"])
                h = h + self.linear(torch.nn.functional.silu(gate) * up, w["down"])
            for b, s in zip(items, starts, strict=True):
                b.cache.length = s + len(b.ids)
                b.cache.tree = None if b.parents is None else (s, tuple(b.parents))
            # logits only for the kept rows, gathered into their own tiles
            kept: list[int] = []
            r0 = 0
            for b in items:
                n = len(b.ids)
                kept.extend(range(r0 + n - min(b.keep, n), r0 + n))
                r0 += n
            logits = np.zeros((0, self.vocab_size), np.float32)
            if kept:
                hk = self.rms_norm(h[torch.tensor(kept, dtype=torch.long)], self._norm)
                logits = self.linear(hk, (self._head_w, self._head_b)).float().numpy()
        self.forwards += 1
        out: list[np.ndarray] = []
        r0 = 0
        it = iter(items)
        for b in batch:
            if not len(b.ids):
                out.append(np.zeros((0, self.vocab_size), np.float32))
                continue
            next(it)
            k = min(b.keep, len(b.ids))
            out.append(logits[r0:r0 + k])
            r0 += k
        return out
