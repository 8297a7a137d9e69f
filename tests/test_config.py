"""config.json parsing: both published layouts, and clear errors."""

from __future__ import annotations

import pytest

from llm_flashmoe.config import parse_config
from llm_flashmoe.errors import FlashMoeError
from llm_flashmoe.synth import make_config


def test_hf_layout_397b():
    cfg = parse_config(make_config("397b"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (4096, 60, 512, 10)
    assert cfg.rope_dims == 64 and cfg.rope_theta == 1e7
    assert [cfg.is_linear(i) for i in range(8)] == [True, True, True, False] * 2
    assert cfg.conv_dim == 2 * 16 * 128 + 64 * 128
    assert cfg.quantization is None and cfg.quant_for("layers.0.mlp.gate") is None


def test_mlx_layout_quantization_overrides():
    cfg = parse_config(make_config("tiny", quant_bits=4))
    assert cfg.quant_for("layers.3.linear_attn.in_proj_qkv").bits == 4
    assert cfg.quant_for("layers.3.mlp.gate").bits == 8
    assert cfg.quant_for("layers.3.mlp.shared_expert_gate").bits == 8


def test_layer_types_from_interval_when_absent():
    raw = make_config("tiny")
    del raw["text_config"]["layer_types"]
    raw["text_config"]["full_attention_interval"] = 2
    cfg = parse_config(raw)
    assert cfg.layer_types[:4] == ("linear_attention", "full_attention") * 2


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.pop("hidden_size"), "field 'hidden_size' is missing"),
    (lambda t: t.update(num_experts_per_tok=100), "field 'num_experts_per_tok' is larger than num_experts"),
    (lambda t: t.update(layer_types=["linear_attention"]), "field 'layer_types' lists 1 layers"),
    (lambda t: t.update(layer_types=["mamba"] * 8), "unknown layer type 'mamba'"),
    (lambda t: t.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda t: t.update(hidden_size=-4), "must be a positive integer"),
    (lambda t: t.update(rope_parameters={"rope_type": "yarn"}), "rope_type"),
])
def test_inconsistent_fields_named(mutate, message):
    raw = make_config("tiny")
    mutate(raw["text_config"])
    with pytest.raises(FlashMoeError, match=message):
        parse_config(raw)


def test_bad_quantization():
    raw = make_config("tiny", quant_bits=4)
    raw["quantization"]["bits"] = 7
    with pytest.raises(FlashMoeError, match="quantization.bits"):
        parse_config(raw)


def test_switch_mlp_override_maps_to_experts():
    raw = make_config("tiny", quant_bits=4)
    raw["quantization"]["language_model.model.layers.2.mlp.switch_mlp.down_proj"] = {"group_size": 64, "bits": 2}
    cfg = parse_config(raw)
    assert cfg.quant_for("layers.2.mlp.experts.down_proj").bits == 2
    assert cfg.quant_for("layers.2.mlp.experts.up_proj").bits == 4


def test_synthetic_shards_written_in_parallel_are_the_same_bytes(tmp_path):
    """write_synthetic(workers=2) writes the shards in two processes: the same files, byte for
    byte, as one process writes (each tensor's values depend only on the seed and its name)."""
    from llm_flashmoe.synth import write_synthetic

    one = write_synthetic(tmp_path / "one", preset="tiny", layout="mlx", layers=2, progress=False)
    two = write_synthetic(tmp_path / "two", preset="tiny", layout="mlx", layers=2, progress=False, workers=2)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and sum(n.endswith(".safetensors") for n in names) == 4
    for n in names:
        assert (one / n).read_bytes() == (two / n).read_bytes(), n
