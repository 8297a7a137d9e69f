"""Plain-MLX twins of the fused kernels: the reference each kernel is checked against.

Every function takes and returns exactly what its kernel does (one decode
token, batch 1) and says it in the same MLX ops as engine/qwen35.py, so a
twin runs on any device, the CPU included. Shapes: H hidden, K experts per
token, I/Is expert/shared width, Hq/Hkv/Dh attention, Hk/Hv/Dk/Dv linear
attention, C = 2*Hk*Dk + Hv*Dv conv channels.
"""

from __future__ import annotations

import mlx.core as mx

from ..engine.linear import Linear


def qmv(x: mx.array, linears: list[Linear]) -> list[mx.array]:
    """x [M, in] -> [l(x) for l in linears], each [M, out_l]."""
    return [lin(x) for lin in linears]


def compose_norm_qmv(qmv, rms_norm, add_rms_norm):
    """norm_qmv made of a backend's own `qmv`, `rms_norm` and `add_rms_norm`."""
    def norm_qmv(x: mx.array, xadd: mx.array | None, w: mx.array, eps: float, linears: list[Linear]):
        """h = x (+ xadd), n = rmsnorm(h) * w -> ([l(n) for l in linears], h, n)."""
        if xadd is None:
            h, n = x, rms_norm(x, w, eps)
        else:
            h, n = add_rms_norm(x, xadd, w, eps)
        return qmv(n, linears), h, n
    return norm_qmv


def stacks_at(addresses: mx.array, stacks: list[tuple[Linear, int]]) -> list[Linear]:
    """Per (stack, first part): a [K, ...] stack read from the K experts' part addresses
    (uint64 [K, 9]: gate, up, down x weight, scales, biases). The twin of the CUDA kernels'
    ADDRESSED mode, for host addresses only (the GPU expert cache's host transport, tests)."""
    import ctypes

    import numpy as np

    table = np.array(addresses).reshape(-1, 9)
    out = []
    for stack, first in stacks:
        parts = []
        for j, a in enumerate((stack.weight, stack.scales, stack.biases)):
            one = a[0]
            nbytes = one.nbytes
            raw = b"".join(ctypes.string_at(int(table[k, first + j]), nbytes) for k in range(len(table)))
            view = mx.array(np.frombuffer(raw, np.uint8).copy())
            parts.append(view.view(a.dtype).reshape(len(table), *one.shape))
        out.append(Linear(parts[0], parts[1], parts[2], stack.bits, stack.group_size))
    return out


def moe_route(logits: mx.array, k: int, norm_topk: bool) -> tuple[mx.array, mx.array]:
    """Router logits [E] -> top-k expert ids int32 [k] and their softmax weights float32 [k]."""
    probs = mx.softmax(logits.reshape(-1).astype(mx.float32), axis=-1)
    ids = mx.argpartition(-probs, kth=k - 1)[:k]
    w = probs[ids]
    if norm_topk:
        w = w / w.sum()
    return ids.astype(mx.int32), w


def moe_gate_up(x: mx.array, rows: mx.array, gate: Linear, up: Linear,
                shared_gate: Linear, shared_up: Linear) -> tuple[mx.array, mx.array]:
    """x [H], rows int32 [K] of the expert stacks -> h [K, I] = silu(gate x) * up x, and the shared hs [Is].
    rows uint64 [K, 9]: the addresses of the experts' parts instead (see `stacks_at`)."""
    if rows.dtype == mx.uint64:
        (gate, up), rows = stacks_at(rows, [(gate, 0), (up, 3)]), mx.arange(rows.shape[0], dtype=mx.int32)
    H, K = x.size, rows.size
    xe = x.reshape(1, 1, 1, H)
    idx = rows.reshape(1, K)
    g, u = gate.gather(xe, idx), up.gather(xe, idx)                 # [1, K, 1, I]
    h = (g * mx.sigmoid(g) * u).astype(x.dtype).reshape(K, -1)
    x1 = x.reshape(1, H)
    sg = shared_gate(x1)
    hs = (sg * mx.sigmoid(sg) * shared_up(x1)).reshape(-1)
    return h, hs


def route_gate_up(route, gate_up):
    """moe_route_gate_up made of a backend's own `route` (moe_route) and `gate_up` (moe_gate_up)."""
    def moe_route_gate_up(logits: mx.array, k: int, norm_topk: bool, lookup: mx.array | None, x: mx.array,
                          gate: Linear, up: Linear, shared_gate: Linear, shared_up: Linear, then=None):
        """moe_route, then moe_gate_up on the chosen experts' rows: ids, or lookup[ids] (int32 [E]
        rows of the stacks, or uint64 [E, 9] addresses) -> h [K, I], hs [Is], those rows, weights [K].
        `then` (the stacks moe_down reads next, which a fused launch may ask for ahead) is not used."""
        ids, weights = route(logits, k, norm_topk)
        rows = ids if lookup is None else lookup[ids]
        h, hs = gate_up(x, rows, gate, up, shared_gate, shared_up)
        return h, hs, rows, weights
    return moe_route_gate_up


moe_route_gate_up = route_gate_up(moe_route, moe_gate_up)


def moe_down(h: mx.array, rows: mx.array, weights: mx.array, down: Linear, hs: mx.array,
             shared_down: Linear, shared_gate_logit: mx.array, residual: mx.array) -> mx.array:
    """residual [H] + sum_k weights[k] * down_{rows[k]}(h[k]) + sigmoid(logit) * shared_down(hs) -> [H]
    in the residual's shape (any leading 1s). rows uint64 [K, 9]: the addresses of the experts'
    parts instead (see `stacks_at`)."""
    if rows.dtype == mx.uint64:
        (down,), rows = stacks_at(rows, [(down, 6)]), mx.arange(rows.shape[0], dtype=mx.int32)
    K, I = h.shape
    y = down.gather(h.reshape(1, K, 1, I), rows.reshape(1, K)).reshape(K, -1)   # [K, H]
    y = (y * weights[:, None].astype(y.dtype)).sum(axis=0)
    shared = mx.sigmoid(shared_gate_logit.reshape(-1)) * shared_down(hs.reshape(1, -1)).reshape(-1)
    return (residual.reshape(-1) + (y + shared).astype(residual.dtype)).reshape(residual.shape)


def index(v) -> mx.array:
    """A position or a length as the decode steps' launches take it (`state_in`, once a step): an
    int32 [1] array, of a Python int or of an array made on the device. (The CUDA kernels' is int32
    [4]: kernels/gpu.py's SMALL_BYTES.)"""
    return v.reshape(1).astype(mx.int32) if isinstance(v, mx.array) else mx.array([v], mx.int32)


def _scalar(i: mx.array) -> mx.array:
    """Element 0 of a position or length array (`index`'s, of any backend) as a scalar array."""
    return i.reshape(()) if i.size == 1 else i[0]


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, n, qg: mx.array, then=None) -> mx.array:
    """q [Hq, Dh] attends over the first n of keys/values [1, Hkv, capacity, Dh] (n: an int, or
    an int32 array computed on the device: then the rest of the capacity is masked out); the
    output is gated by sigmoid of the second half of each head of qg [..., Hq*2*Dh] -> [..., Hq*Dh]
    (qg's leading shape). `then` (the matrices the next launches read, which a fused launch may
    ask for ahead) is not used."""
    Hq, Dh = q.shape
    if isinstance(n, mx.array):
        mask = (mx.arange(keys.shape[2]) < _scalar(n)).reshape(1, 1, 1, -1)
        out = mx.fast.scaled_dot_product_attention(q.reshape(1, Hq, 1, Dh), keys, values, scale=Dh ** -0.5,
                                                   mask=mask)
    else:
        out = mx.fast.scaled_dot_product_attention(
            q.reshape(1, Hq, 1, Dh), keys[:, :, :n], values[:, :, :n], scale=Dh ** -0.5)
    gate = qg.reshape(Hq, 2 * Dh)[:, Dh:]
    return (out.reshape(Hq, Dh) * mx.sigmoid(gate)).reshape(*qg.shape[:-1], Hq * Dh)


def qk_norm_rope(qg: mx.array, k: mx.array, q_w: mx.array, k_w: mx.array, pos,
                 rope_dims: int, theta: float, eps: float, n_kv_heads: int) -> tuple[mx.array, mx.array]:
    """RMSNorm of each query head (first half of qg [Hq, 2*Dh]) and key head (k [Hkv*Dh]),
    then rope on their first rope_dims dims at position pos (an int, or an int32 array computed
    on the device) -> q [Hq, Dh], k [1, Hkv, 1, Dh] (a KV cache's layout)."""
    Dh = q_w.size
    if isinstance(pos, mx.array):
        pos = _scalar(pos)
    q = qg.reshape(1, -1, 1, 2 * Dh)[..., :Dh]                      # [1, Hq, 1, Dh]
    kk = k.reshape(1, n_kv_heads, 1, Dh)
    q = mx.fast.rope(mx.fast.rms_norm(q, q_w, eps), rope_dims, traditional=False, base=theta,
                     scale=1.0, offset=pos)
    kk = mx.fast.rope(mx.fast.rms_norm(kk, k_w, eps), rope_dims, traditional=False, base=theta,
                      scale=1.0, offset=pos)
    return q.reshape(-1, Dh), kk


def compose_qk_norm_rope_kv(qk_norm_rope):
    """qk_norm_rope_kv made of a backend's own `qk_norm_rope` and two slice updates."""
    def qk_norm_rope_kv(qg, k, v, keys, values, q_w, k_w, pos, rope_dims: int, theta: float, eps: float,
                        n_kv_heads: int):
        """qk_norm_rope, and this token's key (roped) and value v [Hkv*Dh] written at position pos
        (an int, or an int32 [1] array computed on the device) of the KV buffers keys, values
        [1, Hkv, capacity, Dh] -> (q, k, keys, values): new buffers here; the GPU kernel
        (FLASHMOE_KV_INPLACE=1) writes the given ones in place and hands them back."""
        q, kk = qk_norm_rope(qg, k, q_w, k_w, pos, rope_dims, theta, eps, n_kv_heads)
        at = pos[:1] if isinstance(pos, mx.array) else mx.array([pos], mx.int32)
        shape = (1, n_kv_heads, 1, q_w.size)
        keys = mx.slice_update(keys, kk.astype(keys.dtype).reshape(shape), at, axes=(2,))
        values = mx.slice_update(values, v.astype(values.dtype).reshape(shape), at, axes=(2,))
        return q, kk, keys, values
    return qk_norm_rope_kv


def gdn_step(qkv, z, b, a, conv_state, conv_w, A, dt_bias, norm_w, state, n_key_heads: int,
             key_dim: int, eps: float, then=None):
    """One GatedDeltaNet token: qkv [..., C], z [Hv*Dv], b and a [Hv], conv_state [1, Kc-1, C] (or
    None), conv_w [C, Kc], A = -exp(A_log) and dt_bias [Hv] float32, norm_w [Dv], state
    [1, Hv, Dv, Dk] float32 (or None) -> out [..., Hv*Dv] (qkv's leading shape), new conv_state,
    new state. `then` (the matrices the next launches read, which a fused launch may ask for ahead)
    is not used."""
    Hk, Dk = n_key_heads, key_dim
    Hv = b.size
    Dv = z.size // Hv
    C = qkv.size
    Kc = conv_w.shape[1]
    if conv_state is None:
        conv_state = mx.zeros((1, Kc - 1, C), qkv.dtype)
    conv_in = mx.concatenate([conv_state, qkv.reshape(1, 1, C)], axis=1)   # [1, Kc, C]
    conv = (conv_in[0] * conv_w.T).sum(axis=0)                               # [C]
    y = conv * mx.sigmoid(conv)
    q, k, v = mx.split(y, [Hk * Dk, 2 * Hk * Dk])

    def l2n(t):
        t32 = t.astype(mx.float32)
        return (t32 * mx.rsqrt((t32 * t32).sum(-1, keepdims=True) + 1e-6)).astype(t.dtype)

    q = l2n(q.reshape(1, 1, Hk, Dk)) * (Dk ** -0.5)
    k = l2n(k.reshape(1, 1, Hk, Dk))
    v = v.reshape(1, 1, Hv, Dv)
    g = A * mx.logaddexp(a.reshape(1, 1, Hv).astype(mx.float32) + dt_bias, 0.0)
    beta = mx.sigmoid(b.reshape(1, 1, Hv))
    if state is None:
        state = mx.zeros((1, Hv, Dv, Dk), mx.float32)
    o, state = mx.fast.gated_delta_update(q, k, v, mx.exp(g), beta, state)
    o = mx.fast.rms_norm(o, norm_w, eps)
    z32 = z.reshape(1, 1, Hv, Dv).astype(mx.float32)
    o = (o.astype(mx.float32) * z32 * mx.sigmoid(z32)).astype(qkv.dtype)
    return o.reshape(*qkv.shape[:-1], Hv * Dv), conv_in[:, 1:], state


def rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    """rmsnorm(x) * w (rows of the last axis)."""
    return mx.fast.rms_norm(x, w, eps)


def add_rms_norm(x: mx.array, y: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """h = x + y; n = rmsnorm(h) * w  (rows of the last axis)."""
    h = x + y
    return h, mx.fast.rms_norm(h, w, eps)


norm_qmv = compose_norm_qmv(qmv, rms_norm, add_rms_norm)
qk_norm_rope_kv = compose_qk_norm_rope_kv(qk_norm_rope)

OPS = {name: globals()[name] for name in (
    "qmv", "norm_qmv", "moe_route", "moe_gate_up", "moe_route_gate_up", "moe_down", "decode_attention", "qk_norm_rope",
    "qk_norm_rope_kv", "gdn_step", "add_rms_norm", "rms_norm", "index")}
