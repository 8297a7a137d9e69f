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


def test_speculative_direct_reads_change_no_logits(tmp_path, monkeypatch):
    """FLASHMOE_PREFETCH with direct reads into the host cache: the next layer's best guess is
    read while the disk would idle. Every step cold, the logits are exactly those without it;
    each guess the router picked is one read fewer; `auto` turns it on only for direct reads."""
    import os

    from llm_flashmoe.engine.qwen35 import _prefetch_default
    from llm_flashmoe.errors import FlashMoeError
    from llm_flashmoe.experts import format as fmt
    from llm_flashmoe.synth import write_synthetic

    path = write_synthetic(tmp_path / "small", preset="small", layout="packed", layers=4, progress=False)
    try:
        os.close(os.open(path / fmt.read_manifest(path).layers[0].file, os.O_RDONLY | os.O_DIRECT))
        direct = True
    except OSError:   # tmpfs: no O_DIRECT, so no host cache and nothing to speculate
        direct = False
    monkeypatch.setenv("FLASHMOE_KERNELS", "auto")
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    prompt = np.random.default_rng(5).integers(0, 248000, 5).tolist()

    def run(prefetch):
        monkeypatch.setenv("FLASHMOE_PREFETCH", prefetch)
        model = load_model(path, dtype=mx.float32)
        store = model.experts
        cache = model.make_cache()
        out = [np.array(model(prompt, cache))]
        store.stats.reset()
        read = 0
        for _ in range(6):
            store.drop_page_cache()                          # cold: every step reads from disk
            out.append(np.array(model([int(np.argmax(out[-1][-1]))], cache)))
        s = store.stats
        read = s.experts - s.in_place                        # experts the router's fetches read
        store.close()
        return model, out, read, s.prefetched, s.prefetch_hits

    off, ref, read_off, pre_off, _ = run("0")
    assert off.layers[0].moe.next_router is None and pre_off == 0
    on, got, read_on, pre_on, hits = run("auto")
    for r, g in zip(ref, got):
        assert np.array_equal(r, g)                          # exactly: speculation changes no sum
    if not direct:
        assert on.layers[0].moe.next_router is None          # auto: nothing to speculate with
        return
    assert on.layers[0].moe.next_router is on.layers[1].moe.router
    k = on.experts.speculate_experts                         # (FLASHMOE_PREFETCH_EXPERTS, default 2)
    assert 0 < pre_on <= 6 * 3 * k                           # at most k guesses per layer but the last
    assert 0 < hits <= pre_on                                # (this model's guesses are mostly right)
    assert read_on == read_off - hits                        # each picked guess: one read fewer

    monkeypatch.setenv("FLASHMOE_COLD_READS", "readahead")   # auto: off where reads go to the page cache
    monkeypatch.setenv("FLASHMOE_PREFETCH", "auto")
    model = load_model(path, dtype=mx.float32)
    assert model.layers[0].moe.next_router is None
    monkeypatch.setenv("FLASHMOE_PREFETCH", "sometimes")
    with pytest.raises(FlashMoeError, match="FLASHMOE_PREFETCH"):
        _prefetch_default(model.experts)
    model.experts.close()
