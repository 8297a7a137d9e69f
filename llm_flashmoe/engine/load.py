"""Model directory -> a ready `Qwen35Model`.

A published checkpoint (Hugging Face or MLX layout) is loaded whole, experts
included, into memory. A directory converted by `llm flashmoe convert`
keeps only the resident weights in memory and streams experts from its
packed files (experts/store.py).
"""

from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..errors import FlashMoeError


def default_dtype():
    """float32 on the CPU (MLX's bf16 matmuls are 10-50x slower there), bf16 on GPUs."""
    import mlx.core as mx

    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def is_packed_dir(model_dir: str | Path) -> bool:
    """True for a directory written by `llm flashmoe convert` (experts streamed)."""
    from ..experts import format as expert_format

    return expert_format.is_packed_dir(model_dir)


def load_model(model_dir: str | Path, *, experts_per_token: int | None = None, dtype=None,
               gpu_cache: str | None = None):
    """`gpu_cache`: size of the GPU expert cache of a packed model on CUDA (experts/cache.py:
    auto, off, 50%, 40GB, or a slot count); default FLASHMOE_GPU_CACHE, else auto."""
    from ..checkpoint import load_tensors
    from ..engine.linear import Linear, room_behind, stack_with_room
    from ..experts.source import ResidentExperts
    from .qwen35 import Qwen35Model

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FlashMoeError(f"model directory {model_dir} does not exist.")
    dtype = dtype or default_dtype()
    cfg = load_config(model_dir)

    if is_packed_dir(model_dir):
        from ..experts.store import open_packed_model

        from ..experts.cache import wrap_store

        weights, experts = open_packed_model(model_dir, cfg, dtype=dtype)
        try:
            experts = wrap_store(experts, gpu_cache)
        except BaseException:
            experts.close()
            raise
    else:
        weights = load_tensors(model_dir, cfg, experts=True)
        layers, room = [], room_behind()
        for i in range(cfg.num_hidden_layers):
            stacks = []
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"layers.{i}.mlp.experts.{proj}"
                q = cfg.quant_for(name)
                if q is None:
                    stacks.append(Linear(weights.pop(name + ".weight").astype(dtype)))
                else:
                    stacks.append(Linear(weights.pop(name + ".weight"), weights.pop(name + ".scales").astype(dtype),
                                         weights.pop(name + ".biases").astype(dtype), q.bits, q.group_size))
            layers.append(tuple(map(stack_with_room, stacks)) if room else tuple(stacks))
        experts = ResidentExperts(layers)
    return Qwen35Model(cfg, weights, experts, dtype=dtype, experts_per_token=experts_per_token)
