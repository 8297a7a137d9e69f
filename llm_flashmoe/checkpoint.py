"""Published checkpoint layouts (Hugging Face, MLX) -> one internal naming.

Internal names drop the published prefixes and follow the MLX conventions:
norm weights hold 1 + w, conv1d weights are [C, K], experts are stacked per
projection as `layers.N.mlp.experts.{gate,up,down}_proj.{weight,scales,biases}`.

| published (Hugging Face)                     | internal                              |
|----------------------------------------------|---------------------------------------|
| model.language_model.layers.N.X              | layers.N.X                            |
| ...mlp.experts.gate_up_proj [E, 2I, H]       | ...mlp.experts.{gate,up}_proj.weight  |
| ...mlp.experts.down_proj [E, H, I]           | ...mlp.experts.down_proj.weight       |
| ...linear_attn.conv1d.weight [C, 1, K]       | ...linear_attn.conv1d.weight [C, K]   |
| norms stored zero-centred (w)                | 1 + w                                 |
| (MLX) language_model.model.layers.N.X        | layers.N.X                            |
| (MLX) ...mlp.switch_mlp.P                    | ...mlp.experts.P                      |
| (MLX) conv1d [C, K, 1]                       | [C, K]                                |

`mtp.*` and the vision tower are skipped: a text engine does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import ModelConfig
from .errors import FlashMoeError
from .safetensors_io import SafetensorsFile, iter_checkpoint_files

HF_PREFIX = "model.language_model."
MLX_PREFIX = "language_model.model."

# Norms whose published Hugging Face weights are zero-centred. The gated norm
# inside GatedDeltaNet (`linear_attn.norm`) is used as is in both layouts.
_CENTRED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight",
                  "q_norm.weight", "k_norm.weight")

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModuleSpec:
    """One weight-carrying module of the model, internal name and shape."""

    name: str  # e.g. "layers.0.linear_attn.in_proj_qkv"
    kind: str  # "linear" | "experts" | "vector" | "conv" | "embedding"
    shape: tuple[int, ...]  # logical (unquantized) shape, e.g. (out, in)


def model_modules(cfg: ModelConfig) -> list[ModuleSpec]:
    """Every module a checkpoint for `cfg` must provide, in file order."""
    H, V = cfg.hidden_size, cfg.vocab_size
    mods = [ModuleSpec("embed_tokens", "embedding", (V, H))]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        mods += [ModuleSpec(p + "input_layernorm", "vector", (H,)),
                 ModuleSpec(p + "post_attention_layernorm", "vector", (H,))]
        if cfg.is_linear(i):
            a = p + "linear_attn."
            Hv = cfg.linear_num_value_heads
            mods += [
                ModuleSpec(a + "in_proj_qkv", "linear", (cfg.conv_dim, H)),
                ModuleSpec(a + "in_proj_z", "linear", (cfg.linear_value_dim, H)),
                ModuleSpec(a + "in_proj_b", "linear", (Hv, H)),
                ModuleSpec(a + "in_proj_a", "linear", (Hv, H)),
                ModuleSpec(a + "conv1d", "conv", (cfg.conv_dim, cfg.linear_conv_kernel_dim)),
                ModuleSpec(a + "dt_bias", "vector", (Hv,)),
                ModuleSpec(a + "A_log", "vector", (Hv,)),
                ModuleSpec(a + "norm", "vector", (cfg.linear_value_head_dim,)),
                ModuleSpec(a + "out_proj", "linear", (H, cfg.linear_value_dim)),
            ]
        else:
            a = p + "self_attn."
            Dh, Hq, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
            mods += [
                ModuleSpec(a + "q_proj", "linear", (2 * Hq * Dh, H)),  # query | gate per head
                ModuleSpec(a + "k_proj", "linear", (Hkv * Dh, H)),
                ModuleSpec(a + "v_proj", "linear", (Hkv * Dh, H)),
                ModuleSpec(a + "o_proj", "linear", (H, Hq * Dh)),
                ModuleSpec(a + "q_norm", "vector", (Dh,)),
                ModuleSpec(a + "k_norm", "vector", (Dh,)),
            ]
        m = p + "mlp."
        E, I, S = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        mods += [
            ModuleSpec(m + "gate", "linear", (E, H)),
            ModuleSpec(m + "experts.gate_proj", "experts", (E, I, H)),
            ModuleSpec(m + "experts.up_proj", "experts", (E, I, H)),
            ModuleSpec(m + "experts.down_proj", "experts", (E, H, I)),
            ModuleSpec(m + "shared_expert.gate_proj", "linear", (S, H)),
            ModuleSpec(m + "shared_expert.up_proj", "linear", (S, H)),
            ModuleSpec(m + "shared_expert.down_proj", "linear", (H, S)),
            ModuleSpec(m + "shared_expert_gate", "linear", (1, H)),
        ]
    mods += [ModuleSpec("norm", "vector", (H,))]
    if not cfg.tie_word_embeddings:
        mods += [ModuleSpec("lm_head", "linear", (V, H))]
    return mods


def tensor_shapes(cfg: ModelConfig, mod: ModuleSpec, quantized: bool = True) -> dict[str, tuple[int, ...]]:
    """Internal tensor names of one module and their stored shapes."""
    q = cfg.quant_for(mod.name) if quantized and mod.kind in ("linear", "experts", "embedding") else None
    if q is None:
        return {tensor_name(mod): mod.shape}
    *lead, inner = mod.shape
    if inner % q.group_size or (inner * q.bits) % 32:
        raise FlashMoeError(f"{mod.name}: input width {inner} does not fit {q.bits}-bit groups of {q.group_size}")
    return {
        mod.name + ".weight": (*lead, inner * q.bits // 32),
        mod.name + ".scales": (*lead, inner // q.group_size),
        mod.name + ".biases": (*lead, inner // q.group_size),
    }


def tensor_name(mod: ModuleSpec) -> str:
    """The internal name of a single-tensor module (parameters carry no `.weight`)."""
    if mod.name.endswith(("dt_bias", "A_log")):
        return mod.name
    return mod.name + ".weight"


def internal_name(published: str) -> tuple[str | None, str]:
    """(internal name or None to skip, layout 'hf' | 'mlx') of a published tensor name."""
    if published.startswith(HF_PREFIX):
        name, layout = published[len(HF_PREFIX):], "hf"
    elif published.startswith(MLX_PREFIX):
        name, layout = published[len(MLX_PREFIX):], "mlx"
        name = name.replace(".mlp.switch_mlp.", ".mlp.experts.")
    elif published in ("lm_head.weight",):
        return published, "hf"
    elif published.startswith("language_model.lm_head."):
        return published[len("language_model."):], "mlx"
    else:
        return None, "?"  # mtp.*, model.visual.*, vision_tower.*
    if name.startswith("mtp.") or ".mtp." in name:
        return None, layout
    return name, layout


def iter_published_tensors(model_dir: str | Path) -> Iterator[tuple[str, str, SafetensorsFile, str]]:
    """(internal name, layout, file, published name) for every tensor a text model uses."""
    for path in iter_checkpoint_files(model_dir):
        f = SafetensorsFile(path)
        for published in f.tensors:
            name, layout = internal_name(published)
            if name is not None:
                yield name, layout, f, published


def load_tensors(model_dir: str | Path, cfg: ModelConfig, *, experts: bool = True):
    """Read a published checkpoint into {internal name: mx.array}.

    Hugging Face tensors are converted to the internal conventions (fused
    gate_up split, conv squeezed, norms shifted by one); MLX tensors only
    renamed. With `experts=False` the expert stacks are skipped (they are
    streamed from disk instead). Shapes are checked against `cfg`.
    """
    import mlx.core as mx

    out: dict[str, mx.array] = {}
    for name, layout, f, published in iter_published_tensors(model_dir):
        is_expert = ".mlp.experts." in name
        if is_expert and not experts:
            continue
        a = f.read(published)
        if layout == "hf" and name.endswith(".mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            mid = a.shape[-2] // 2
            out[base + "gate_proj.weight"] = a[..., :mid, :]
            out[base + "up_proj.weight"] = a[..., mid:, :]
            continue
        if layout == "hf" and name.endswith(".mlp.experts.down_proj"):
            name = name + ".weight"
        if name.endswith("conv1d.weight") and a.ndim == 3:
            a = a.reshape(a.shape[0], -1)  # [C,1,K] or [C,K,1] -> [C,K]
        if layout == "hf" and (name == "norm.weight" or name.endswith(_CENTRED_NORMS)):
            a = (a.astype(mx.float32) + 1.0).astype(a.dtype)
        out[name] = a
    check_tensors(out, cfg, experts=experts, source=str(model_dir))
    return out


def check_tensors(tensors: dict, cfg: ModelConfig, *, experts: bool, source: str) -> None:
    """Every tensor `cfg` needs is present with its expected shape."""
    for mod in model_modules(cfg):
        if mod.kind == "experts" and not experts:
            continue
        for name, shape in tensor_shapes(cfg, mod).items():
            if name not in tensors:
                raise FlashMoeError(
                    f"{source}: tensor {name} is missing from the checkpoint; the download or "
                    "conversion is incomplete, or this is not a Qwen3.5 MoE text checkpoint."
                )
            got = tuple(tensors[name].shape)
            if got != shape:
                raise FlashMoeError(
                    f"{source}: tensor {name} has shape {list(got)} but config.json implies "
                    f"{list(shape)}; the weights do not belong to this config."
                )
