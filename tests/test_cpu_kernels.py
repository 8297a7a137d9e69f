"""The C CPU kernels (kernels/cpu/) against the plain-MLX path they replace.

Fresh random inputs every run; shapes include odd ones (rows not a multiple
of anything, in-features not a multiple of a 16-lane block, widths of the
shared expert unlike the routed ones). Error = max |kernel - MLX| / max |MLX|.
"""

from __future__ import annotations

import ctypes
import platform

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.cpu import build, engine as cpu_engine, ops
from llm_flashmoe.engine.linear import Linear
from llm_flashmoe.kernels import plain

TOL = 2e-5
pytestmark = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def lib():
    lib = build.load()
    assert lib is not None
    return lib


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    """The same sources built without AVX-512: the portable path (NEON/AVX2 machines)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("portable build variant is exercised on x86 only")
    path = build.build(extra_flags=["-mno-avx512f"], out_dir=tmp_path_factory.mktemp("portable"))
    lib = ctypes.CDLL(str(path))
    build._declare(lib)
    return lib


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def quantized(shape, bits, group, scale_dtype=mx.float32, seed=None) -> Linear:
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal(shape).astype(np.float32) * shape[-1] ** -0.5)
    q, s, b = mx.quantize(w, group_size=group, bits=bits)
    return Linear(q, s.astype(scale_dtype), b.astype(scale_dtype), bits, group)


def qmm_err(y, lin: Linear, x: np.ndarray) -> float:
    """max |y - MLX| relative to the size of the sums (|W| |x|), not of their results:
    a one-element output that cancels to near zero must not look inaccurate."""
    w = mx.dequantize(lin.weight, lin.scales.astype(mx.float32), lin.biases.astype(mx.float32),
                      group_size=lin.group_size, bits=lin.bits)
    size = np.abs(x) @ np.abs(np.asarray(w)).T
    return float(np.abs(np.asarray(y, np.float64) - reference(lin, x)).max() / size.max())


def reference(lin: Linear, x: np.ndarray) -> np.ndarray:
    """MLX's own quantized matmul with float32 scales."""
    return np.asarray(mx.quantized_matmul(mx.array(x), lin.weight, lin.scales.astype(mx.float32),
                                          lin.biases.astype(mx.float32), transpose=True,
                                          group_size=lin.group_size, bits=lin.bits))


QMM_CASES = [  # (rows, cols, tokens)
    (1, 128, 1), (7, 384, 3), (33, 640, 5), (64, 4096, 1), (130, 256, 9),
    (7, 4224, 1), (6, 8320, 1),   # one token, more than 4096 in: rows in pairs (and a last one alone)
]
PARTIAL_BLOCK = (9, 320, 2)  # a last block of 64 bytes only partly filled (2 and 4 bits; groups up to 64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_qmm_matches_mlx(lib, bits, group):
    rng = np.random.default_rng()
    for rows, cols, T in QMM_CASES + [(5, 96, 2)] * (group == 32) + [PARTIAL_BLOCK] * (group <= 64):
        for st in (mx.float32, mx.bfloat16, mx.float16):
            lin = quantized((rows, cols), bits, group, st)
            x = rng.standard_normal((T, cols)).astype(np.float32)
            (y,) = ops.qmm(lib, [cpu_engine.linear_qmat(lin)], x)
            assert qmm_err(y, lin, x) < TOL, (bits, group, rows, cols, T, st)


def test_qmm_several_matrices_share_input(lib):
    rng = np.random.default_rng()
    lins = [quantized((r, 512), b, g) for r, b, g in [(300, 4, 64), (17, 8, 64), (64, 2, 32), (5, 3, 128)]]
    x = rng.standard_normal((4, 512)).astype(np.float32)
    outs = ops.qmm(lib, [cpu_engine.linear_qmat(l) for l in lins], x)
    for lin, y in zip(lins, outs):
        assert y.shape == (4, lin.out_features)
        assert qmm_err(y, lin, x) < TOL


def test_portable_path_matches_mlx(portable_lib):
    rng = np.random.default_rng()
    for bits in (2, 3, 4, 8):
        for rows, cols, T in [(7, 384, 3), (33, 640, 5), (16, 4096, 1)]:
            lin = quantized((rows, cols), bits, 64, mx.bfloat16)
            x = rng.standard_normal((T, cols)).astype(np.float32)
            (y,) = ops.qmm(portable_lib, [cpu_engine.linear_qmat(lin)], x)
            assert qmm_err(y, lin, x) < TOL, (bits, rows, cols, T)


@pytest.fixture(scope="module")
def float_lib(tmp_path_factory):
    """The same sources built without AVX512-VNNI: 2- and 4-bit codes take the float path
    (AVX-512 machines without VNNI; on others this is the build the machine gets)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    path = build.build(extra_flags=["-mno-avx512vnni"] if x86 else [], out_dir=tmp_path_factory.mktemp("float"))
    lib = ctypes.CDLL(str(path))
    build._declare(lib)
    return lib


def test_float_path_matches_mlx(float_lib):
    rng = np.random.default_rng()
    for bits in (2, 4):
        for group in (32, 64, 128):
            for rows, cols, T in [(7, 384, 3), (16, 4096, 1), (6, 8320, 1)] + [PARTIAL_BLOCK] * (group <= 64):
                lin = quantized((rows, cols), bits, group, mx.bfloat16)
                x = rng.standard_normal((T, cols)).astype(np.float32)
                (y,) = ops.qmm(float_lib, [cpu_engine.linear_qmat(lin)], x)
                assert qmm_err(y, lin, x) < TOL, (bits, group, rows, cols, T)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qmm_extreme_activations(lib, bits):
    """Activations the integer path (2 and 4 bits on AVX512-VNNI) quantizes per token:
    all zero, one outlier 10^4 above the rest, a negative maximum, tiny and huge
    magnitudes, values exactly halfway between two digits."""
    rng = np.random.default_rng()
    lin = quantized((40, 1024), bits, 64, mx.bfloat16)
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    x[0] = 0.0
    x[1, 17] = 3e4
    x[2, 5] = -1e3
    x[3] *= 1e-30
    x[4] *= 1e30
    x[5] = (rng.integers(-254, 255, 1024) + 0.5) / 256 * (127 / 127.5)  # max 127/256 at halves
    (y,) = ops.qmm(lib, [cpu_engine.linear_qmat(lin)], x)
    ref = reference(lin, x)
    assert not np.any(y[0]) and np.isfinite(y).all()
    for t in range(1, 6):
        assert qmm_err(y[t : t + 1], lin, x[t : t + 1]) < TOL, t
    assert rel_err(y[1:], ref[1:]) < 1e-3  # and not only relative to the sums' size


def test_huge_pages_keep_weights_in_place(lib, monkeypatch):
    """Resident weights moved onto huge pages (FLASHMOE_CPU_HUGEPAGES=1) keep their address
    and bytes: MLX and the kernels read the same values as before."""
    import sys

    monkeypatch.setenv("FLASHMOE_CPU_HUGEPAGES", "1")
    lin = quantized((4096, 4096), 4, 64)  # 8 MiB of codes: at least three whole 2 MiB pages
    before = [np.array(t, copy=True) for t in (lin.weight, lin.scales, lin.biases)]
    w, s, b = cpu_engine.linear_views(lin)  # (moved here already, by the engine)
    first_page = (w.ctypes.data + (2 << 20) - 1) // (2 << 20)
    assert (first_page in cpu_engine._on_huge) == sys.platform.startswith("linux")
    x = np.random.default_rng().standard_normal((1, 4096)).astype(np.float32)
    addr = w.ctypes.data
    (y0,) = ops.qmm(lib, [cpu_engine.linear_qmat(lin)], x)
    assert qmm_err(y0, lin, x) < TOL
    moved = lib.fm_huge_remap(w.ctypes.data, w.nbytes)
    assert moved > 0 if sys.platform.startswith("linux") else moved == 0
    assert np.asarray(lin.weight.view(mx.uint32)).ctypes.data == addr
    assert all(np.array_equal(t, u) for t, u in zip((w, s, b), before))
    (y1,) = ops.qmm(lib, [cpu_engine.linear_qmat(lin)], x)
    assert np.array_equal(y0, y1)
    assert np.array_equal(np.asarray(lin(mx.array(x))), reference(lin, x))  # MLX reads it too


def test_qmm_rejects_bad_arguments(lib):
    lin = quantized((8, 128), 4, 64)
    with pytest.raises(ValueError):
        ops.qmat(*cpu_engine.linear_views(lin), bits=5, group=64)
    with pytest.raises(ValueError):  # rows past the end of the arrays
        ops.qmat(*cpu_engine.linear_views(lin), bits=4, group=64, rows=9)


def moe_reference(x, experts, pairs):
    """y[t] = sum over (e, t, c) of c * down_e(silu(gate_e x_t) * up_e x_t), in MLX."""
    y = np.zeros_like(x)
    for e, t, c in pairs:
        g, u, d = experts[e]
        xt = mx.array(x[t : t + 1])
        a, b = g(xt), u(xt)
        y[t] += c * np.asarray(d(a * mx.sigmoid(a) * b))[0]
    return y


@pytest.mark.parametrize("H,I,Is,bits,group", [(256, 128, 128, 4, 64), (160, 96, 64, 3, 32), (512, 64, 192, 2, 64)])
def test_moe_matches_mlx(lib, H, I, Is, bits, group):
    """Several tokens, experts shared between tokens, a shared expert of another width and 8 bits."""
    rng = np.random.default_rng()
    E, T, K = 6, 5, 3
    experts = [tuple(quantized(s, bits, group) for s in [(I, H), (I, H), (H, I)]) for _ in range(E)]
    experts.append(tuple(quantized(s, 8, 32) for s in [(Is, H), (Is, H), (H, Is)]))  # shared
    x = rng.standard_normal((T, H)).astype(np.float32)
    pairs = []
    for t in range(T):
        for e in rng.choice(E, K, replace=False):
            pairs.append((int(e), t, float(rng.random())))
        pairs.append((E, t, float(rng.random())))
    pairs.sort(key=lambda p: p[0])
    offsets = np.searchsorted([p[0] for p in pairs], np.arange(E + 2)).astype(np.int32)
    toks = np.array([p[1] for p in pairs], np.int32)
    coef = np.array([p[2] for p in pairs], np.float32)
    q = [[cpu_engine.linear_qmat(ex[j]) for ex in experts] for j in range(3)]
    ref = moe_reference(x, experts, pairs)
    y = ops.moe(lib, q[0], q[1], q[2], offsets, toks, coef, x)
    assert rel_err(y, ref) < TOL
    # The two phases separately, accumulating onto a residual.
    h = ops.moe_gate_up(lib, q[0], q[1], offsets, toks, x)
    res = rng.standard_normal((T, H)).astype(np.float32)
    y2 = ops.moe_down(lib, q[2], offsets, toks, coef, h, res.copy())
    assert rel_err(y2, ref + res) < TOL


def test_moe_397b_shapes(lib):
    """Real 397B expert shapes (hidden 4096, width 1024, 4-bit group 64, bf16 scales), K=4 + shared."""
    rng = np.random.default_rng()
    stack = [quantized((8, *s), 4, 64, mx.bfloat16) for s in [(1024, 4096), (1024, 4096), (4096, 1024)]]
    shared = [quantized(s, 4, 64, mx.bfloat16) for s in [(1024, 4096), (1024, 4096), (4096, 1024)]]
    gate, up, down = (Linear(l.weight, l.scales, l.biases, 4, 64) for l in stack)
    x = mx.array(rng.standard_normal((1, 4096)).astype(np.float32))
    rows = mx.array(rng.choice(8, 4, replace=False).astype(np.int32))
    w = mx.softmax(mx.array(rng.standard_normal(4).astype(np.float32)))
    logit, residual = mx.array([0.3]), mx.array(rng.standard_normal(4096).astype(np.float32))
    h, hs = cpu_engine.moe_gate_up(x, rows, gate, up, shared[0], shared[1])
    h_ref, hs_ref = plain.moe_gate_up(x, rows, gate, up, shared[0], shared[1])
    assert rel_err(h, h_ref) < TOL and rel_err(hs, hs_ref) < TOL
    y = cpu_engine.moe_down(h, rows, w, down, hs, shared[2], logit, residual)
    y_ref = plain.moe_down(h_ref, rows, w, down, hs_ref, shared[2], logit, residual)
    assert y.shape == y_ref.shape and rel_err(y - residual, y_ref - residual) < TOL


def test_qmv_op_falls_back_for_dense_and_keeps_order():
    rng = np.random.default_rng()
    lins = [quantized((12288, 4096), 4, 64), Linear(mx.array(rng.standard_normal((3, 4096)).astype(np.float32))),
            quantized((64, 4096), 8, 64)]
    x = mx.array(rng.standard_normal((1, 4096)).astype(np.float32))
    for y, r in zip(cpu_engine.qmv(x, lins), plain.qmv(x, lins)):
        assert y.shape == r.shape and rel_err(y, r) < TOL


def test_no_compiler_falls_back_with_one_line_notice(monkeypatch, capsys):
    from llm_flashmoe import kernels

    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    monkeypatch.delenv("FLASHMOE_KERNELS", raising=False)
    assert build.load() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plain-MLX" in err
    if mx.default_device() == mx.cpu:
        assert kernels.active_backend() == "plain"


def test_kernels_off_disables(monkeypatch):
    from llm_flashmoe import kernels

    monkeypatch.setenv("FLASHMOE_KERNELS", "off")
    assert build.load() is None and kernels.ops() is None


@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(16, 64, 128, 128), (4, 16, 128, 128), (3, 6, 40, 24)])
def test_gdn_step_matches_mlx(lib, Hk, Hv, Dk, Dv):
    """Three steps from an empty state (None) through the conv history, against the twin."""
    rng = np.random.default_rng()
    r = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    C, Kc = 2 * Hk * Dk + Hv * Dv, 4
    conv_w, A, dt_bias, norm_w = r(C, Kc) * 0.5, -mx.exp(r(Hv) * 0.5), r(Hv), 1 + 0.1 * r(Dv)
    ours = ref = (None, None)
    for _ in range(3):
        qkv, z, b, a = r(C), r(Hv * Dv), r(Hv), r(Hv)
        o, conv, st = cpu_engine.gdn_step(qkv, z, b, a, ours[0], conv_w, A, dt_bias, norm_w, ours[1], Hk, Dk, 1e-6)
        o_r, conv_r, st_r = plain.gdn_step(qkv, z, b, a, ref[0], conv_w, A, dt_bias, norm_w, ref[1], Hk, Dk, 1e-6)
        assert o.shape == o_r.shape and conv.shape == conv_r.shape and st.shape == st_r.shape
        assert rel_err(o, o_r) < 1e-4 and rel_err(st, st_r) < 1e-5 and rel_err(conv, conv_r) == 0
        ours, ref = (conv, st), (conv_r, st_r)


def test_route_and_add_rms_norm_match_mlx():
    rng = np.random.default_rng()
    logits = mx.array(rng.standard_normal(512).astype(np.float32) * 3)
    for norm in (True, False):
        ids, w = cpu_engine.moe_route(logits, 4, norm)
        ids_r, w_r = plain.moe_route(logits, 4, norm)
        o, o_r = np.argsort(np.asarray(ids)), np.argsort(np.asarray(ids_r))
        assert np.array_equal(np.asarray(ids)[o], np.asarray(ids_r)[o_r])
        assert rel_err(np.asarray(w)[o], np.asarray(w_r)[o_r]) < 1e-5  # float32 softmax, other summation order
    x, y = (mx.array(rng.standard_normal((1, 1, 4096)).astype(np.float32)) for _ in range(2))
    wn = mx.array(rng.standard_normal(4096).astype(np.float32))
    for a, b in zip(cpu_engine.add_rms_norm(x, y, wn, 1e-6), plain.add_rms_norm(x, y, wn, 1e-6)):
        assert isinstance(a, mx.array) and a.shape == b.shape and rel_err(a, b) < 1e-5  # MLX sums in float32


def test_route_kernel_matches_mlx(lib):
    """The C top-k and softmax on numpy logits: odd sizes and k, equal logits, a NaN (numpy then)."""
    rng = np.random.default_rng()
    for E, k in [(512, 4), (512, 10), (37, 1), (9, 9), (128, 8)]:
        lg = (rng.standard_normal(E) * 3).astype(np.float32)
        lg[rng.choice(E, 3, replace=False)] = lg.max() + 1  # a tie at the top
        for norm in (True, False):
            ids, w = cpu_engine.moe_route(lg, k, norm)
            ids_r, w_r = plain.moe_route(mx.array(lg), k, norm)
            assert ids.dtype == np.int32 and w.dtype == np.float32 and ids.shape == w.shape == (k,)
            assert sorted(lg[ids]) == sorted(np.asarray(lg)[np.asarray(ids_r)])  # the same logits chosen
            assert rel_err(np.sort(w), np.sort(np.asarray(w_r))) < 1e-5
    lg = rng.standard_normal(64).astype(np.float32)
    lg[5] = np.nan
    ids, w = cpu_engine.moe_route(lg, 4, True)   # refused by the kernel: the numpy fallback
    assert ids.shape == (4,)


@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 1000), (7,), (2, 1, 33)])
def test_rms_norm_kernels_match_mlx(lib, shape):
    rng = np.random.default_rng()
    x, y = (rng.standard_normal(shape).astype(np.float32) * 10 for _ in range(2))
    w = mx.array(rng.standard_normal(shape[-1]).astype(np.float32))
    def exact(v):  # float64 reference
        v = np.asarray(v, np.float64)
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6) * np.asarray(w, np.float64)

    n = cpu_engine.rms_norm(x, w, 1e-6)
    n_r = mx.fast.rms_norm(mx.array(x), w, 1e-6)
    assert isinstance(n, np.ndarray) and n.shape == shape
    assert rel_err(n, exact(x)) < 5e-7 and rel_err(n, n_r) < 1e-5   # MLX: float32 sums of squares
    for a, b in [(x, y), (x, mx.array(y)), (mx.array(x), y)]:   # numpy out when either is numpy
        h, n = cpu_engine.add_rms_norm(a, b, w, 1e-6)
        h_r, n_r = plain.add_rms_norm(mx.array(x), mx.array(y), w, 1e-6)
        assert isinstance(h, np.ndarray) and isinstance(n, np.ndarray) and h.shape == n.shape == shape
        assert rel_err(h, h_r) == 0 and rel_err(n, exact(x + y)) < 5e-7 and rel_err(n, n_r) < 1e-5


def test_gdn_step_state_alignment(lib):
    """The new state streamed in aligned chunks whatever the buffer's alignment: the same results."""
    rng = np.random.default_rng()
    Hk, Hv, Dk, Dv, Kc = 2, 4, 128, 24, 4
    C = 2 * Hk * Dk + Hv * Dv
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    ins = [f(C), f(Hv * Dv), f(Hv), f(Hv), f(Kc - 1, C), f(C, Kc), -np.abs(f(Hv)), f(Hv), f(Dv), f(Hv, Dv, Dk)]
    results = []
    for shift in (0, 1, 2, 6, 15):
        raw = np.full(Hv * Dv * Dk + 32, 7.0, np.float32)
        start = (-(raw.ctypes.data // 4)) % 16 + shift          # 64-byte aligned, then one float off
        s_out = raw[start : start + Hv * Dv * Dk]
        conv, out = np.empty((Kc - 1) * C, np.float32), np.empty(Hv * Dv, np.float32)
        assert lib.fm_gdn_step(*[a.ctypes.data for a in ins], Hk, Hv, Dk, Dv, Kc, 1e-6, conv.ctypes.data,
                               s_out.ctypes.data, out.ctypes.data) == 0
        assert np.all(raw[:start] == 7) and np.all(raw[start + Hv * Dv * Dk :] == 7)   # nothing written outside
        results.append((s_out.copy(), out))
    for st, out in results[1:]:
        assert np.array_equal(st, results[0][0]) and np.array_equal(out, results[0][1])


def test_concurrent_callers_get_correct_results(lib):
    """ctypes releases the GIL: calls from several Python threads share one pool."""
    import threading

    rng = np.random.default_rng()
    lin = quantized((2048, 1024), 4, 64)
    xs = [rng.standard_normal((1, 1024)).astype(np.float32) for _ in range(4)]
    refs = [reference(lin, x) for x in xs]
    q = cpu_engine.linear_qmat(lin)
    errors = []

    def work(i):
        for _ in range(20):
            (y,) = ops.qmm(lib, [q], xs[i])
            errors.append(qmm_err(y, lin, xs[i]) if not np.allclose(y, refs[i], rtol=1e-4, atol=1e-5) else 0.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 80 and max(errors) < TOL
