"""Check and time every fused kernel against its plain-MLX twin on this GPU.

    python -m llm_flashmoe.kernels.check [--backend cuda|metal] [--quick]

For each kernel and shape set (397b, tiny, odd): fresh random inputs, outputs
poisoned with NaN before the call, the result compared with the twin
(error = max |kernel - twin| / max |twin|, bound per dtype; for bf16 and fp16
inputs the twin runs in float32 on the same values, since a bf16 twin rounds
its intermediates and is itself ~1e-2 off), then both timed
(median over runs after warm-up; each run evaluates REPS independent calls in
one graph, between mx.synchronize calls, and reports the time per call).
Prints one table; exits 1 if any kernel fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import mlx.core as mx
import numpy as np

from ..engine.linear import Linear
from . import active_backend, plain
from .gpu import GpuKernels

BOUND = {mx.float32: 2e-4, mx.bfloat16: 2e-2, mx.float16: 4e-3}
# ... except that an output of at most SMALL values may instead be within PLAIN_FACTOR times the
# plain twin's own error at the same dtype (against the same float32 copy), or within the bound
# against the call's largest reference value (all its outputs): a lone value whose true value is
# near 0 (the shared expert's gate logit) is past the bound on the plain path itself in some
# draws, and its error against its own size says nothing of the kernel.
PLAIN_FACTOR, SMALL = 1.5, 8


def judge(got, ref, plain_got, dtype) -> tuple[float, float, bool]:
    """(worst rel. error of got, of plain_got (0 if None), whether got passes) against ref."""
    err = perr = 0.0
    ok = True
    plains = _flat(plain_got) if plain_got is not None else [None] * len(_flat(ref))
    top = [float(np.abs(np.array(r.astype(mx.float32))).max()) if r.size else 0.0 for r in _flat(ref)]
    scale = max(top, default=0.0)
    for g, r, pg, t in zip(_flat(got), _flat(ref), plains, top):
        e, pe = rel_err(g, r), rel_err(pg, r) if pg is not None else 0.0
        err, perr = max(err, e), max(perr, pe)
        lone = r.size <= SMALL and (e <= PLAIN_FACTOR * pe or e * max(t, 1e-30) <= BOUND[dtype] * scale)
        ok &= e <= BOUND[dtype] or lone
    return err, perr, ok


REPS = 20


def qlinear(out_f, in_f, bits=4, gs=64, dtype=mx.bfloat16, experts=None):
    shape = (out_f, in_f) if experts is None else (experts, out_f, in_f)
    w = mx.random.normal(shape) * (in_f ** -0.5)
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    return Linear(q, s.astype(dtype), b.astype(dtype), bits, gs)


def up32(v):
    """v (arrays, Linears, and lists/tuples/dicts of them) with floating arrays in float32."""
    if isinstance(v, mx.array):
        return v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
    if isinstance(v, Linear):
        return Linear(up32(v.weight), up32(v.scales), up32(v.biases), v.bits, v.group_size)
    if isinstance(v, (list, tuple)):
        return type(v)(up32(a) for a in v)
    if isinstance(v, dict):
        return {k: up32(a) for k, a in v.items()}
    return v


def pair(op: str, *args):
    """(fused call, twin call, twin on float32 copies) of kernel `op` on `args`."""
    twin = getattr(plain, op)
    return (lambda o: getattr(o, op)(*args), lambda: twin(*args), lambda: twin(*up32(args)))


def case_args(make, label, dtype) -> tuple:
    """The arguments case `make` (of CASES) hands its kernel, for calls of one's own."""
    global pair
    saved = pair
    pair = lambda op, *args: args   # noqa: E731
    try:
        return make(label, dtype)
    finally:
        pair = saved


def rnd(shape, dtype=mx.bfloat16, scale=1.0):
    return (mx.random.normal(shape) * scale).astype(dtype)


def rnd_gate_logit(dtype=mx.bfloat16) -> mx.array:
    """A random shared-gate logit [1] as the engine has it: the first of a longer buffer
    (gpu.SMALL_BYTES: MLX keeps buffers of 8 bytes or fewer where the GPU reads them slowly)."""
    return rnd((8,), dtype)[:1]


# -- cases: name -> list of (shape label, (fused fn, twin fn, args builder)) ----------

def case_qmv(label, dtype):
    K, Ns, bits, gs = {
        "397b": (4096, [12288, 8192, 64, 64], 4, 64),
        "397b-4096": (4096, [4096], 4, 64),
        "397b-2bit": (4096, [4096], 2, 64),
        "397b-3bit": (4096, [4096], 3, 64),
        "397b-8bit": (4096, [4096], 8, 64),
        "tiny": (256, [1024, 256, 16, 16], 4, 64),
        "odd": (96, [37, 5], 3, 32),
        # 4-bit odd sizes (the tensor-core path on CUDA: slots of 1 and 37 rows, a block count no
        # multiple of the blocks loaded at once; groups of 128)
        "odd-4bit": (320, [37, 5, 1, 70], 4, 64),
        "odd-g128": (384, [50], 4, 128),
        # rows long enough that a lane's chunks take several batches, the last one partial (the
        # matrix-vector loop's batches, FLASHMOE_QPIPE's register double buffer)
        "long": (3136, [40, 3], 4, 64),
        # inputs a multiple of 1024, where FLASHMOE_QASYNC's ring applies: several chunks per lane,
        # slots of many rows, of fewer rows than a warp takes, of one; 8-bit codes (two pieces a chunk)
        "ring": (2048, [40, 3, 1], 4, 64),
        "ring-8bit": (1024, [24, 1], 8, 128),
    }[label]
    lins = [qlinear(n, K, bits, gs, dtype) for n in Ns]
    return pair("qmv", rnd((1, K), dtype), lins)


def case_norm_qmv(label, dtype):
    """The RMSNorm (label "+add": residual add and RMSNorm) in front of qmv, as the engine runs the
    input projections (no add) and the router with the shared expert's gate (add)."""
    shape, add = label.removesuffix("+add"), label.endswith("+add")
    M, K, Ns, bits, gs = {"397b": (1, 4096, [12288, 8192, 64, 64], 4, 64), "397b-router": (1, 4096, [512, 1], 4, 64),
                          "tiny": (1, 256, [64, 1], 4, 64), "odd": (2, 96, [37, 5], 3, 32),
                          "odd-4bit": (2, 320, [37, 1], 4, 64), "long": (1, 3136, [40, 3], 4, 64),
                          "ring": (2, 2048, [40, 3, 1], 4, 64)}[shape]
    lins = [qlinear(n, K, bits, gs, dtype) for n in Ns]
    return pair("norm_qmv", rnd((M, K), dtype), rnd((M, K), dtype) if add else None, rnd((K,), dtype, 0.2) + 1,
                1e-6, lins)


MOE_SHAPES = {"397b": (512, 4, 4096, 1024, 1024, 64), "tiny": (64, 4, 256, 128, 128, 64),
              "odd": (40, 3, 160, 96, 64, 32),
              # 4-bit, groups of 64, odd sizes for the tensor-core path (3 blocks of 64 inputs)
              "odd-4bit": (40, 3, 192, 64, 128, 64),
              # a hidden size whose rows take the gate/up loop several batches (as "long" of qmv)
              "long": (16, 2, 3136, 64, 64, 64),
              # a hidden size a multiple of 1024: the gate/up launch takes FLASHMOE_QASYNC's ring
              "ring": (16, 2, 2048, 64, 64, 64)}


def moe_inputs(label, dtype):
    E, K, H, I, Is, gs = MOE_SHAPES[label]
    d = dict(E=E, K=K, x=rnd((H,), dtype), res=rnd((H,), dtype),
             router=qlinear(E, H, 4, gs, dtype), sgate=qlinear(1, H, 4, gs, dtype),
             gate=qlinear(I, H, 4, gs, dtype, E), up=qlinear(I, H, 4, gs, dtype, E),
             down=qlinear(H, I, 4, gs, dtype, E), sg=qlinear(Is, H, 4, gs, dtype),
             su=qlinear(Is, H, 4, gs, dtype), sd=qlinear(H, Is, 4, gs, dtype))
    d["rows"] = mx.array(np.random.choice(E, K, replace=False).astype(np.int32))
    d["w"] = mx.softmax(mx.random.normal((K,)))
    return d


def case_moe_route(label, dtype):
    E, K = MOE_SHAPES[label][:2]
    logits = rnd((E,), dtype, 2.0)
    def sort(r):
        ids, w = r
        order = mx.argsort(ids)
        return [ids[order].astype(mx.float32), w[order]]
    return (lambda o: sort(o.moe_route(logits, K, True)), lambda: sort(plain.moe_route(logits, K, True)),
            lambda: sort(plain.moe_route(up32(logits), K, True)))


def case_moe_gate_up(label, dtype):
    d = moe_inputs(label, dtype)
    return pair("moe_gate_up", d["x"], d["rows"], d["gate"], d["up"], d["sg"], d["su"])


def case_moe_route_gate_up(label, dtype):
    """Without a lookup, and (label "+lookup") through an int32 lookup [E] of rows of the stacks
    (a GPU expert cache: its stacks hold more rows than there are experts)."""
    shape, lookup = label.removesuffix("+lookup"), label.endswith("+lookup")
    d = moe_inputs(shape, dtype)
    E, K = d["E"], d["K"]
    table = mx.array(np.random.permutation(E).astype(np.int32)) if lookup else None
    logits = rnd((E,), dtype, 2.0)
    f, t, t32 = pair("moe_route_gate_up", logits, K, True, table, d["x"], d["gate"], d["up"], d["sg"], d["su"])

    def sort(r):   # the twin's experts come in no particular order
        h, hs, rows, w = r
        order = mx.argsort(rows)
        return [h[order], hs, rows[order].astype(mx.float32), w[order]]
    return lambda o: sort(f(o)), lambda: sort(t()), lambda: sort(t32())


def case_moe_down(label, dtype):
    d = moe_inputs(label, dtype)
    K, I, Is = d["K"], d["gate"].weight.shape[1], d["sg"].out_features
    return pair("moe_down", rnd((K, I), dtype), d["rows"], d["w"], d["down"], rnd((Is,), dtype), d["sd"],
                rnd_gate_logit(dtype), d["res"])


def moe_block(o, d, fused):
    """The whole MoE block at decode: router + shared gate, top-k, experts, shared expert, residual."""
    x1 = d["x"].reshape(1, -1)
    logits, sgl = o.qmv(x1, [d["router"], d["sgate"]])
    if fused:   # routing folded into the gate/up launch, handed moe_down's stacks, as the engine runs it
        h, hs, ids, w = o.moe_route_gate_up(logits, d["K"], True, None, d["x"], d["gate"], d["up"], d["sg"], d["su"],
                                            then=(d["down"], d["sd"]))
    else:
        ids, w = o.moe_route(logits, d["K"], True)
        h, hs = o.moe_gate_up(d["x"], ids, d["gate"], d["up"], d["sg"], d["su"])
    return o.moe_down(h, ids, w, d["down"], hs, d["sd"], sgl, d["res"])


# The block routes on its own bf16 router logits, the reference on float32 ones: where the K-th and
# (K+1)-th largest are closer than bf16 rounding can move them, the two pick different experts and
# differ by O(1) on the fused and the plain path alike (seen on the H200: the odd shape, 0.17 on both).
# Such draws test tie-breaking, not the kernels: the token x is drawn again until the float32 logits'
# gap there is at least ROUTE_MARGIN times their largest magnitude (bf16 keeps 8 bits: 2^-8 = 0.0039).
ROUTE_MARGIN, ROUTE_DRAWS = 0.02, 100


def route_gap(d) -> float:
    """The gap between the K-th and (K+1)-th largest float32 router logits of inputs d, over the
    largest magnitude."""
    x, router = up32([d["x"], d["router"]])
    logits = np.sort(np.array(plain.qmv(x.reshape(1, -1), [router])[0]).reshape(-1))[::-1]
    K = d["K"]
    return float((logits[K - 1] - logits[K]) / max(np.abs(logits).max(), 1e-30))


def moe_block_inputs(label, dtype):
    """moe_inputs whose token routes with ROUTE_MARGIN to spare."""
    d = moe_inputs(label, dtype)
    for _ in range(ROUTE_DRAWS):       # a fresh token (the expert stacks are costly to draw)
        if route_gap(d) >= ROUTE_MARGIN:
            break
        d["x"] = rnd(d["x"].shape, dtype)
    else:
        raise RuntimeError(f"MoE block {label}: no draw of {ROUTE_DRAWS} with a routing margin of {ROUTE_MARGIN}")
    return d


def case_moe_block(label, dtype):
    d = moe_block_inputs(label, dtype)
    return lambda o: moe_block(o, d, True), lambda: moe_block(plain, d, False), lambda: moe_block(plain, up32(d), False)


def case_attention(label, dtype):
    Hq, Hkv, Dh, n, cap = {"397b": (32, 2, 256, 1000, 1024), "397b-short": (32, 2, 256, 64, 256),
                           "tiny": (8, 2, 256, 37, 256), "odd": (6, 3, 64, 7, 9)}[label]
    q, qg = rnd((Hq, Dh), dtype), rnd((Hq * 2 * Dh,), dtype)
    keys, values = rnd((1, Hkv, cap, Dh), dtype), rnd((1, Hkv, cap, Dh), dtype)
    args = (q, keys, values, n, qg)
    return pair("decode_attention", *args)


def case_qk_norm_rope(label, dtype):
    Hq, Hkv, Dh, rope, pos = {"397b": (32, 2, 256, 64, 123), "tiny": (8, 2, 256, 64, 7),
                              "odd": (3, 1, 64, 16, 5000)}[label]
    args = (rnd((Hq * 2 * Dh,), dtype), rnd((Hkv * Dh,), dtype), rnd((Dh,), dtype, 0.2) + 1,
            rnd((Dh,), dtype, 0.2) + 1, pos, rope, 1e7, 1e-6, Hkv)
    return pair("qk_norm_rope", *args)


def case_qk_norm_rope_kv(label, dtype):
    """qk_norm_rope with the token's key and value written into KV buffers at pos (in place on the
    GPU: the buffers are compared after the call, the written row against the twin's)."""
    Hq, Hkv, Dh, rope, pos, cap = {"397b": (32, 2, 256, 64, 123, 256), "tiny": (8, 2, 256, 64, 7, 8),
                                   "odd": (3, 1, 64, 16, 11, 13)}[label]
    args = (rnd((Hq * 2 * Dh,), dtype), rnd((Hkv * Dh,), dtype), rnd((Hkv * Dh,), dtype),
            rnd((1, Hkv, cap, Dh), dtype), rnd((1, Hkv, cap, Dh), dtype), rnd((Dh,), dtype, 0.2) + 1,
            rnd((Dh,), dtype, 0.2) + 1, mx.array([pos], mx.int32), rope, 1e7, 1e-6, Hkv)
    return pair("qk_norm_rope_kv", *args)


def case_gdn(label, dtype):
    Hk, Hv, Dk, Dv = {"397b": (16, 64, 128, 128), "tiny": (4, 16, 128, 128), "odd": (2, 6, 64, 32)}[label]
    C = 2 * Hk * Dk + Hv * Dv
    args = (rnd((C,), dtype), rnd((Hv * Dv,), dtype), rnd((Hv,), dtype), rnd((Hv,), dtype),
            rnd((1, 3, C), dtype), rnd((C, 4), dtype, 0.5), -mx.exp(mx.random.normal((Hv,)) * 0.5),
            mx.random.normal((Hv,)), rnd((Dv,), dtype, 0.2) + 1, mx.random.normal((1, Hv, Dv, Dk)) * 0.1,
            Hk, Dk, 1e-6)
    return pair("gdn_step", *args)


def case_add_rms_norm(label, dtype):
    M, H = {"397b": (1, 4096), "tiny": (1, 256), "odd": (3, 100)}[label]
    args = (rnd((M, H), dtype), rnd((M, H), dtype), rnd((H,), dtype, 0.2) + 1, 1e-6)
    return pair("add_rms_norm", *args)


CASES = [
    ("qmv", case_qmv, ["397b", "397b-4096", "397b-2bit", "397b-3bit", "397b-8bit", "tiny", "odd", "odd-4bit",
                       "odd-g128", "long", "ring", "ring-8bit"]),
    ("norm_qmv", case_norm_qmv, ["397b", "397b-router+add", "tiny", "tiny+add", "odd", "odd+add", "odd-4bit",
                                 "odd-4bit+add", "long", "ring+add"]),
    ("moe_route", case_moe_route, ["397b", "tiny", "odd"]),
    ("moe_gate_up", case_moe_gate_up, ["397b", "tiny", "odd", "odd-4bit", "long", "ring"]),
    ("moe_route_gate_up", case_moe_route_gate_up,
     ["397b", "397b+lookup", "tiny", "tiny+lookup", "odd", "odd+lookup", "odd-4bit", "odd-4bit+lookup", "ring+lookup"]),
    ("moe_down", case_moe_down, ["397b", "tiny", "odd", "odd-4bit"]),
    ("MoE block", case_moe_block, ["397b", "tiny", "odd", "odd-4bit"]),
    ("decode_attention", case_attention, ["397b", "397b-short", "tiny", "odd"]),
    ("qk_norm_rope", case_qk_norm_rope, ["397b", "tiny", "odd"]),
    ("qk_norm_rope_kv", case_qk_norm_rope_kv, ["397b", "tiny", "odd"]),
    ("gdn_step", case_gdn, ["397b", "tiny", "odd"]),
    ("add_rms_norm", case_add_rms_norm, ["397b", "tiny", "odd"]),
]

# cases also timed as one compiled graph each (fused and plain), as the engine's decode steps run
COMPILED = ("MoE block",)


def _flat(r):
    if isinstance(r, (list, tuple)):
        return [a for x in r for a in _flat(x)]
    return [r]


def rel_err(got, ref) -> float:
    worst = 0.0
    for g, r in zip(_flat(got), _flat(ref)):
        g32, r32 = np.array(g.astype(mx.float32)), np.array(r.astype(mx.float32))
        if g32.shape != r32.shape or not np.isfinite(g32).all():
            return math.inf
        worst = max(worst, float(np.abs(g32 - r32).max() / max(np.abs(r32).max(), 1e-30)))
    return worst


# --ncu-marks: the timed regions' labels in order; region i lies between the marker kernels 2i and
# 2i + 1 (ncu.MARK), which `overhead ncu LOG --check-log LOG` cuts an ncu log at.
NCU_MARKS: list[str] | None = None


def time_call(fn, runs: int, label: str | None = None) -> float:
    """Median microseconds per call, REPS calls per graph, the GPU kept busy for a moment first
    (decode_bench.heat: its clocks ramp up under load). With --ncu-marks, the timed calls between
    two marker kernels, and their `label` and count printed."""
    from .decode_bench import heat
    from .sweeps import ncu_mark

    heat(0.25)
    for _ in range(3):
        mx.eval(*[_flat(fn()) for _ in range(REPS)])
    mx.synchronize()
    marked = NCU_MARKS is not None and label is not None
    if marked:
        NCU_MARKS.append(label)
        n = 2 * (len(NCU_MARKS) - 1)
        print(f"ncu mark {n}: {label}, {runs * REPS} calls", flush=True)
        ncu_mark(n)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval(*[_flat(fn()) for _ in range(REPS)])
        mx.synchronize()
        times.append((time.perf_counter() - t0) / REPS * 1e6)
    if marked:
        ncu_mark(n + 1)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--only", default=None, help="comma-separated kernel names")
    ap.add_argument("--ncu-marks", action="store_true",
                    help="(CUDA, under ncu) marker kernels around each timed region, for `overhead ncu LOG --check-log`")
    args = ap.parse_args(argv)
    backend = args.backend or active_backend()
    if backend not in ("cuda", "metal"):
        print(f"no GPU kernel backend here (active: {backend}); run on a Metal or CUDA device.")
        return 2
    global NCU_MARKS
    NCU_MARKS = [] if args.ncu_marks and backend == "cuda" else None
    fused = GpuKernels(backend, poison=True)       # correctness: outputs start as NaN
    timed = GpuKernels(backend)                      # timing: no fill launches
    mx.random.seed(int(time.time()))
    np.random.seed(int(time.time()) % 2**31)
    fails = 0
    print(f"backend {backend}, device {mx.default_device()}, {REPS} calls per graph, median of {args.runs}")
    print(f"{'kernel':18} {'shape':11} {'dtype':8} {'rel.err':>9} {'bound':>7} {'plain':>9} {'ok':3} "
          f"{'fused us':>9} {'plain us':>9} {'speedup':>7}")
    print(f"(ok: rel.err within the bound; an output of at most {SMALL} values may instead be within "
          f"{PLAIN_FACTOR}x the plain twin's error at the dtype)")
    for name, make, labels in CASES:
        if args.only and name not in args.only.split(","):
            continue
        for label in labels:
            for dt in args.dtypes.split(","):
                dtype = getattr(mx, dt)
                if dtype == mx.float32 and name in ("MoE block",) :
                    continue
                f, t, t32 = make(label, dtype)
                try:
                    got = f(fused)
                    mx.eval(_flat(got))
                    err, perr, ok = judge(got, t32(), t(), dtype)
                except Exception as e:  # report, keep going
                    print(f"{name:18} {label:11} {dt:8} ERROR {type(e).__name__}: {str(e)[:400]}")
                    fails += 1
                    continue
                fails += not ok
                case = f"{name} {label} {dt}"
                tf = time_call(lambda: f(timed), args.runs, f"{case} | fused")
                tp = time_call(t, args.runs, f"{case} | plain")
                print(f"{name:18} {label:11} {dt:8} {err:9.2e} {BOUND[dtype]:7.0e} {perr:9.2e} {'yes' if ok else 'NO':3} "
                      f"{tf:9.1f} {tp:9.1f} {tp / tf:6.2f}x", flush=True)
                if name in COMPILED:   # as the engine runs it on a GPU: one mx.compile graph each
                    tf = time_call(mx.compile(lambda: _flat(f(timed))), args.runs, f"{case} | fused, compiled")
                    tp = time_call(mx.compile(lambda: _flat(t())), args.runs, f"{case} | plain, compiled")
                    print(f"{'  compiled':18} {label:11} {dt:8} {'':9} {'':7} {'':9} {'':3} "
                          f"{tf:9.1f} {tp:9.1f} {tp / tf:6.2f}x", flush=True)
    print("all kernels pass" if not fails else f"{fails} FAILED")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
