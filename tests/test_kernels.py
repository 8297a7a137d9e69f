"""Kernel twins against straightforward numpy, the dialect split, and the engine wiring (CPU)."""

from __future__ import annotations

import os
import re

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe import kernels
from llm_flashmoe.engine.linear import Linear
from llm_flashmoe.kernels import plain, source

RNG = np.random.default_rng(0)


def qlin(out_f, in_f, bits=4, gs=64, experts=None):
    shape = (out_f, in_f) if experts is None else (experts, out_f, in_f)
    q, s, b = mx.quantize(mx.array(RNG.normal(size=shape).astype(np.float32) * in_f ** -0.5), group_size=gs, bits=bits)
    return Linear(q, s, b, bits, gs)


def np_dequant(lin: Linear) -> np.ndarray:
    """The affine format by hand: little-endian bit stream of `bits`-bit codes per row."""
    w = np.array(lin.weight)
    lead, words = w.shape[:-1], w.shape[-1]
    n = words * 32 // lin.bits
    bits = np.unpackbits(w.view(np.uint8).reshape(*lead, words * 4), axis=-1, bitorder="little")
    codes = (bits.reshape(*lead, n, lin.bits) * (1 << np.arange(lin.bits))).sum(-1)
    rep = lambda a: np.repeat(np.array(a.astype(mx.float32)), lin.group_size, axis=-1)  # noqa: E731
    return codes * rep(lin.scales) + rep(lin.biases)


def close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1.0), np.abs(a - b).max()


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def rmsnorm(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("bits,gs,K,N", [(4, 64, 256, 48), (2, 32, 128, 20), (3, 32, 96, 7), (8, 128, 256, 5)])
def test_qmv_matches_numpy(bits, gs, K, N):
    lins = [qlin(N, K, bits, gs), qlin(3, K, bits, gs)]
    x = RNG.normal(size=(1, K)).astype(np.float32)
    for got, lin in zip(plain.qmv(mx.array(x), lins), lins):
        close(got, x @ np_dequant(lin).T)


@pytest.mark.parametrize("add", [False, True])
def test_norm_qmv_twin_is_the_norm_then_qmv(add):
    K = 96
    lins = [qlin(20, K, 4, 32), qlin(1, K, 4, 32)]
    x, xa, w = RNG.normal(size=(2, K)), RNG.normal(size=(2, K)), 1 + 0.1 * RNG.normal(size=K)
    outs, h, n = plain.norm_qmv(*(mx.array(t.astype(np.float32)) if t is not None else None
                                  for t in (x, xa if add else None, w)), 1e-6, lins)
    h_ref = x + xa if add else x
    close(h, h_ref)
    close(n, rmsnorm(h_ref, w))
    for got, lin in zip(outs, lins):
        close(got, rmsnorm(h_ref, w) @ np_dequant(lin).T)


def test_ops_compose_norm_qmv_from_the_backends_own_ops():
    calls = []
    qmv = lambda *a: calls.append("qmv") or plain.qmv(*a)                          # noqa: E731
    norm = lambda *a: calls.append("rms_norm") or plain.rms_norm(*a)               # noqa: E731
    add_norm = lambda *a: calls.append("add_rms_norm") or plain.add_rms_norm(*a)   # noqa: E731
    kernels.register_backend("test-norm", lambda: {"qmv": qmv, "rms_norm": norm, "add_rms_norm": add_norm})
    o = kernels.ops("test-norm")
    x, w, lin = mx.ones((1, 64)), mx.ones((64,)), qlin(8, 64, 4, 32)
    o.norm_qmv(x, None, w, 1e-6, [lin])
    o.norm_qmv(x, x, w, 1e-6, [lin])
    assert calls == ["rms_norm", "qmv", "add_rms_norm", "qmv"]
    assert kernels.ops("twin").norm_qmv is plain.norm_qmv


def test_moe_twins_match_numpy():
    E, K, H, I, Is = 12, 3, 64, 32, 64
    gate, up, down = qlin(I, H, 4, 32, E), qlin(I, H, 4, 32, E), qlin(H, I, 4, 32, E)
    sg, su, sd = qlin(Is, H, 4, 32), qlin(Is, H, 4, 32), qlin(H, Is, 4, 32)
    logits = RNG.normal(size=E).astype(np.float32)
    x, res = RNG.normal(size=H).astype(np.float32), RNG.normal(size=H).astype(np.float32)
    ids, w = plain.moe_route(mx.array(logits), K, True)
    p = np.exp(logits - logits.max()); p /= p.sum()
    want = np.argsort(-p)[:K]
    assert sorted(np.array(ids).tolist()) == sorted(want.tolist())
    close(np.sort(np.array(w)), np.sort(p[want] / p[want].sum()))

    h, hs = plain.moe_gate_up(mx.array(x), ids, gate, up, sg, su)
    G, U, D = np_dequant(gate), np_dequant(up), np_dequant(down)
    silu = lambda t: t * sigmoid(t)  # noqa: E731
    ids_np = np.array(ids)
    want_h = np.stack([silu(G[e] @ x) * (U[e] @ x) for e in ids_np])
    want_hs = silu(np_dequant(sg) @ x) * (np_dequant(su) @ x)
    close(h, want_h)
    close(hs, want_hs)

    logit = np.float32(0.3)
    out = plain.moe_down(h, ids, w, down, hs, sd, mx.array([float(logit)]), mx.array(res))
    want = res + sum(wk * (D[e] @ hk) for wk, e, hk in zip(np.array(w), ids_np, want_h))
    want = want + sigmoid(logit) * (np_dequant(sd) @ want_hs)
    close(out, want)


@pytest.mark.parametrize("with_lookup", [False, True])
def test_route_gate_up_twin_is_route_then_gate_up(with_lookup):
    E, K, H, I, Is = 12, 3, 64, 32, 64
    gate, up = qlin(I, H, 4, 32, E + 5), qlin(I, H, 4, 32, E + 5)     # a cache: more rows than experts
    sg, su = qlin(Is, H, 4, 32), qlin(Is, H, 4, 32)
    logits, x = mx.array(RNG.normal(size=E).astype(np.float32)), mx.array(RNG.normal(size=(1, H)).astype(np.float32))
    lookup = mx.array(RNG.permutation(E + 5)[:E].astype(np.int32)) if with_lookup else None
    h, hs, rows, w = plain.moe_route_gate_up(logits, K, True, lookup, x, gate, up, sg, su)
    ids, w_ref = plain.moe_route(logits, K, True)
    rows_ref = ids if lookup is None else lookup[ids]
    h_ref, hs_ref = plain.moe_gate_up(x, rows_ref, gate, up, sg, su)
    assert rows.dtype == mx.int32 and np.array_equal(np.array(rows), np.array(rows_ref))
    for got, ref in ((h, h_ref), (hs, hs_ref), (w, w_ref)):
        assert np.array_equal(np.array(got), np.array(ref))


def test_ops_compose_route_gate_up_from_the_backends_own_ops():
    calls = []
    route = lambda *a: calls.append("route") or plain.moe_route(*a)        # noqa: E731
    gate_up = lambda *a: calls.append("gate_up") or plain.moe_gate_up(*a)  # noqa: E731
    kernels.register_backend("test-route", lambda: {"moe_route": route, "moe_gate_up": gate_up})
    o = kernels.ops("test-route")
    E, H, I, Is = 8, 64, 32, 64
    o.moe_route_gate_up(mx.zeros((E,)), 2, True, None, mx.ones((1, H)), qlin(I, H, 4, 32, E), qlin(I, H, 4, 32, E),
                        qlin(Is, H, 4, 32), qlin(Is, H, 4, 32))
    assert calls == ["route", "gate_up"]
    assert kernels.ops("twin").moe_route_gate_up is plain.moe_route_gate_up


def test_decode_attention_matches_numpy():
    Hq, Hkv, Dh, cap, n = 4, 2, 32, 16, 9
    q = RNG.normal(size=(Hq, Dh)).astype(np.float32)
    keys, values = (RNG.normal(size=(1, Hkv, cap, Dh)).astype(np.float32) for _ in range(2))
    qg = RNG.normal(size=(Hq * 2 * Dh,)).astype(np.float32)
    got = plain.decode_attention(mx.array(q), mx.array(keys), mx.array(values), n, mx.array(qg))
    want = []
    for h in range(Hq):
        kv = h // (Hq // Hkv)
        s = keys[0, kv, :n] @ q[h] / np.sqrt(Dh)
        p = np.exp(s - s.max()); p /= p.sum()
        want.append((p @ values[0, kv, :n]) * sigmoid(qg.reshape(Hq, 2 * Dh)[h, Dh:]))
    close(got, np.concatenate(want))


def test_qk_norm_rope_matches_numpy():
    Hq, Hkv, Dh, rope, pos, theta = 3, 1, 32, 8, 11, 1e4
    qg = RNG.normal(size=(Hq, 2 * Dh)).astype(np.float32)
    k = RNG.normal(size=(Hkv, Dh)).astype(np.float32)
    qw, kw = (1 + 0.1 * RNG.normal(size=Dh)).astype(np.float32), (1 + 0.1 * RNG.normal(size=Dh)).astype(np.float32)
    gq, gk = plain.qk_norm_rope(mx.array(qg.reshape(-1)), mx.array(k.reshape(-1)), mx.array(qw), mx.array(kw),
                                pos, rope, theta, 1e-6, Hkv)

    def ref(x):
        x = x.copy()
        half = rope // 2
        ang = pos * theta ** (-np.arange(half) * 2 / rope)
        x1, x2 = x[..., :half].copy(), x[..., half:rope].copy()
        x[..., :half] = x1 * np.cos(ang) - x2 * np.sin(ang)
        x[..., half:rope] = x2 * np.cos(ang) + x1 * np.sin(ang)
        return x

    close(gq, ref(rmsnorm(qg[:, :Dh], qw)), 1e-4)
    close(gk, ref(rmsnorm(k, kw)).reshape(1, Hkv, 1, Dh), 1e-4)   # (a KV cache's layout)


@pytest.mark.parametrize("array_pos", [False, True])
def test_qk_norm_rope_kv_twin_writes_the_token_at_its_position(array_pos):
    """qk_norm_rope_kv (the twin: qk_norm_rope, then slice updates): q and k as qk_norm_rope gives
    them, the roped k and the value v at position pos of the KV buffers, every other row as it was."""
    Hq, Hkv, Dh, rope, pos, cap = 4, 2, 32, 8, 5, 9
    qg, k, v = (mx.array(RNG.normal(size=n).astype(np.float32)) for n in (Hq * 2 * Dh, Hkv * Dh, Hkv * Dh))
    qw, kw = (mx.array((1 + 0.1 * RNG.normal(size=Dh)).astype(np.float32)) for _ in range(2))
    keys, values = (mx.array(RNG.normal(size=(1, Hkv, cap, Dh)).astype(np.float32)) for _ in range(2))
    at = mx.array([pos], mx.int32) if array_pos else pos
    q, kk, nk, nv = plain.qk_norm_rope_kv(qg, k, v, keys, values, qw, kw, at, rope, 1e4, 1e-6, Hkv)
    q0, k0 = plain.qk_norm_rope(qg, k, qw, kw, pos, rope, 1e4, 1e-6, Hkv)
    np.testing.assert_array_equal(np.array(q), np.array(q0))
    np.testing.assert_array_equal(np.array(kk), np.array(k0))
    np.testing.assert_array_equal(np.array(nk)[:, :, pos], np.array(k0)[:, :, 0])
    np.testing.assert_array_equal(np.array(nv)[:, :, pos], np.array(v).reshape(1, Hkv, Dh))
    rest = [i for i in range(cap) if i != pos]
    np.testing.assert_array_equal(np.array(nk)[:, :, rest], np.array(keys)[:, :, rest])
    np.testing.assert_array_equal(np.array(nv)[:, :, rest], np.array(values)[:, :, rest])


def recording(launches: list):
    """A stand-in for mx.fast.cuda_kernel / metal_kernel (GpuKernels._make): each launch goes to
    `launches` as (the kernel's name, input names, header and source as the compiler reads them
    (the CUDA launches' files in place of their #includes); the launch's inputs, grid and thread
    group), and its outputs are zeros."""
    from llm_flashmoe.kernels.gpu import inline_sources

    def make(**kw):
        def launch(inputs, output_shapes, output_dtypes, grid=None, threadgroup=None, **_):
            launches.append((kw["name"], kw["input_names"], inline_sources(kw["header"]), inline_sources(kw["source"]),
                             inputs, grid, threadgroup))
            return [mx.zeros(shape, dt) for shape, dt in zip(output_shapes, output_dtypes)]
        return launch
    return make


def launch_defines(header: str, *names: str) -> dict:
    """The launch's own values of the #defines `names` in a kernel's header (the first of each: the
    kernels' fallback defaults come after)."""
    d = {}
    for k, v in re.findall(rf"#define ({'|'.join(names)}) (\d+)\n", header):
        d.setdefault(k, int(v))
    return d


def test_cuda_launches_take_their_header_and_body_from_files_named_by_their_text(monkeypatch, tmp_path):
    """MLX 0.32's CUDA backend hashes each launch's whole source, so the CUDA kernels are made with
    two #include lines of files holding the rendered header and body (written once, named by their
    text's hash), plus a comment naming the inputs' shapes the body reads (MLX passes those it finds
    in the source); FLASHMOE_CUDA_SOURCE_FILES=0, Metal, and a folder that cannot be written give the
    text inline. The emulator's launches (g++ reading the same files) match the plain twin."""
    from llm_flashmoe.kernels import check, emulate, gpu, plain, source

    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path / "cache"))
    made = []

    def kernels(backend):
        k = gpu.GpuKernels(backend)
        k._make = lambda **kw: made.append(kw) or recording([])(**kw)
        return k

    q = mx.zeros((2, 256), mx.bfloat16)
    keys = values = mx.zeros((1, 1, 16, 256), mx.bfloat16)
    try:
        gpu.configure({})
        g = kernels("cuda")
        g.decode_attention(q, keys, values, 5, mx.zeros((1, 1024), mx.bfloat16))
        kw = made.pop()
        (name, _, defines), = g._kernels             # the launch's own defines
        header, body = source.render(name, "cuda", dict(defines))
        folder = gpu.source_dir()
        assert folder == tmp_path / "cache" / "cuda-sources"
        inc = re.findall(r'^#include "([^"]+)"$', kw["header"] + kw["source"], flags=re.M)
        assert len(inc) == 2 and all(p.startswith(str(folder.resolve())) for p in inc)
        assert len(kw["header"]) + len(kw["source"]) < 400 < len(header)
        assert "keys_shape" in kw["source"] and "keys_shape" in body   # MLX passes it where named
        assert gpu.inline_sources(kw["source"]) == "// reads keys_shape\n" + body
        assert gpu.inline_sources(kw["header"]) == header
        files = sorted(folder.iterdir())
        assert all(f.suffix == ".cuh" for f in files)      # no temporary left
        kernels("cuda").decode_attention(q, keys, values, 5, mx.zeros((1, 1024), mx.bfloat16))
        assert made.pop()["source"] == kw["source"] and sorted(folder.iterdir()) == files
        # inline: the switch off, Metal, a folder that cannot be written
        for backend, env in (("cuda", {"FLASHMOE_CUDA_SOURCE_FILES": "0"}), ("metal", {})):
            gpu.configure(env)
            kernels(backend).decode_attention(q, keys, values, 5, mx.zeros((1, 1024), mx.bfloat16))
            kw = made.pop()
            assert "#include" not in kw["source"] and kw["source"].endswith(
                source.render("decode_attention", backend, {})[1])
        gpu.configure({})
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path / "file"))
        kernels("cuda").decode_attention(q, keys, values, 5, mx.zeros((1, 1024), mx.bfloat16))
        assert made.pop()["source"].endswith(body)
        # the emulator compiles the files (g++) and its launch matches the twin
        monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path / "cache"))
        f32 = mx.float32
        qq, kk, vv = check.rnd((2, 256), f32), check.rnd((1, 1, 16, 256), f32), check.rnd((1, 1, 16, 256), f32)
        qg = check.rnd((1, 1024), f32)
        got = emulate.emulated_kernels(tmp_path).decode_attention(qq, kk, vv, 5, qg)
        ref = plain.decode_attention(qq, kk, vv, 5, qg)
        assert check.judge(got, ref, None, mx.float32)[2]
    finally:
        gpu.configure()


def headers_of(kern, headers: list):
    """kern (a GpuKernels) with each kernel it builds also putting its header in `headers` (as the
    compiler reads it)."""
    from llm_flashmoe.kernels.gpu import inline_sources

    make = kern._make
    kern._make = lambda **kw: headers.append(inline_sources(kw["header"])) or make(**kw)
    return kern


def test_kv_inplace_switch_picks_the_kernel_that_writes_the_buffers_it_is_given(monkeypatch):
    """FLASHMOE_KV_INPLACE=1 (and auto, the default, on CUDA): the table has qk_norm_rope_kv, whose
    launch takes the KV buffers as inputs, writes them through a cast pointer at pos (its source)
    and hands the same buffers back as arrays that depend on the launch's outputs (mx.depends: what
    reads them later comes after the write MLX cannot see); 0 (and auto on Metal): the backend's
    qk_norm_rope, then slice updates (`ops` composes it)."""
    from llm_flashmoe.kernels import gpu

    depends = []
    real_depends = mx.depends
    monkeypatch.setattr(mx, "depends", lambda a, d: depends.append((a, d)) or real_depends(a, d))

    launches = []
    Hq, Hkv, Dh = 2, 1, 64
    args = (mx.zeros((Hq * 2 * Dh,)), mx.zeros((Hkv * Dh,)), mx.zeros((Hkv * Dh,)),
            mx.zeros((1, Hkv, 8, Dh)), mx.zeros((1, Hkv, 8, Dh)), mx.ones((Dh,)), mx.ones((Dh,)),
            mx.array([3], mx.int32), 16, 1e4, 1e-6, Hkv)
    try:
        gpu.configure({"FLASHMOE_KV_INPLACE": "1"})
        kern = gpu.GpuKernels("cuda")
        kern._make = recording(launches)
        assert "qk_norm_rope_kv" in kern.table()
        q, k, keys, values = kern.table()["qk_norm_rope_kv"](*args)
        (name, names, _, body, inputs, _, _), = launches
        assert name.startswith("fm_qk_norm_rope_kv_")
        (bufs, deps), = depends
        assert bufs[0] is args[3] and bufs[1] is args[4] and deps[0] is q and deps[1] is k
        mx.eval(keys, values, args[3], args[4])
        for got, given in ((keys, args[3]), (values, args[4])):   # the same memory
            assert np.array(got, copy=False).ctypes.data == np.array(given, copy=False).ctypes.data
        assert inputs[names.index("keys")] is args[3] and inputs[names.index("values")] is args[4]
        assert "((GLOBAL T*)keys)[at]" in body and "((GLOBAL T*)values)[at]" in body and "keys_shape[2]" in body
        assert not any("(GLOBAL T*)" + n + ")" in body for n in names if n not in ("keys", "values"))
        gpu.configure({"FLASHMOE_KV_INPLACE": "0"})
        assert gpu.KV_INPLACE == 0 and "qk_norm_rope_kv" not in gpu.GpuKernels("cuda").table()
        kernels._built.pop("cuda", None)
        composed = kernels.ops("cuda").qk_norm_rope_kv
        assert composed.__qualname__.startswith("compose_qk_norm_rope_kv")
        gpu.configure({})
        assert gpu.KV_INPLACE is None and "qk_norm_rope_kv" in gpu.GpuKernels("cuda").table()
        assert "qk_norm_rope_kv" not in gpu.GpuKernels("metal").table()
        kernels._built.pop("cuda", None)
        assert kernels.ops("cuda").qk_norm_rope_kv.__qualname__ == "GpuKernels.qk_norm_rope_kv"
    finally:
        gpu.configure()
        kernels._built.pop("cuda", None)


def test_min_groups_sets_the_matrix_vector_kernels_launch_bounds():
    """FLASHMOE_MIN_GROUPS=N: qmv, the MoE's gate/up and its down are built with MIN_GROUPS N and
    MAX_THREADS (the launch's thread group), so CUDA's __global__ carries __launch_bounds__ for them,
    defined after the kernel's #defines; the default (0) leaves the launch bounds out, and Metal's
    dialect has none; a bad value is refused."""
    from llm_flashmoe.errors import FlashMoeError
    from llm_flashmoe.kernels import check, gpu

    launches = []

    def build(backend):
        launches.clear()
        kern = gpu.GpuKernels(backend)
        kern._make = recording(launches)
        d = check.moe_inputs("tiny", mx.float32)
        kern.qmv(mx.zeros((1, 128)), [check.qlinear(64, 128, 4, 64, mx.float32)])
        kern.moe_gate_up(d["x"], d["rows"], d["gate"], d["up"], d["sg"], d["su"])
        kern.moe_down(check.rnd((d["K"], d["gate"].weight.shape[1]), mx.float32), d["rows"], d["w"], d["down"],
                      check.rnd((d["sg"].out_features,), mx.float32), d["sd"], check.rnd((1,), mx.float32), d["res"])
        return [(name, header, group) for name, _, header, _, _, _, group in launches]

    try:
        gpu.configure({"FLASHMOE_MIN_GROUPS": "3", "FLASHMOE_MV_THREADS": "128"})
        built = build("cuda")
        assert [n.split("_")[1:-1] for n, _, _ in built] == [["qmv"], ["moe", "gate", "up"], ["moe", "down"]]
        for _, header, group in built:
            assert group == (128, 1, 1)
            bounds = header.index("__launch_bounds__(MAX_THREADS, MIN_GROUPS)")
            assert header.index("#define MIN_GROUPS 3\n") < bounds and header.index("#define MAX_THREADS 128\n") < bounds
        for _, header, _ in build("metal"):
            assert "#define MIN_GROUPS 3" in header and "__launch_bounds__" not in header
        gpu.configure({})
        assert all("#define MIN_GROUPS" not in header for _, header, _ in build("cuda"))
        for bad in ("-1", "33"):
            with pytest.raises(FlashMoeError, match="FLASHMOE_MIN_GROUPS"):
                gpu.configure({"FLASHMOE_MIN_GROUPS": bad})
    finally:
        gpu.configure()


def test_qasync_takes_the_launches_whose_rows_fit_the_ring_and_sizes_groups_to_fast_memory():
    """FLASHMOE_QASYNC=S: a qmv launch with inputs a multiple of 1024, 4- or 8-bit codes and 2-byte
    scales is built with the ring's defines (QASYNC S, pieces per chunk, scale pieces per row,
    QA_WARPS) and launched with QA_WARPS warps per group, as many as fit the staged input and
    every warp's ring in the backend's fast memory (at most FLASHMOE_MV_THREADS / 32); other
    launches (float32 scales, 3-bit, 2-bit, inputs not a multiple of 1024), the default (0) and the
    tensor-core form keep theirs; a bad value is refused. (Here without FLASHMOE_QINT, whose
    staging takes more fast memory.) (The ring's copies, waits and warp
    syncs are checked by the emulator, whose copies land only when waited for.)"""
    from llm_flashmoe.errors import FlashMoeError
    from llm_flashmoe.kernels import check, gpu

    launches = []

    def built(backend, K, Ns, bits=4, gs=64, dtype=mx.bfloat16):
        launches.clear()
        kern = gpu.GpuKernels(backend)
        kern._make = recording(launches)
        kern.qmv(mx.zeros((1, K), dtype), [check.qlinear(n, K, bits, gs, dtype) for n in Ns])
        (_, _, header, _, _, grid, group), = launches
        d = launch_defines(header, "QASYNC", "QA_ROWS", "QA_C16", "QA_SB16", "QA_WARPS", "QMV_R", "QMV_GW")
        if d["QASYNC"] == 0:
            del d["QASYNC"]
        if "QASYNC" in d:
            R, warps = d["QA_ROWS"], d["QA_WARPS"]
            assert R == d["QMV_R"]
            assert group == (32 * warps, 1, 1) and d["QMV_GW"] == grid[0] // group[0] * warps
            per_warp = 16 * (d["QASYNC"] * R * d["QA_C16"] * 32 + 2 * R * d["QA_SB16"])
            staged = 4 * (K // 32 * 33 + K // 32 + 32)   # the staged input, its sums, the norm's partials
            assert staged + warps * per_warp <= kern.max_shared
            assert warps == gpu.mv_threads() // 32 or staged + (warps + 1) * per_warp > kern.max_shared
        else:
            assert group == (gpu.mv_threads(), 1, 1)
        return d

    try:
        gpu.configure({"FLASHMOE_QASYNC": "3", "FLASHMOE_QINT": "0"})
        d = built("cuda", 4096, [12288, 8192, 64, 64])
        assert (d["QASYNC"], d["QA_C16"], d["QA_SB16"]) == (3, 1, 4096 // 64 * 2 // 16) and d["QA_WARPS"] >= 1
        assert built("cuda", 1024, [24, 1], bits=8, gs=128)["QA_C16"] == 2
        assert built("metal", 2048, [40])["QA_WARPS"] < built("cuda", 2048, [40])["QA_WARPS"]   # 32 KB there
        assert built("cuda", 1024, [64], gs=128)["QA_SB16"] == 1
        for other in (dict(dtype=mx.float32), dict(bits=3), dict(bits=2)):
            assert "QASYNC" not in built("cuda", 4096, [64], **other)
        assert "QASYNC" not in built("cuda", 3136, [64])
        gpu.configure({"FLASHMOE_QASYNC": "3", "FLASHMOE_MIN_GROUPS": "4", "FLASHMOE_QINT": "0"})   # the bounds of the groups launched
        launches.clear()
        kern = gpu.GpuKernels("cuda")
        kern._make = recording(launches)
        kern.qmv(mx.zeros((1, 4096), mx.bfloat16), [check.qlinear(n, 4096, 4, 64, mx.bfloat16) for n in (16384, 64)])
        (_, _, header, _, _, _, group), = launches
        assert "#define QA_WARPS" in header and group[0] < gpu.mv_threads()
        assert f"#define MAX_THREADS {group[0]}\n" in header and "#define MIN_GROUPS 4\n" in header
        gpu.configure({"FLASHMOE_QASYNC": "3", "FLASHMOE_QMV_MMA": "1", "FLASHMOE_QINT": "0"})
        assert "QASYNC" not in built("cuda", 4096, [64])
        # the MoE's gate/up (routed or not): its warps' gate and up rows through the ring, beside the
        # staged input, the experts' rows and (routed) the routing's fast memory; not addressed experts
        gpu.configure({"FLASHMOE_QASYNC": "2", "FLASHMOE_QINT": "0"})
        for name, label in (("moe_gate_up", "ring"), ("moe_route_gate_up", "ring+lookup"), ("moe_gate_up", "tiny")):
            launches.clear()
            kern = gpu.GpuKernels("cuda")
            kern._make = recording(launches)
            next(make for n, make, _ in check.CASES if n == name)(label, mx.bfloat16)[0](kern)
            (kname, _, header, _, _, _, group), = [l for l in launches if "gate_up" in l[0]]
            ring = re.search(r"#define QA_WARPS (\d+)\n", header)
            assert bool(ring) == (label != "tiny"), (name, label)   # tiny: 256 inputs
            if ring:
                assert group == (32 * int(ring.group(1)), 1, 1) and "#define QA_ROWS 2\n" in header
        d = check.moe_inputs("ring", mx.bfloat16)   # experts by address (the host tier): no ring
        launches.clear()
        kern = gpu.GpuKernels("cuda")
        kern._make = recording(launches)
        kern.moe_gate_up(d["x"], mx.zeros((d["K"], 9), mx.uint64), d["gate"], d["up"], d["sg"], d["su"])
        (_, _, header, _, _, _, group), = launches
        assert "#define ADDRESSED 1" in header and "#define QA_WARPS" not in header and group == (gpu.mv_threads(), 1, 1)
        gpu.configure({})
        assert "QASYNC" not in built("cuda", 4096, [12288, 8192, 64, 64])
        for bad in ("1", "5", "-2"):
            with pytest.raises(FlashMoeError, match="FLASHMOE_QASYNC"):
                gpu.configure({"FLASHMOE_QASYNC": bad})
    finally:
        gpu.configure()


def test_qint_stages_integers_for_launches_of_one_code_width():
    """FLASHMOE_QINT=1: a qmv, gate/up or (FMA form) down launch whose rows are all 4-bit (or all 8-bit) is built with
    QINT 4 (8) and its input's digits QDIG, 2 for bf16 activations and 3 for float32
    (FLASHMOE_QINT_DIGITS sets them); mixed widths, 2- and 3-bit codes and the tensor-core form
    keep the FMA form (QINT 0); auto (the default) takes it on CUDA, not on Metal; bad values are
    refused."""
    from llm_flashmoe.errors import FlashMoeError
    from llm_flashmoe.kernels import check, gpu

    def defines(backend, K, parts, dtype=mx.bfloat16, name="qmv"):
        launches = []
        kern = gpu.GpuKernels(backend)
        kern._make = recording(launches)
        if name == "qmv":
            kern.qmv(mx.zeros((1, K), dtype), [check.qlinear(n, K, bits, 64, dtype) for n, bits in parts])
        else:
            next(make for n, make, _ in check.CASES if n == name)("tiny", dtype)[0](kern)
        return launch_defines([l for l in launches if name in l[0]][0][2], "QINT", "QDIG")

    try:
        gpu.configure({"FLASHMOE_QINT": "1"})
        assert defines("cuda", 4096, [(12288, 4), (64, 4)]) == {"QINT": 4, "QDIG": 2}
        assert defines("cuda", 512, [(40, 8)], mx.float32) == {"QINT": 8, "QDIG": 3}
        assert defines("metal", 512, [(40, 4)])["QINT"] == 4   # 1: on any backend
        for parts in ([(64, 4), (64, 8)], [(64, 3)], [(64, 2)]):
            assert defines("cuda", 512, parts)["QINT"] == 0, parts
        for name in ("moe_gate_up", "moe_route_gate_up"):
            assert defines("cuda", 0, [], name=name) == {"QINT": 4, "QDIG": 2}
        assert defines("cuda", 0, [], name="moe_down")["QINT"] == 0   # its tensor-core form (FLASHMOE_MOE_MMA)
        gpu.configure({"FLASHMOE_QINT": "1", "FLASHMOE_MOE_MMA": "0"})
        assert defines("cuda", 0, [], name="moe_down") == {"QINT": 4, "QDIG": 2}
        gpu.configure({"FLASHMOE_QINT": "1", "FLASHMOE_QINT_DIGITS": "3"})
        assert defines("cuda", 512, [(40, 4)])["QDIG"] == 3
        gpu.configure({"FLASHMOE_QINT": "1", "FLASHMOE_QMV_MMA": "1"})
        assert defines("cuda", 512, [(40, 4)])["QINT"] == 0
        gpu.configure({"FLASHMOE_QINT": "auto"})
        assert defines("cuda", 512, [(40, 4)])["QINT"] == 4 and defines("metal", 512, [(40, 4)])["QINT"] == 0
        gpu.configure({"FLASHMOE_QINT": "0"})
        assert defines("cuda", 512, [(40, 4)])["QINT"] == 0
        gpu.configure({})
        assert defines("cuda", 512, [(40, 4)])["QINT"] == 4
        for var, bad in (("FLASHMOE_QINT", "2"), ("FLASHMOE_QINT_DIGITS", "4")):
            with pytest.raises(FlashMoeError, match=var):
                gpu.configure({var: bad})
    finally:
        gpu.configure()


def test_qint_launches_take_their_measured_shapes_unless_the_knobs_say_otherwise():
    """By default the launches that take QINT get the shapes measured fastest for them on the H200
    (gpu._qint_shape): qmv launches of 16384-65535 rows 8 rows a warp in groups of 256 threads, other
    qmv launches groups of 512 (8 rows a warp from 65536, in a grid of 2 groups a multiprocessor
    there; 2 rows below 16384), the MoE's gate/up groups of 512 in a grid of 2 groups a multiprocessor (the host has no CUDA runtime: 4 multiprocessors), the
    warps striding over the row groups; float32 launches (3 digits) 256 threads and no grid; FLASHMOE_QMV_ROWS, FLASHMOE_MV_THREADS and FLASHMOE_GRID=off
    override them; launches without QINT keep 256 threads and a warp per row group."""
    from llm_flashmoe.kernels import check, gpu

    def launch(K, N, name="qmv", backend="cuda", dtype=mx.bfloat16):
        launches = []
        kern = gpu.GpuKernels(backend)
        kern._make = recording(launches)
        if name == "qmv":
            kern.qmv(mx.zeros((1, K), dtype), [check.qlinear(N, K, 4, 64, dtype)])
        else:
            next(make for n, make, _ in check.CASES if n == name)("397b", dtype)[0](kern)
        (_, _, header, _, _, grid, group), = [l for l in launches if name in l[0]]
        return launch_defines(header, "QMV_R", "QMV_GW", "GU_GW"), grid[0] // group[0], group[0]

    try:
        gpu.configure({})
        d, blocks, threads = launch(64, 20608)
        assert (d["QMV_R"], threads) == (8, 256) and blocks == -(-20608 // 8 // 8) and d["QMV_GW"] == blocks * 8
        d, blocks, threads = launch(64, 65536)   # the head: a grid of 2 groups a multiprocessor too
        assert (d["QMV_R"], threads) == (8, 512) and blocks == 2 * 4 and d["QMV_GW"] == blocks * 16
        d, blocks, threads = launch(256, 4096)
        assert (d["QMV_R"], threads) == (2, 512) and d["QMV_GW"] == blocks * 16 == 4096 // 2
        d, blocks, threads = launch(0, 0, "moe_gate_up")
        assert threads == 512 and blocks == 2 * 4 and d["GU_GW"] == blocks * 16
        _, blocks, threads = launch(0, 0, "moe_gate_up", "metal")   # no QINT there
        assert threads == 256 and blocks > 8
        # float32 activations (3 digits): 256 threads (a norm_qmv's registers do not fit 512 there)
        d, blocks, threads = launch(256, 4096, dtype=mx.float32)
        assert (d["QMV_R"], threads) == (2, 256) and d["QMV_GW"] == blocks * 8 == 4096 // 2
        _, blocks, threads = launch(0, 0, "moe_gate_up", dtype=mx.float32)
        assert threads == 256 and blocks > 8
        gpu.configure({"FLASHMOE_QMV_ROWS": "4", "FLASHMOE_MV_THREADS": "128", "FLASHMOE_GRID": "off"})
        d, blocks, threads = launch(64, 20608)
        assert (d["QMV_R"], threads) == (4, 128)
        d, blocks, threads = launch(0, 0, "moe_gate_up")
        assert threads == 128 and d["GU_GW"] == blocks * 4 and blocks > 8
        gpu.configure({"FLASHMOE_QINT": "0"})
        d, blocks, threads = launch(64, 20608)
        assert (d["QMV_R"], threads) == (4, 256)
        d, blocks, threads = launch(256, 4096)
        assert (d["QMV_R"], threads) == (2, 256)
    finally:
        gpu.configure()


def test_qint_kernels_run_on_the_host_match_the_twins(tmp_path):
    """The integer staging's numerics, run: the CUDA sources of qmv (8-bit) and norm_qmv with the
    residual add (4-bit, whose staging writes each chunk's digits over the norm's first pass) under
    FLASHMOE_QINT=1, compiled with g++ and run a thread per lane (kernels.emulate), against the
    float32 twins: within float32's accuracy at 3 digits, within 1.5e-5 of a chunk's largest input
    per input at 2 (so well inside the bf16 bound), and not the FMA form's launch."""
    from llm_flashmoe.kernels import check, emulate, gpu

    K = 256
    x, xa = (check.rnd((1, K), mx.float32, 2.0) for _ in range(2))
    nw = 1.0 + check.rnd((K,), mx.float32, 0.1)
    lin8, lin4 = check.qlinear(24, K, 8, 64, mx.float32), check.qlinear(40, K, 4, 32, mx.float32)
    want8 = plain.qmv(x, [lin8])[0]
    (want4,), h_want, n_want = plain.compose_norm_qmv(plain.qmv, plain.rms_norm, plain.add_rms_norm)(
        x, xa, nw, 1e-6, [lin4])
    errs = {}
    try:
        for digits in ("3", "2"):
            gpu.configure({"FLASHMOE_QINT": "1", "FLASHMOE_QINT_DIGITS": digits})
            launches = []
            kern = headers_of(emulate.emulated_kernels(tmp_path), launches)
            got8 = kern.qmv(x, [lin8])[0]
            (got4,), h, n = kern.norm_qmv(x, xa, nw, 1e-6, [lin4])
            assert [launch_defines(hd, "QINT")["QINT"] for hd in launches] == [8, 4]
            np.testing.assert_allclose(np.array(h), np.array(h_want), rtol=1e-6)   # the add, as the twin's
            errs[digits] = [check.rel_err(got8, want8), check.rel_err(got4, want4)]
    finally:
        gpu.configure()
    assert max(errs["3"]) < 1e-5, errs
    assert max(errs["2"]) < 5e-4, errs
    assert max(errs["2"]) > max(errs["3"]), errs   # two digits do round the inputs


def test_moe_down_fma_form_strides_its_warps_over_the_rows_of_a_smaller_grid(tmp_path):
    """moe_down's FMA form (FLASHMOE_MOE_MMA without down) under FLASHMOE_GRID_BLOCKS: one thread
    group whose warps take the output rows in turn (DOWN_GW, the grid's warps), the input staged
    once; run on the host (kernels.emulate), with and without FLASHMOE_QINT, it matches the float32
    twin, and its launch is the one group asked for."""
    from llm_flashmoe.kernels import check, emulate, gpu

    try:
        for qint in ("1", "0"):
            gpu.configure({"FLASHMOE_MOE_MMA": "0", "FLASHMOE_GRID_BLOCKS": "1", "FLASHMOE_QINT": qint})
            launches = []
            kern = headers_of(emulate.emulated_kernels(tmp_path), launches)
            f, _, t32 = check.case_moe_down("tiny", mx.float32)
            got = f(kern)
            (header,) = launches
            assert f"#define QINT {4 if qint == '1' else 0}\n" in header
            assert f"#define DOWN_GW {gpu.mv_threads() // 32}\n" in header   # one group's warps for 256 rows
            assert check.rel_err(got, t32()) < 1e-5
    finally:
        gpu.configure()


def emulated_launch(tmp_path, env: dict, call):
    """call(kernels) on the host emulator's CUDA kernels under the launch knobs `env` (gpu.configure)
    -> (its output, its one launch: kernels.emulate's _Launch, with what it prefetched)."""
    from llm_flashmoe.kernels import emulate, gpu

    gpu.configure(env)
    kern = emulate.emulated_kernels(tmp_path)
    made = []
    make = kern._make
    kern._make = lambda **kw: made.append(make(**kw)) or made[-1]
    out = call(kern)
    (launch,) = made
    return out, launch


def test_gate_up_launch_asks_for_moe_downs_rows_ahead(tmp_path):
    """FLASHMOE_DOWN_PF=1: moe_route_gate_up, given moe_down's stacks (`then`), asks for exactly the
    chosen experts' down rows (codes, scales, biases) and the shared expert's into L2, every line
    of them once its launch knows the experts, and nothing outside its buffers (kernels.emulate
    checks each address); its outputs are those of the launch without it, bit for bit. Off by
    default, and without `then` (or on Metal) the launch is the plain one."""
    from llm_flashmoe.kernels import check, gpu

    d = check.moe_inputs("tiny", mx.bfloat16)
    E, K = d["E"], d["K"]
    logits = check.rnd((E,), mx.float32, 3.0)
    args = (logits, K, True, None, d["x"], d["gate"], d["up"], d["sg"], d["su"])
    then = (d["down"], d["sd"])
    try:
        outs, launches = {}, {}
        for pf in ("0", "1"):
            outs[pf], launches[pf] = emulated_launch(tmp_path, {"FLASHMOE_DOWN_PF": pf},
                                                     lambda k: k.moe_route_gate_up(*args, then=then))
        assert launches["0"].spec[1] == launches["1"].spec[1][:-6]
        assert launches["1"].spec[1][-6:] == ["pdw", "pds", "pdb", "psdw", "psds", "psdb"]
        assert not launches["0"].prefetched
        for a, b in zip(outs["0"], outs["1"]):
            assert mx.array_equal(a, b)
        rows = sorted(np.array(outs["1"][2]).tolist())
        assert len(set(rows)) == K
        got = launches["1"].prefetched

        def lines(nbytes, starts):
            return {s + o for s in starts for o in range(0, nbytes, 128)}

        for name, a in (("pdw", d["down"].weight), ("pds", d["down"].scales), ("pdb", d["down"].biases)):
            per = a.nbytes // E
            assert got[name] == lines(per, [r * per for r in rows]), name
        for name, a in (("psdw", d["sd"].weight), ("psds", d["sd"].scales), ("psdb", d["sd"].biases)):
            assert got[name] == lines(a.nbytes, [0]), name
        assert set(got) == {"pdw", "pds", "pdb", "psdw", "psds", "psdb"}
        # without `then`, or on Metal: the plain launch
        gpu.configure({"FLASHMOE_DOWN_PF": "1"})
        for backend, given in (("cuda", None), ("metal", then)):
            recorded = []
            k = gpu.GpuKernels(backend)
            k._make = recording(recorded)
            k.moe_route_gate_up(*args, then=given)
            (launch,) = recorded
            assert "pdw" not in launch[1] and "#define DOWN_PF 1" not in launch[2]
    finally:
        gpu.configure()
    assert gpu.DOWN_PF == 0


def test_launches_before_an_output_projection_ask_for_the_next_matrices_ahead(tmp_path):
    """FLASHMOE_NEXT_PF=1: gdn_step and decode_attention, given the matrices the next launches read
    (`then`: the output projection, the router), ask for every line of their codes, scales and
    biases into L2, dealt out over their warps (more slices than warps here), nothing outside their
    buffers (the host emulator checks each address), and their outputs are those without it, bit
    for bit. Off by default; on Metal, or without `then`, the launch is the plain one."""
    from llm_flashmoe.kernels import check, gpu

    nxt = [check.qlinear(1500, 512, 4, 32, mx.float32), check.qlinear(40, 512, 8, 64, mx.float32)]   # 140 + 6 slices
    cases = {name: check.case_args(make, "odd", mx.float32)
             for name, make in (("gdn_step", check.case_gdn), ("decode_attention", check.case_attention))}
    parts = [a for lin in nxt for a in (lin.weight, lin.scales, lin.biases)]
    want = {f"npf{i}": set(range(0, a.nbytes, 128)) for i, a in enumerate(parts)}
    try:
        for name, args in cases.items():
            outs, launches = {}, {}
            for pf in ("0", "1"):
                out, launches[pf] = emulated_launch(tmp_path, {"FLASHMOE_NEXT_PF": pf},
                                                    lambda k: getattr(k, name)(*args, then=nxt))
                outs[pf] = list(out) if isinstance(out, (tuple, list)) else [out]
            assert all(mx.array_equal(a, b) for a, b in zip(outs["0"], outs["1"])), name
            assert not launches["0"].prefetched and launches["1"].prefetched == want, name
            assert launches["1"].spec[1][-6:] == [f"npf{i}" for i in range(6)]
            for backend, given in (("cuda", None), ("metal", nxt)):
                recorded = []
                k = gpu.GpuKernels(backend)
                k._make = recording(recorded)
                getattr(k, name)(*args, then=given)
                assert "npf0" not in recorded[0][1] and "#define NPF 6" not in recorded[0][2], (name, backend)
    finally:
        gpu.configure()
    assert gpu.NEXT_PF == 0


def test_qmv_mma_switch_takes_4bit_bf16_launches_through_tensor_core_products():
    """FLASHMOE_QMV_MMA=1: a qmv launch whose slots are all 4-bit with groups of 64 or 128 on bf16
    activations is built with QMV_MMA 1 and a thread group per 16 rows, on CUDA and on Metal (its
    shuffle path); float32 activations, 3-bit or 8-bit slots and groups of 32 keep the FMA form, as does the
    default (0); FLASHMOE_MOE_MMA does the same for the MoE's gate/up and down (a thread group per
    16 rows of moe_down's output), by default moe_down's alone and on CUDA alone; a bad value is refused."""
    from llm_flashmoe.errors import FlashMoeError
    from llm_flashmoe.kernels import check, gpu

    launches = []
    record = recording(launches)

    def built(backend, dtype, bits=4, gs=64, n=(40, 1)):
        launches.clear()
        kern = gpu.GpuKernels(backend)
        kern._make = record
        lins = [check.qlinear(r, 128, bits, gs, dtype) for r in n]
        kern.qmv(mx.zeros((1, 128), dtype), lins)
        (_, _, header, body, _, grid, group), = launches
        mma = "#define QMV_MMA 1" in header
        assert mma == ("#define QMV_R 16\n" in header) and (mma or "#define QMV_MMA 0\n" in header)
        return mma, grid[0] // group[0]

    try:
        gpu.configure({})
        assert not built("cuda", mx.bfloat16)[0] and not built("metal", mx.bfloat16)[0]
        gpu.configure({"FLASHMOE_QMV_MMA": "1"})
        # a thread group per 16 rows of a slot (its warps split the inputs): 40 + 1 rows, 3 + 1 groups
        assert built("cuda", mx.bfloat16) == (True, 4)
        assert built("cuda", mx.bfloat16, gs=128)[0]
        assert built("cuda", mx.bfloat16, n=(4096,)) == (True, 4096 // 16)
        assert not built("cuda", mx.float32)[0]
        assert not built("cuda", mx.bfloat16, bits=3)[0] and not built("cuda", mx.bfloat16, bits=8)[0]
        assert not built("cuda", mx.bfloat16, gs=32)[0]
        assert built("metal", mx.bfloat16)[0] and not built("metal", mx.float32)[0]
        gpu.configure({"FLASHMOE_QMV_MMA": "0"})
        assert not built("cuda", mx.bfloat16)[0]
        for name in ("FLASHMOE_QMV_MMA", "FLASHMOE_MOE_MMA", "FLASHMOE_QPIPE"):
            with pytest.raises(FlashMoeError, match=name):
                gpu.configure({name: "maybe"})
        # the MoE: GU_MMA with 16 rows per warp for the gate/up, DOWN_MMA with a thread group per 16
        # output rows for moe_down; auto (the default): moe_down alone on CUDA, neither on Metal
        d = check.moe_inputs("tiny", mx.bfloat16)
        for setting, backend, gu_on, down_on in (({}, "cuda", False, True), ({}, "metal", False, False),
                                                 ({"FLASHMOE_MOE_MMA": "auto"}, "cuda", False, True),
                                                 ({"FLASHMOE_MOE_MMA": "1"}, "cuda", True, True),
                                                 ({"FLASHMOE_MOE_MMA": "1"}, "metal", True, True),
                                                 ({"FLASHMOE_MOE_MMA": "gateup"}, "cuda", True, False),
                                                 ({"FLASHMOE_MOE_MMA": "down"}, "cuda", False, True),
                                                 ({"FLASHMOE_MOE_MMA": "0"}, "cuda", False, False)):
            gpu.configure(setting)
            launches.clear()
            kern = gpu.GpuKernels(backend)
            kern._make = record
            kern.moe_gate_up(d["x"], d["rows"], d["gate"], d["up"], d["sg"], d["su"])
            I, Is = d["gate"].weight.shape[1], d["sg"].out_features
            kern.moe_down(mx.zeros((d["K"], I), mx.bfloat16), d["rows"], d["w"], d["down"], mx.zeros((Is,), mx.bfloat16),
                          d["sd"], mx.zeros((1,), mx.bfloat16), d["res"])
            (_, _, gu, _, _, _, _), (_, _, down, _, _, grid, group) = launches
            assert ("#define GU_MMA 1\n" in gu) == gu_on == ("#define GU_R 16\n" in gu), (setting, backend)
            assert ("#define DOWN_MMA 1\n" in down) == down_on, (setting, backend)
            assert grid[0] // group[0] == (256 // 16 if down_on else 256 // (gpu.mv_threads() // 32))   # tiny: H 256
    finally:
        gpu.configure()
    # the dialects: CUDA's tensor-core product where the GPU has one, Metal's none (its shuffle path)
    cuda, metal = source.dialect("cuda")["header"], source.dialect("metal")["header"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in cuda and "#define HAS_MMA 0" in metal


def test_gdn_step_matches_numpy():
    Hk, Hv, Dk, Dv, Kc = 2, 4, 32, 16, 4
    C = 2 * Hk * Dk + Hv * Dv
    f = lambda *s: RNG.normal(size=s).astype(np.float32)  # noqa: E731
    qkv, z, b, a, cs, cw = f(C), f(Hv * Dv), f(Hv), f(Hv), f(1, Kc - 1, C), f(C, Kc) * 0.5
    A, dt, nw, S = -np.exp(f(Hv) * 0.5), f(Hv), 1 + 0.1 * f(Dv), f(1, Hv, Dv, Dk) * 0.1
    o, cs2, S2 = plain.gdn_step(*(mx.array(t) for t in (qkv, z, b, a, cs, cw, A, dt, nw, S)), Hk, Dk, 1e-6)

    conv_in = np.concatenate([cs[0], qkv[None]], 0)
    y = (conv_in * cw.T).sum(0)
    y = y * sigmoid(y)
    q, k, v = y[: Hk * Dk].reshape(Hk, Dk), y[Hk * Dk: 2 * Hk * Dk].reshape(Hk, Dk), y[2 * Hk * Dk:].reshape(Hv, Dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk ** -0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    decay = np.exp(A * np.logaddexp(a + dt, 0))
    beta = sigmoid(b)
    St = S[0].copy()
    out = np.zeros((Hv, Dv), np.float32)
    for h in range(Hv):
        hk = h // (Hv // Hk)
        St[h] *= decay[h]
        delta = (v[h] - St[h] @ k[hk]) * beta[h]
        St[h] += np.outer(delta, k[hk])
        oh = St[h] @ q[hk]
        zz = z.reshape(Hv, Dv)[h]
        out[h] = rmsnorm(oh, nw) * zz * sigmoid(zz)
    close(o, out.reshape(-1), 1e-4)
    close(cs2, conv_in[None, 1:])
    close(S2, St[None], 1e-4)


def test_add_rms_norm_matches_numpy():
    x, y, w = RNG.normal(size=(3, 40)), RNG.normal(size=(3, 40)), 1 + 0.1 * RNG.normal(size=40)
    h, n = plain.add_rms_norm(*(mx.array(t.astype(np.float32)) for t in (x, y, w)), 1e-6)
    close(h, x + y)
    close(n, rmsnorm(x + y, w))


# -- sources ---------------------------------------------------------------

@pytest.mark.parametrize("kernel", sorted(source.KERNELS))
def test_metal_and_cuda_differ_only_in_the_dialect(kernel):
    defines = {"KDIM": 64, "NSLOT": 1}
    gen = {b: source.render(kernel, b, defines) for b in source.BACKENDS}
    stripped = set()
    for b, (header, body) in gen.items():
        d = source.dialect(b)
        assert header.startswith(d["header"]) and body.startswith(d["prologue"])
        rest = header[len(d["header"]):]
        if "bounds" in d:   # CUDA's launch bounds, after the kernel's own #defines
            assert d["bounds"] in rest and rest.index(d["bounds"]) >= len(source.defines_text(defines))
            rest = rest.replace(d["bounds"], "", 1)
        stripped.add((rest, body[len(d["prologue"]):]))
        assert "kernel " + kernel in source.family(source.KERNELS[kernel])
        assert "//@part" not in body   # shared parts expanded
    assert len(stripped) == 1
    # the shared part uses only dialect names for what differs between backends
    shared = "".join(next(iter(stripped)))
    for word in ("__syncthreads", "threadgroup_barrier", "__shared__", "__shfl", "simd_", "blockIdx",
                 "threadIdx", "thread_position", "__device__", "metal::"):
        assert word not in shared, word


def test_generated_sources_declare_what_mlx_needs():
    _, body = source.render("qmv", "metal", {})
    assert "threadgroup_position_in_grid" in body and "thread_position_in_threadgroup" in body
    _, body = source.render("qmv", "cuda", {})
    assert "blockIdx" in body and "threadIdx" in body
    assert re.search(r"#define K 3\b", source.render("qmv", "cuda", {"K": 3})[0])


# -- dispatch and engine ----------------------------------------------------

def test_dispatch_plain_on_cpu_and_off(monkeypatch):
    monkeypatch.setenv("FLASHMOE_KERNELS", "auto")
    o = kernels.ops()                                # CPU: native kernels if they build, else plain
    assert o is None or o.backend == "cpu"
    monkeypatch.setenv("FLASHMOE_KERNELS", "off")
    assert kernels.ops() is None
    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    assert kernels.ops().backend == "twin"


def test_partial_backend_falls_back_to_twins():
    calls = []
    kernels.register_backend("test-cpu", lambda: {"add_rms_norm": lambda *a: calls.append(1) or plain.add_rms_norm(*a)})
    o = kernels.ops("test-cpu")
    assert o.qmv is plain.qmv
    o.add_rms_norm(mx.ones((1, 4)), mx.ones((1, 4)), mx.ones((4,)), 1e-6)
    assert calls == [1]


@pytest.mark.parametrize("fuse_input_norm", ["0", "1"])
def test_engine_decode_through_twins_matches_plain(tmp_path, monkeypatch, fuse_input_norm):
    """One token through the fused ops' twins: the router's add+norm always in its matvec's launch
    (norm_qmv with a residual), the input norm there only with FLASHMOE_FUSE_INPUT_NORM=1."""
    from dataclasses import replace

    from llm_flashmoe import synth
    from llm_flashmoe.engine.load import load_model
    from llm_flashmoe.kernels.decode_bench import compare

    monkeypatch.setenv("FLASHMOE_FUSE_INPUT_NORM", fuse_input_norm)
    monkeypatch.setattr(synth, "_write_tokenizer", lambda d: None)
    synth.write_synthetic(tmp_path / "m", preset="tiny", layout="mlx", layers=4)
    model = load_model(tmp_path / "m", dtype=mx.float32)
    calls = []
    twin = kernels.ops("twin")
    ops = replace(twin, norm_qmv=lambda x, xa, *a: calls.append(xa is not None) or twin.norm_qmv(x, xa, *a))
    err, top1 = compare(model, ops, [3, 1, 4, 1, 5], 4)
    assert err < 1e-4 and top1 == 1.0
    layers, steps = len(model.layers), 4
    assert calls.count(True) == layers * steps
    assert calls.count(False) == (layers * steps if fuse_input_norm == "1" else 0)


def test_compiled_decode_steps_match_the_uncompiled_ones(tmp_path, monkeypatch):
    """FLASHMOE_COMPILE: each layer's decode step as one compiled graph (GatedDeltaNet layers
    whole; the MoE after attention), the same logits as building it op by op, also after K
    changes (a new graph, not the old one with K baked in)."""
    from llm_flashmoe import synth
    from llm_flashmoe.engine.load import load_model
    from llm_flashmoe.kernels.decode_bench import with_ops

    monkeypatch.setattr(synth, "_write_tokenizer", lambda d: None)
    synth.write_synthetic(tmp_path / "m", preset="tiny", layout="mlx", layers=4)
    model = load_model(tmp_path / "m", dtype=mx.float32)
    twin = kernels.ops("twin")

    def run(compile, k):
        with_ops(model, twin, compile)
        model.set_experts_per_token(k)
        cache = model.make_cache()
        outs = [model([3, 1, 4, 1, 5], cache, last_only=True)]
        for t in (9, 2, 6, 5):
            outs.append(model([t], cache, last_only=True))
        return [np.array(o) for o in outs]

    for k in (model.cfg.num_experts_per_tok, 1):
        ref, got = run(False, k), run(True, k)
        assert all(np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(ref, got))
    kinds = [sorted({key[0] for key in layer._compiled}) for layer in model.layers]
    assert kinds == [["layer"] if layer.is_linear else ["attn"] for layer in model.layers]
    assert {key[2] for layer in model.layers for key in layer._compiled} == {model.cfg.num_experts_per_tok, 1}
    monkeypatch.setenv("FLASHMOE_COMPILE", "1")
    from llm_flashmoe.engine.compiled import compile_default
    assert compile_default(twin) and not compile_default(None)
    monkeypatch.setenv("FLASHMOE_COMPILE", "auto")
    assert not compile_default(twin) and compile_default(kernels.Ops("cuda", *[None] * len(kernels.OP_NAMES)))


def test_kernel_sources_ship_with_the_package():
    """The sources are found inside the package (so a regular install works) and
    pyproject's package data names every file the generator reads."""
    import tomllib
    from pathlib import Path

    pkg = Path(kernels.__file__).parent.parent
    assert source.KERNEL_DIR.parent == Path(source.__file__).parent
    needed = [source.KERNEL_DIR / f"{fam}.kern" for fam in {*source.KERNELS.values(), "common"}]
    needed += [source.KERNEL_DIR / "dialect" / f"{b}.h" for b in source.BACKENDS]
    assert all(p.is_file() for p in needed)
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llm_flashmoe"]
    shipped = {p for pat in patterns for p in pkg.glob(pat)}
    assert set(needed) <= shipped


def test_bf16_tolerance_check_through_twins(tmp_path, monkeypatch):
    """The acceptance-4 check on CPU: twins in bf16 against plain float32 on the same weights."""
    from llm_flashmoe import synth
    from llm_flashmoe.engine.load import load_model
    from llm_flashmoe.kernels import decode_bench
    from llm_flashmoe.kernels.decode_bench import tolerance_check

    monkeypatch.setattr(synth, "_write_tokenizer", lambda d: None)
    synth.write_synthetic(tmp_path / "m", preset="tiny", layout="mlx", layers=4)
    ref = load_model(tmp_path / "m", dtype=mx.float32)
    model = load_model(tmp_path / "m", dtype=mx.bfloat16)
    (r,) = tolerance_check(ref, model, kernels.ops("twin"), [3, 1, 4, 1, 5], 2, layers=(1,))
    p, f = r["plain"], r["fused"]
    assert r["layers"] == 1 and 1e-4 < p["rel"] < 0.3            # bf16 really rounds, and not wildly
    # the twins regroup the same bf16 ops: the same size of error (a few steps are noisy)
    assert f["rel"] < 3 * p["rel"] and 0 < p["top1"] <= 1
    assert r["ok"] == (f["rel"] <= max(decode_bench.TOLERANCE_RATIO * p["rel"], decode_bench.TOLERANCE_FLOOR))
    # float32 against itself: no error, passes on the floor
    (r,) = tolerance_check(ref, ref, kernels.ops("twin"), [3, 1, 4], 2, layers=(1,))
    assert r["ok"] and r["plain"]["rel"] == 0 and r["fused"]["rel"] < 1e-5


def test_check_judges_lone_outputs_against_the_plain_twins_own_error():
    """kernels.check.judge: every output must be within the dtype's bound, except that an output of
    at most SMALL values may instead be within PLAIN_FACTOR times the plain twin's own error, or
    within the bound against the call's largest reference value (a lone value near 0); a larger
    output gets no such leeway, and no plain run means the bound."""
    from llm_flashmoe.kernels import check

    bf = mx.bfloat16
    ref_big, ref_one = mx.ones((64,)) * 0.01, mx.array([0.01])   # the call's largest value 0.01

    def off(a, e):   # a with a relative error of e
        return a + e * mx.abs(a).max()

    def ok(got, plain):
        return check.judge(got, [ref_big, ref_one], plain, bf)[2]

    big_fine = off(ref_big, 1e-3)
    assert ok([big_fine, off(ref_one, 1e-3)], [ref_big, ref_one])
    assert not ok([big_fine, off(ref_one, 0.5)], [ref_big, off(ref_one, 0.1)])    # 0.5 > 1.5 * 0.1
    assert ok([big_fine, off(ref_one, 0.12)], [ref_big, off(ref_one, 0.1)])       # lone, within 1.5x
    assert not ok([off(ref_big, 0.05), off(ref_one, 1e-3)], [off(ref_big, 0.1), ref_one])   # big: the bound
    assert not check.judge([big_fine, off(ref_one, 0.12)], [ref_big, ref_one], None, bf)[2]
    # against the call's largest value, here 1.0: 0.5 of 0.01 is 0.005, within 2e-2 of it; 3.0 of 0.01 is not
    one = mx.ones((64,))
    assert check.judge([off(one, 1e-3), off(ref_one, 0.5)], [one, ref_one], None, bf)[2]
    assert not check.judge([off(one, 1e-3), off(ref_one, 3.0)], [one, ref_one], [one, ref_one], bf)[2]
    err, perr, _ = check.judge([big_fine, off(ref_one, 0.12)], [ref_big, ref_one], [ref_big, off(ref_one, 0.1)], bf)
    assert abs(err - 0.12) < 1e-3 and abs(perr - 0.1) < 1e-3


def test_check_cases_run_through_the_twins_against_their_float32_copies():
    """`kernels.check` on CPU, twins standing in for the kernels: every case gives (fused, twin,
    twin on float32 copies); a twin equals itself, and the float32 copy is a close reference."""
    from llm_flashmoe.kernels import check, plain

    seen = set()
    for name, make, labels in check.CASES:
        if name == "MoE block":
            continue   # (its 397b expert stacks are large; the parts are covered one by one)
        label = "odd" if "odd" in labels else labels[-1]
        f, t, t32 = make(label, mx.bfloat16)
        got, ref = f(plain), t32()
        assert check.rel_err(got, t()) == 0.0
        err = check.rel_err(got, ref)
        assert 0.0 <= err < 0.1, (name, err)                   # bf16 rounding, not a wrong reference
        assert all(a.dtype == mx.float32 for a in check._flat(ref) if mx.issubdtype(a.dtype, mx.floating))
        f, t, t32 = make(label, mx.float32)
        assert check.rel_err(f(plain), t32()) == 0.0           # float32: the copy is the same computation
        seen.add(name)
    assert {n for n, _, _ in check.CASES} - seen == {"MoE block"}


def test_check_moe_block_draws_a_token_whose_routing_bf16_cannot_flip():
    """The MoE block case routes on bf16 logits against a float32 reference: its token is drawn
    again until the K-th/(K+1)-th float32 logit gap clears ROUTE_MARGIN, so that the plain bf16 path
    picks the reference's experts and the block's error is rounding, not a different expert."""
    from llm_flashmoe.kernels import check, plain

    mx.random.seed(13)
    np.random.seed(13)
    d = check.moe_inputs("odd", mx.bfloat16)
    gaps = []
    for _ in range(100):
        d["x"] = check.rnd(d["x"].shape, mx.bfloat16)
        gaps.append(check.route_gap(d))
    assert min(gaps) < check.ROUTE_MARGIN <= max(gaps)    # the margin does reject some tokens
    for _ in range(20):
        d = check.moe_block_inputs("odd", mx.bfloat16)
        assert check.route_gap(d) >= check.ROUTE_MARGIN
        logits = [plain.qmv(x.reshape(1, -1), [r])[0] for x, r in ((d["x"], d["router"]),
                                                                   check.up32([d["x"], d["router"]]))]
        ids = [set(np.array(plain.moe_route(lg, d["K"], True)[0]).tolist()) for lg in logits]
        assert ids[0] == ids[1]
        f, t, t32 = (lambda: check.moe_block(plain, d, True), lambda: check.moe_block(plain, d, False),
                     lambda: check.moe_block(plain, check.up32(d), False))
        assert check.rel_err(f(), t32()) < 0.05 and check.rel_err(t(), t32()) < 0.05


def test_compile_check_renders_every_kernel_and_the_addressed_mode():
    """`kernels.compile_check` drives the CUDA launchers on CPU: a translation unit for every kernel
    (each with its defines and MLX's signature), the MoE kernels also in ADDRESSED mode."""
    from llm_flashmoe.kernels import compile_check

    units = compile_check.render_all()
    names = {n.rsplit("_", 1)[0][len("fm_"):] for n in units}
    assert names == set(source.KERNELS)
    addressed = [n for n, text in units.items() if "#define ADDRESSED 1" in text]
    # the tensor-core variants too (FLASHMOE_QMV_MMA, FLASHMOE_MOE_MMA): qmv's and the MoE's
    mma = {n.rsplit("_", 1)[0] for n, text in units.items()
           if any(f"#define {d} 1\n" in text for d in ("QMV_MMA", "GU_MMA", "DOWN_MMA"))}
    assert mma == {"fm_qmv", "fm_moe_gate_up", "fm_moe_route_gate_up", "fm_moe_down"}
    assert {n.rsplit("_", 1)[0] for n in addressed} == {"fm_moe_route_gate_up", "fm_moe_gate_up", "fm_moe_down"}
    for text in units.values():
        assert '#include "shim.h"' in text and "template void fm_" in text and "//@part" not in text
    cuda = compile_check.render_all(nvcc=True)
    assert set(cuda) == set(units)
    assert all("#include <cuda_bf16.h>" in t and f"template __global__ void {n}<" in t for n, t in cuda.items())


def test_launch_knobs_reach_the_kernels_and_bad_ones_are_refused():
    """FLASHMOE_GDN_ROWS becomes gdn_step's GROWS define, FLASHMOE_XV_INNER and FLASHMOE_L2_PREFETCH
    the matvecs' XV_INNER and L2PF (L2PF=down: moe_down's alone); FLASHMOE_FUSE_ROUTE=0 routes in a launch of its own;
    FLASHMOE_MV_THREADS and FLASHMOE_GDN_THREADS must be multiples of 32 from 64 to 1024 (the error
    names the variable), and the latter is gdn_step's thread group."""
    from llm_flashmoe.errors import FlashMoeError
    from llm_flashmoe.kernels import compile_check, gpu

    try:
        gpu.configure({"FLASHMOE_GDN_ROWS": "3", "FLASHMOE_MV_THREADS": "128", "FLASHMOE_XV_INNER": "0",
                       "FLASHMOE_L2_PREFETCH": "1", "FLASHMOE_FUSE_ROUTE": "0", "FLASHMOE_QMV_WORDS": "8",
                       "FLASHMOE_QPIPE": "1"})
        assert (gpu.GDN_ROWS, gpu.MV_THREADS, gpu.XV_INNER, gpu.QWORDS, gpu.QPIPE) == (3, 128, 0, 8, 1)
        units = compile_check.render_all()
        gdn = [t for n, t in units.items() if n.startswith("fm_gdn_step_")]
        assert gdn and all("#define GROWS 3" in t for t in gdn)
        mv = [t for n, t in units.items() if n.startswith(("fm_qmv_", "fm_moe_gate_up_", "fm_moe_down_"))]
        assert mv and all("#define XV_INNER 0" in t and "#define L2PF 1" in t and "#define QWORDS 8" in t
                          and "#define QPIPE 1" in t for t in mv)
        # the routing in a launch of its own: moe_route and moe_gate_up, no fused launch
        assert not any(n.startswith("fm_moe_route_gate_up_") for n in units)
        assert any(n.startswith("fm_moe_route_") and not n.startswith("fm_moe_route_gate_up_") for n in units)
        # FLASHMOE_L2_PREFETCH=down: moe_down alone asks for its rows ahead
        gpu.configure({"FLASHMOE_L2_PREFETCH": "down"})
        units = compile_check.render_all()
        down = [t for n, t in units.items() if n.startswith("fm_moe_down_")]
        rest = [t for n, t in units.items() if n.startswith(("fm_qmv_", "fm_moe_gate_up_", "fm_moe_route_gate_up_"))]
        assert down and rest and all("#define L2PF 1" in t for t in down) and all("#define L2PF 0" in t for t in rest)
        with pytest.raises(FlashMoeError, match="FLASHMOE_L2_PREFETCH=2"):
            gpu.configure({"FLASHMOE_L2_PREFETCH": "2"})
        gpu.configure({"FLASHMOE_MOE_ROWS": "2:4"})      # ':' as well as ',' (gpu_session's sweeps)
        assert (gpu.MOE_GU_ROWS, gpu.MOE_DOWN_ROWS) == (2, 4)
        for bad in ("4", "0,1", "a,b"):
            with pytest.raises(FlashMoeError, match="FLASHMOE_MOE_ROWS"):
                gpu.configure({"FLASHMOE_MOE_ROWS": bad})
        for bad in ("100", "32", "2048"):
            with pytest.raises(FlashMoeError, match="FLASHMOE_MV_THREADS"):
                gpu.configure({"FLASHMOE_MV_THREADS": bad})
            with pytest.raises(FlashMoeError, match="FLASHMOE_GDN_THREADS"):
                gpu.configure({"FLASHMOE_GDN_THREADS": bad})
        # FLASHMOE_GDN_THREADS: gdn_step's thread group per value head
        from llm_flashmoe.kernels import check

        gdn_case = next(make for name, make, _ in check.CASES if name == "gdn_step")
        heads = set()
        # (auto: 512 on CUDA, 256 on Metal)
        for setting, backend, threads in (("256", "cuda", 256), ("512", "cuda", 512), ("auto", "cuda", 512),
                                          ("auto", "metal", 256)):
            gpu.configure({"FLASHMOE_GDN_THREADS": setting})
            launches = []
            kernels = gpu.GpuKernels(backend)
            kernels._make = recording(launches)
            gdn_case("tiny", mx.float32)[0](kernels)
            (name, _, _, _, _, grid, group), = launches            # one thread group of `threads` per value head
            assert name.startswith("fm_gdn_step_") and group == (threads, 1, 1) and grid[0] % threads == 0
            heads.add(grid[0] // threads)
        assert len(heads) == 1 and heads.pop() > 1
    finally:
        gpu.configure()
    assert (gpu.GDN_ROWS, gpu.GDN_THREADS, gpu.MV_THREADS, gpu.XV_INNER, gpu.L2PF, gpu.L2PF_DOWN, gpu.FUSE_ROUTE,
            gpu.QWORDS, gpu.QPIPE, gpu.MOE_MMA, gpu.QINT, gpu.GRID_PER_SM) == (8, None, None, 1, 0, False, True, 16, 0,
                                                                               None, None, None)


def test_settings_set_the_engine_read_knobs_in_the_environment(monkeypatch):
    """`overhead settings`: a setting's engine-read knob (fusenorm) is put in the environment while
    it runs and taken out for the next setting; kernel knobs go to the kernel module."""
    from llm_flashmoe.engine.qwen35 import _fuse_input_norm
    from llm_flashmoe.kernels import gpu, sweeps

    monkeypatch.delenv("FLASHMOE_FUSE_INPUT_NORM", raising=False)
    try:
        sweeps.apply_setting(sweeps.parse_setting("fusenorm=0 gdnrows=2 qmma=1 moemma=1 kvinplace=1 qpipe=1"),
                             "twin")
        assert not _fuse_input_norm() and gpu.GDN_ROWS == 2
        assert (gpu.QMV_MMA, gpu.MOE_MMA, gpu.KV_INPLACE, gpu.QPIPE) == (1, {"gateup", "down"}, 1, 1)
        sweeps.apply_setting(sweeps.parse_setting("moemma=down"), "twin")
        assert gpu.MOE_MMA == {"down"}
        sweeps.apply_setting(sweeps.parse_setting("-"), "twin")
        assert _fuse_input_norm() and gpu.GDN_ROWS == 8 and "FLASHMOE_FUSE_INPUT_NORM" not in os.environ
        assert (gpu.QMV_MMA, gpu.MOE_MMA, gpu.KV_INPLACE, gpu.QPIPE) == (0, None, None, 0)
    finally:
        gpu.configure()
    with pytest.raises(SystemExit, match="fusenorm"):
        sweeps.parse_setting("fusenorm")


def test_ncu_summary_per_kernel(tmp_path, capsys):
    """`overhead ncu`: the raw duration metric is preferred over the section's Duration (not counted
    twice), values with thousands separators are read, section figures and stall reasons are
    averaged per kernel."""
    from llm_flashmoe.kernels import ncu

    head = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = [
        ("0", "qmv_a", "GPU Speed Of Light Throughput", "Duration", "usecond", "40.0"),
        ("0", "qmv_a", "Command line profiler metrics", "gpu__time_duration.sum", "nsecond", "41,000"),
        ("0", "qmv_a", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "20"),
        ("0", "qmv_a", "Command line profiler metrics",
         "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "3.0"),
        ("1", "qmv_a", "Command line profiler metrics", "gpu__time_duration.sum", "usecond", "43"),
        ("1", "qmv_a", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "30"),
        ("2", "gdn_b", "GPU Speed Of Light Throughput", "Duration", "usecond", "14.5"),
    ]
    path = tmp_path / "ncu.csv"
    path.write_text("==PROF== noise\n" + head + "".join(",".join(f'"{v}"' for v in r) + "\n" for r in rows))
    per = ncu.ncu_rows(str(path))
    assert per["qmv_a"]["us"] == [41.0, 43.0] and per["gdn_b"]["us"] == [14.5]
    ncu.ncu_summary(str(path))
    out = capsys.readouterr().out
    assert "3 kernels, 98.5 us" in out
    assert re.search(r"DRAM Throughput\s+25\.00", out) and "long_scoreboard 3.00" in out


def test_norm_bisect_compares_every_layers_projections_three_ways(tiny_mlx, monkeypatch, capsys):
    """decode_bench --norm-bisect on the kernels' twins (whose norm_qmv is the norm then qmv): a
    line per layer, every projection and each GatedDeltaNet layer's output the same three ways,
    and the model and the environment left as they were."""
    from llm_flashmoe.engine.load import load_model
    from llm_flashmoe.kernels import decode_bench, ops

    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.delenv("FLASHMOE_FUSE_INPUT_NORM", raising=False)
    model = load_model(tiny_mlx)
    decode_bench.norm_bisect(model, ops(), [5, 17, 300, 42])
    out = capsys.readouterr().out.splitlines()
    heads = [l for l in out if l.startswith("layer ")]
    assert len(heads) == len(model.layers)
    for layer, line, after in zip(model.layers, heads, [out[out.index(h) + 1] for h in heads]):
        n = 4 if layer.is_linear else 3
        diffs = [float(v) for v in re.findall(r"\d\.\d\de[-+]\d\d", line.split("rel. diff")[1])]
        assert len(diffs) == 2 * n and not any(diffs), line
        diffs = [float(v) for v in re.findall(r"\d\.\d\de[-+]\d\d", after)]
        assert len(diffs) == n + layer.is_linear and not any(diffs), after
    assert "FLASHMOE_FUSE_INPUT_NORM" not in os.environ
    assert all(l.ops is None for l in model.layers)


def test_ncu_logs_of_several_settings_side_by_side_per_kernel_family(tmp_path, capsys):
    """`overhead ncu A B --labels ...`: our kernels' names carry a tag of their defines, which a
    setting changes, so the logs are compared per family (fm_qmv, ...); MLX's kernels by name."""
    from llm_flashmoe.kernels import overhead

    head = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'

    def log(name, rows):
        path = tmp_path / name
        path.write_text(head + "".join(
            f'"{i}","{k}","Command line profiler metrics","gpu__time_duration.sum","usecond","{us}"\n'
            for i, (k, us) in enumerate(rows)))
        return str(path)

    a = log("a.csv", [("custom_kernel_fm_qmv_1a2b3c4d_bfloat16", 40), ("custom_kernel_fm_qmv_99aa00ff_bfloat16", 10),
                      ("custom_kernel_fm_gdn_step_0badf00d_bfloat16", 15), ("void rms_norm<bf16>", 4)])
    b = log("b.csv", [("custom_kernel_fm_qmv_deadbeef_bfloat16", 38), ("custom_kernel_fm_qmv_99aa00ff_bfloat16", 10),
                      ("custom_kernel_fm_gdn_step_12345678_bfloat16", 9)])
    assert overhead.main(["ncu", a, b, "--labels", "default,gdnthreads=512"]) == 0
    out = capsys.readouterr().out
    rows = {l.split()[0]: l.split()[1:] for l in out.splitlines()[2:]}
    assert rows["fm_qmv"] == ["50.0", "(", "2)", "48.0", "(", "2)"]
    assert rows["fm_gdn_step"] == ["15.0", "(", "1)", "9.0", "(", "1)"]
    assert rows["void"][-1] == "-"                     # MLX's rms_norm: only in the first log
    assert rows["all"] == ["69.0", "(", "4)", "57.0", "(", "3)"]
    with pytest.raises(SystemExit):
        overhead.main(["ncu", a, b, "--labels", "one"])


def test_ncu_log_of_several_settings_is_cut_at_their_markers(tmp_path, capsys):
    """`overhead ncu LOG --marked "a;b"`: one process's log of several settings (`ncusettings`) is cut
    where each setting's marker kernel ran; kernels before the first marker count for none, the
    markers themselves for none, and a setting without its marker is named."""
    from llm_flashmoe.kernels import ncu, overhead

    head = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = [("void warmup<bf16>", 99), ("custom_kernel_fm_mark_0(const float *, float *)", 1),
            ("custom_kernel_fm_qmv_1a2b3c4d_bfloat16", 40), ("custom_kernel_fm_gdn_step_0badf00d_bfloat16", 15),
            ("custom_kernel_fm_mark_1(const float *, float *)", 1),
            ("custom_kernel_fm_qmv_deadbeef_bfloat16", 30), ("custom_kernel_fm_qmv_deadbeef_bfloat16", 31)]
    path = tmp_path / "ncusettings.csv"
    path.write_text("==PROF== Profiling\n" + head + "".join(
        f'"{i}","{k}","Command line profiler metrics","gpu__time_duration.sum","usecond","{us}"\n'
        for i, (k, us) in enumerate(rows)))
    segments = ncu.ncu_segments(str(path))
    assert [n for n, _ in segments] == [0, 1]
    assert {k: v["us"] for k, v in segments[1][1].items()} == {"custom_kernel_fm_qmv_deadbeef_bfloat16": [30.0, 31.0]}
    assert sum(len(v["us"]) for v in ncu.ncu_rows(str(path)).values()) == len(rows)   # unmarked: everything
    assert overhead.main(["ncu", str(path), "--marked=-;qpipe=1;words=8"]) == 0
    out = capsys.readouterr().out
    assert "no marker in" in out and "for: words=8" in out
    table = {l.split()[0]: l.split()[1:] for l in out.splitlines() if l.startswith(("fm_", "all"))}
    assert table["all"] == ["55.0", "(", "2)", "61.0", "(", "2)"]
    assert table["fm_qmv"] == ["40.0", "(", "1)", "61.0", "(", "2)"] and table["fm_gdn_step"][-1] == "-"
    # per layer and the head: a kernel's launches of 100 us or more are the head's where it has one a
    # step, whoever's kernel it is; one with more (the plain path's routing gather) is the layers'
    rows[3:3] = [("void mlx_qmv<bf16>(const T *)", 160), ("void mlx_qmv<bf16>(const T *)", 150)]
    rows[3:3] = [("void gather_axis<float>(const T *)", 120)] * 4
    path.write_text(head + "".join(f'"{i}","{k}","Command line profiler metrics","gpu__time_duration.sum",'
                                   f'"usecond","{us}"\n' for i, (k, us) in enumerate(rows)))
    assert overhead.main(["ncu", str(path), "--marked=-;qpipe=1", "--layers", "2", "--steps", "2"]) == 0
    split = {l.split()[0]: l.split()[1:] for l in capsys.readouterr().out.splitlines() if "per layer" in l}
    assert split["-"] == ["head", "155.0", "per", "layer", "133.8"]         # (310) / 2; (40 + 15 + 480) / 4
    assert split["qpipe=1"] == ["head", "0.0", "per", "layer", "15.2"]


def test_ncu_log_of_the_check_gives_fused_and_plain_gpu_time_per_call(tmp_path, capsys):
    """`overhead ncu LOG --check-log CHECKLOG` (gpu_session's kncu): the check's timed regions lie
    between marker kernels 2i and 2i+1 (its log names each and its calls); what runs outside them
    (the heat, warm-up, set-up) counts for none; per case the fused and plain GPU time per call and
    their ratio, op by op and compiled."""
    from llm_flashmoe.kernels import overhead

    head = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    mark = "custom_kernel_fm_mark_{}(const float *, float *)"
    rows = [("nvjet_heat", 500), (mark.format(0), 1), ("custom_kernel_fm_moe_down_1", 20), ("custom_kernel_fm_qmv_2", 10),
            ("custom_kernel_fm_moe_down_1", 22), ("custom_kernel_fm_qmv_2", 8), (mark.format(1), 1), ("nvjet_heat", 500),
            ("void mlx::gather_qmv", 70), (mark.format(2), 1), ("void mlx::gather_qmv", 100), ("void mlx::qmv", 20),
            ("void mlx::gather_qmv", 90), ("void mlx::qmv", 30), (mark.format(3), 1), ("void mlx::copy", 5),
            (mark.format(4), 1), ("custom_kernel_fm_moe_down_1", 30), ("custom_kernel_fm_moe_down_1", 30), (mark.format(5), 1)]
    path = tmp_path / "kncu.csv"
    path.write_text(head + "".join(f'"{i}","{k}","Command line profiler metrics","gpu__time_duration.sum","usecond",'
                                   f'"{us}"\n' for i, (k, us) in enumerate(rows)))
    log = tmp_path / "kncu.log"
    log.write_text("backend cuda\nncu mark 0: MoE block 397b bfloat16 | fused, 2 calls\n"
                   "ncu mark 2: MoE block 397b bfloat16 | plain, 2 calls\n"
                   "ncu mark 4: MoE block 397b bfloat16 | fused, compiled, 2 calls\n"
                   "ncu mark 6: MoE block 397b bfloat16 | plain, compiled, 2 calls\n")
    assert overhead.main(["ncu", str(path), "--check-log", str(log)]) == 0
    out = capsys.readouterr().out
    table = {l[:44].strip(): l[44:].split() for l in out.splitlines() if l.startswith("MoE block")}
    assert table["MoE block 397b bfloat16"] == ["30.0", "120.0", "4.00x"]
    assert table["MoE block 397b bfloat16, compiled"] == ["30.0", "-", "-"]
    assert "no marker fm_mark_6" in out


def test_ncu_marked_log_compares_each_launch_shape_of_a_family(tmp_path, capsys):
    """Where the log has the grid, a family launched at several shapes (a layer's projections, all
    fm_qmv) keeps a row per shape in the summary, and `--marked` prints us per call of each shape
    per setting after the family table; MLX's kernels stay out of that second table."""
    from llm_flashmoe.kernels import ncu, overhead

    head = '"ID","Kernel Name","Grid Size","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = [("custom_kernel_fm_mark_0(const float *, float *)", "(1, 1, 1)", 1),
            ("custom_kernel_fm_qmv_1a2b3c4d_bfloat16", "(644, 1, 1)", 40),
            ("custom_kernel_fm_qmv_5e6f7a8b_bfloat16", "(33, 1, 1)", 12),
            ("custom_kernel_fm_qmv_1a2b3c4d_bfloat16", "(644, 1, 1)", 42),
            ("void gather<bf16>", "(1, 1, 1)", 4),
            ("custom_kernel_fm_mark_1(const float *, float *)", "(1, 1, 1)", 1),
            ("custom_kernel_fm_qmv_deadbeef_bfloat16", "(644, 1, 1)", 30),
            ("custom_kernel_fm_qmv_0badf00d_bfloat16", "(33, 2, 1)", 20)]
    path = tmp_path / "ncusettings.csv"
    path.write_text(head + "".join(
        f'"{i}","{k}","{g}","Command line profiler metrics","gpu__time_duration.sum","usecond","{us}"\n'
        for i, (k, g, us) in enumerate(rows)))
    first = dict(ncu.ncu_segments(str(path)))[0]
    assert first["custom_kernel_fm_qmv_1a2b3c4d_bfloat16 [644]"]["us"] == [40.0, 42.0]
    assert overhead.main(["ncu", str(path), "--marked=-;l2pf=1"]) == 0
    out = capsys.readouterr().out
    family = {l.split()[0]: l.split()[1:] for l in out.split("per launch shape")[0].splitlines()
              if l.startswith(("fm_", "all"))}
    assert family["fm_qmv"] == ["94.0", "(", "3)", "50.0", "(", "2)"]
    shapes = {l.split(" [")[0] + " " + l.split(" [")[1].split()[0]: l.split("]")[1].split()
              for l in out.split("per launch shape")[1].splitlines() if l.startswith("fm_")}
    assert shapes == {"fm_qmv 644": ["41.0", "(", "2)", "30.0", "(", "1)"],
                      "fm_qmv 33": ["12.0", "(", "1)", "-"], "fm_qmv 66": ["-", "20.0", "(", "1)"]}


def test_ncusettings_runs_each_setting_in_one_process_and_restores_the_knobs(tiny_mlx, capsys):
    """`overhead ncusettings` on the kernels' CPU twins (no profiler, no markers): every setting's
    compiled decode steps run in turn in one process, and the kernel knobs are the defaults after."""
    from llm_flashmoe.kernels import gpu, overhead

    assert overhead.main(["ncusettings", "--dir", str(tiny_mlx), "--settings=-;qpipe=1 words=8;kernels=off",
                          "--backend", "twin", "--steps", "3", "--profiled", "1"]) == 0
    out = capsys.readouterr().out
    assert "setting 1 (-): first step" in out and "setting 2 (qpipe=1 words=8): first step" in out
    assert "setting 3 (kernels=off) (the plain path): first step" in out and "(-) (the plain path)" not in out
    assert (gpu.QPIPE, gpu.QWORDS) == (0, 16) and "FLASHMOE_KERNELS" not in os.environ
    for bad in ("-;qpipe=1 wrods=8", "-;kernels=twin"):     # refused before the model loads
        with pytest.raises(SystemExit, match="bad setting|ncusettings alone"):
            overhead.main(["ncusettings", "--dir", "/nonexistent", f"--settings={bad}", "--backend", "twin"])
    with pytest.raises(SystemExit, match="ncusettings alone"):   # the plain path: ncusettings' alone
        overhead.main(["settings", "--dir", "/nonexistent", "--settings=-;kernels=off", "--backend", "twin"])


def test_kernel_positions_from_ints_or_device_arrays():
    """qk_norm_rope and decode_attention take the position as a Python int (op by op) or as an
    array computed on the device (compiled attention layers); either reaches the kernel as int32 [1],
    or on CUDA as int32 [4], all of it the position (no buffer of 8 bytes or fewer: gpu.SMALL_BYTES)."""
    from llm_flashmoe.kernels import gpu

    for v in (7, mx.array(7), mx.array([7], mx.int64)):
        a = gpu._index(v)
        assert a.dtype == mx.int32 and a.shape == (1,) and int(a[0]) == 7
        a = gpu._index(v, cuda=True)
        assert a.dtype == mx.int32 and a.nbytes > gpu.SMALL_BYTES and a.tolist() == [7] * a.size
        assert gpu._index(a, cuda=True) is a          # already in the launches' form: no fill a launch
        assert gpu.GpuKernels("cuda").index(v).tolist() == a.tolist()
        assert gpu.GpuKernels("metal").index(v).tolist() == [7] == kernels.plain.index(v).tolist()


def test_decode_step_makes_its_positions_once_in_its_backends_form(tiny_mlx):
    """`state_in` gives the attention layers the position and the length as their ops' `index`
    makes them (on CUDA int32 [4], made on the device; elsewhere [1]), one pair a step for all."""
    import dataclasses

    from llm_flashmoe.engine.load import load_model
    from llm_flashmoe.kernels import gpu

    model = load_model(tiny_mlx, dtype=mx.float32)
    cache = model.make_cache()
    attn = [(l, c) for l, c in zip(model.layers, cache.layers) if not l.is_linear]
    assert len(attn) >= 2
    for ops, width in ((None, 1), (dataclasses.replace(kernels.ops("twin"), index=gpu.GpuKernels("cuda").index), 4)):
        positions: dict = {}
        got = []
        for layer, c in attn:
            layer.ops = ops
            got.append(layer.state_in(c, mx.float32, positions)[2:])
        assert all(p is q for p, q in zip(got[0], got[1]))          # shared by the step's layers
        pos, n = got[0]
        assert pos.dtype == n.dtype == mx.int32 and pos.tolist() == [0] * width and n.tolist() == [1] * width


def test_plain_ops_read_element_0_of_any_backends_positions():
    """The decode step makes its position and length once, in the form its backend's launches read
    (`index`: int32 [1], on CUDA [4]); the plain ops a fused backend falls back to read element 0 of
    either, with the same results."""
    mx.random.seed(5)
    Hq, Hkv, Dh, cap, rope = 4, 2, 32, 12, 16
    qg, k, v = (mx.random.normal((n,)) for n in (Hq * 2 * Dh, Hkv * Dh, Hkv * Dh))
    q_w, k_w = mx.random.uniform(0.5, 1.5, (Dh,)), mx.random.uniform(0.5, 1.5, (Dh,))
    keys, values = mx.random.normal((1, Hkv, cap, Dh)), mx.random.normal((1, Hkv, cap, Dh))
    results = []
    for width in (1, 4):
        pos, n = mx.array([5] * width, mx.int32), mx.array([6] * width, mx.int32)
        q, kk, ks, vs = plain.qk_norm_rope_kv(qg, k, v, keys, values, q_w, k_w, pos, rope, 1e6, 1e-6, Hkv)
        results.append([q, kk, ks, vs, plain.decode_attention(q, ks, vs, n, qg)])
    for a, b in zip(*results):
        assert a.shape == b.shape and mx.array_equal(a, b)
    want_q, _ = plain.qk_norm_rope(qg, k, q_w, k_w, 5, rope, 1e6, 1e-6, Hkv)   # the position as an int
    assert mx.allclose(results[1][0], want_q)
    assert not mx.array_equal(results[1][2], keys) and mx.array_equal(results[1][2][:, :, :5], keys[:, :, :5])


def test_a_kernels_name_changes_with_its_text(monkeypatch, tmp_path):
    """MLX's CUDA backend keeps compiled modules on disk across processes, and newer MLX names them
    by the kernel's name alone: so the name covers the kernel's text as well as its launch shape
    (the same name for the same text in a new GpuKernels; another name for another text under the
    same defines), with the text in files (the #include lines name the files by their hash) and
    inline."""
    from llm_flashmoe.kernels import gpu, source

    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path / "cache"))
    q = mx.zeros((2, 256), mx.bfloat16)
    kv = mx.zeros((1, 1, 16, 256), mx.bfloat16)
    gate = mx.zeros((1, 1024), mx.bfloat16)

    def name_made(backend="cuda"):
        k, made = gpu.GpuKernels(backend), []
        k._make = lambda **kw: made.append(kw) or recording([])(**kw)
        k.decode_attention(q, kv, kv, 5, gate)
        return made[-1]["name"]

    render = source.render
    try:
        for env in ({}, {"FLASHMOE_CUDA_SOURCE_FILES": "0"}):
            gpu.configure(env)
            monkeypatch.setattr(gpu, "render", render)
            first = name_made()
            assert first.startswith("fm_decode_attention_") and name_made() == first
            monkeypatch.setattr(gpu, "render", lambda *a: (lambda h, b: (h, b + "\n// edited"))(*render(*a)))
            assert name_made() != first
    finally:
        gpu.configure({})


def test_cuda_launches_make_no_output_of_8_bytes_or_fewer(tmp_path):
    """MLX's CUDA allocator keeps buffers of 8 bytes or fewer in managed memory on the host side:
    moe_down spent half its time reading the shared expert gate's logit from one. On CUDA a launch's
    outputs that small are made ROOMY_BYTES long, and come back as views in the shapes asked for,
    with the values the plain twin gives; larger outputs are made as asked."""
    from llm_flashmoe.kernels import check, emulate, gpu, overhead

    kern = emulate.emulated_kernels(tmp_path)
    made, make = [], kern._make

    def recording(**spec):
        launch = make(**spec)

        def call(**kw):
            made.append([(tuple(s), d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])])
            return launch(**kw)
        return call

    kern._make = recording
    mx.random.seed(3)
    for dtype in (mx.float32, mx.bfloat16):
        d = check.moe_inputs("tiny", dtype)
        x = check.rnd((d["router"].weight.shape[1] * 32 // d["router"].bits,), dtype)
        made.clear()
        logits, sgl = kern.qmv(x, [d["router"], d["sgate"]])
        want_logits, want_sgl = plain.qmv(x, [d["router"], d["sgate"]])
        assert sgl.shape == want_sgl.shape == (1,) and logits.shape == want_logits.shape
        assert made == [[(logits.shape, dtype), ((gpu.ROOMY_BYTES // dtype.size,), dtype)]]
        if dtype == mx.float32:   # (two bf16 sums differ by more than either's error against float32)
            got, want = (np.array(mx.concatenate([a, b])) for a, b in ((logits, sgl), (want_logits, want_sgl)))
            assert np.linalg.norm(got - want) <= 2e-4 * np.linalg.norm(want)   # check's bound
            assert abs(got[-1] - want[-1]) <= 1e-4 * max(1.0, abs(want[-1]))
        # as a decode step has it, [1, 1, H]: made longer in the first dimension, back through one slice
        made.clear()
        logits3, sgl3 = kern.qmv(x.reshape(1, 1, -1), [d["router"], d["sgate"]])
        assert sgl3.shape == (1, 1, 1) and made == [[((1, 1, logits.size), dtype), ((gpu.ROOMY_BYTES // dtype.size, 1, 1), dtype)]]
        census = overhead.graph_census([sgl3])   # (before it is evaluated; the emulator adds a View for bf16)
        assert census.get("Slice") == 1 and "Reshape" not in census
        assert mx.array_equal(sgl3.reshape(-1), sgl) and mx.array_equal(logits3.reshape(-1), logits)


def test_a_small_outputs_view_goes_into_the_next_launch_as_its_buffer(tmp_path):
    """The router's launch gives the shared expert gate's logit back as a view of a longer buffer
    (one slice); moe_down, a launch of the same GpuKernels, takes that buffer in its place (the
    logit its first value), so the step's graph has no slice: one operation fewer per layer for the
    host. Same result as with the view (and as the plain path), op by op and compiled; a view
    given to another GpuKernels' launch, or an array it did not make, goes in as it is."""
    from llm_flashmoe.kernels import check, emulate, gpu, overhead

    mx.random.seed(5)
    d = check.moe_inputs("tiny", mx.float32)
    H, I, Is, K = d["x"].size, d["gate"].weight.shape[1], d["sg"].out_features, d["K"]
    x, y = d["x"].reshape(1, 1, H), d["res"].reshape(1, 1, H)
    nw = check.rnd((H,), mx.float32, 0.2) + 1
    h_in, hs = check.rnd((K, I), mx.float32), check.rnd((Is,), mx.float32)
    kern = emulate.emulated_kernels(tmp_path)
    given, make = [], kern._make

    def recording(**spec):
        launch = make(**spec)

        def call(**kw):
            given.append((spec["name"], dict(zip(spec["input_names"], kw["inputs"]))))
            return launch(**kw)
        return call

    kern._make = recording

    def step(o, sg=None):
        (logits, sgl), hh, n = o.norm_qmv(x, y, nw, 1e-6, [d["router"], d["sgate"]])
        out = o.moe_down(h_in, d["rows"], d["w"], d["down"], hs, d["sd"], sgl if sg is None else sg, hh)
        return out, sgl

    out, sgl = step(kern)
    (_, router), (name, down) = given
    assert name.startswith("fm_moe_down") and sgl.shape == (1, 1, 1)
    assert down["sg"].shape == (gpu.ROOMY_BYTES // 4, 1, 1)                 # the buffer, not the view
    want, want_sgl = step(plain)
    assert mx.array_equal(sgl, want_sgl) or check.rel_err(sgl, want_sgl) < 2e-4
    assert check.rel_err(out, want) < 2e-4
    given.clear()
    again, _ = step(kern, mx.array(np.array(sgl)))         # an array it did not make: as it is
    assert given[-1][1]["sg"].shape == (1, 1, 1) and mx.allclose(again, out)
    other = emulate.emulated_kernels(tmp_path)
    (_, sgl2), _, _ = other.norm_qmv(x, y, nw, 1e-6, [d["router"], d["sgate"]])
    given.clear()
    kern.moe_down(h_in, d["rows"], d["w"], d["down"], hs, d["sd"], sgl2, y)   # another GpuKernels' view
    assert given[-1][1]["sg"].shape == (1, 1, 1)
    compiled = mx.compile(lambda: step(kern)[0])()
    assert mx.allclose(compiled, out)

    # the graph (launches stubbed lazily: each output a function of all its inputs): no slice
    def lazy(**spec):
        def launch(inputs, output_shapes, output_dtypes, **_):
            tot = sum(mx.sum(a.astype(mx.float32)) for a in inputs)
            return [(mx.zeros(sh, dt) + tot).astype(dt) for sh, dt in zip(output_shapes, output_dtypes)]
        return launch

    stubbed, apart = gpu.GpuKernels("cuda"), gpu.GpuKernels("cuda")
    stubbed._make = apart._make = lazy
    assert "Slice" not in overhead.graph_census([step(stubbed)[0]])
    (_, sgl_apart), _, _ = apart.norm_qmv(x, y, nw, 1e-6, [d["router"], d["sgate"]])
    assert overhead.graph_census([step(stubbed, sgl_apart)[0]]).get("Slice") == 1


def test_downids_summary_reads_each_sets_time_per_round_and_whether_the_rounds_agree(tmp_path, capsys):
    """`overhead downids --summary LOG`: moe_down's calls in a setting's segment are the expert sets
    (down_id_sets: patterned, then seeded random ones, the same each time) round after round; the
    summary prints each set's time per round, the share of slow calls, and whether the sets are
    slow or fast alike in both rounds (the question the experiment asks); a segment whose call
    count does not fit is named."""
    from llm_flashmoe.kernels import overhead, sweeps

    sets = sweeps.down_id_sets(512, 4)
    assert sets == sweeps.down_id_sets(512, 4) and len({tuple(ids) for _, ids in sets}) == len(sets)
    assert all(len(ids) == 4 == len(set(ids)) and max(ids) < 512 for _, ids in sets)
    # setting 0: sets with an odd first expert slow in both rounds; setting 1: one round short
    slow = [30.0 if ids[0] % 2 else 13.0 for _, ids in sets]
    rows = ([("custom_kernel_fm_mark_0(const float *, float *)", 1)]
            + [("custom_kernel_fm_moe_down_0a1b_bfloat16", t) for t in slow + slow]
            + [("custom_kernel_fm_mark_1(const float *, float *)", 1)]
            + [("custom_kernel_fm_moe_down_0a1b_bfloat16", 20.0) for _ in sets])
    head = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    path = tmp_path / "downids.csv"
    path.write_text(head + "".join(f'"{i}","{k}","Command line profiler metrics","gpu__time_duration.sum",'
                                   f'"usecond","{us}"\n' for i, (k, us) in enumerate(rows)))
    assert overhead.main(["downids", "--summary", str(path), "--settings=-;grid=2"]) == 0
    out = capsys.readouterr().out
    share = sum(t > 20 for t in slow) / len(slow)
    assert f"calls over 1.5x the fastest: {share:.0%}" in out and "alike in every round: 100%" in out
    assert "correlation of rounds 1 and 2: 1.00" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("stride 129"))
    assert line.split()[-2:] == ["13.0", "13.0"]        # first expert 0: fast in both rounds
    assert f"setting 2: {len(sets)} moe_down calls, expected {2 * len(sets)}" in out
    # --repeat 2: each set's first call, then the later ones' median apart
    rows = [("custom_kernel_fm_mark_0(const float *, float *)", 1)]
    rows += [("custom_kernel_fm_moe_down_0a1b_bfloat16", t) for _ in range(2) for f in slow for t in (f, 11.0)]
    path.write_text(head + "".join(f'"{i}","{k}","Command line profiler metrics","gpu__time_duration.sum",'
                                   f'"usecond","{us}"\n' for i, (k, us) in enumerate(rows)))
    assert overhead.main(["downids", "--summary", str(path), "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert f"calls over 1.5x the fastest: {share:.0%}" in out and "after the first on a set: median 11.0" in out


def test_dlpack_info_gives_each_arrays_address_with_its_byte_offset_strides_and_dtype(capsys):
    """kernels.interop reads an MLX array's DLPack export: the address of its first element (a
    view's buffer plus its byte offset), its shape, strides in elements and DLPack dtype; on this
    CPU the bytes there are the array's (the probe checks the same through the driver on CUDA)."""
    from llm_flashmoe.kernels import interop

    cases = {label: (a, want) for label, a, want in interop.probe_cases()}
    whole, rows = (interop.dlpack_info(cases[k][0]) for k in ("float32 [6, 8]", "rows 2: of it (a byte offset)"))
    assert whole["device"] == rows["device"] == "cpu" and whole["shape"] == (6, 8) and rows["shape"] == (4, 8)
    assert rows["byte_offset"] == 64 and rows["address"] == whole["address"] + 64
    t = interop.dlpack_info(cases["its transpose (strides)"][0])
    assert t["shape"] == (8, 6) and t["strides"] == (1, 8) and t["address"] == whole["address"]
    assert interop.dlpack_info(cases["bf16 [64]"][0])["dtype"] == (4, 16, 1)     # DLPack's bfloat code
    for a, want in cases.values():
        assert interop.host_bytes(interop.dlpack_info(a), len(want)) == want
    x = mx.arange(10, dtype=mx.int32)
    assert np.frombuffer(interop.host_bytes(interop.dlpack_info(x[3:]), 8), np.int32).tolist() == [3, 4]
    assert interop.probe() == 0
    assert capsys.readouterr().out.count("host bytes at the address: the array") == len(cases)
