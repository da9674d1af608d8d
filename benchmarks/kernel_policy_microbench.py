"""Microbenchmark: the target's prefill and scoring passes with the small-M kernel and without.

Loads the fetched 1.5B target in bf16 and, interleaved in one process so that background load
hits every variant alike, times: a 60-token prefill in one torch pass, in 16-token chunks with
the kernel (what the scorer does where it installs the kernel), in 16-token chunks on torch; and
a scoring pass of 1 and 5 rows on torch and with the kernel. Prints the CPU and its bf16 flags
first, then the median and every repetition, in milliseconds.

    python benchmarks/kernel_policy_microbench.py [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import DynamicCache

    from cloud_node.kernels import small_m_kernel_enabled
    from cloud_node.kernels.build import NATIVE_BF16_FLAGS, cpu_flags
    from cloud_node.scorer import TargetModel
    from tandem.bench.report import machine_info
    from tandem.models import registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args(argv).reps
    print(f"cpu: {machine_info()['cpu']}; native bf16 flags: {sorted(cpu_flags() & NATIVE_BF16_FLAGS) or 'none'}",
          flush=True)
    target = TargetModel(registry.target_dir(), dtype="bf16", small_m_kernel=True)
    prompt = [i % 1000 + 100 for i in range(60)]

    def forward(cache: Any, ids: list[int], kernel: bool, keep: int) -> None:
        ctx = small_m_kernel_enabled() if kernel else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            target.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=keep)

    def prefill(kernel: bool, chunk: int) -> tuple[float, Any]:
        cache = DynamicCache(config=target.model.config)
        t0 = time.perf_counter()
        for start in range(0, len(prompt), chunk):
            forward(cache, prompt[start:start + chunk], kernel, 1)
        return time.perf_counter() - t0, cache

    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for name, kernel, chunk in (("prefill 60, torch, one pass", False, 60),
                                    ("prefill 60, kernel, 16-row chunks", True, 16),
                                    ("prefill 60, torch, 16-row chunks", False, 16)):
            times.setdefault(name, []).append(prefill(kernel, chunk)[0])
        _, cache = prefill(False, 60)
        for rows in (1, 5):
            for name, kernel in (("torch", False), ("kernel", True)):
                t0 = time.perf_counter()
                forward(cache, prompt[:rows], kernel, rows)
                times.setdefault(f"score {rows} rows, {name}", []).append(time.perf_counter() - t0)
                cache.crop(-rows)
        print(f"repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    for name, values in times.items():
        print(f"{name:36s} median {1000 * statistics.median(values):6.0f} ms  "
              f"({', '.join(f'{1000 * v:.0f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
