"""Native CPU kernels for the target scorer.

`smallm_gemm.c` computes y = x @ W^T (+ bias) for a few rows of x (speculative verification
scores k+1 = 2..17 tokens at once), reading each weight once from memory; torch 2.13 on AVX2-only
CPUs has no such GEMM for bf16 and its cost grows linearly with the rows. `build` compiles and
loads it on first use; `linear.small_m_linear` calls it. `cloud_node.autotune` decides, per CPU,
whether the engine's linear layers use it or torch. Importing this package compiles nothing.
"""

from cloud_node.kernels.linear import small_m_linear

__all__ = ["small_m_linear"]
