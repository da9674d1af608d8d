"""Route small-M `nn.Linear` calls to the native small-M kernel, opt in, per thread.

Guarantees:
- `install_small_m_linear(model)` patches the `forward` of every `torch.nn.Linear` inside the
  model (an instance attribute: classes, parameters and state_dict keys are unchanged). It is
  idempotent and returns the number of Linear layers that route through the kernel.
- A patched layer uses the kernel only while `small_m_kernel_enabled()` is active on the calling
  thread AND the input flattens to 2..max_rows rows AND the weight is a contiguous bf16 or fp32
  tensor matching the input dtype AND no gradient is needed. Every other call is the stock
  `F.linear`, so e.g. transformers `generate` on the same model object stays stock PyTorch.
- Kernel numerics: x and the weights are upcast to fp32 (exact), products accumulate in fp32,
  and the result (bias added in fp32) is rounded once to the input dtype, to nearest even.
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


def _usable(layer: Any, x: Any, max_rows: int) -> bool:
    import torch

    w = layer.weight
    k = x.shape[-1] if x.dim() else 0
    if not k or not 2 <= x.numel() // k <= max_rows or x.dtype != w.dtype or not x.is_cpu:
        return False
    if w.dtype not in (torch.bfloat16, torch.float32) or not w.is_contiguous() or w.shape[1] != k:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))


def _forward(layer: Any, x: Any) -> Any:
    """The patched `Linear.forward` (a bound method, so a deepcopy of the model binds to the copy)."""
    import torch.nn.functional as F

    if _enabled() and _usable(layer, x, layer._small_m_max_rows) and load_kernel() is not None:
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
            module.__dict__["_small_m_max_rows"] = max_rows
            if not _patched(module):  # an instance attribute shadows Linear.forward
                module.__dict__["forward"] = types.MethodType(_forward, module)
            count += 1
    return count


def uninstall_small_m_linear(model: Any) -> int:
    """Undo `install_small_m_linear`; returns how many layers were restored."""
    count = 0
    for module in model.modules():
        if _patched(module):
            del module.__dict__["forward"], module.__dict__["_small_m_max_rows"]
            count += 1
    return count
