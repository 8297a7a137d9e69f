"""The engine against mlx-lm's independent `qwen3_5_moe` implementation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.engine.generate import Session
from llm_flashmoe.engine.load import load_model
from llm_flashmoe.engine.sampling import SamplingParams
from llm_flashmoe.errors import FlashMoeError

PROMPT = np.random.default_rng(7).integers(0, 248000, 40).tolist()


def reference_model(path: Path):
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(Path(path))
    model.set_dtype(mx.float32)
    return model


def rel_err(ours: mx.array, ref: mx.array) -> float:
    return float(mx.abs(ours - ref).max() / mx.abs(ref).max())


@pytest.fixture(scope="module", params=["hf", "mlx"])
def pair(request, tiny_hf, tiny_mlx):
    path = tiny_hf if request.param == "hf" else tiny_mlx
    return request.param, path, load_model(path, dtype=mx.float32), reference_model(path)


def test_logits_match_reference_chunked_prefill_then_decode(pair):
    layout, _path, ours, ref = pair
    oc, rc = ours.make_cache(), ref.make_cache()
    errors = []
    for start in range(0, len(PROMPT), 16):  # chunks of 16, 16, 8
        chunk = PROMPT[start : start + 16]
        r = ref(mx.array(chunk)[None], cache=rc)[0]
        o = ours(chunk, oc)
        assert o.shape == r.shape == (len(chunk), 248320)
        errors.append(rel_err(o, r))
    token = int(mx.argmax(r[-1]))
    for _ in range(10):
        r = ref(mx.array([token])[None], cache=rc)[0]
        o = ours([token], oc)
        errors.append(rel_err(o, r))
        token = int(mx.argmax(r[-1]))
    assert max(errors) <= 1e-3, (layout, errors)
    assert len(oc.tokens) == len(PROMPT) + 10


def test_greedy_generation_identical_to_mlx_lm(pair):
    from mlx_lm.generate import generate_step

    _layout, _path, ours, ref = pair
    theirs = []
    for token, _ in generate_step(mx.array(PROMPT), ref, max_tokens=32, sampler=lambda x: mx.argmax(x, axis=-1)):
        theirs.append(int(token))
    mine = list(Session(ours, prefill_chunk=16).generate(PROMPT, params=SamplingParams(temperature=0), max_tokens=32))
    assert mine == theirs


def test_fewer_experts_per_token_changes_output(tiny_mlx):
    full = load_model(tiny_mlx, dtype=mx.float32)
    fewer = load_model(tiny_mlx, dtype=mx.float32, experts_per_token=2)
    a = full(PROMPT[:8], full.make_cache())
    b = fewer(PROMPT[:8], fewer.make_cache())
    assert a.shape == b.shape
    assert rel_err(b, a) > 1e-3  # different experts, different logits
    assert fewer.experts_per_token == 2 and full.experts_per_token == 4


def test_expert_stacks_with_room_behind_give_the_same_logits(tiny_mlx, monkeypatch):
    """On MLX's CUDA backend the loader gives each resident expert stack a row of room behind its
    last (linear.with_room: MLX's gather_qmm reads past a stack's end there), and quantized 2-D
    weights room up to a whole tile of rows (linear.matrix_with_room): they keep their shapes and
    values and are views into the longer buffers, and the prompt's and a decode step's logits are
    those of the plain weights."""
    from llm_flashmoe.engine import linear

    plain = load_model(tiny_mlx, dtype=mx.float32)
    monkeypatch.setattr(linear, "room_behind", lambda: True)
    roomy = load_model(tiny_mlx, dtype=mx.float32)
    for a, b in zip(plain.experts.layers, roomy.experts.layers):
        for la, lb in zip(a, b):
            for pa, pb in ((la.weight, lb.weight), (la.scales, lb.scales), (la.biases, lb.biases)):
                assert pa.shape == pb.shape and pa.dtype == pb.dtype
                assert mx.array_equal(pa, pb)
    w = mx.arange(24, dtype=mx.uint32).reshape(4, 3, 2)
    r = linear.with_room(w)
    assert r.shape == w.shape and mx.array_equal(r, w)
    # the row behind, read through the view's address the way the CUDA kernels overrun: zeros
    import ctypes

    start = np.array(r, copy=False).__array_interface__["data"][0]
    behind = np.ctypeslib.as_array((ctypes.c_uint32 * (w.size + 6)).from_address(start))
    assert behind[: w.size].tolist() == list(range(24)) and not behind[w.size:].any()
    # quantized 2-D weights of fewer rows than a whole 128-row tile (GatedDeltaNet's in_proj_a, a
    # row per value head): views into buffers of 128 rows, the rest zeros
    pa, pb = plain.layers[0].mixer.in_proj_a, roomy.layers[0].mixer.in_proj_a
    assert pa.quantized and pa.weight.shape[0] % linear.QMM_TILE_ROWS
    for xa, xb in ((pa.weight, pb.weight), (pa.scales, pb.scales), (pa.biases, pb.biases)):
        assert xa.shape == xb.shape and mx.array_equal(xa, xb)
        start = np.array(xb, copy=False).__array_interface__["data"][0]
        row = xb.size // xb.shape[0]
        whole = np.ctypeslib.as_array((ctypes.c_char * (128 * row * xb.itemsize)).from_address(start))
        assert whole[: xb.nbytes].tobytes() == np.array(xb).tobytes() and not whole[xb.nbytes:].view(np.uint8).any()
    assert linear.matrix_with_room(pa).weight.shape == pa.weight.shape
    monkeypatch.setattr(linear, "room_behind", lambda: False)
    assert linear.matrix_with_room(pa) is pa   # elsewhere: as it is
    c1, c2 = plain.make_cache(), roomy.make_cache()
    a, b = plain(PROMPT[:12], c1), roomy(PROMPT[:12], c2)
    assert mx.array_equal(a, b)
    assert mx.array_equal(plain(PROMPT[12:13], c1), roomy(PROMPT[12:13], c2))


@pytest.mark.parametrize("k", [0, 5, -1])
def test_invalid_experts_per_token(tiny_mlx, k):
    with pytest.raises(FlashMoeError, match="experts_per_token must be between 1 and the model's top-k \\(4\\)"):
        load_model(tiny_mlx, experts_per_token=k)


def copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_missing_tensor_is_named(tiny_mlx, tmp_path):
    from llm_flashmoe.safetensors_io import SafetensorsFile, write_safetensors

    d = copy_checkpoint(tiny_mlx, tmp_path / "m")
    shard = d / "model-00003-of-00010.safetensors"  # layer 1
    with SafetensorsFile(shard) as f:
        tensors = {n: f.read(n) for n in f.tensors if not n.endswith("linear_attn.in_proj_z.scales")}
    write_safetensors(shard, tensors)
    with pytest.raises(FlashMoeError, match=r"tensor layers\.1\.linear_attn\.in_proj_z\.scales is missing"):
        load_model(d)


def test_wrong_shape_is_named(tiny_hf, tmp_path):
    d = copy_checkpoint(tiny_hf, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 256  # the weights have 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashMoeError, match=r"tensor layers\.0\.mlp\.experts\.gate_proj\.weight has shape \[64, 128, 256\]"):
        load_model(d)


def test_unknown_model_type(tiny_hf, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((tiny_hf / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashMoeError, match="model_type 'llama' is not supported"):
        load_model(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FlashMoeError, match="does not exist"):
        load_model(tmp_path / "nowhere")
