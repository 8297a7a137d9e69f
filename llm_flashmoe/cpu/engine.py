"""The "cpu" backend of `kernels.ops()`: MLX arrays in and out, C kernels inside.

On the CPU, MLX arrays live in host memory and `np.asarray` of an evaluated
array is a view, so weights reach the kernels without copies: resident
weights through views cached on their `Linear`, streamed experts through
views of the expert store's buffers. Each op evaluates its inputs first (a
sync point; on the CPU MLX runs eagerly enough that this costs little) and
returns small new arrays. Ops not listed in `table()` fall back to their
plain-MLX twins in kernels/plain.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..engine.linear import Linear
from . import ops as cops
from .build import load


def host_view(a: mx.array) -> np.ndarray:
    """A numpy view of an MLX array's memory (bfloat16 seen as uint16 bits)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    mx.eval(a)
    v = np.asarray(a)
    return v if v.flags.c_contiguous else np.ascontiguousarray(v)


def kernel_ready(lin: Linear) -> bool:
    return lin.quantized and cops.supported(lin.bits, lin.group_size)


def linear_views(lin: Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, biases) host views of a quantized Linear, cached on it:
    resident weights are converted to views once per model."""
    cached = lin.__dict__.get("_cpu_views")
    if cached is not None and cached[0] is lin.weight:
        return cached[1]
    views = (host_view(lin.weight), host_view(lin.scales), host_view(lin.biases))
    lin.__dict__["_cpu_views"] = (lin.weight, views)
    return views


def linear_qmat(lin: Linear) -> cops.QMat:
    w, s, b = linear_views(lin)
    return cops.qmat(w, s, b, lin.bits, lin.group_size)


def expert_qmats(stack: Linear, rows: np.ndarray) -> list[cops.QMat]:
    """One QMat per selected row (expert) of a stacked [E, out, in] quantized Linear."""
    w, s, b = linear_views(stack)
    out_f = stack.weight.shape[-2]
    w_row, s_row = w[0].nbytes, s[0].nbytes
    return [cops.qmat(w, s, b, stack.bits, stack.group_size, rows=out_f,
                      w_offset=int(r) * w_row, s_offset=int(r) * s_row) for r in rows]


def _f32(x: mx.array, cols: int | None = None) -> np.ndarray:
    """Host float32 view; reshaped (in numpy: an MLX reshape would be one more graph node
    to evaluate) to [-1, cols] if cols is given."""
    v = host_view(x.astype(mx.float32) if x.dtype != mx.float32 else x)
    return v.reshape(-1, cols) if cols else v


def qmv(x: mx.array, linears: list[Linear]) -> list[mx.array]:
    """x [M, in] -> [l(x) for l in linears], each [M, out_l]."""
    lib = load()
    fast = [i for i, l in enumerate(linears) if kernel_ready(l)]
    out: list = [None] * len(linears)
    if fast:
        xn = _f32(x, x.shape[-1])
        res = cops.qmm(lib, [linear_qmat(linears[i]) for i in fast], xn)
        for i, r in zip(fast, res):
            y = mx.array(r.reshape(*x.shape[:-1], r.shape[-1]))
            out[i] = y.astype(x.dtype) if x.dtype != mx.float32 else y
    for i, l in enumerate(linears):
        if out[i] is None:
            out[i] = l(x)
    return out


def moe_gate_up(x: mx.array, rows: mx.array, gate: Linear, up: Linear,
                shared_gate: Linear, shared_up: Linear) -> tuple[mx.array, mx.array]:
    """x [H], rows int32 [K] of the expert stacks -> h [K, I] = silu(gate x) * up x, and the shared hs [Is]."""
    if not all(kernel_ready(l) for l in (gate, up, shared_gate, shared_up)):
        from ..kernels import plain

        return plain.moe_gate_up(x, rows, gate, up, shared_gate, shared_up)
    lib = load()
    r = np.asarray(rows).reshape(-1)
    K = len(r)
    I, Is = gate.weight.shape[-2], shared_gate.out_features
    g = expert_qmats(gate, r) + [linear_qmat(shared_gate)]
    u = expert_qmats(up, r) + [linear_qmat(shared_up)]
    # Every expert (the shared one last) sees the single token 0.
    h = cops.moe_gate_up(lib, g, u, np.arange(K + 2, dtype=np.int32), np.zeros(K + 1, np.int32),
                         _f32(x, x.size))
    return mx.array(h[:K, :I]), mx.array(h[K, :Is])


def moe_down(h: mx.array, rows: mx.array, weights: mx.array, down: Linear, hs: mx.array,
             shared_down: Linear, shared_gate_logit: mx.array, residual: mx.array) -> mx.array:
    """residual [H] + sum_k weights[k] * down_{rows[k]}(h[k]) + sigmoid(logit) * shared_down(hs) -> [H]."""
    if not (kernel_ready(down) and kernel_ready(shared_down)):
        from ..kernels import plain

        return plain.moe_down(h, rows, weights, down, hs, shared_down, shared_gate_logit, residual)
    lib = load()
    r = np.asarray(rows).reshape(-1)
    K = len(r)
    hn, hsn = _f32(h, h.shape[-1]), _f32(hs).reshape(-1)
    width = max(hn.shape[1], hsn.shape[0])
    hh = np.zeros((K + 1, width), np.float32)
    hh[:K, : hn.shape[1]] = hn
    hh[K, : hsn.shape[0]] = hsn
    logit = float(np.asarray(shared_gate_logit.astype(mx.float32)).reshape(-1)[0])
    coef = np.empty(K + 1, np.float32)
    coef[:K] = _f32(weights).reshape(-1)
    coef[K] = 1.0 / (1.0 + np.exp(-logit))
    y = np.array(_f32(residual, residual.size), copy=True)
    d = expert_qmats(down, r) + [linear_qmat(shared_down)]
    cops.moe_down(lib, d, np.arange(K + 2, dtype=np.int32), np.zeros(K + 1, np.int32), coef, hh, y)
    out = mx.array(y.reshape(-1))
    return out.astype(residual.dtype) if residual.dtype != mx.float32 else out


def new_host_array(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
    """A new MLX array and a writable host view of its memory, for a kernel to fill."""
    a = mx.zeros(shape, mx.float32)
    mx.eval(a)
    v = np.asarray(a)
    if not (v.flags.writeable and v.flags.c_contiguous):
        raise RuntimeError("MLX memory is not host-writable here")
    return a, v


def gdn_step(qkv, z, b, a, conv_state, conv_w, A, dt_bias, norm_w, state, n_key_heads: int,
             key_dim: int, eps: float):
    """One GatedDeltaNet token (see kernels/plain.py for the contract) -> out [Hv*Dv],
    new conv_state [1, Kc-1, C], new state [1, Hv, Dv, Dk] float32."""
    lib = load()
    Hk, Dk = n_key_heads, key_dim
    Hv = b.size
    Dv = z.size // Hv
    C = qkv.size
    Kc = conv_w.shape[1]
    new_conv, conv_v = new_host_array((1, Kc - 1, C))
    new_state, state_v = new_host_array((1, Hv, Dv, Dk))
    out = np.empty(Hv * Dv, np.float32)
    ins = [_f32(t).reshape(-1) for t in (qkv, z, b, a)]
    cin = _f32(conv_state).reshape(-1) if conv_state is not None else None
    sin = _f32(state).reshape(-1) if state is not None else None
    consts = [_f32(t).reshape(-1) for t in (conv_w, A, dt_bias, norm_w)]
    ptr = lambda arr: None if arr is None else arr.ctypes.data  # noqa: E731
    rc = lib.fm_gdn_step(*[ptr(t) for t in ins], ptr(cin), *[ptr(t) for t in consts], ptr(sin),
                         Hk, Hv, Dk, Dv, Kc, eps, conv_v.ctypes.data, state_v.ctypes.data, out.ctypes.data)
    if rc != 0:
        raise ValueError(f"fm_gdn_step rejected its arguments (code {rc})")
    o = mx.array(out)
    if qkv.dtype != mx.float32:
        o, new_conv = o.astype(qkv.dtype), new_conv.astype(qkv.dtype)
    return o, new_conv, new_state


# Small ops in numpy on the calling thread: as MLX ops each would cost an
# evaluation, a hand-off to MLX's stream thread that takes longer than the
# arithmetic (25 us on an idle machine, milliseconds on a busy one).

def moe_route(logits: mx.array, k: int, norm_topk: bool) -> tuple[mx.array, mx.array]:
    """Router logits [E] -> top-k expert ids int32 [k] and their softmax weights float32 [k]."""
    lg = _f32(logits).reshape(-1)
    p = np.exp(lg - lg.max())
    p /= p.sum()
    ids = np.argpartition(-p, k - 1)[:k].astype(np.int32)
    w = p[ids]
    if norm_topk:
        w = w / w.sum()
    return mx.array(ids), mx.array(w.astype(np.float32))


def add_rms_norm(x: mx.array, y: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """h = x + y; n = rmsnorm(h) * w  (rows of the last axis)."""
    if x.dtype != mx.float32 or y.dtype != mx.float32 or x.shape != y.shape:
        from ..kernels import plain

        return plain.add_rms_norm(x, y, w, eps)
    n_cols = x.shape[-1]
    h = _f32(x, n_cols) + _f32(y, n_cols)
    ms = np.einsum("ij,ij->i", h, h, dtype=np.float32) / np.float32(n_cols)
    n = h * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))[:, None] * _f32(w).reshape(-1)
    return mx.array(h.reshape(x.shape)), mx.array(n.astype(np.float32).reshape(x.shape))


def table() -> dict:
    """{op name: implementation} for kernels.ops(); the rest use the plain-MLX twins
    (all of them when the library cannot be built)."""
    if load() is None:
        return {}
    return {"qmv": qmv, "moe_gate_up": moe_gate_up, "moe_down": moe_down, "gdn_step": gdn_step,
            "moe_route": moe_route, "add_rms_norm": add_rms_norm}
