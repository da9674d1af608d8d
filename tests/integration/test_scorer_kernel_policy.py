"""The target installs the small-M AVX2 kernel only where it helps: on CPUs without native bf16
matmuls (Zen 3). Where AVX512-BF16 or AMX exist (Zen 4, Sapphire Rapids) torch's matmuls are
faster, so the scorer keeps torch and prefills in one pass. The CPU's flags are faked here to
exercise both branches on any machine; the model is the tiny random-weight target."""

from __future__ import annotations

import pytest

from cloud_node.kernels import build
from cloud_node.scorer import TargetModel


@pytest.mark.parametrize(("flags", "auto_installs"), [
    ({"avx2", "fma"}, True),                          # Zen 3: the kernel helps
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, False),  # Zen 4
    ({"avx2", "fma", "amx_bf16", "avx512_bf16"}, False),  # Sapphire Rapids
])
def test_the_kernel_follows_the_cpu(tiny_models, monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                    auto_installs: bool) -> None:
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(flags))
    build.load_kernel.cache_clear()
    try:
        loads = build.load_kernel() is not None  # CPU flags faked; the compiler and the real CPU decide
        auto = TargetModel(tiny_models.target_hf, dtype="fp32")
        assert (auto.small_m_layers > 0) == (auto_installs and loads)
        forced = TargetModel(tiny_models.target_hf, dtype="fp32", small_m_kernel=True)
        assert (forced.small_m_layers > 0) == loads
        assert TargetModel(tiny_models.target_hf, dtype="fp32", small_m_kernel=False).small_m_layers == 0
        # Same scores either way: the policy changes speed, never results.
        ids = [5, 17, 99, 3]
        a = auto.new_session(ids).score([1, 2])
        b = forced.new_session(ids).score([1, 2])
        assert abs(a - b).max() < 1e-3
    finally:
        build.load_kernel.cache_clear()
