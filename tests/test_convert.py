"""Conversion to the packed layout: streamed experts give the in-memory engine's logits bit for bit."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.convert import main as convert_main
from llm_flashmoe.engine.load import load_model
from llm_flashmoe.errors import FlashMoeError
from llm_flashmoe.experts import convert as conv
from llm_flashmoe.experts import format as fmt
from llm_flashmoe.experts.store import ExpertStore

PROMPT = np.random.default_rng(11).integers(0, 248000, 20).tolist()


@pytest.fixture(scope="module")
def packed(tiny_hf, tiny_mlx, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return {"mlx": conv.convert_checkpoint(tiny_mlx, root / "from-mlx", progress=False),
            "hf": conv.convert_checkpoint(tiny_hf, root / "from-hf", progress=False)}


class Crash(Exception):
    """Stands for a kill or power loss in the middle of a conversion."""


def expert_region(path) -> bytes:
    with open(path, "rb") as f:
        f.seek(fmt.HEADER_BYTES)
        return f.read()


@pytest.mark.parametrize("layout", ["mlx", "hf"])
def test_streamed_logits_bit_identical_to_in_memory_engine(layout, packed, tiny_mlx):
    # The in-memory reference is the MLX checkpoint: for the HF source it is the
    # same bf16 weights quantized with group 64, as the converter does.
    ref = load_model(tiny_mlx, dtype=mx.float32)
    ours = load_model(packed[layout], dtype=mx.float32)
    assert isinstance(ours.experts, ExpertStore)
    rc, oc = ref.make_cache(), ours.make_cache()
    # 4 tokens (unsorted expert path), then 16 (the sorted path of the MoE block).
    for chunk in (PROMPT[:4], PROMPT[4:]):
        r, o = ref(chunk, rc), ours(chunk, oc)
        assert mx.array_equal(r, o).item()
    token = int(mx.argmax(r[-1]))
    for _ in range(4):
        r, o = ref([token], rc), ours([token], oc)
        assert mx.array_equal(r, o).item()
        token = int(mx.argmax(r[-1]))
    s = ours.experts.stats
    assert s.experts > 0 and s.bytes == s.experts * ours.experts.manifest.expert_bytes
    ours.experts.close()


def test_hf_and_mlx_sources_give_the_same_expert_bytes(packed):
    a, b = fmt.read_manifest(packed["mlx"]), fmt.read_manifest(packed["hf"])
    assert a.expert_bytes == b.expert_bytes and a.components == b.components
    assert [l.crc32 for l in a.layers] == [l.crc32 for l in b.layers]
    for entry in a.layers:
        assert expert_region(packed["mlx"] / entry.file) == expert_region(packed["hf"] / entry.file)
    assert a.resident["crc32_data"] == b.resident["crc32_data"]  # the non-expert weights too
    assert a.model_id != b.model_id


def test_layout_is_aligned_and_documented(packed):
    m = fmt.read_manifest(packed["mlx"])
    assert m.expert_stride % fmt.ALIGNMENT == 0 and m.header_bytes % fmt.ALIGNMENT == 0
    assert [c.name for c in m.components] == [f"{p}.{q}" for p in fmt.PROJECTIONS for q in fmt.PARTS]
    assert m.components[-1].offset + m.components[-1].nbytes == m.expert_bytes
    assert (packed["mlx"] / "tokenizer.json").is_file() and (packed["mlx"] / fmt.COMPLETE_NAME).is_file()
    assert not (packed["mlx"] / fmt.STATE_NAME).exists()
    assert fmt.conversion_status(packed["mlx"]) == "complete"
    # The 397B expert at 4 bits: 7,077,888 bytes, already a multiple of 16 KiB.
    parts = []
    for p, (o, i) in zip(fmt.PROJECTIONS, [(1024, 4096), (1024, 4096), (4096, 1024)]):
        parts += [(f"{p}.weight", "uint32", (o, i // 8)), (f"{p}.scales", "bfloat16", (o, i // 64)),
                  (f"{p}.biases", "bfloat16", (o, i // 64))]
    _, size, stride = fmt.layout_components(parts)
    assert size == stride == 7_077_888


def test_expert_bits_requantizes(tiny_mlx, tmp_path, packed):
    out = conv.convert_checkpoint(tiny_mlx, tmp_path / "q2", expert_bits=2, progress=False)
    m = fmt.read_manifest(out)
    assert m.bits == 2 and m.expert_bytes < fmt.read_manifest(packed["mlx"]).expert_bytes
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["language_model.model.layers.0.mlp.experts.down_proj"]["bits"] == 2
    model = load_model(out, dtype=mx.float32)
    ref = load_model(packed["mlx"], dtype=mx.float32)
    a = model(PROMPT[:4], model.make_cache())
    b = ref(PROMPT[:4], ref.make_cache())
    assert bool(mx.all(mx.isfinite(a)).item())
    assert not mx.array_equal(a, b).item()  # 2-bit experts differ, but the model still runs
    # The 2-bit codes dequantize close to the 4-bit experts they came from.
    e4 = ref.experts.fetch(0, np.array([3]))
    e2 = model.experts.fetch(0, np.array([3]))
    d4 = mx.dequantize(e4.down.weight[0], e4.down.scales[0], e4.down.biases[0], group_size=64, bits=4)
    d2 = mx.dequantize(e2.down.weight[0], e2.down.scales[0], e2.down.biases[0], group_size=64, bits=2)
    assert float(mx.abs(d2 - d4).mean() / mx.abs(d4).mean()) < 0.6


def test_interrupted_conversion_is_refused_then_resumes(tiny_mlx, tmp_path, packed, monkeypatch):
    dest = tmp_path / "resume"
    real = conv.write_layer
    calls, crash = [], [True]

    def flaky(dest_, layer, *a, **k):
        calls.append(layer)
        if layer == 2 and crash[0]:  # die while writing the third layer file
            (dest_ / (fmt.layer_file_name(layer) + ".partial")).write_bytes(b"half")
            raise Crash
        return real(dest_, layer, *a, **k)

    monkeypatch.setattr(conv, "write_layer", flaky)
    with pytest.raises(Crash):
        conv.convert_checkpoint(tiny_mlx, dest, progress=False)
    assert fmt.conversion_status(dest).startswith("incomplete: conversion not finished (2 of 8 layers")
    with pytest.raises(FlashMoeError, match="unfinished conversion.*Resume it with: llm flashmoe convert"):
        load_model(dest)
    with pytest.raises(FlashMoeError, match="another source"):
        conv.convert_checkpoint(tiny_mlx, dest, expert_bits=2, progress=False)

    calls.clear()
    crash[0] = False
    conv.convert_checkpoint(tiny_mlx, dest, progress=False)
    assert calls == [2, 3, 4, 5, 6, 7]  # only what was missing
    assert not list(dest.glob("*.partial"))
    a, b = fmt.read_manifest(dest), fmt.read_manifest(packed["mlx"])
    assert [l.crc32 for l in a.layers] == [l.crc32 for l in b.layers]
    with pytest.raises(FlashMoeError, match="already holds a complete"):
        conv.convert_checkpoint(tiny_mlx, dest, progress=False)


def test_convert_refuses_bad_destinations_and_sources(tiny_mlx, tmp_path, packed, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FlashMoeError, match="not empty"):
        conv.convert_checkpoint(tiny_mlx, tmp_path / "busy", progress=False)
    with pytest.raises(FlashMoeError, match="already a converted"):
        conv.convert_checkpoint(packed["mlx"], tmp_path / "again", progress=False)
    with pytest.raises(FlashMoeError, match="expert-bits"):
        conv.convert_checkpoint(tiny_mlx, tmp_path / "x", expert_bits=5, progress=False)
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "Error: source checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
