"""Native CPU kernels for the target scorer.

`smallm_gemm.c` computes y = x @ W^T (+ bias) for a few rows of x (speculative verification
scores k+1 = 2..9 tokens at once), reading each weight once from memory; torch 2.13 on AVX2-only
CPUs has no such GEMM for bf16 and its cost grows linearly with the rows. `build` compiles and
loads it on first use; `linear` routes `nn.Linear` calls to it, opt in and per thread. Importing
this package compiles nothing and changes nothing.
"""

from cloud_node.kernels.linear import (
    install_small_m_linear,
    small_m_kernel_enabled,
    small_m_linear,
)

__all__ = ["install_small_m_linear", "small_m_kernel_enabled", "small_m_linear"]
