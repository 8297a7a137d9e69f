"""Logits of whole models with the CPU kernels against the plain-MLX path.

The `397b` preset (2 layers, about 7 GB) is checked by hand with
`python -m llm_flashmoe.cpu.logits_check`; CI covers the 397B shapes at
kernel level in test_cpu_kernels.py::test_moe_397b_shapes.
"""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.cpu import build
from llm_flashmoe.cpu.logits_check import compare_decode
from llm_flashmoe.engine.load import load_model

pytestmark = [
    pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler"),
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend is chosen on the CPU device"),
]


def test_tiny_logits_match_plain(tiny_mlx, monkeypatch):
    monkeypatch.setenv("FLASHMOE_KERNELS", "auto")
    model = load_model(tiny_mlx, dtype=mx.float32)
    prompt = np.random.default_rng().integers(0, 248000, 12).tolist()
    assert compare_decode(model, prompt, steps=6) < 1e-4
