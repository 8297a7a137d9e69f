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
    from ..engine.linear import Linear
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
        layers = []
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
            layers.append(tuple(stacks))
        experts = ResidentExperts(layers)
    model = Qwen35Model(cfg, weights, experts, dtype=dtype, experts_per_token=experts_per_token)
    if settle_default():
        settle(model)
    return model


def settle_default() -> bool:
    """FLASHMOE_SETTLE (auto | 1 | 0): copy the loaded weights into device memory (`settle`).
    Auto: on for MLX's CUDA backend, where arrays the loader filled from the host stay in
    managed memory; off elsewhere (Apple's memory is one, the CPU has nothing to move)."""
    import os

    import mlx.core as mx

    v = os.environ.get("FLASHMOE_SETTLE", "auto").strip().lower()
    if v not in ("auto", "1", "0", "on", "off"):
        raise FlashMoeError(f"FLASHMOE_SETTLE={v!r}: use auto, 1 or 0.")
    if v == "auto":
        return mx.default_device() != mx.cpu and mx.cuda.is_available()
    return v in ("1", "on")


def settle(model, chunk_bytes: int = 1 << 30) -> int:
    """Replace every array the model holds (its layers' weights, the resident experts) by a copy
    a GPU operation wrote, in place, a chunk at a time -> bytes copied. On MLX's CUDA backend an
    array filled from the host lives in managed memory, which the driver moves to the GPU on
    first use in pages of its choosing; a copy written on the GPU is plain device memory.
    Arrays held twice (tied embeddings) stay one array; an array right inside a tuple is left
    where it is (the model keeps none there); a packed model's expert store is not touched."""
    import mlx.core as mx

    from ..experts.source import ResidentExperts

    todo: list = []   # (container, key or attribute, array), None once replaced

    def visit(obj, seen: set) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            items = list(obj.items())
        elif isinstance(obj, list):
            items = list(enumerate(obj))
        elif isinstance(obj, tuple):
            items = [(None, o) for o in obj]
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("llm_flashmoe"):
            items = list(vars(obj).items())
        else:
            return
        for key, value in items:
            if isinstance(value, mx.array):
                if key is not None:   # (an array right inside a tuple stays where it is)
                    todo.append((obj, key, value))
            else:
                visit(value, seen)

    store = getattr(model, "experts", None)
    # a packed model's expert store keeps its own device memory (slots whose addresses it hands
    # out): left alone; resident experts are weights like the rest
    visit(model, set() if isinstance(store, ResidentExperts) or store is None else {id(store)})
    done: dict[int, mx.array] = {}   # id of an original -> its copy
    keep = mx.array(True)
    copied = 0
    for start in range(len(todo)):
        if todo[start] is None:
            continue
        size, batch = 0, []   # a chunk: copies made, evaluated, put in place (the originals freed)
        for n in range(start, len(todo)):
            obj, key, a = todo[n]
            if id(a) not in done:
                if size >= chunk_bytes:
                    break
                done[id(a)] = mx.where(keep, a, a) if a.size else a
                size += a.nbytes
            batch.append(n)
        mx.eval([done[id(todo[n][2])] for n in batch])
        copied += size
        for n in batch:
            obj, key, a = todo[n]
            if isinstance(obj, (dict, list)):
                obj[key] = done[id(a)]
            else:
                setattr(obj, key, done[id(a)])
            todo[n] = None
    return copied
