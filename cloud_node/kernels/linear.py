"""y = x @ W^T + b on a few rows through the native small-M kernel (`cloud_node.kernels.build`).

Guarantees:
- `small_m_linear(x, weight, bias)` takes bf16 or fp32 x and weights and returns x's dtype.
- Kernel numerics: x and the weights are upcast to fp32 (exact), products accumulate in fp32 in
  a fixed order per row, and the result (bias added in fp32) is rounded once to the input dtype,
  to nearest even. Whether rows are independent of the row count on this CPU is checked by
  `cloud_node.autotune` before the engine uses it.
"""

from __future__ import annotations

from typing import Any

from cloud_node.kernels.build import load_kernel


def small_m_linear(x: Any, weight: Any, bias: Any = None) -> Any:
    """y = x @ weight.T + bias through the kernel, in x's dtype. x (..., K) and weight (N, K) are
    each bf16 or fp32 (weight contiguous), bias (N,) or None; any number of rows (the kernel is
    fast for few). Raises RuntimeError when the kernel is unavailable."""
    import torch

    lib = load_kernel()
    if lib is None:
        raise RuntimeError("the small-M kernel is unavailable on this machine")
    _DTYPES = (torch.bfloat16, torch.float32)
    n, k = weight.shape
    if x.shape[-1] != k or x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"small_m_linear: x {tuple(x.shape)} {x.dtype} vs weight {tuple(weight.shape)} {weight.dtype}")
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if not x.is_contiguous():
        x = x.contiguous()  # at most max_rows x K when called from a patched layer
    if bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()):
        bias = bias.to(weight.dtype).contiguous()
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype)
    status = lib.smallm_linear(
        x.data_ptr(), k, x.dtype == torch.bfloat16, weight.data_ptr(),
        None if bias is None else bias.data_ptr(), weight.dtype == torch.bfloat16,
        y.data_ptr(), y.dtype == torch.bfloat16, x.numel() // k, n, k, torch.get_num_threads())
    if status != 0:
        raise MemoryError("small-M kernel: no memory for the fp32 copy of x")
    return y
