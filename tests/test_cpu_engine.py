"""Logits of whole models with the CPU kernels against the plain-MLX path.

One model object serves both sides: its decode hooks (`.ops` of every block)
are switched to None for the plain path, so the weights are loaded once.
The `397b` preset (2 layers, ~7 GB written and held in memory) runs only
with FLASHMOE_SLOW_TESTS=1; CI covers the 397B shapes at kernel level in
test_cpu_kernels.py::test_moe_397b_shapes.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.cpu import build
from llm_flashmoe.engine.load import load_model

pytestmark = [
    pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler"),
    pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend is chosen on the CPU device"),
]


def set_ops(model, ops) -> None:
    for layer in model.layers:
        for block in (layer, layer.mixer, layer.moe):
            block.ops = ops


def compare_decode(model, prompt: list[int], steps: int) -> float:
    """Max relative logit error over a prefill then `steps` greedy decode steps."""
    fused = model.layers[0].ops
    assert fused is not None and fused.backend == "cpu"
    caches = [model.make_cache(), model.make_cache()]
    errs = []
    tokens = [prompt, prompt]
    for _ in range(steps + 1):
        outs = []
        for side, cache in enumerate(caches):
            set_ops(model, fused if side == 0 else None)
            outs.append(model(tokens[side], cache, last_only=True)[-1])
        mx.eval(outs)
        ref = np.asarray(outs[1], np.float64)
        errs.append(float(np.abs(np.asarray(outs[0]) - ref).max() / np.abs(ref).max()))
        nxt = int(np.argmax(ref))
        tokens = [[nxt], [nxt]]
    set_ops(model, fused)
    return max(errs)


def test_tiny_logits_match_plain(tiny_mlx, monkeypatch):
    monkeypatch.setenv("FLASHMOE_KERNELS", "auto")
    model = load_model(tiny_mlx, dtype=mx.float32)
    prompt = np.random.default_rng().integers(0, 248000, 12).tolist()
    assert compare_decode(model, prompt, steps=6) < 1e-4


@pytest.mark.skipif(os.environ.get("FLASHMOE_SLOW_TESTS") != "1", reason="set FLASHMOE_SLOW_TESTS=1 (writes ~7 GB)")
def test_397b_two_layers_logits_match_plain(tmp_path_factory, monkeypatch):
    from llm_flashmoe.synth import write_synthetic

    monkeypatch.setenv("FLASHMOE_KERNELS", "auto")
    path = os.environ.get("FLASHMOE_397B_L2") or write_synthetic(
        tmp_path_factory.mktemp("q397b") / "mlx", preset="397b", layout="mlx", layers=2, progress=False)
    model = load_model(path, dtype=mx.float32, experts_per_token=4)
    prompt = np.random.default_rng().integers(0, 248000, 4).tolist()
    assert compare_decode(model, prompt, steps=3) < 1e-4
