"""Attention over packed rows for `cloud_node.engine`: how a pass is cut into query tiles, and the math.

Each session's rows attend to their own session's KV cache only (the packed-rows, "varlen"
idea); all sessions' query tiles still go through the same tensor ops at once.

Guarantees (the attention part of the engine's batch invariance):
- Fixed shapes: queries run in tiles of exactly `att_rows` rows (short tiles padded with copies
  of their last row) against key blocks of `key_block` positions. A row's softmax max is exact;
  its block sums are added in block order, and blocks past its position add exact zeros. So a
  row's output depends only on its query and its own keys, not on the batch, on how many rows
  its session sent, or on how a prompt was chunked.
- Draft trees (`Rows.parents`): a node's output is bit-equal to that of the same token at the
  same position in a chain pass over its root-to-node path, because it sums the same key blocks
  in the same order: the prefix's whole blocks in shared query tiles (the tree's nodes in
  order, read once per tree), then the rest in its own tiles, the tree cut into vertical
  segments (one per leaf) whose tiles read the prefix's last partial block and the path's keys
  laid out as that chain's would be. A masked tile over the whole tree would change the blocks
  and the order of the sums, hence the bits. Cost: a chain of R rows has R / att_rows tiles; a
  tree adds one own tile per leaf, each over at most two key blocks past the shared ones.
- Numerics: scores and softmax in fp32, the output in the queries' dtype. Probabilities below
  e^-64 of their row's max are flushed to exact zeros: they cannot change the fp32 sums, and as
  denormals (0.6% of layer 0's at 2k random tokens of the 1.5B target) they slow the matmul that
  reads them some 50x on this CPU.
- Pure function of its inputs: `layout` reads only the rows' shapes, `attention` reads the
  caches and writes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_node.engine import KVCache, Rows


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



@dataclass(frozen=True)
class Layout:
    """A pass's attention tiles (`layout`), in the order their key blocks are summed."""

    sets: list[_TileSet]
    att_rows: int  # queries per tile
    key_block: int  # key positions per block
    group: int  # query heads per kv head


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


def layout(items: Sequence[Rows], starts: Sequence[int], ta: int, kb: int, group: int) -> Layout:
    """A pass's attention tiles: `items` packed in order, item i's rows appended to its cache at
    starts[i]; query tiles of `ta` rows against blocks of `kb` keys; `group` query heads per kv
    head. The tile sets come in the order their key blocks are summed: trees' shared prefix
    blocks, then trees' own blocks, then chains' (each with its own span: short tree tiles never
    pay for a long chain's keys)."""
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
    return Layout([_tile_set(kind, tiles, ta, kb, group) for kind, tiles in kinds if tiles], ta, kb, group)




def _scores(q: Any, ts: _TileSet, layer: int, lay: Layout, scale: float) -> tuple[Any, Any]:
    """A tile set's masked scores [tiles, kv_heads, group, ta, span] and values
    [tiles * kv_heads, nblocks, key_block, d], fp32, keys gathered per tile (past the last one
    a tile reads: any finite values, masked)."""
    import torch

    ta, kb, n_t, g = lay.att_rows, lay.key_block, len(ts.tiles), lay.group
    heads, d = q.shape[1], q.shape[2]
    kv_heads, span = heads // g, ts.nblocks * kb
    kk = torch.empty(n_t, kv_heads, span, d, dtype=torch.float32)
    vv = torch.empty_like(kk)
    for a, e, idx in ts.gathers:  # a tree's own tiles: one gather
        cache = ts.tiles[a].cache
        kk[a:e] = cache.k[layer][:, idx].view(kv_heads, e - a, span, d).transpose(0, 1)
        vv[a:e] = cache.v[layer][:, idx].view(kv_heads, e - a, span, d).transpose(0, 1)
    for i, t in enumerate(ts.tiles):
        if t.slots is None:  # keys lo .. its last position straight from the cache, zeros after
            kc, vc, end = t.cache.k[layer], t.cache.v[layer], t.pos[-1] + 1
            kk[i, :, :end - t.lo], vv[i, :, :end - t.lo] = kc[:, t.lo:end], vc[:, t.lo:end]
            kk[i, :, end - t.lo:], vv[i, :, end - t.lo:] = 0.0, 0.0
    # [tiles, ta, heads, d] -> [tiles * kv_heads, group * ta, d]; head h reads kv head h // group
    qg = q[ts.queries].float().view(n_t, ta, heads, d).permute(0, 2, 1, 3)
    qg = qg.reshape(n_t * kv_heads, g * ta, d) * scale
    scores = torch.bmm(qg, kk.view(n_t * kv_heads, span, d).transpose(1, 2))
    scores = scores.view(n_t, kv_heads, g * ta, span).masked_fill(ts.hidden[:, None], float("-inf"))
    return scores.view(n_t, kv_heads, g, ta, span), vv.view(n_t * kv_heads, ts.nblocks, kb, d)


def attention(q: Any, lay: Layout, layer: int, scale: float) -> Any:
    """Attention of every query (rows of q [R, heads, d]; their K/V already in the caches) ->
    [R, heads*d], in q's dtype. All sessions' query tiles go through the same ops at once: tiles
    of exactly `lay.att_rows` queries (padded with copies of the last row) against blocks of
    `lay.key_block` keys; `scale` multiplies the queries (1 / sqrt(head_dim)). A tree node's keys
    are split between two tile sets (the shared prefix blocks, then its own); its softmax max is
    exact over both, and its block sums are added block by block in position order, continuing
    from the first set into the second, so that it sums what a chain row sums, in the same order
    (blocks past a row's position, or a set's blocks past a row's part of it, add exact zeros)."""
    import torch

    ta, g, sets = lay.att_rows, lay.group, lay.sets
    rows, heads, d = q.shape
    kvh = heads // g
    parts = [_scores(q, ts, layer, lay, scale) for ts in sets]
    top = torch.full((rows, kvh, g), float("-inf"))  # trees' rows: the max over both sets
    for ts, (scores, _) in zip(sets, parts, strict=True):
        if ts.kind != "chain":
            m = scores.amax(-1).permute(0, 3, 1, 2).reshape(-1, kvh, g)[ts.real]
            top[ts.rows] = torch.maximum(top[ts.rows], m)
    denom, acc = torch.zeros(rows, kvh, g), torch.zeros(rows, kvh, g, d)  # trees' shared-part sums
    result = q.new_zeros(rows, heads * d)
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
            result[ts.rows] = out.reshape(n_t * ta, -1)[ts.real].to(q.dtype)
    return result
