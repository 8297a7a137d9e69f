"""Synthetic Qwen3.5 MoE checkpoints: real layouts and shapes, random weights.

    python -m llm_flashmoe.synth DEST --preset tiny --layout hf
    python -m llm_flashmoe.synth DEST --preset 397b --layers 4 --layout mlx

Writes a real `config.json` (every field of SPEC section 2), the real
Qwen3.5 tokenizer files, and the weights under their published names, one
safetensors shard per layer, generated and written piece by piece so that
memory stays near one expert (or one block of embedding rows) even for
tens of GB. Deterministic for a given seed: every tensor piece draws from
its own generator seeded by (seed, tensor name, piece), so the Hugging Face
and MLX layouts of one seed hold the same weights, the MLX one quantized
exactly as a conversion with group 64 would.

Exception: `--fast-experts` (default for the 397b preset in MLX layout)
draws the experts' 4-bit codes, scales and biases directly instead of
quantizing normal weights: statistically similar, about 50x faster to write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
import zlib
from pathlib import Path

import numpy as np

from .config import ModelConfig, QuantSpec, parse_config
from .checkpoint import ModuleSpec, model_modules

PRESETS = {
    # For tests: small widths, the real head dims, ratios and vocabulary.
    "tiny": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=256, linear_num_key_heads=4, linear_num_value_heads=16, linear_key_head_dim=128,
                 linear_value_head_dim=128, num_experts=64, num_experts_per_tok=4,
                 moe_intermediate_size=128, shared_expert_intermediate_size=128),
    # For tests of O_DIRECT reads: every expert part a multiple of 4 KiB.
    "small": dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=256, linear_num_key_heads=4, linear_num_value_heads=16, linear_key_head_dim=128,
                  linear_value_head_dim=128, num_experts=16, num_experts_per_tok=4,
                  moe_intermediate_size=512, shared_expert_intermediate_size=512),
    # The real 397B-A17B per-layer shapes; choose the layer count with --layers.
    "397b": dict(hidden_size=4096, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=2,
                 head_dim=256, linear_num_key_heads=16, linear_num_value_heads=64, linear_key_head_dim=128,
                 linear_value_head_dim=128, num_experts=512, num_experts_per_tok=10,
                 moe_intermediate_size=1024, shared_expert_intermediate_size=1024),
}
VOCAB_SIZE = 248320
ROWS_PER_PIECE_ELEMS = 1 << 22  # rows of a 2-D tensor drawn per piece: ~4M values


def make_config(preset: str, layers: int | None = None, quant_bits: int | None = None) -> dict:
    """A config.json dict in the published Qwen3.5 MoE form."""
    p = dict(PRESETS[preset])
    if layers is not None:
        p["num_hidden_layers"] = layers
    n = p["num_hidden_layers"]
    text = {
        "model_type": "qwen3_5_moe_text",
        **p,
        "vocab_size": VOCAB_SIZE,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)],
        "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "attn_output_gate": True,
        "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "router_aux_loss_coef": 0.001,
        "mtp_num_hidden_layers": 1,
        "eos_token_id": 248044,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    cfg = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
    }
    if quant_bits is not None:
        q = {"group_size": 64, "bits": quant_bits, "mode": "affine"}
        for i in range(n):  # as published: router and shared-expert gate at 8 bits
            for m in ("mlp.gate", "mlp.shared_expert_gate"):
                q[f"language_model.model.layers.{i}.{m}"] = {"group_size": 64, "bits": 8}
        cfg["quantization"] = q
        cfg["quantization_config"] = q
    return cfg


class WeightMaker:
    """Deterministic random values for each (tensor, piece)."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def rng(self, name: str, piece: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode()), piece])

    def dense(self, mod: ModuleSpec, piece: int, rows: int) -> np.ndarray:
        """float32 values of `rows` rows of module `mod` (zero-centred norms for vectors)."""
        rng = self.rng(mod.name, piece)
        cols = mod.shape[-1]
        leaf = mod.name.rsplit(".", 1)[-1]
        if mod.kind == "vector":
            if leaf == "A_log":
                return np.log(rng.uniform(1, 16, mod.shape)).astype(np.float32)
            if leaf == "dt_bias":
                return (1.0 + 0.1 * rng.standard_normal(mod.shape)).astype(np.float32)
            return (0.1 * rng.standard_normal(mod.shape)).astype(np.float32)  # zero-centred norm
        if mod.kind == "conv":
            return (0.5 * rng.standard_normal((rows, cols))).astype(np.float32)
        std = 1.0 if mod.kind == "embedding" else cols ** -0.5
        return (std * rng.standard_normal((rows, cols), dtype=np.float32)).astype(np.float32)


def _pieces(mod: ModuleSpec):
    """(piece index, expert or None, row slice) covering a module, in file order."""
    if mod.kind == "experts":
        for e in range(mod.shape[0]):
            yield e, e, slice(0, mod.shape[1])
        return
    rows = mod.shape[0] if len(mod.shape) > 1 else 1
    per = max(1, ROWS_PER_PIECE_ELEMS // mod.shape[-1])
    for i, start in enumerate(range(0, rows, per)):
        yield i, None, slice(start, min(rows, start + per))


def _bf16(a: np.ndarray):
    import mlx.core as mx

    return mx.array(a).astype(mx.bfloat16)


def _published_names(layout: str, name: str) -> str:
    prefix = "model.language_model." if layout == "hf" else "language_model.model."
    if name == "lm_head":
        return "lm_head" if layout == "hf" else "language_model.lm_head"
    if layout == "mlx":
        name = name.replace(".mlp.experts.", ".mlp.switch_mlp.")
    return prefix + name


def write_synthetic(dest: str | Path, *, preset: str = "tiny", layout: str = "hf", layers: int | None = None,
                    seed: int = 0, fast_experts: bool | None = None, progress: bool = True,
                    workers: int = 1) -> Path:
    """Write a synthetic checkpoint into `dest` (created; must be empty or absent). `workers` > 1
    writes the shards (one per layer, one each for the embedding and the head) in that many
    processes: the same bytes, as each tensor's values depend only on the seed and its name."""
    from .errors import FlashMoeError

    if preset not in PRESETS:
        raise FlashMoeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if layout == "packed":  # straight into the streamed layout, no published checkpoint in between
        from .experts.convert import write_packed_synthetic

        return write_packed_synthetic(dest, preset=preset, layers=layers, seed=seed, fast_experts=fast_experts,
                                      progress=progress)
    if layout not in ("hf", "mlx"):
        raise FlashMoeError(f"unknown layout {layout!r}; choose hf (bf16), mlx (4-bit) or packed.")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FlashMoeError(f"{dest} is not empty; choose a new directory.")
    dest.mkdir(parents=True, exist_ok=True)
    if fast_experts is None:
        fast_experts = preset != "tiny" and layout == "mlx"

    raw_cfg = make_config(preset, layers, 4 if layout == "mlx" else None)
    cfg = parse_config(raw_cfg)
    mods = model_modules(cfg)

    # One shard for the embedding, one per layer, one for the final norm and head.
    groups: list[list[ModuleSpec]] = [[m for m in mods if m.name == "embed_tokens"]]
    for i in range(cfg.num_hidden_layers):
        groups.append([m for m in mods if m.name.startswith(f"layers.{i}.")])
    groups.append([m for m in mods if m.name in ("norm", "lm_head")])

    total = len(groups)
    weight_map = {}
    jobs = []
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{total:05d}.safetensors"
        for mod in group:
            for name, *_rest in _declare(cfg, mod, layout):
                weight_map[name] = fname
        jobs.append((raw_cfg, seed, [m.name for m in group], layout, fast_experts, str(dest / fname)))
    parallel = workers > 1 and len(jobs) > 1
    with (multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) if parallel
          else contextlib.nullcontext()) as pool:
        for done, _ in enumerate(pool.imap_unordered(_write_shard, jobs) if parallel else map(_write_shard, jobs), 1):
            if progress:
                print(f"\rsynth: wrote {done}/{total} shards", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)

    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (dest / "config.json").write_text(json.dumps(raw_cfg, indent=2))
    (dest / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [248046, 248044]},
        indent=2))
    _write_tokenizer(dest)
    return dest


def _write_shard(job) -> str:
    """Write one shard: (raw config, seed, its modules' names, layout, fast_experts, path)."""
    import mlx.core as mx

    from .safetensors_io import SafetensorsWriter

    raw_cfg, seed, names, layout, fast_experts, path = job
    cfg = parse_config(raw_cfg)
    maker = WeightMaker(cfg, seed)
    names = set(names)
    group = [m for m in model_modules(cfg) if m.name in names]
    decl = [d for mod in group for d in _declare(cfg, mod, layout)]
    w = SafetensorsWriter(Path(path), [(n, d, s) for n, d, s, _ in decl],
                          metadata={"format": "mlx" if layout == "mlx" else "pt"})
    for mod in group:
        for pub, chunk in _generate(cfg, mod, layout, maker, fast_experts, mx):
            w.write(pub, chunk)
    w.close()
    return path


def _write_tokenizer(dest: Path) -> None:
    from .chat.vocab import write_tokenizer_files

    write_tokenizer_files(dest)


def _quant(cfg: ModelConfig, mod: ModuleSpec) -> QuantSpec | None:
    if mod.kind not in ("linear", "experts", "embedding"):
        return None
    return cfg.quant_for(mod.name)


def _declare(cfg: ModelConfig, mod: ModuleSpec, layout: str):
    """[(published name, dtype, shape, role)] of one module's tensors, in write order."""
    pub = _published_names(layout, mod.name)
    if mod.kind == "vector":
        return [(pub + ".weight" if mod.name.endswith("norm") else pub, "BF16" if not mod.name.endswith("A_log") else "F32", mod.shape, "v")]
    if mod.kind == "conv":
        C, K = mod.shape
        return [(pub + ".weight", "BF16", (C, 1, K) if layout == "hf" else (C, K, 1), "v")]
    q = _quant(cfg, mod)
    if layout == "hf" and mod.kind == "experts":
        if mod.name.endswith("gate_proj"):
            E, I, H = mod.shape
            return [(pub.replace("gate_proj", "gate_up_proj"), "BF16", (E, 2 * I, H), "v")]
        if mod.name.endswith("up_proj"):
            return []  # written together with gate_proj
        return [(pub, "BF16", mod.shape, "v")]
    if q is None:
        return [(pub + ".weight", "BF16", mod.shape, "v")]
    *lead, inner = mod.shape
    return [
        (pub + ".weight", "U32", (*lead, inner * q.bits // 32), "w"),
        (pub + ".scales", "BF16", (*lead, inner // q.group_size), "s"),
        (pub + ".biases", "BF16", (*lead, inner // q.group_size), "b"),
    ]


def _generate(cfg: ModelConfig, mod: ModuleSpec, layout: str, maker: WeightMaker, fast_experts: bool, mx):
    """Yield (published tensor name, piece) in declaration order."""
    decl = _declare(cfg, mod, layout)
    if not decl:
        return
    if mod.kind == "vector":
        v = maker.dense(mod, 0, 1)
        leaf = mod.name.rsplit(".", 1)[-1]
        if layout == "mlx" and leaf in ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm", "norm") \
                and not mod.name.endswith("linear_attn.norm"):
            # MLX files store 1 + w, computed as a conversion of the bf16 weights does:
            # rounded to bf16 first, so the two layouts give bit-identical converted norms.
            v = np.array(_bf16(v).astype(mx.float32)) + 1.0
        if mod.name.endswith("linear_attn.norm"):
            v = v + 1.0  # the gated norm weight is used as is: centre it on one
        yield decl[0][0], (v if leaf == "A_log" else _bf16(v))
        return
    if mod.kind == "conv":
        yield decl[0][0], _bf16(maker.dense(mod, 0, mod.shape[0]))
        return
    q = _quant(cfg, mod)
    if layout == "hf" and mod.kind == "experts":
        name = decl[0][0]
        if mod.name.endswith("gate_proj"):  # gate_up_proj: per expert, gate rows then up rows
            up = ModuleSpec(mod.name.replace("gate_proj", "up_proj"), mod.kind, mod.shape)
            for e in range(mod.shape[0]):
                g = maker.dense(mod, e, mod.shape[1])
                u = maker.dense(up, e, mod.shape[1])
                yield name, _bf16(np.concatenate([g, u]))
        else:
            for e in range(mod.shape[0]):
                yield name, _bf16(maker.dense(mod, e, mod.shape[1]))
        return
    if q is None:
        for piece, _e, rows in _pieces(mod):
            yield decl[0][0], _bf16(maker.dense(mod, piece, rows.stop - rows.start))
        return
    # Quantized (MLX layout): the codes piece by piece; scales and biases (an
    # eighth of the codes' size at 4 bits) are kept to follow them.
    scales, biases = [], []
    for piece, _e, rows in _pieces(mod):
        if mod.kind == "experts" and fast_experts:
            w, s, b = _fast_codes(maker, mod, piece, q)
        else:
            dense = _bf16(maker.dense(mod, piece, rows.stop - rows.start))
            w, s, b = mx.quantize(dense, group_size=q.group_size, bits=q.bits)
        yield decl[0][0], w
        scales.append(s)
        biases.append(b)
    for s in scales:
        yield decl[1][0], s
    for b in biases:
        yield decl[2][0], b


def _fast_codes(maker: WeightMaker, mod: ModuleSpec, piece: int, q: QuantSpec):
    """Random codes, scales and biases for one expert: values ~ U(-a, a), a = 1.7/sqrt(in)."""
    import mlx.core as mx

    rng = maker.rng(mod.name + ".codes", piece)
    rows, inner = mod.shape[1], mod.shape[2]
    words = rng.integers(0, 2**32, size=(rows, inner * q.bits // 32), dtype=np.uint32)
    levels = (1 << q.bits) - 1
    a = 1.7 * inner ** -0.5
    scales = np.full((rows, inner // q.group_size), 2 * a / levels, np.float32)
    biases = np.full((rows, inner // q.group_size), -a, np.float32)
    return mx.array(words), _bf16(scales), _bf16(biases)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llm_flashmoe.synth", description=__doc__.split("\n")[0])
    ap.add_argument("dest", help="directory to create")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layout", choices=["hf", "mlx", "packed"], default="hf",
                    help="hf: Hugging Face bf16; mlx: MLX 4-bit as published; packed: converted (streamed experts)")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast-experts", action=argparse.BooleanOptionalAction, default=None,
                    help="draw 4-bit expert codes directly (default: on for 397b in MLX layout)")
    args = ap.parse_args(argv)
    from .errors import FlashMoeError

    try:
        out = write_synthetic(args.dest, preset=args.preset, layout=args.layout, layers=args.layers,
                              seed=args.seed, fast_experts=args.fast_experts)
    except FlashMoeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
