"""Python faces of the C kernels: numpy in, numpy out, no copies of weights.

`QMat` describes one quantized matrix by pointers into arrays that stay
owned by the caller (MLX arrays seen through numpy, or the expert store's
read buffers). Activations are float32 [T, in]; outputs float32 [T, out].
"""

from __future__ import annotations

import ctypes

import numpy as np

F32, BF16, F16 = 0, 1, 2
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)


class QMat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("group", ctypes.c_int32), ("scale_type", ctypes.c_int32), ("pad", ctypes.c_int32)]


def supported(bits: int, group: int) -> bool:
    return bits in SUPPORTED_BITS and group in SUPPORTED_GROUPS


def scale_type(a: np.ndarray, bf16: bool = False) -> int:
    """float32 -> F32; float16 -> F16; uint16 holds bfloat16 bits (numpy has no bf16)."""
    if a.dtype == np.float32:
        return F32
    if a.dtype == np.float16:
        return F16
    if a.dtype in (np.uint16, np.int16) or bf16:
        return BF16
    raise TypeError(f"unsupported scale dtype {a.dtype}")


def qmat(w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int,
         rows: int | None = None, w_offset: int = 0, s_offset: int = 0) -> QMat:
    """A matrix of `rows` rows starting `w_offset` bytes into `w` and
    `s_offset` bytes into scales/biases (both row-major, C-contiguous).
    The arrays must outlive every kernel call that uses the result."""
    if not supported(bits, group):
        raise ValueError(f"unsupported quantization: {bits} bits, group {group}")
    st = scale_type(scales)
    if scale_type(biases) != st:
        raise TypeError("scales and biases must share a dtype")
    for a in (w, scales, biases):
        if not a.flags.c_contiguous:
            raise ValueError("quantized arrays must be C-contiguous")
    n_groups = scales.shape[-1]
    cols = n_groups * group
    if rows is None:
        rows = int(np.prod(scales.shape[:-1]))
    row_bytes = cols * bits // 8
    if w.shape[-1] * w.itemsize != row_bytes:
        raise ValueError(f"weight rows are {w.shape[-1] * w.itemsize} bytes, expected {row_bytes}")
    if w_offset + rows * row_bytes > w.nbytes or s_offset + rows * n_groups * scales.itemsize > scales.nbytes:
        raise ValueError("matrix extends past its arrays")
    return QMat(w.ctypes.data + w_offset, scales.ctypes.data + s_offset, biases.ctypes.data + s_offset,
                rows, cols, bits, group, st, 0)


def _f32_2d(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(1, -1) if x.ndim == 1 else x


def qmm(lib, mats: list[QMat], x: np.ndarray, outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """y_i = x @ W_i^T for each matrix (all with x's in-features): [T, rows_i] float32."""
    x = _f32_2d(x)
    T = x.shape[0]
    if outs is None:
        outs = [np.empty((T, m.rows), np.float32) for m in mats]
    arr = (QMat * len(mats))(*mats)
    ptrs = (ctypes.c_void_p * len(mats))(*[o.ctypes.data for o in outs])
    rc = lib.fm_qmm(len(mats), arr, x.ctypes.data, T, ptrs)
    if rc != 0:
        raise ValueError(f"fm_qmm rejected its arguments (code {rc})")
    return outs


def moe(lib, gate: list[QMat], up: list[QMat], down: list[QMat], offsets: np.ndarray, tokens: np.ndarray,
        coef: np.ndarray, x: np.ndarray, y: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """y[t] (+)= sum of coef[p] * down_e(silu(gate_e x_t) * up_e x_t) over the pairs p of expert e
    (offsets[e]:offsets[e+1]) with t = tokens[p]."""
    x = _f32_2d(x)
    T, H = x.shape
    n = len(gate)
    offsets = np.ascontiguousarray(offsets, np.int32)
    tokens = np.ascontiguousarray(tokens, np.int32)
    coef = np.ascontiguousarray(coef, np.float32)
    if len(up) != n or len(down) != n or offsets.shape != (n + 1,) or len(tokens) != offsets[-1] \
            or len(coef) != len(tokens):
        raise ValueError("moe: inconsistent expert lists / pairs")
    if y is None:
        y = np.empty((T, H), np.float32)
        accumulate = False
    rc = lib.fm_moe(n, (QMat * n)(*gate), (QMat * n)(*up), (QMat * n)(*down), offsets.ctypes.data,
                    tokens.ctypes.data, coef.ctypes.data, x.ctypes.data, T, y.ctypes.data, int(accumulate))
    if rc != 0:
        raise ValueError(f"fm_moe rejected its arguments (code {rc})")
    return y


def _pairs(n: int, offsets, tokens, coef=None):
    offsets = np.ascontiguousarray(offsets, np.int32)
    tokens = np.ascontiguousarray(tokens, np.int32)
    if offsets.shape != (n + 1,) or len(tokens) != offsets[-1]:
        raise ValueError("moe: offsets/tokens do not describe the experts' pairs")
    if coef is not None:
        coef = np.ascontiguousarray(coef, np.float32)
        if len(coef) != len(tokens):
            raise ValueError("moe: one coefficient per pair")
    return offsets, tokens, coef


def moe_gate_up(lib, gate: list[QMat], up: list[QMat], offsets, tokens, x: np.ndarray,
                h: np.ndarray | None = None) -> np.ndarray:
    """h[p] = silu(gate_e x_t) * up_e x_t for every pair p -> float32 [pairs, max width]."""
    x = _f32_2d(x)
    n = len(gate)
    offsets, tokens, _ = _pairs(n, offsets, tokens)
    width = max(g.rows for g in gate)
    if h is None:
        h = np.empty((len(tokens), width), np.float32)
    if len(up) != n or h.shape[0] != len(tokens) or h.dtype != np.float32 or not h.flags.c_contiguous:
        raise ValueError("moe_gate_up: bad expert list or output")
    rc = lib.fm_moe_gate_up(n, (QMat * n)(*gate), (QMat * n)(*up), offsets.ctypes.data, tokens.ctypes.data,
                            x.ctypes.data, x.shape[0], h.ctypes.data, h.shape[1])
    if rc != 0:
        raise ValueError(f"fm_moe_gate_up rejected its arguments (code {rc})")
    return h


def moe_down(lib, down: list[QMat], offsets, tokens, coef, h: np.ndarray, y: np.ndarray,
             accumulate: bool = True) -> np.ndarray:
    """y[tokens[p]] (+)= coef[p] * down_e h[p] over all pairs; y float32 [T, H], written in place."""
    n = len(down)
    offsets, tokens, coef = _pairs(n, offsets, tokens, coef)
    h = np.ascontiguousarray(h, np.float32)
    if y.dtype != np.float32 or not y.flags.c_contiguous or y.ndim != 2 or h.shape[0] != len(tokens):
        raise ValueError("moe_down: bad output or hidden activations")
    rc = lib.fm_moe_down(n, (QMat * n)(*down), offsets.ctypes.data, tokens.ctypes.data, coef.ctypes.data,
                         h.ctypes.data, h.shape[1], y.shape[0], y.ctypes.data, int(accumulate))
    if rc != 0:
        raise ValueError(f"fm_moe_down rejected its arguments (code {rc})")
    return y
