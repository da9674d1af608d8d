"""Shared fixtures: tiny random-weight models built once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TinyModels:
    target_hf: Path  # the target, transformers folder
    target_onnx: Path  # the same weights exported to ONNX: the target as its own drafter
    drafter_hf: Path  # the target with noise on its weights: agrees only partly
    drafter_onnx: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from tandem.models.tiny import build_hf, build_onnx, perturb

    root = tmp_path_factory.mktemp("tiny")
    target = build_hf(root / "target", seed=1)
    drafter = perturb(target, root / "drafter", noise=0.03, seed=2)
    return TinyModels(
        target_hf=target,
        target_onnx=build_onnx(target, root / "target_onnx", root / "cache"),
        drafter_hf=drafter,
        drafter_onnx=build_onnx(drafter, root / "drafter_onnx", root / "cache"),
    )
