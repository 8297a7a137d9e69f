"""One frozen configuration parsed from a checkpoint's `config.json`.

Both published layouts are read: Hugging Face (`model_type` `qwen3_5_moe`
with the language model under `text_config`) and MLX-converted (the same,
plus a top-level `quantization` block that may carry per-module overrides).
Anything we do not support is rejected here, naming the field, rather than
producing wrong tokens later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import FlashMoeError

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


@dataclass(frozen=True)
class QuantSpec:
    """Affine quantization of one linear layer in the MLX format."""

    bits: int
    group_size: int
    mode: str = "affine"


@dataclass(frozen=True)
class ModelConfig:
    # Shapes (SPEC section 2 names).
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    layer_types: tuple[str, ...]
    # Numerics.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 262144
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = (248046, 248044)
    # Quantization: the default for every linear layer (None: dense weights)
    # and per-module overrides keyed by our internal module path
    # (e.g. "layers.0.mlp.gate"); an override of None means "not quantized".
    quantization: QuantSpec | None = None
    quant_overrides: Mapping[str, QuantSpec | None] = field(default_factory=dict)

    # -- derived -----------------------------------------------------------
    @property
    def rope_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:  # Hk * Dk
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:  # Hv * Dv
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:  # channels of the q|k|v stream
        return 2 * self.linear_key_dim + self.linear_value_dim

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == LINEAR_ATTENTION

    def quant_for(self, module: str) -> QuantSpec | None:
        """The quantization of the linear layer at internal path `module`."""
        if module in self.quant_overrides:
            return self.quant_overrides[module]
        return self.quantization


# Fields every supported checkpoint must state; the rest have the defaults
# the published Qwen3.5 MoE configs use.
_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
_DEFAULTS = {
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
}


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` into a `ModelConfig`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FlashMoeError(
            f"{path} not found: is {model_dir} a Qwen3.5 MoE model directory? "
            "It should hold config.json, the tokenizer files and the weights."
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlashMoeError(f"{path} is not valid JSON ({e}); re-download or re-convert it.") from e
    return parse_config(raw, source=str(path))


def parse_config(raw: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FlashMoeError(
            f"{source}: model_type {model_type!r} is not supported; llm-flashmoe runs "
            f"Qwen3.5 MoE checkpoints ({' or '.join(SUPPORTED_MODEL_TYPES)})."
        )
    text = raw.get("text_config", raw) if model_type == "qwen3_5_moe" else raw
    if not isinstance(text, Mapping):
        raise FlashMoeError(f"{source}: text_config must be an object.")

    def bad(name: str, why: str) -> FlashMoeError:
        return FlashMoeError(f"{source}: field {name!r} {why}")

    values: dict[str, Any] = {}
    for name in _REQUIRED:
        if name not in text:
            raise bad(name, "is missing")
        values[name] = text[name]
    for name, default in _DEFAULTS.items():
        values[name] = text.get(name, default)
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise bad(name, f"must be a positive integer, got {v!r}")

    n_layers = values["num_hidden_layers"]
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = text.get("full_attention_interval", 4)
        if not isinstance(interval, int) or interval <= 0:
            raise bad("full_attention_interval", f"must be a positive integer, got {interval!r}")
        layer_types = [
            FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(n_layers)
        ]
    if len(layer_types) != n_layers:
        raise bad("layer_types", f"lists {len(layer_types)} layers but num_hidden_layers is {n_layers}")
    for t in layer_types:
        if t not in (LINEAR_ATTENTION, FULL_ATTENTION):
            raise bad("layer_types", f"has unknown layer type {t!r}")

    if values["num_experts_per_tok"] > values["num_experts"]:
        raise bad("num_experts_per_tok", "is larger than num_experts")
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise bad("num_key_value_heads", "must divide num_attention_heads")
    if values["linear_num_value_heads"] % values["linear_num_key_heads"]:
        raise bad("linear_num_key_heads", "must divide linear_num_value_heads")
    if text.get("decoder_sparse_step", 1) != 1 or text.get("mlp_only_layers"):
        raise bad("decoder_sparse_step", "must be 1 (every layer a MoE layer) for Qwen3.5 MoE")
    if text.get("attention_bias", False):
        raise bad("attention_bias", "must be false for Qwen3.5 MoE")

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise bad("rope_parameters.rope_type", f"{rope_type!r} is not supported (only default rope)")
    rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 1e7)))
    partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
    if not 0 < partial <= 1:
        raise bad("partial_rotary_factor", f"must be in (0, 1], got {partial}")

    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    eos_ids = {248046, 248044}
    if isinstance(eos, int):
        eos_ids.add(eos)
    elif isinstance(eos, list):
        eos_ids.update(int(e) for e in eos)

    quant, overrides = _parse_quantization(raw, source)
    return ModelConfig(
        **values,
        layer_types=tuple(layer_types),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        partial_rotary_factor=partial,
        max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
        norm_topk_prob=bool(text.get("norm_topk_prob", True)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        eos_token_ids=tuple(sorted(eos_ids)),
        quantization=quant,
        quant_overrides=overrides,
    )


def _parse_quantization(raw: Mapping[str, Any], source: str):
    q = raw.get("quantization")
    if q is None:
        return None, {}
    if not isinstance(q, Mapping):
        raise FlashMoeError(f"{source}: field 'quantization' must be an object.")
    default = _quant_spec(q, "quantization", source)
    overrides: dict[str, QuantSpec | None] = {}
    for key, value in q.items():
        if key in ("group_size", "bits", "mode"):
            continue
        module = internal_module_path(key)
        if value is False:
            overrides[module] = None
        elif isinstance(value, Mapping):
            overrides[module] = _quant_spec(value, f"quantization.{key}", source)
        else:
            raise FlashMoeError(f"{source}: field 'quantization.{key}' must be an object or false.")
    return default, overrides


def _quant_spec(q: Mapping[str, Any], name: str, source: str) -> QuantSpec:
    bits, group = q.get("bits"), q.get("group_size")
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise FlashMoeError(f"{source}: field '{name}.mode' is {mode!r}; only affine quantization is supported.")
    if bits not in (2, 3, 4, 5, 6, 8):
        raise FlashMoeError(f"{source}: field '{name}.bits' must be 2, 3, 4, 5, 6 or 8, got {bits!r}")
    if group not in (32, 64, 128):
        raise FlashMoeError(f"{source}: field '{name}.group_size' must be 32, 64 or 128, got {group!r}")
    return QuantSpec(bits=bits, group_size=group, mode=mode)


_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.", "model.")


def internal_module_path(name: str) -> str:
    """Map a published module/tensor name to our internal naming.

    Internal names drop the published prefixes: `layers.N.mlp.gate`,
    `embed_tokens`, `norm`, `lm_head`.
    """
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    return name.replace(".mlp.switch_mlp.", ".mlp.experts.")
