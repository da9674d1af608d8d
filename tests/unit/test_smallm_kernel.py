"""The small-M GEMM kernel against F.linear, and how it loads (or does not).

Tolerances: the kernel accumulates in fp32 in another order than torch, so against F.linear on
fp32(-upcast) weights it agrees to rtol = atol = 1e-5 (inputs scaled so outputs are O(1)). A bf16
result is the fp32 sum rounded once to bf16, so it is within half a bf16 ulp (2^-8 relative) of
the fp32 reference and within one ulp (2^-7) of torch's own bf16 result.
"""

from __future__ import annotations

import pytest
import torch

from cloud_node.kernels import linear as kl
from cloud_node.kernels.build import load_kernel

F = torch.nn.functional

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="small-M kernel unavailable (CPU or compiler)")

BF16_HALF_ULP = 2.0**-8


def _problem(m: int, n: int, k: int, wdtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(wdtype)
    b = torch.randn(n, generator=g).to(wdtype) if bias else None
    return x.to(wdtype), w, b


def _reference(x, w, b):
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(5, 37), (33, 203), (1, 8), (3, 5), (64, 1100)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 9, 16, 21])
def test_fp32_matches_f_linear(m: int, n: int, k: int, bias: bool) -> None:
    x, w, b = _problem(m, n, k, torch.float32, bias)
    y = kl.small_m_linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(5, 37), (33, 203), (64, 1100)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16])
def test_bf16_within_bf16_rounding(m: int, n: int, k: int, bias: bool) -> None:
    x, w, b = _problem(m, n, k, torch.bfloat16, bias)
    y = kl.small_m_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = _reference(x, w, b)
    assert ((y.float() - ref).abs() <= BF16_HALF_ULP * ref.abs() + 1e-5).all()
    stock = F.linear(x, w, b).float()
    assert ((y.float() - stock).abs() <= 2 * BF16_HALF_ULP * ref.abs() + 1e-5).all()


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_and_batched_inputs(wdtype) -> None:
    m, n, k = 5, 19, 45
    _, w, b = _problem(m, n, k, wdtype, bias=True)
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(m, 2 * k, generator=g).to(wdtype)
    inputs = [
        wide[:, ::2],  # column stride 2
        wide[:, :k],  # row stride 2k, columns contiguous
        torch.randn(k, m, generator=g).to(wdtype).t(),  # transposed
        torch.randn(1, m, k, generator=g).to(wdtype),  # (batch, seq, K)
    ]
    for x in inputs:
        y = kl.small_m_linear(x, w, b)
        assert y.shape == (*x.shape[:-1], n)
        ref = _reference(x, w, b)
        torch.testing.assert_close(y.float(), ref, rtol=BF16_HALF_ULP if wdtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5)


def test_unavailable_kernel_leaves_torch_in_charge(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_node.kernels import build

    monkeypatch.setattr(build, "find_compiler", lambda: None)
    build.load_kernel.cache_clear()
    try:
        assert build.load_kernel() is None
    finally:
        build.load_kernel.cache_clear()
    monkeypatch.setattr(kl, "load_kernel", lambda: None)
    with pytest.raises(RuntimeError, match="unavailable"):
        kl.small_m_linear(torch.zeros(2, 4), torch.zeros(3, 4))


def test_library_name_tracks_source_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from cloud_node.kernels import build

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    path = build.library_path("/usr/bin/cc")
    assert path.parent == tmp_path / "kernels" and path.name.startswith("smallm_gemm-")
    assert build.library_path("/usr/bin/clang") != path
    monkeypatch.setattr(build, "FLAGS", (*build.FLAGS, "-g"))
    assert build.library_path("/usr/bin/cc") != path


def test_a_missing_source_means_no_kernel_not_a_crash(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """An install without the C source (the old wheel) must fall back to torch, as promised."""
    from cloud_node.kernels import build

    monkeypatch.setattr(build, "SOURCE", tmp_path / "missing.c")
    build.load_kernel.cache_clear()
    try:
        assert build.load_kernel() is None
    finally:
        build.load_kernel.cache_clear()


def test_a_prebuilt_library_loads_without_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The image's runtime stage has no compiler: $TANDEM_SMALLM_KERNEL names the library built earlier."""
    from cloud_node.kernels import build

    prebuilt = tmp_path / "smallm_gemm.so"
    build.compile_library(build.find_compiler(), prebuilt)
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    build.load_kernel.cache_clear()
    try:
        assert build.load_kernel() is None  # no compiler and nothing prebuilt: torch stays in charge
        build.load_kernel.cache_clear()
        monkeypatch.setenv(build.PREBUILT_ENV, str(prebuilt))
        lib = build.load_kernel()
        assert lib is not None and hasattr(lib, "smallm_linear")
    finally:
        build.load_kernel.cache_clear()
