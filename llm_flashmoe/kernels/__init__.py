"""Fused decode kernels and the one place that picks them per backend.

    ops = kernels.ops()        # None: use the plain-MLX math in engine/qwen35.py
    qkv, z = ops.qmv(x, [lin_qkv, lin_z])

`ops()` resolves FLASHMOE_KERNELS (auto | off | twin | metal | cuda | cpu)
and the default device once, and returns an `Ops` whose attributes are the
chosen backend's functions (no lookups per call). Backends are tables of op
name -> function in `_TABLES`; an op a backend lacks falls back to its
plain-MLX twin (plain.py), so a partial backend (e.g. CPU native kernels)
slots in by registering only what it implements; a composed op a backend
lacks (moe_route_gate_up, norm_qmv, qk_norm_rope_kv) is made of the backend's own parts instead. 'twin' runs the twins
themselves through the fused code path (for CPU tests of the wiring).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from . import plain

OP_NAMES = tuple(plain.OPS)


def _gpu_table(backend: str) -> dict[str, Callable]:
    from .gpu import GpuKernels

    return GpuKernels(backend).table()


def _cpu_table() -> dict[str, Callable]:
    from ..cpu.engine import table

    return table()


def _cpu_kernels_available() -> bool:
    from ..cpu.build import load

    return load() is not None  # prints the one-line notice when it cannot build


# backend name -> () -> {op name: implementation}
_TABLES: dict[str, Callable[[], dict[str, Callable]]] = {
    "twin": lambda: dict(plain.OPS),
    "cpu": _cpu_table,
    "metal": lambda: _gpu_table("metal"),
    "cuda": lambda: _gpu_table("cuda"),
}
_built: dict[str, dict[str, Callable]] = {}


def register_backend(name: str, table: Callable[[], dict[str, Callable]]) -> None:
    """Add (or replace) a backend: `table()` returns {op name: function} for the ops it implements."""
    _TABLES[name] = table
    _built.pop(name, None)


def active_backend() -> str:
    """'plain', or the name of a kernel backend, from FLASHMOE_KERNELS and the default device."""
    import mlx.core as mx

    want = os.environ.get("FLASHMOE_KERNELS", "auto").strip().lower()
    if want in ("off", "plain", "0", "none"):
        return "plain"
    if want not in ("", "auto"):
        return want
    if mx.default_device() == mx.cpu:
        return "cpu" if "cpu" in _TABLES and _cpu_kernels_available() else "plain"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "plain"


@dataclass(frozen=True)
class Ops:
    backend: str
    qmv: Callable
    norm_qmv: Callable
    moe_route: Callable
    moe_gate_up: Callable
    moe_route_gate_up: Callable
    moe_down: Callable
    decode_attention: Callable
    qk_norm_rope: Callable
    qk_norm_rope_kv: Callable
    gdn_step: Callable
    add_rms_norm: Callable
    rms_norm: Callable
    index: Callable   # a position or a length in the form the backend's launches read


def ops(backend: str | None = None) -> Ops | None:
    """The fused ops of `backend` (default: `active_backend()`), or None for the plain path."""
    name = backend or active_backend()
    if name == "plain":
        return None
    if name not in _TABLES:
        from ..errors import FlashMoeError

        raise FlashMoeError(f"unknown FLASHMOE_KERNELS backend {name!r}; use one of auto, off, {', '.join(_TABLES)}.")
    if name not in _built:
        _built[name] = _TABLES[name]()
    table = _built[name]
    chosen = {op: table.get(op, plain.OPS[op]) for op in OP_NAMES}
    if "norm_qmv" not in table:   # the backend's own norms, then its qmv
        chosen["norm_qmv"] = plain.compose_norm_qmv(chosen["qmv"], chosen["rms_norm"], chosen["add_rms_norm"])
    if "qk_norm_rope_kv" not in table:   # the backend's own qk_norm_rope, then slice updates
        chosen["qk_norm_rope_kv"] = plain.compose_qk_norm_rope_kv(chosen["qk_norm_rope"])
    if "moe_route_gate_up" not in table:   # the backend's own moe_route and moe_gate_up, in turn
        chosen["moe_route_gate_up"] = plain.route_gate_up(chosen["moe_route"], chosen["moe_gate_up"])
    return Ops(name, **chosen)
