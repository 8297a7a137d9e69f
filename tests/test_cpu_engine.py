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


def _linear_states(cache):
    from llm_flashmoe.engine.cache import LinearAttentionState

    return [c for c in cache.layers if isinstance(c, LinearAttentionState)]


def test_decode_reuses_released_state_and_spares_held_state(tiny_mlx, monkeypatch):
    """The GDN kernel writes a step's new state into the buffer of two steps ago when
    nothing else holds it, and never into one that something (a snapshot) still holds."""
    monkeypatch.setenv("FLASHMOE_KERNELS", "auto")
    model = load_model(tiny_mlx, dtype=mx.float32)
    cache = model.make_cache()
    mx.eval(model([5, 6, 7], cache, last_only=True))
    held = [(np.array(c.recurrent), c.recurrent, np.array(c.conv), c.conv) for c in _linear_states(cache)]
    addresses = []
    for t in range(6):
        mx.eval(model([10 + t], cache))
        addresses.append(np.asarray(_linear_states(cache)[0].recurrent).ctypes.data)
    for rec_copy, rec, conv_copy, conv in held:
        assert np.array_equal(rec_copy, np.asarray(rec)) and np.array_equal(conv_copy, np.asarray(conv))
    assert addresses[-1] == addresses[-3] and addresses[-2] == addresses[-4]   # two buffers take turns
