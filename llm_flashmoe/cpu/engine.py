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


def host_views(arrays: list[mx.array]) -> list[np.ndarray]:
    """numpy views of MLX arrays' memory (bfloat16 seen as uint16 bits), float32 made
    contiguous. One evaluation for all of them: each evaluation of pending work is a
    hand-off to MLX's stream thread."""
    arrays = [a.view(mx.uint16) if a.dtype == mx.bfloat16 else a for a in arrays]
    mx.eval(*arrays)
    out = []
    for a in arrays:
        v = np.asarray(a)
        out.append(v if v.flags.c_contiguous else np.ascontiguousarray(v))
    return out


def host_view(a: mx.array) -> np.ndarray:
    return host_views([a])[0]


def kernel_ready(lin: Linear) -> bool:
    return lin.quantized and cops.supported(lin.bits, lin.group_size)


def prepare(linears: list[Linear], arrays: list[mx.array] = ()) -> list[np.ndarray]:
    """Host views of the quantized Linears (cached on each: resident weights are
    converted once per model) and float32 host views of `arrays`, in one evaluation."""
    todo = [l for l in linears if not _cached(l)]
    todo = list({id(l): l for l in todo}.values())
    f32 = [a.astype(mx.float32) if a.dtype != mx.float32 else a for a in arrays]
    views = host_views([t for l in todo for t in (l.weight, l.scales, l.biases)] + f32)
    for i, l in enumerate(todo):
        l.__dict__["_cpu_views"] = (l.weight, tuple(views[3 * i : 3 * i + 3]))
    return views[3 * len(todo):]


def _cached(lin: Linear) -> bool:
    cached = lin.__dict__.get("_cpu_views")
    return cached is not None and cached[0] is lin.weight


def linear_views(lin: Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, biases) host views of a quantized Linear."""
    if not _cached(lin):
        prepare([lin])
    return lin.__dict__["_cpu_views"][1]


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
        (xn,) = prepare([linears[i] for i in fast], [x])
        res = cops.qmm(lib, [linear_qmat(linears[i]) for i in fast], xn.reshape(-1, x.shape[-1]))
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
    xn, r = prepare([gate, up, shared_gate, shared_up], [x, rows])
    r = r.reshape(-1).astype(np.int64)
    K = len(r)
    I, Is = gate.weight.shape[-2], shared_gate.out_features
    g = expert_qmats(gate, r) + [linear_qmat(shared_gate)]
    u = expert_qmats(up, r) + [linear_qmat(shared_up)]
    # Every expert (the shared one last) sees the single token 0.
    h = cops.moe_gate_up(lib, g, u, np.arange(K + 2, dtype=np.int32), np.zeros(K + 1, np.int32),
                         xn.reshape(1, -1))
    return mx.array(h[:K, :I]), mx.array(h[K, :Is])


def moe_down(h: mx.array, rows: mx.array, weights: mx.array, down: Linear, hs: mx.array,
             shared_down: Linear, shared_gate_logit: mx.array, residual: mx.array) -> mx.array:
    """residual [H] + sum_k weights[k] * down_{rows[k]}(h[k]) + sigmoid(logit) * shared_down(hs) -> [H]."""
    if not (kernel_ready(down) and kernel_ready(shared_down)):
        from ..kernels import plain

        return plain.moe_down(h, rows, weights, down, hs, shared_down, shared_gate_logit, residual)
    lib = load()
    hn, hsn, r, wn, logit, res = prepare([down, shared_down], [h, hs, rows, weights, shared_gate_logit, residual])
    r = r.reshape(-1).astype(np.int64)
    K = len(r)
    hn, hsn = hn.reshape(K, -1), hsn.reshape(-1)
    hh = np.zeros((K + 1, max(hn.shape[1], hsn.shape[0])), np.float32)
    hh[:K, : hn.shape[1]] = hn
    hh[K, : hsn.shape[0]] = hsn
    coef = np.empty(K + 1, np.float32)
    coef[:K] = wn.reshape(-1)
    coef[K] = 1.0 / (1.0 + np.exp(-float(logit.reshape(-1)[0])))
    y = np.array(res.reshape(1, -1), copy=True)
    d = expert_qmats(down, r) + [linear_qmat(shared_down)]
    cops.moe_down(lib, d, np.arange(K + 2, dtype=np.int32), np.zeros(K + 1, np.int32), coef, hh, y)
    out = mx.array(y.reshape(-1))
    return out.astype(residual.dtype) if residual.dtype != mx.float32 else out


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
    # The new state lives in MLX memory the kernel writes through a view: no copy after.
    new_state = mx.zeros((1, Hv, Dv, Dk), mx.float32)
    given = [t for t in (conv_state, state) if t is not None]
    views = prepare([], [qkv, z, b, a, conv_w, A, dt_bias, norm_w, new_state] + given)
    ins, consts, state_v = views[:4], views[4:8], views[8]
    cin = views[9] if conv_state is not None else None
    sin = views[-1] if state is not None else None
    if not (state_v.flags.writeable and state_v.flags.c_contiguous):
        raise RuntimeError("MLX memory is not host-writable here")
    conv_v = np.empty((1, Kc - 1, C), np.float32)
    out = np.empty(Hv * Dv, np.float32)
    ptr = lambda arr: None if arr is None else arr.ctypes.data  # noqa: E731
    rc = lib.fm_gdn_step(*[ptr(t) for t in ins], ptr(cin), *[ptr(t) for t in consts], ptr(sin),
                         Hk, Hv, Dk, Dv, Kc, eps, conv_v.ctypes.data, state_v.ctypes.data, out.ctypes.data)
    if rc != 0:
        raise ValueError(f"fm_gdn_step rejected its arguments (code {rc})")
    o, new_conv = mx.array(out), mx.array(conv_v)
    if qkv.dtype != mx.float32:
        o, new_conv = o.astype(qkv.dtype), new_conv.astype(qkv.dtype)
    return o, new_conv, new_state


# Small ops in numpy on the calling thread: as MLX ops each would cost an
# evaluation, a hand-off to MLX's stream thread that takes longer than the
# arithmetic (25 us on an idle machine, milliseconds on a busy one).

def moe_route(logits: mx.array, k: int, norm_topk: bool) -> tuple[mx.array, mx.array]:
    """Router logits [E] -> top-k expert ids int32 [k] and their softmax weights float32 [k]."""
    (lg,) = prepare([], [logits])
    lg = lg.reshape(-1)
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
    xn, yn, wn = prepare([], [x, y, w])
    h = xn.reshape(-1, n_cols) + yn.reshape(-1, n_cols)
    ms = np.einsum("ij,ij->i", h, h, dtype=np.float32) / np.float32(n_cols)
    n = h * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))[:, None] * wn.reshape(-1)
    return mx.array(h.reshape(x.shape)), mx.array(n.astype(np.float32).reshape(x.shape))


def table() -> dict:
    """{op name: implementation} for kernels.ops(); the rest use the plain-MLX twins
    (all of them when the library cannot be built)."""
    if load() is None:
        return {}
    return {"qmv": qmv, "moe_gate_up": moe_gate_up, "moe_down": moe_down, "gdn_step": gdn_step,
            "moe_route": moe_route, "add_rms_norm": add_rms_norm}
