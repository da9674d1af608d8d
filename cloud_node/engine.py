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
    blocks of `plan.key_block` positions (`cloud_node.attention`);
  - rotary tables are computed once for every position.
  `TilePlan.verified` says whether the start-up self-check confirmed, on this CPU and with these
  weights, that the kernels behave as that requires; `cloud_node.autotune` picks the plan.
- **Draft trees.** A `Rows` item may carry `parents` (a tree, see `Rows`): its nodes are verified
  in the same pass, node i at position (cached length) + depth(i), attending to the cache, its
  ancestors and itself only. Each node's logits and K/V are bit-equal to those of the same token
  at the same position in a chain pass over its root-to-node path (`cloud_node.attention` says
  how). Until `KVCache.accept(path)` keeps one root-to-node path (exactly as if it had been run
  as a chain) or `crop` drops the tree, the cache takes no other pass. Cost: the linear layers
  are the chain's for the same rows; attention adds one query tile per leaf.
- Numerics: bf16 (or fp32) weights and activations as the model's own, attention scores and
  softmax in fp32; close to transformers' forward (checked in tests) but not bit-equal to it.
- The engine is the only code that runs the target for Tandem's sessions; transformers
  `generate` on the same weights (the bench's "target" baseline) stays stock.
- One caller at a time: `Engine.forward` is not thread-safe; `cloud_node.batcher` serializes it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_node.attention import attention, layout

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
            lay = layout(items, starts, self.plan.att_rows, self.plan.key_block, self.group)
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
                att = attention(q, lay, li, self.scale)
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
