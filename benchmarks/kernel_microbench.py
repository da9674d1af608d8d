"""Microbenchmark: torch F.linear vs the small-M kernel, ms per call, side by side.

Shapes are the Qwen2.5-1.5B target's Linear layers (out, in): MLP up/gate, attention q/o, MLP
down, and the lm_head. In a real forward pass every weight comes from DRAM (the model is far
larger than L3), so each shape is measured on enough weight copies (--rotate-mb, default 128 MB)
to defeat the L3 cache, rotating copies between calls; torch and the kernel alternate call by
call so that background load hits both alike. Each line is printed as soon as it is measured:
the median (and the best) of --reps rounds over all copies, after one warm-up round.

    python benchmarks/kernel_microbench.py [--reps 5] [--rotate-mb 128] [--dtypes bf16 fp32] [--rows 1 2 3 5 8 9 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

SHAPES = [(8960, 1536), (1536, 1536), (1536, 8960), (151936, 1536)]


def time_pair(fns: list[Callable[[object], object]], weights: list[object], reps: int) -> list[list[float]]:
    """ms per call of each fn, alternating fns call by call and rotating the weight copies."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(-len(weights), reps * len(weights)):  # the first round warms up
        w = weights[r % len(weights)]
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn(w)
            if r >= 0:
                out.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 5, 8, 9, 16])
    parser.add_argument("--rotate-mb", type=int, default=128, help="0: one copy (cache-warm timings)")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from cloud_node.kernels.build import load_kernel
    from cloud_node.kernels.linear import small_m_linear

    if load_kernel() is None:
        print("small-M kernel unavailable on this machine (see the warning above)")
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call, median (best) of "
          f"{args.reps} rounds")
    print(f"{'dtype':>5} {'N x K':>13} {'M':>3} {'torch':>15} {'kernel':>15} {'speedup':>8} {'kernel GB/s':>11}")
    for name in args.dtypes:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        for n, k in SHAPES:
            nbytes = n * k * (2 if name == "bf16" else 4)
            copies = max(1, -(-args.rotate_mb * 2**20 // nbytes))
            weights = [torch.randn(n, k).div_(k**0.5).to(dtype) for _ in range(copies)]
            for m in args.rows:
                x = torch.randn(m, k).to(dtype)
                with torch.inference_mode():
                    t_torch, t_kernel = time_pair([lambda w, x=x: F.linear(x, w), lambda w, x=x: small_m_linear(x, w)],
                                                  weights, args.reps)
                med_t, med_k = statistics.median(t_torch), statistics.median(t_kernel)
                print(f"{name:>5} {f'{n}x{k}':>13} {m:>3} {med_t:7.2f} ({min(t_torch):5.2f}) "
                      f"{med_k:7.2f} ({min(t_kernel):5.2f}) {med_t / med_k:7.2f}x {nbytes / med_k / 1e6:11.1f}",
                      flush=True)
            del weights
    return 0


if __name__ == "__main__":
    sys.exit(main())
