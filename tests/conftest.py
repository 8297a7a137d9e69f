"""Shared fixtures: synthetic `tiny` checkpoints, built once per test session.

Both published layouts of the same seed: `tiny_hf` (Hugging Face bf16) and
`tiny_mlx` (MLX 4-bit, quantized from the same weights with group 64).
Tests must not modify these directories; copy them first.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    from llm_flashmoe.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny") / "hf", preset="tiny", layout="hf", progress=False)


@pytest.fixture(scope="session")
def tiny_mlx(tmp_path_factory):
    from llm_flashmoe.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("tiny") / "mlx", preset="tiny", layout="mlx", progress=False)
