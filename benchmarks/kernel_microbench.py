"""Microbenchmark: torch F.linear vs the small-M kernel, ms per call, side by side.

Shapes are the Qwen2.5-1.5B target's Linear layers (out, in): MLP up/gate, attention q/o, MLP
down, and the lm_head. Each line is printed as soon as it is measured (median of --reps calls,
after one warm-up call each).

    python benchmarks/kernel_microbench.py [--reps 5] [--dtypes bf16 fp32] [--rows 1 2 3 5 8 9 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

SHAPES = [(8960, 1536), (1536, 1536), (1536, 8960), (151936, 1536)]


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 5, 8, 9, 16])
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from cloud_node.kernels.build import load_kernel
    from cloud_node.kernels.linear import small_m_linear

    if load_kernel() is None:
        print("small-M kernel unavailable on this machine (see the warning above)")
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call, median of {args.reps}")
    print(f"{'dtype':>5} {'N x K':>13} {'M':>3} {'torch':>9} {'kernel':>9} {'speedup':>8} {'kernel GB/s':>11}")
    for name in args.dtypes:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        for n, k in SHAPES:
            w = torch.randn(n, k).div_(k**0.5).to(dtype)
            for m in args.rows:
                x = torch.randn(m, k).to(dtype)
                with torch.inference_mode():
                    t_torch = median_ms(lambda: F.linear(x, w), args.reps)
                    t_kernel = median_ms(lambda: small_m_linear(x, w), args.reps)
                gbs = w.numel() * w.element_size() / (t_kernel * 1e-3) / 1e9
                print(f"{name:>5} {f'{n}x{k}':>13} {m:>3} {t_torch:9.2f} {t_kernel:9.2f} "
                      f"{t_torch / t_kernel:7.2f}x {gbs:11.1f}", flush=True)
            del w
    return 0


if __name__ == "__main__":
    sys.exit(main())
