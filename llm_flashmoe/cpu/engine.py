"""The "cpu" backend of `kernels.ops()`: a decode step in numpy and C, no MLX inside.

A decode step's activations travel between these ops as float32 numpy
arrays: no op evaluates an MLX graph, so no op waits on MLX's stream
thread (each such hand-off cost 0.1-1 ms on these 2-core machines, more
than the arithmetic of most ops). MLX arrays still come in where they must
(the embedding row, the state of the caches, resident weights) and are seen
through numpy views: resident weights and constants once per model (views
cached on their `Linear` or by identity), state once per step.

What goes back into MLX: the state kept in the caches (conv and recurrent
state, the new key/value rows) so that prompt processing and snapshots keep
working on MLX arrays, and the logits. `rms_norm` and `add_rms_norm` give
back what they are given: MLX for MLX (prompt processing runs the plain-MLX
layers), numpy for numpy.

Ops not listed in `table()` fall back to their plain-MLX twins in kernels/plain.py.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import weakref

import mlx.core as mx
import numpy as np

from ..engine.linear import Linear
from . import ops as cops
from .build import load


def host_views(arrays: list) -> list[np.ndarray]:
    """numpy views of arrays' memory (bfloat16 seen as uint16 bits), float32 made contiguous.
    numpy arrays pass through; the MLX ones are evaluated together (one hand-off to MLX's
    stream thread for all, none if all are evaluated already)."""
    out: list = list(arrays)
    todo = [i for i, a in enumerate(arrays) if not isinstance(a, np.ndarray)]
    if todo:
        mxs = [arrays[i].view(mx.uint16) if arrays[i].dtype == mx.bfloat16 else arrays[i] for i in todo]
        mx.eval(*mxs)
        for i, a in zip(todo, mxs):
            out[i] = np.asarray(a)
    return [v if v.flags.c_contiguous else np.ascontiguousarray(v) for v in out]


def host_view(a) -> np.ndarray:
    return host_views([a])[0]


def f32(arrays: list) -> list[np.ndarray]:
    """Host float32 arrays of MLX or numpy arrays (views where already float32)."""
    conv = [a.astype(mx.float32) if isinstance(a, mx.array) and a.dtype != mx.float32 else a for a in arrays]
    return [v if v.dtype == np.float32 else v.astype(np.float32) for v in host_views(conv)]


class _ByArray:
    """A dict keyed by MLX arrays' identity whose entries go when their array does
    (models come and go in one process)."""

    def __init__(self):
        self.d: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, a: mx.array):
        e = self.d.get(id(a))
        return e[1] if e is not None and e[0]() is a else None

    def put(self, a: mx.array, value) -> None:
        key = id(a)
        self.d[key] = (weakref.ref(a, lambda _, d=self.d, k=key: d.pop(k, None)), value)


# Constants of a layer (conv weights, norms, gate parameters) as host float32 copies,
# converted once per model, not per token (copies: a view would keep the array alive).
_consts = _ByArray()


def const_views(arrays: list[mx.array]) -> list[np.ndarray]:
    missing = [a for a in arrays if _consts.get(a) is None]
    for a, v in zip(missing, f32(missing)):
        _consts.put(a, np.array(v, copy=True))
    return [_consts.get(a) for a in arrays]


def kernel_ready(lin: Linear) -> bool:
    return lin.quantized and cops.supported(lin.bits, lin.group_size)


_HUGE = 2 << 20
_on_huge: set[int] = set()  # 2 MiB pages already moved onto huge pages


def huge_pages(views: list[np.ndarray]) -> None:
    """With FLASHMOE_CPU_HUGEPAGES=1, move resident weights onto transparent huge pages,
    in place (kernels/cpu/pages.c: fewer TLB misses; decode of a 397B-shaped model held in
    RAM measured 0.1-0.2 closer to the bandwidth bound, before the kernels' page-walk
    prefetch). Only weights nothing writes any more (never the expert store's read
    buffers), each region once per process. Off by default: moving costs about 1 s per GB
    on the first decode step here (8.6 s for a 2-layer 397B model held in RAM), repaid
    only over long generations (see DESIGN.md)."""
    if os.environ.get("FLASHMOE_CPU_HUGEPAGES", "0").strip() in ("", "0", "off", "no", "false"):
        return
    lib = load()
    for v in views:
        start = (v.ctypes.data + _HUGE - 1) // _HUGE
        end = (v.ctypes.data + v.nbytes) // _HUGE
        if end - start < 2 or all(p in _on_huge for p in range(start, end)):
            continue  # under two whole pages: not worth a copy
        if lib.fm_huge_remap(v.ctypes.data, v.nbytes) > 0:
            _on_huge.update(range(start, end))


def prepare(linears: list[Linear], arrays: list = ()) -> list[np.ndarray]:
    """Host views of the quantized Linears (cached on each: resident weights are
    converted once per model) and float32 host views of `arrays`, in one evaluation.
    Matrices (2-D weights) are always resident: they go onto huge pages here."""
    todo = [l for l in linears if not _cached(l)]
    todo = list({id(l): l for l in todo}.values())
    views = host_views([t for l in todo for t in (l.weight, l.scales, l.biases)])
    for i, l in enumerate(todo):
        w, s, b = views[3 * i : 3 * i + 3]
        qm = cops.qmat(w, s, b, l.bits, l.group_size) if l.weight.ndim == 2 else None
        if qm is not None:
            huge_pages([w, s, b])
        l.__dict__["_cpu_views"] = (l.weight, (w, s, b), qm)
    return f32(list(arrays))


def _cached(lin: Linear) -> bool:
    cached = lin.__dict__.get("_cpu_views")
    return cached is not None and cached[0] is lin.weight


def linear_views(lin: Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, biases) host views of a quantized Linear."""
    if not _cached(lin):
        prepare([lin])
    return lin.__dict__["_cpu_views"][1]


def linear_qmat(lin: Linear) -> cops.QMat:
    if not _cached(lin):
        prepare([lin])
    return lin.__dict__["_cpu_views"][2]


def expert_qmats(stack: Linear, rows: np.ndarray) -> list[cops.QMat]:
    """One QMat per selected row (expert) of a stacked [E, out, in] quantized Linear."""
    if not _cached(stack):
        prepare([stack])
    entry = stack.__dict__["_cpu_views"]
    if len(entry) < 4:   # checked once per stack: expert 0's matrix, and the bytes per expert
        w, s, b = entry[1]
        if w.shape[0] > len(rows):   # all experts, held in memory (a streamed batch holds the selected)
            huge_pages([w, s, b])
        first = cops.qmat(w, s, b, stack.bits, stack.group_size, rows=stack.weight.shape[-2])
        entry = stack.__dict__["_cpu_views"] = (*entry, (first, w[0].nbytes, s[0].nbytes, w.shape[0]))
    first, w_row, s_row, n = entry[3]
    addresses = stack.row_addresses   # rows that lie elsewhere (the store's page-cache mappings)
    out = []
    for r in rows:
        r = int(r)
        if not 0 <= r < n:
            raise IndexError(f"expert row {r} outside the stack of {n}")
        if addresses is not None:
            w, s, b = (int(a) for a in addresses[r])
        else:
            w, s, b = first.w + r * w_row, first.scales + r * s_row, first.biases + r * s_row
        out.append(cops.QMat(w, s, b, first.rows, first.cols, first.bits, first.group, first.scale_type, 0))
    return out


class _QmmCall:
    """The ctypes arguments of one fm_qmm over a fixed list of matrices, built once per
    list (a call site of the model: the same Linears every token)."""

    def __init__(self, linears: list[Linear]):
        self.linears = linears
        self.weights = [l.weight for l in linears]
        mats = [linear_qmat(l) for l in linears]
        self.mats = (cops.QMat * len(mats))(*mats)
        self.rows = [m.rows for m in mats]
        self.offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.total = sum(self.rows)
        self.cols = mats[0].cols

    def valid(self, linears: list[Linear]) -> bool:
        return len(linears) == len(self.linears) and all(
            a is b and a.weight is w for a, b, w in zip(linears, self.linears, self.weights))

    def __call__(self, lib, x: np.ndarray) -> list[np.ndarray]:
        T = x.shape[0]
        buf = np.empty(T * self.total, np.float32)   # one allocation, one pointer for all outputs
        base = buf.ctypes.data
        ptrs = (ctypes.c_void_p * len(self.rows))(*[base + 4 * T * o for o in self.offsets])
        rc = lib.fm_qmm(len(self.rows), self.mats, x.ctypes.data, T, ptrs)
        if rc != 0:
            raise ValueError(f"fm_qmm rejected its arguments (code {rc})")
        return [buf[T * o : T * (o + r)].reshape(T, r) for o, r in zip(self.offsets, self.rows)]


def _qmm_call(linears: list[Linear]) -> _QmmCall:
    """The cached call for this list of Linears, kept on the first of them."""
    key = tuple(id(l) for l in linears)
    calls = linears[0].__dict__.setdefault("_cpu_calls", {})
    call = calls.get(key)
    if call is None or not call.valid(linears):
        call = calls[key] = _QmmCall(linears)
    return call


def qmv(x, linears: list[Linear]) -> list[np.ndarray]:
    """x [M, in] -> [l(x) for l in linears], each float32 [M, out_l] (numpy)."""
    lib = load()
    xn = _f32c(x)
    xn = xn.reshape(-1, xn.shape[-1])
    calls = linears[0].__dict__.get("_cpu_calls")
    call = calls.get(tuple(map(id, linears))) if calls else None
    if call is not None and call.valid(linears):   # a call site seen before, all kernel-ready
        return call(lib, xn)
    fast = [l for l in linears if kernel_ready(l)]
    res = iter(_qmm_call(fast)(lib, xn) if fast else [])
    out = []
    for l in linears:
        out.append(next(res) if kernel_ready(l) else f32([l(mx.array(xn))])[0])
    return out


_ARANGE = np.arange(64, dtype=np.int32)
_ZEROS = np.zeros(64, dtype=np.int32)


def moe_gate_up(x, rows, gate: Linear, up: Linear, shared_gate: Linear,
                shared_up: Linear) -> tuple[np.ndarray, np.ndarray]:
    """x [H], rows int32 [K] of the expert stacks -> h [K, I] = silu(gate x) * up x, and the shared hs [Is]."""
    if not all(kernel_ready(l) for l in (gate, up, shared_gate, shared_up)):
        from ..kernels import plain

        return plain.moe_gate_up(*(mx.array(t) for t in (x, rows)), gate, up, shared_gate, shared_up)
    lib = load()
    # One evaluation for both stacks (streamed experts arrive as fresh Linears every layer,
    # their scales possibly still to be converted by MLX), the input and the rows.
    xn = prepare([gate, up], [x])[0]
    r = host_view(rows).reshape(-1)
    K = len(r)
    I, Is = gate.weight.shape[-2], shared_gate.out_features
    g = expert_qmats(gate, r) + [linear_qmat(shared_gate)]
    u = expert_qmats(up, r) + [linear_qmat(shared_up)]
    # Every expert (the shared one last) sees the single token 0.
    h = np.empty((K + 1, max(I, Is)), np.float32)
    rc = lib.fm_moe_gate_up(K + 1, (cops.QMat * (K + 1))(*g), (cops.QMat * (K + 1))(*u), _ARANGE.ctypes.data,
                            _ZEROS.ctypes.data, xn.ctypes.data, 1, h.ctypes.data, h.shape[1])
    if rc != 0:
        raise ValueError(f"fm_moe_gate_up rejected its arguments (code {rc})")
    return h[:K, :I], h[K, :Is]


def moe_down(h, rows, weights, down: Linear, hs, shared_down: Linear, shared_gate_logit, residual) -> np.ndarray:
    """residual [H] + sum_k weights[k] * down_{rows[k]}(h[k]) + sigmoid(logit) * shared_down(hs) -> [H]."""
    if not (kernel_ready(down) and kernel_ready(shared_down)):
        from ..kernels import plain

        args = [mx.array(t) for t in (h, rows, weights, hs, shared_gate_logit, residual)]
        return plain.moe_down(*args[:3], down, args[3], shared_down, *args[4:])
    lib = load()
    hn, hsn, wn, logit, res = f32([h, hs, weights, shared_gate_logit, residual])
    r = host_view(rows).reshape(-1)
    K = len(r)
    hn, hsn = hn.reshape(K, -1), hsn.reshape(-1)
    base = hn.base
    if (base is not None and hsn.base is base and base.ndim == 2 and base.shape == (K + 1, hn.shape[1])
            and hn.ctypes.data == base.ctypes.data and hsn.ctypes.data == base[K].ctypes.data):
        hh = base                                     # moe_gate_up's buffer: already [h; hs]
    else:
        hh = np.zeros((K + 1, max(hn.shape[1], hsn.shape[0])), np.float32)
        hh[:K, : hn.shape[1]] = hn
        hh[K, : hsn.shape[0]] = hsn
    coef = np.empty(K + 1, np.float32)
    coef[:K] = wn.reshape(-1)
    coef[K] = 1.0 / (1.0 + math.exp(-float(logit.reshape(-1)[0])))
    y = np.array(res.reshape(1, -1), copy=True)
    d = expert_qmats(down, r) + [linear_qmat(shared_down)]
    rc = lib.fm_moe_down(K + 1, (cops.QMat * (K + 1))(*d), _ARANGE.ctypes.data, _ZEROS.ctypes.data,
                         coef.ctypes.data, hh.ctypes.data, hh.shape[1], 1, y.ctypes.data, 1)
    if rc != 0:
        raise ValueError(f"fm_moe_down rejected its arguments (code {rc})")
    return y.reshape(-1)


# Per layer (by its conv weight) and state: last step's input state, which the cache has
# let go of by the next step. If nothing else holds it then (a snapshot would), the kernel
# writes the new state into it: the state stays an MLX array (snapshots and prompt
# processing use MLX) with neither a copy nor an MLX evaluation to allocate it (a hand-off
# to MLX's stream thread, which competes with the kernels' threads for the cores).
_spare = {"recurrent": _ByArray(), "conv": _ByArray()}


def _pop_counted(entry: list):
    """entry[1] and its reference count once the entry has let go of it."""
    obj, entry[1] = entry[1], None
    return obj, sys.getrefcount(obj)


_SOLE = _pop_counted([None, object()])[1]   # the count of an object nothing else holds


def _take_if_sole(entry: list):
    """entry[1], if the entry was its only holder (else None); the entry lets go of it."""
    obj, refs = _pop_counted(entry)
    return obj if obj is not None and refs <= _SOLE else None


def _state_out(layer_key: mx.array, name: str, given, shape: tuple) -> mx.array:
    """A float32 MLX array of `shape` for the new state that the kernel may overwrite."""
    entry = _spare[name].get(layer_key)
    out = _take_if_sole(entry) if entry is not None else None
    if out is not None and (out.shape != shape or out.dtype != mx.float32):
        out = None
    if entry is None:
        _spare[name].put(layer_key, [None, given])
    else:
        entry[1] = given
    return out if out is not None else mx.zeros(shape, mx.float32)


def gdn_step(qkv, z, b, a, conv_state, conv_w, A, dt_bias, norm_w, state, n_key_heads: int,
             key_dim: int, eps: float, then=None):
    """One GatedDeltaNet token (see kernels/plain.py for the contract; `then` unused) -> out [Hv*Dv] (numpy),
    new conv_state [1, Kc-1, C] and new state [1, Hv, Dv, Dk] float32 (MLX: cache state)."""
    lib = load()
    Hk, Dk = n_key_heads, key_dim
    Hv = b.size
    Dv = z.size // Hv
    C = qkv.size
    Kc = conv_w.shape[1]
    new_state = _state_out(conv_w, "recurrent", state, (1, Hv, Dv, Dk))
    f32_conv = conv_w.dtype == mx.float32
    new_conv = _state_out(conv_w, "conv", conv_state, (1, Kc - 1, C)) if f32_conv else None
    ins = f32([qkv, z, b, a])
    consts = const_views([conv_w, A, dt_bias, norm_w])
    given = [t for t in (conv_state, state) if t is not None]
    state_v, conv_v, *given = f32([new_state, new_conv if f32_conv else np.empty((1, Kc - 1, C), np.float32)]
                                  + given)
    cin = given.pop(0) if conv_state is not None else None
    sin = given.pop(0) if state is not None else None
    if not all(v.flags.writeable and v.flags.c_contiguous for v in (state_v, conv_v)):
        raise RuntimeError("MLX memory is not host-writable here")
    out = np.empty(Hv * Dv, np.float32)
    ptr = lambda arr: None if arr is None else arr.ctypes.data  # noqa: E731
    rc = lib.fm_gdn_step(*[ptr(t) for t in ins], ptr(cin), *[ptr(t) for t in consts], ptr(sin),
                         Hk, Hv, Dk, Dv, Kc, eps, conv_v.ctypes.data, state_v.ctypes.data, out.ctypes.data)
    if rc != 0:
        raise ValueError(f"fm_gdn_step rejected its arguments (code {rc})")
    if not f32_conv:
        new_conv = mx.array(conv_v).astype(conv_w.dtype)
    return out, new_conv, new_state


# Small ops on the calling thread: RMSNorms and the router in C (kernels/cpu/small.c; in
# numpy each was several calls, 40-80 us per layer in a decode step whose weights have just
# flushed the caches), the rest in numpy.

def _f32c(a) -> np.ndarray:
    """a as a C-contiguous float32 numpy array (itself when it is one)."""
    if type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous:
        return a
    return f32([a])[0]


def _const(a: mx.array) -> np.ndarray:
    v = _consts.get(a)
    return v if v is not None else const_views([a])[0]


def moe_route(logits, k: int, norm_topk: bool) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [E] -> top-k expert ids int32 [k] and their softmax weights float32 [k]."""
    lg = _f32c(logits).reshape(-1)
    ids, w = np.empty(k, np.int32), np.empty(k, np.float32)
    if 0 < k <= lg.size and load().fm_route(lg.ctypes.data, lg.size, k, 1 if norm_topk else 0,
                                            ids.ctypes.data, w.ctypes.data) == 0:
        return ids, w
    p = np.exp(lg - lg.max())   # NaN logits (the kernel refuses them) or an odd k
    p /= p.sum()
    ids = np.argpartition(-p, k - 1)[:k].astype(np.int32)
    w = p[ids]
    if norm_topk:
        w = w / w.sum()
    return ids, w.astype(np.float32)


def _rms_rows(h: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("ij,ij->i", h, h, dtype=np.float32) / np.float32(h.shape[1])
    return h * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))[:, None] * w.reshape(-1)


def rms_norm(x, w: mx.array, eps: float):
    """rmsnorm(x) * w over the last axis; numpy for numpy, MLX (mx.fast) for MLX."""
    if isinstance(x, mx.array):
        return mx.fast.rms_norm(x, w, eps)
    wn, xn = _const(w), _f32c(x)
    cols = xn.shape[-1] if xn.ndim else 0
    if cols == 0 or wn.size != cols:
        return _rms_rows(xn.reshape(-1, cols), wn, eps).reshape(xn.shape)
    out = np.empty(xn.shape, np.float32)
    load().fm_rms_norm(xn.ctypes.data, None, wn.ctypes.data, xn.size // cols, cols, eps, None, out.ctypes.data)
    return out


def add_rms_norm(x, y, w: mx.array, eps: float):
    """h = x + y; n = rmsnorm(h) * w  (rows of the last axis). numpy if either is numpy."""
    if isinstance(x, mx.array) and isinstance(y, mx.array):
        if x.dtype != mx.float32 or y.dtype != mx.float32 or x.shape != y.shape:
            from ..kernels import plain

            return plain.add_rms_norm(x, y, w, eps)
        h, n = add_rms_norm(*f32([x, y]), w, eps)
        return mx.array(h), mx.array(n)
    shape = x.shape if x.size >= y.size else y.shape
    xn, yn, wn = _f32c(x), _f32c(y), _const(w)
    cols = shape[-1] if shape else 0
    if cols == 0 or xn.size != yn.size or wn.size != cols:
        h = xn.reshape(-1, shape[-1]) + yn.reshape(-1, shape[-1])
        return h.reshape(shape), _rms_rows(h, wn, eps).reshape(shape)
    h, n = np.empty(shape, np.float32), np.empty(shape, np.float32)
    load().fm_rms_norm(xn.ctypes.data, yn.ctypes.data, wn.ctypes.data, xn.size // cols, cols, eps, h.ctypes.data,
                       n.ctypes.data)
    return h, n


_rope_tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _rope(x: np.ndarray, pos: int, dims: int, theta: float) -> np.ndarray:
    """Rotate the first `dims` of each row of x [heads, Dh] by position pos (MLX's
    non-traditional rope: pairs (i, i + dims/2)), in place."""
    key = (pos, dims, theta)
    cs = _rope_tables.get(key)
    if cs is None:
        if len(_rope_tables) > 8192:
            _rope_tables.clear()
        half = dims // 2
        inv = np.exp(-np.arange(half, dtype=np.float32) * np.float32(2.0 / dims) * np.float32(math.log(theta)))
        ang = np.float32(pos) * inv
        cs = _rope_tables[key] = (np.cos(ang), np.sin(ang))
    cos, sin = cs
    half = dims // 2
    x1, x2 = x[:, :half].copy(), x[:, half:dims]
    x[:, :half] = x1 * cos - x2 * sin
    x[:, half:dims] = x1 * sin + x2 * cos
    return x


def qk_norm_rope(qg, k, q_w: mx.array, k_w: mx.array, pos: int, rope_dims: int, theta: float,
                 eps: float, n_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """RMSNorm of each query head (first half of qg [Hq, 2*Dh]) and key head (k [Hkv*Dh]),
    then rope on their first rope_dims dims at position pos -> q [Hq, Dh], k [1, Hkv, 1, Dh]."""
    qw, kw = const_views([q_w, k_w])
    Dh = qw.size
    qgn, kn = f32([qg, k])
    q = _rms_rows(qgn.reshape(-1, 2 * Dh)[:, :Dh].copy(), qw, eps)
    kk = _rms_rows(kn.reshape(n_kv_heads, Dh), kw, eps)
    return _rope(q, pos, rope_dims, theta), _rope(kk, pos, rope_dims, theta).reshape(1, n_kv_heads, 1, Dh)


def decode_attention(q, keys, values, n: int, qg, then=None) -> np.ndarray:
    """q [Hq, Dh] attends over the first n of keys/values [1, Hkv, capacity, Dh]; the
    output is gated by sigmoid of the second half of each head of qg [Hq, 2*Dh] -> [Hq*Dh]
    (`then` unused: see kernels/plain.py)."""
    qn, qgn = f32([q, qg])
    kv = f32([keys, values])                                   # whole buffers: no MLX slice to evaluate
    K, V = kv[0][0, :, :n], kv[1][0, :, :n]                    # [Hkv, n, Dh]
    Hq, Dh = qn.shape
    Hkv = K.shape[0]
    qh = qn.reshape(Hkv, Hq // Hkv, Dh)                        # query heads grouped by their kv head
    s = np.matmul(qh, K.transpose(0, 2, 1)) * np.float32(Dh ** -0.5)   # [Hkv, G, n]
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    out = np.matmul(s, V).reshape(Hq, Dh)
    gate = qgn.reshape(Hq, 2 * Dh)[:, Dh:]
    return (out * (np.float32(1.0) / (np.float32(1.0) + np.exp(-gate)))).reshape(-1)


def table() -> dict:
    """{op name: implementation} for kernels.ops(); the rest use the plain-MLX twins
    (all of them when the library cannot be built)."""
    if load() is None:
        return {}
    return {"qmv": qmv, "moe_gate_up": moe_gate_up, "moe_down": moe_down, "gdn_step": gdn_step,
            "moe_route": moe_route, "add_rms_norm": add_rms_norm, "rms_norm": rms_norm,
            "qk_norm_rope": qk_norm_rope, "decode_attention": decode_attention}
