"""Route small-M `nn.Linear` calls to the native small-M kernel, opt in, per thread.

Guarantees:
- `install_small_m_linear(model)` patches the `forward` of every `torch.nn.Linear` inside the
  model (an instance attribute: classes, parameters and state_dict keys are unchanged). It is
  idempotent and returns the number of Linear layers that route through the kernel.
- A patched layer uses the kernel only while `small_m_kernel_enabled()` is active on the calling
  thread AND the input flattens to 2..max_rows rows AND the weight is a contiguous bf16 or fp32
  tensor matching the input dtype AND no gradient is needed. Every other call is the stock
  `F.linear`, so e.g. transformers `generate` on the same model object stays stock PyTorch.
- Kernel numerics: x and the weights are upcast to fp32, products accumulate in fp32, and the
  result is rounded once to the input dtype (as torch's bf16 linear does).
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from typing import Any

from cloud_node.kernels.build import load_kernel

_state = threading.local()  # .depth: how many small_m_kernel_enabled() blocks this thread is in


@contextlib.contextmanager
def small_m_kernel_enabled() -> Iterator[None]:
    """Within this block, patched Linear layers called from this thread may use the kernel."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _enabled() -> bool:
    return getattr(_state, "depth", 0) > 0


def small_m_linear(x: Any, weight: Any, bias: Any = None) -> Any:
    """y = x @ weight.T + bias through the kernel; x (..., K), weight (N, K) contiguous, same dtype
    as x (bf16 or fp32), bias (N,) or None. Raises RuntimeError when the kernel is unavailable."""
    import torch

    lib = load_kernel()
    if lib is None:
        raise RuntimeError("the small-M kernel is unavailable on this machine")
    fn = lib.smallm_gemm_bf16 if weight.dtype == torch.bfloat16 else lib.smallm_gemm_f32
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or x2.stride(1) != 1:
        x2 = x2.to(torch.float32).contiguous()  # at most max_rows x K floats
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    bias_ptr = None
    if bias is not None:
        bias = bias.to(weight.dtype).contiguous()
        bias_ptr = bias.data_ptr()
    fn(x2.data_ptr(), x2.stride(0), weight.data_ptr(), bias_ptr, y.data_ptr(), m, n, k,
       torch.get_num_threads())
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _usable(layer: Any, x: Any, max_rows: int) -> bool:
    import torch

    w = layer.weight
    if x.dtype != w.dtype or w.dtype not in (torch.bfloat16, torch.float32) or x.device.type != "cpu":
        return False
    if x.dim() == 0 or x.shape[-1] != w.shape[1] or not w.is_contiguous():
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 2 <= rows <= max_rows:
        return False
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    return not grad and load_kernel() is not None


def _forward(layer: Any, x: Any) -> Any:
    """The patched `Linear.forward` (a bound method, so a deepcopy of the model binds to the copy)."""
    import torch.nn.functional as F

    if _enabled() and _usable(layer, x, layer._small_m_max_rows):
        return small_m_linear(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def _patched(module: Any) -> bool:
    fwd = module.__dict__.get("forward")
    return getattr(fwd, "__func__", None) is _forward


def install_small_m_linear(model: Any, max_rows: int = 16) -> int:
    """Patch every nn.Linear in `model` (see the module docstring); returns how many route through
    the kernel, 0 when the kernel cannot load here (then nothing is patched)."""
    import torch

    if max_rows < 2:
        raise ValueError(f"max_rows must be at least 2, got {max_rows}")
    if load_kernel() is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module._small_m_max_rows = max_rows
            if not _patched(module):
                module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def uninstall_small_m_linear(model: Any) -> int:
    """Undo `install_small_m_linear`; returns how many layers were restored."""
    count = 0
    for module in model.modules():
        if _patched(module):
            del module.forward
            del module._small_m_max_rows
            count += 1
    return count
