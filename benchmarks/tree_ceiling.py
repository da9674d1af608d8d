"""The ceiling of draft-tree shapes, by teacher forcing: target forwards per token, no timing.

For each prompt of the shipped set (or --categories), the target's greedy answer is generated
once (the in-process pair's speculative route, whose tokens are the target-only ones), then the drafter reads the prompt and that
answer in one batched pass, which gives the rank of each answer token among the drafter's
choices at its position (0: the drafter's own greedy choice). A greedy round is then simulated
on those ranks, from every position the answer reaches:
- a chain of k drafts keeps drafts while their rank is 0 and commits one token more;
- a caterpillar (`tandem_core.branching`) also holds the drafter's next w choices as siblings at
  every depth: a rejection whose target token has rank 1..w commits it and one token more;
- with sub-chains, the sibling of rank 1 at the first B depths carries m drafts of its own (the
  drafter's greedy choices after it: exactly the answer's ranks after it, since the sibling
  taken is the answer's token).
Every sibling is assumed present: an upper bound on what a planner that adds only the siblings
worth their rows reaches. The figure is rounds / tokens = target forwards per token (prefill
not counted). Progress lines go to stderr; the table names the CPU.

    python benchmarks/tree_ceiling.py [--categories prose,chat,code] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def rounds_per_token(rank: Sequence[int], k: int, w: int = 0, m: int = 0, depths: int = 0) -> float:
    """Simulated target forwards per token for ranks `rank` (see the module doc)."""
    t, rounds, n = 0, 0, len(rank)
    while t < n:
        j = next((i for i in range(k) if t + i >= n or rank[t + i] != 0), k)
        got = j + 1
        if j < k and t + j < n and 1 <= rank[t + j] <= w:
            more = 0
            if rank[t + j] == 1 and j < depths:
                while more < m and t + j + 1 + more < n and rank[t + j + 1 + more] == 0:
                    more += 1
            got = j + 2 + more
        t += got
        rounds += 1
    return rounds / n


SHAPES = [("chain k=4", 4, 0, 0, 0), ("chain k=5", 5, 0, 0, 0), ("caterpillar k=5 w=1", 5, 1, 0, 0),
          ("caterpillar k=5 w=3", 5, 3, 0, 0), ("+ sub-chains m=2 at 2 depths", 5, 3, 2, 2),
          ("+ sub-chains m=2 at every depth", 5, 3, 2, 5), ("k=8 w=3, m=4 at every depth", 8, 3, 4, 8)]


def ranks(categories: set[str], max_new_tokens: int) -> dict[str, list[list[int]]]:
    """Per category, each prompt's answer-token ranks under the drafter."""
    from tandem.bench.main import default_prompts_path, load_prompts
    from tandem.models.registry import require_pair
    from tandem.pair import LocalPair
    from tandem_core.sampling import SamplingParams

    pair = LocalPair(*require_pair(), dtype="bf16")
    assert pair.drafter is not None
    out: dict[str, list[list[int]]] = {}
    prompts = [p for p in load_prompts(default_prompts_path()) if p.category in categories]
    for i, p in enumerate(prompts, 1):
        ids = pair.drafter.encode(prompt=p.prompt, messages=p.messages)
        # The engine's greedy tokens (target-only, as every exact method's), in fewer passes.
        answer = list(pair.speculative_generate(ids, SamplingParams(), draft_len=4, max_new_tokens=max_new_tokens,
                                                lookup=False, tree_nodes=0).tokens)
        session = pair.drafter.new_session(ids, SamplingParams(), 0)
        first = session._logits.copy()
        rows = np.vstack([first[None], session._append_rows(answer[:-1])]) if len(answer) > 1 else first[None]
        rank = [int((rows[t] > rows[t, answer[t]]).sum()) for t in range(len(answer))]
        out.setdefault(p.category, []).append(rank)
        print(f"tree_ceiling: [{i}/{len(prompts)}] {p.id}: {len(answer)} tokens, drafter top-1 "
              f"{np.mean(np.array(rank) == 0):.2f}", file=sys.stderr, flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--categories", default="prose,chat,code")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--min-tokens", type=int, default=50, help="leave out answers shorter than this")
    args = ap.parse_args(argv)
    from tandem.bench.report import machine_info

    by_cat = ranks(set(args.categories.split(",")), args.max_new_tokens)
    print(f"CPU: {machine_info()['cpu']} (the figures do not depend on it: no timing)")
    cats = [c for c in args.categories.split(",") if c in by_cat]
    print(f"{'shape':34s}" + "".join(f"{c:>8s}" for c in cats))
    for name, k, w, m, depths in SHAPES:
        cells = []
        for c in cats:
            long = [r for r in by_cat[c] if len(r) >= args.min_tokens]
            cells.append(np.mean([rounds_per_token(r, k, w, m, depths) for r in long]) if long else float("nan"))
        print(f"{name:34s}" + "".join(f"{x:8.3f}" for x in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
