"""Where a GPU decode step's time goes: MLX's host cost per operation against the kernels.

    python -m llm_flashmoe.kernels.overhead launch [--n 200]
    python -m llm_flashmoe.kernels.overhead decode --dir MODEL [--steps 24]

`launch`: chains of N dependent operations, each timed as the Python time to build the
graph and the time to evaluate it (mx.eval + mx.synchronize), per operation: a trivial
custom kernel with 1 and with 14 inputs, an MLX add, and the fused qmv on a 4096x4096
4-bit matrix; each chain also through mx.compile. MLX's CUDA backend reads
MLX_USE_CUDA_GRAPHS and MLX_MAX_OPS_PER_BUFFER once per process: run this under each
setting to compare them.

`decode`: a resident model's decode step split the same way (build, evaluate), per
layer, op by op and compiled (FLASHMOE_COMPILE's path), fresh tokens each step.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ENV = ("MLX_USE_CUDA_GRAPHS", "MLX_MAX_OPS_PER_BUFFER", "FLASHMOE_COMPILE")


def _env() -> str:
    return " ".join(f"{k}={os.environ.get(k, '-')}" for k in ENV)


def timed(build, reps: int = 7) -> tuple[float, float]:
    """Median seconds of (building the graph with `build()`, evaluating what it returns)."""
    b, e = [], []
    for _ in range(reps + 2):
        mx.synchronize()
        t0 = time.perf_counter()
        out = build()
        t1 = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        t2 = time.perf_counter()
        b.append(t1 - t0)
        e.append(t2 - t1)
    return float(np.median(b[2:])), float(np.median(e[2:]))


def _tiny_kernel(n_inputs: int):
    names = ["x"] + [f"a{i}" for i in range(n_inputs - 1)]
    src = "if (threadIdx.x == 0 && blockIdx.x == 0) { y[0] = x[0] + 1.0f; }"
    return names, mx.fast.cuda_kernel(name=f"fm_tiny{n_inputs}", input_names=names, output_names=["y"], source=src)


def launch(n: int) -> None:
    from ..engine.linear import Linear
    from .gpu import GpuKernels

    chains = {}
    for n_in in (1, 14):
        names, k = _tiny_kernel(n_in)
        extra = [mx.zeros((64,), mx.float32) for _ in names[1:]]

        def chain(x, k=k, extra=extra):
            for _ in range(n):
                x = k(inputs=[x, *extra], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                      output_shapes=[(64,)], output_dtypes=[mx.float32])[0]
            return x
        chains[f"custom kernel, {n_in} input(s)"] = (chain, mx.zeros((64,), mx.float32))

    def adds(x):
        for _ in range(n):
            x = x + 1.0
        return x
    chains["mx add"] = (adds, mx.zeros((64,), mx.float32))

    w = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    qw, qs, qb = mx.quantize(w, group_size=64, bits=4)
    lin = Linear(qw, qs, qb, 4, 64)
    gk = GpuKernels("cuda")

    def qmvs(x):
        for _ in range(n):
            x = gk.qmv(x, [lin])[0] * 0.01
        return x
    chains["fused qmv 4096x4096 + mx mul"] = (qmvs, mx.random.normal((1, 4096)).astype(mx.bfloat16))

    def mlx_qmv(x):
        for _ in range(n):
            x = mx.quantized_matmul(x, qw, qs, qb, transpose=True, group_size=64, bits=4) * 0.01
        return x
    chains["mx.quantized_matmul 4096x4096 + mx mul"] = (mlx_qmv, mx.random.normal((1, 4096)).astype(mx.bfloat16))

    print(f"launch overhead, chains of {n} dependent ops ({_env()}), us per op:")
    print(f"{'chain':42} {'build':>8} {'eval':>8} {'total':>8} {'compiled eval':>14}")
    for name, (fn, x0) in chains.items():
        b, e = timed(lambda: fn(x0))
        cfn = mx.compile(fn)
        _, ce = timed(lambda: cfn(x0))
        print(f"{name:42} {b / n * 1e6:8.1f} {e / n * 1e6:8.1f} {(b + e) / n * 1e6:8.1f} {ce / n * 1e6:14.1f}", flush=True)


def graph_census(outputs) -> dict:
    """Primitives by name in the graph that evaluating `outputs` would run (arrays already
    evaluated are its sources): each one adds to MLX's host cost of building and evaluating the
    step, a reshape too."""
    import re
    import tempfile
    from collections import Counter

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g.dot"
        mx.export_to_dot(str(path), *outputs)
        text = path.read_text()
    return dict(Counter(re.findall(r'label ="([^"]+)", shape=rectangle', text)).most_common())


def census_line(census: dict) -> str:
    return f"{sum(census.values())} primitives: " + ", ".join(f"{k} {v}" for k, v in census.items())


def touch(model) -> None:
    """Read every weight once on the GPU: arrays the loader filled from the host live in
    managed memory and would otherwise move to the GPU page by page inside the timed steps
    (each fresh token routes to experts not touched before)."""
    arrays = list(_arrays(model))
    for i in range(0, len(arrays), 64):
        mx.eval([a.sum() for a in arrays[i:i + 64] if a.size])


def _arrays(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, mx.array):
        yield obj
    elif isinstance(obj, (list, tuple, dict)):
        for o in (obj.values() if isinstance(obj, dict) else obj):
            yield from _arrays(o, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("llm_flashmoe", "builtins")):
        for o in vars(obj).values():
            yield from _arrays(o, seen)


def decode(args) -> None:
    from ..engine.load import load_model
    from .decode_bench import decode_steps, with_ops
    from . import ops as kernel_ops

    t0 = time.perf_counter()
    if args.packed:
        model = load_model(args.packed, experts_per_token=args.k, gpu_cache="100%")
        model.experts.preload()
        where = f"{args.packed} (GPU expert cache: all experts)"
    else:
        model = load_model(args.dir, experts_per_token=args.k)
        where = args.dir
    touch(model)
    L = len(model.layers)
    print(f"loaded {where} in {time.perf_counter() - t0:.1f} s, {L} layers, K={args.k}, {model.dtype} ({_env()})", flush=True)
    prompt = list(range(1, 9))
    ops = kernel_ops()
    rt = None
    if args.profile:
        from ..experts import cuda
        rt = cuda.runtime()

    def profile_last_steps(i):
        if rt is not None and i == args.steps - 3:
            mx.synchronize()
            rt.lib.cudaProfilerStart()

    for label, compile in (("op by op", False), ("compiled", True)):
        with_ops(model, ops, compile)
        rows = decode_steps(model, prompt, args.steps, fresh_tokens=True, before_step=profile_last_steps)
        if rt is not None:
            rt.lib.cudaProfilerStop()
        b, e = np.median(np.array(rows[2:]), axis=0)
        first = sum(rows[0]) * 1e3
        print(f"decode ({label}): build {b * 1e3:.2f} ms + eval {e * 1e3:.2f} ms = {(b + e) * 1e3:.2f} ms/token "
              f"(first step {first:.0f} ms); per layer (embed+head included) {(b + e) / L * 1e6:.0f} us", flush=True)


def rows_sweep(reps: int) -> None:
    """Rows per warp of qmv (the decode's matrix shapes) and of the MoE kernels, then the words
    of codes a lane keeps in flight (QWORDS) at the default rows: each setting checked against
    the plain twin (bf16 bound) and timed as a chain of `reps` dependent calls (the decode's
    situation: one token, each launch waiting for the last)."""
    from . import gpu, plain
    from .check import BOUND, qlinear, rnd, moe_inputs

    dt = mx.bfloat16
    gk = gpu.GpuKernels("cuda")

    def err(a, b):
        a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    def chain(step, x0):
        def run():
            x = x0
            for _ in range(reps):
                x = step(x)
            return x
        _, e = timed(run)
        return e / reps * 1e6

    def cell(label, got, ref, step, x0) -> str:
        e = max(err(a, b) for a, b in zip(got, ref))
        return f"{label}: {chain(step, x0):6.1f} us{'' if e <= BOUND[dt] else f' FAIL {e:.1e}'}"

    qshapes = {"GDN in_proj 4096->12288|8192|64|64": (4096, [12288, 8192, 64, 64]),
               "attn q|k|v 4096->16384|512|512": (4096, [16384, 512, 512]),
               "out_proj/o_proj 8192->4096": (8192, [4096]),
               "router|shared gate 4096->512|1": (4096, [512, 1]),
               "lm_head 4096->248320": (4096, [248320])}
    qcases = []
    for name, (K, Ns) in qshapes.items():
        lins = [qlinear(n, K, 4, 64, dt) for n in Ns]
        x0 = rnd((1, K), dt)
        qcases.append((name, lins, x0, plain.qmv(x0, lins)))
    d = moe_inputs("397b", dt)
    K, I, Is = d["K"], d["gate"].weight.shape[1], d["sg"].out_features
    h0, hs0 = rnd((K, I), dt), rnd((Is,), dt)
    gu_args = lambda x: (x, d["rows"], d["gate"], d["up"], d["sg"], d["su"])
    dn_args = lambda r: (h0, d["rows"], d["w"], d["down"], hs0, d["sd"], mx.zeros((1,), dt), r)
    ref_gu, ref_dn = plain.moe_gate_up(*gu_args(d["x"])), plain.moe_down(*dn_args(d["res"]))

    def qmv_cell(label, lins, x0, ref):
        # the next call's input depends on this one's output (a scalar mix keeps the shape)
        return cell(label, gk.qmv(x0, lins), ref, lambda x: x + gk.qmv(x, lins)[0][..., :1] * 0, x0)

    def gu_cell(label):
        return cell(label, gk.moe_gate_up(*gu_args(d["x"])), ref_gu,
                    lambda x: x + gk.moe_gate_up(*gu_args(x))[1][:1] * 0, d["x"])

    def dn_cell(label):
        return cell(label, [gk.moe_down(*dn_args(d["res"]))], [ref_dn], lambda r: gk.moe_down(*dn_args(r)), d["res"])

    saved = gpu.QMV_ROWS, gpu.MOE_GU_ROWS, gpu.MOE_DOWN_ROWS, gpu.QWORDS
    print(f"qmv rows per warp (FLASHMOE_QMV_ROWS; now {gpu.QMV_ROWS or 'auto'}), us per dependent call "
          "(and a small add), max rel err vs twin:")
    for name, lins, x0, ref in qcases:
        cells = []
        for R in (1, 2, 4, 8):
            gpu.QMV_ROWS = R
            cells.append(qmv_cell(f"R={R}", lins, x0, ref))
        cells.append(f"MLX: {chain(lambda x: x + plain.qmv(x, lins)[0][..., :1] * 0, x0):6.1f} us")   # MLX's own
        print(f"  {name:38} " + "   ".join(cells), flush=True)
    gpu.QMV_ROWS = saved[0]
    print(f"MoE rows per warp (FLASHMOE_MOE_ROWS; now {gpu.MOE_GU_ROWS},{gpu.MOE_DOWN_ROWS}):")
    cells = []
    for R in (1, 2, 4):
        gpu.MOE_GU_ROWS = R
        cells.append(gu_cell(f"R={R}"))
    print("  moe_gate_up (4 experts + shared)      " + "   ".join(cells), flush=True)
    gpu.MOE_GU_ROWS = saved[1]
    cells = []
    for R in (1, 2, 4, 8):
        gpu.MOE_DOWN_ROWS = R
        cells.append(dn_cell(f"R={R}"))
    print("  moe_down (4 experts + shared)         " + "   ".join(cells), flush=True)
    gpu.MOE_DOWN_ROWS = saved[2]
    print(f"words of codes in flight per lane (FLASHMOE_QMV_WORDS; now {gpu.QWORDS}), default rows:")
    for name, lins, x0, ref in qcases:
        cells = []
        for W in (8, 16, 32, 64):
            gpu.QWORDS = W
            cells.append(qmv_cell(f"W={W}", lins, x0, ref))
        print(f"  {name:38} " + "   ".join(cells), flush=True)
    for name, one in (("moe_gate_up (4 experts + shared)", gu_cell), ("moe_down (4 experts + shared)", dn_cell)):
        cells = []
        for W in (8, 16, 32, 64):
            gpu.QWORDS = W
            cells.append(one(f"W={W}"))
        print(f"  {name:38} " + "   ".join(cells), flush=True)
    gpu.QMV_ROWS, gpu.MOE_GU_ROWS, gpu.MOE_DOWN_ROWS, gpu.QWORDS = saved


def first_calls(path: str) -> None:
    """Where the first decode step's time goes: every fused op of the first two decode steps
    evaluated on its own (mx.eval + synchronize) and timed, beside the embedding and the head."""
    from ..engine.load import load_model
    from . import Ops, OP_NAMES, ops as kernel_ops
    from .decode_bench import with_ops

    t0 = time.perf_counter()
    model = load_model(path, experts_per_token=4)
    touch(model)
    print(f"loaded and moved to the GPU in {time.perf_counter() - t0:.1f} s ({_env()})", flush=True)
    fused = kernel_ops()
    log: list = []

    def timed_op(name, fn):
        def call(*a, **k):
            mx.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            mx.eval(out)
            mx.synchronize()
            log.append((name, time.perf_counter() - t))
            return out
        return call

    ops = Ops(fused.backend, **{n: timed_op(n, getattr(fused, n)) for n in OP_NAMES})
    cache = model.make_cache()
    t = time.perf_counter()
    mx.eval(model(list(range(1, 9)), cache, last_only=True))
    print(f"prompt (8 tokens, plain path): {time.perf_counter() - t:.2f} s", flush=True)
    with_ops(model, ops, compile=False)
    for step in (1, 2):
        log.clear()
        t = time.perf_counter()
        mx.eval(model([step], cache, last_only=True))
        total = time.perf_counter() - t
        in_ops = sum(dt for _, dt in log)
        print(f"decode step {step}: {total:.2f} s, of which the fused ops {in_ops:.2f} s ({len(log)} calls); "
              f"slowest calls: " + ", ".join(f"{n} {dt * 1e3:.0f} ms" for n, dt in sorted(log, key=lambda x: -x[1])[:8]),
              flush=True)


# setting key -> the environment variable it stands for
SETTING_KEYS = {"grid": "FLASHMOE_GRID", "blocks": "FLASHMOE_GRID_BLOCKS", "words": "FLASHMOE_QMV_WORDS",
                "qrows": "FLASHMOE_QMV_ROWS", "moerows": "FLASHMOE_MOE_ROWS", "gdnrows": "FLASHMOE_GDN_ROWS",
                "threads": "FLASHMOE_MV_THREADS", "xvinner": "FLASHMOE_XV_INNER", "l2pf": "FLASHMOE_L2_PREFETCH",
                "fuseroute": "FLASHMOE_FUSE_ROUTE", "fusenorm": "FLASHMOE_FUSE_INPUT_NORM",
                "cattn": "FLASHMOE_COMPILE_ATTENTION", "cstep": "FLASHMOE_COMPILE_STEP"}
# read by the engine at each call rather than by the kernel module: set in the environment itself
_ENGINE_KEYS = ("FLASHMOE_FUSE_INPUT_NORM", "FLASHMOE_COMPILE_ATTENTION", "FLASHMOE_COMPILE_STEP")


def parse_setting(text: str) -> dict:
    """'grid=2 words=16' -> {'FLASHMOE_GRID': '2', 'FLASHMOE_QMV_WORDS': '16'} ('-': the defaults)."""
    out = {}
    for part in text.split():
        if part == "-":
            continue
        k, _, v = part.partition("=")
        if k not in SETTING_KEYS or not v:
            raise SystemExit(f"bad setting {part!r}: use {', '.join(f'{k}=...' for k in SETTING_KEYS)}")
        out[SETTING_KEYS[k]] = v
    return out


def set_knobs(env: dict) -> None:
    """The kernel module's knobs as under environment `env` (unset ones at their defaults); the
    engine-read ones put in the process environment itself."""
    from . import gpu

    for k in _ENGINE_KEYS:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)
    gpu.configure(env)


def apply_setting(env: dict, backend: str = "cuda"):
    """`set_knobs(env)`, then fresh kernels -> the backend's ops with them."""
    from . import _built, ops

    set_knobs(env)
    _built.pop(backend, None)
    return ops(backend)


def settings_sweep(args) -> None:
    """Decode (resident, compiled, fresh tokens) under each setting in one process, with the plain
    path and embed+head timed once: us per layer, step by step (build, then evaluate) and
    pipelined (as generate runs it), each the median over --rounds rounds that visit the settings
    in turn (the card's speed drifts between minutes); each setting's logits for the same tokens
    against the plain path's; the 397B MoE block (check case) compiled, fused against plain. The
    fastest setting (pipelined) goes to --best."""
    from ..engine.load import load_model
    from . import check
    from .decode_bench import decode_times, heat, logits_error, logits_run, pipelined_time, with_ops

    t0 = time.perf_counter()
    model = load_model(args.dir, experts_per_token=args.k)
    touch(model)
    L = len(model.layers)
    print(f"loaded {args.dir} in {time.perf_counter() - t0:.1f} s, {L} layers, K={args.k}, {model.dtype} ({_env()})",
          flush=True)
    prompt = list(range(1, 9))
    ref = logits_run(model, None, prompt, 4)
    with_ops(model, None)
    plain_tok = float(np.median(decode_times(model, prompt, args.steps, fresh_tokens=True))) * 1e3
    eh = float(np.median(decode_times(model, prompt, args.steps, embed_head_only=True))) * 1e3
    print(f"plain: {plain_tok:.2f} ms/token, {(plain_tok - eh) / L * 1e3:.1f} us/layer; embed+head {eh:.2f} ms", flush=True)
    mx.random.seed(0)
    f, t, _ = check.case_moe_block(args.moe_shape, mx.bfloat16)
    mx.eval(check._flat(t()))    # the case's random inputs, made once (not inside each timed graph)
    heat()
    moe_plain = check.time_call(mx.compile(lambda: check._flat(t())), args.runs)
    texts = args.settings.split(";")
    built, seen = {}, {text: {"step": [], "pipe": [], "eh": []} for text in texts}
    for r in range(args.rounds):
        for text in texts:
            setting = parse_setting(text)
            if text not in built:
                o = built[text] = apply_setting(setting, args.backend)
                seen[text]["err"] = logits_error(logits_run(model, o, prompt, 4), ref)
                with_ops(model, o)
                heat()
                seen[text]["moe"] = check.time_call(mx.compile(lambda: check._flat(f(o))), args.runs)
            set_knobs(setting)
            with_ops(model, built[text])
            heat()
            seen[text]["step"].append(float(np.median(decode_times(model, prompt, args.steps, fresh_tokens=True))) * 1e3)
            seen[text]["pipe"].append(pipelined_time(model, prompt, args.pipe_steps)[0] * 1e3)
            seen[text]["eh"].append(pipelined_time(model, prompt, args.pipe_steps, embed_head_only=True)[0] * 1e3)
            with_ops(model, None)
        print(f"round {r + 1}: " + ", ".join(f"{t} {(seen[t]['pipe'][-1] - seen[t]['eh'][-1]) / L * 1e3:.1f}"
                                             for t in texts) + " us/layer pipelined", flush=True)
    print(f"medians of {args.rounds} rounds; step: build then evaluate, as the benchmarks time it; pipelined: "
          f"as generate runs it (embed+head pipelined alone beside it)")
    print(f"{'setting':36} {'ms/token':>8} {'us/layer':>8} {'vs plain':>8} {'pipe ms':>8} {'pipe us/l':>9} "
          f"{'rel diff':>9} {'top1':>5} {'MoE us':>7} {'MoE x':>6}", flush=True)
    best = None
    for text in texts:
        v = seen[text]
        tok, pipe, peh = (float(np.median(v[k])) for k in ("step", "pipe", "eh"))
        per_layer, pipe_layer = (tok - eh) / L * 1e3, (pipe - peh) / L * 1e3
        print(f"{text:36} {tok:8.2f} {per_layer:8.1f} {(plain_tok - eh) / (tok - eh):7.2f}x {pipe:8.2f} {pipe_layer:9.1f} "
              f"{v['err']['max']:9.2e} {v['err']['top1']:5.2f} {v['moe']:7.1f} {moe_plain / v['moe']:5.2f}x", flush=True)
        if best is None or pipe_layer < best[0]:
            best = (pipe_layer, parse_setting(text))
    set_knobs({})
    env = " ".join(f"{k}={v}" for k, v in best[1].items())
    print(f"fastest: {env or 'the defaults'} ({best[0]:.1f} us/layer pipelined)")
    if args.best:
        Path(args.best).write_text(env + "\n")


def host_profile(args) -> None:
    """Where the host's time goes in a pipelined decode (which the host bounds on the H200): per
    token, building the step (Python, the compiled layers' calls) against `mx.async_eval` (MLX
    encoding and launching the kernels) against waiting for the device; building split per layer
    kind; then the build's Python profile. Compiled and op by op. A small model (the tiny preset)
    shows the host's share best: the same kernels per layer, little GPU time."""
    import cProfile
    import io
    import pstats

    from ..engine.load import load_model
    from ..engine.sampling import DeviceSampler, SamplingParams
    from .decode_bench import heat, with_ops

    model = load_model(args.dir)
    touch(model)
    fused = model.layers[0].ops
    print(f"loaded {args.dir}: {len(model.layers)} layers "
          f"({sum(l.is_linear for l in model.layers)} GatedDeltaNet), {model.dtype}, ops {fused and fused.backend}")
    sample = DeviceSampler(SamplingParams(temperature=0.0))
    kinds = {}

    class Timed:    # a layer whose graph building is timed per kind
        def __init__(self, layer):
            self.layer, self.is_linear, self.ops = layer, layer.is_linear, layer.ops
            self.kind = "gdn" if layer.is_linear else "attn"

        def __call__(self, x, c):
            t = time.perf_counter()
            out = self.layer(x, c)
            kinds[self.kind] = kinds.get(self.kind, 0.0) + time.perf_counter() - t
            return out

        def __getattr__(self, name):    # the rest of the layer (a whole-step trace calls its parts)
            return getattr(self.layer, name)

    layers = model.layers
    for compile in (True, False):
        model.layers = layers
        with_ops(model, fused, compile)
        model.layers = [Timed(l) for l in layers]
        cache = model.make_cache()
        y = sample(model(list(range(1, 9)), cache, last_only=True)[-1])
        mx.async_eval(y)
        y.item()
        mark = cache.mark()
        print(f"{'compiled' if compile else 'op by op'} step graph: "
              + census_line(graph_census([sample(model.step(y, cache)[-1])])), flush=True)
        cache.rewind(mark)
        n, warm = args.steps, 16
        prof = cProfile.Profile()
        split = {"build": 0.0, "launch": 0.0, "wait": 0.0}
        for i in range(warm + n):
            if i == warm:
                y.item()
                heat()
                split = dict.fromkeys(split, 0.0)
                kinds.clear()
                t_all = time.perf_counter()
                prof.enable()
            t0 = time.perf_counter()
            following = sample(model.step(y, cache)[-1])
            t1 = time.perf_counter()
            mx.async_eval(following)
            t2 = time.perf_counter()
            y.item()
            t3 = time.perf_counter()
            split["build"] += t1 - t0
            split["launch"] += t2 - t1
            split["wait"] += t3 - t2
            y = following
        prof.disable()
        total = (time.perf_counter() - t_all) / n * 1e6
        L = len(model.layers)
        n_gdn = sum(l.is_linear for l in layers)
        print(f"{'compiled' if compile else 'op by op'}: {total:.0f} us per token ({total / L:.0f} per layer); "
              + ", ".join(f"{k} {v / n * 1e6:.0f}" for k, v in split.items())
              + (f" us per token; building per layer: GatedDeltaNet {kinds.get('gdn', 0) / n / max(n_gdn, 1) * 1e6:.0f}, "
                 f"attention {kinds.get('attn', 0) / n / max(L - n_gdn, 1) * 1e6:.0f} us" if kinds else
                 " us per token; the whole step one compiled call (FLASHMOE_COMPILE_STEP)"), flush=True)
        # The same launches with the device idle first: if `mx.async_eval` takes much longer in the
        # pipelined loop above, it waits there for the device (backpressure), not for MLX's work.
        idle = []
        for _ in range(min(n, 32)):
            following = sample(model.step(y, cache)[-1])
            y.item()
            mx.synchronize()
            t1 = time.perf_counter()
            mx.async_eval(following)
            idle.append(time.perf_counter() - t1)
            y = following
        y.item()
        print(f"  async_eval with the device idle first: {float(np.median(idle)) * 1e6:.0f} us per token (median), "
              f"against {split['launch'] / n * 1e6:.0f} pipelined", flush=True)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print("\n".join(l for l in out.getvalue().splitlines() if l.strip())[:6000], flush=True)
    model.layers = layers


def host_loop(args) -> None:
    """A bare pipelined decode for `args.seconds` (as generate runs it: build the next step, launch
    it, then wait for this one's token), nothing timed inside: the process a sampling profiler
    (`perf record`, step `perf` of kernels/gpu_session.sh) watches to see where MLX's host time
    per operation goes. Prints the time per step at the end; preloaded with kernels/cudatrace
    (step `cudatrace`), also the CUDA calls made per step and the time spent in them.""" 
    from ..engine.load import load_model
    from ..engine.sampling import DeviceSampler, SamplingParams

    model = load_model(args.dir)
    touch(model)
    sample = DeviceSampler(SamplingParams(temperature=0.0))
    cache = model.make_cache()
    y = sample(model(list(range(1, 9)), cache, last_only=True)[-1])
    mx.async_eval(y)
    for _ in range(16):     # warm-up: traces and the kernels' compilation
        following = sample(model.step(y, cache)[-1])
        mx.async_eval(following)
        y.item()
        y = following
    print(f"looping: {len(model.layers)} layers, {model.dtype}, pid {os.getpid()}", flush=True)
    y.item()
    mark = cache.mark()
    trace = _cudatrace()
    if trace is not None:
        trace.cudatrace_reset()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        if n % 1024 == 1023:      # back to the mark now and then: the KV buffers stay small
            y.item()
            cache.rewind(mark)
        following = sample(model.step(y, cache)[-1])
        mx.async_eval(following)
        y.item()
        y = following
        n += 1
    y.item()
    dt = time.perf_counter() - t0
    print(f"{n} steps in {dt:.1f} s: {dt / n * 1e6:.0f} us per token, {dt / n / len(model.layers) * 1e6:.0f} per layer",
          flush=True)
    if trace is not None:
        import ctypes

        trace.cudatrace_dump(ctypes.c_long(n))


def _cudatrace():
    """kernels/cudatrace's library where the process runs with it preloaded (LD_PRELOAD), else None."""
    import ctypes

    lib = ctypes.CDLL(None)
    return lib if hasattr(lib, "cudatrace_dump") else None


_TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
# The Speed-of-light, occupancy, launch and warp-state figures shown per kernel (ncu's display
# names, matched as prefixes), then every raw stall-reason metric that was collected.
NCU_SHOWN = ("Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput", "Registers Per Thread",
             "Theoretical Occupancy", "Achieved Occupancy", "Warp Cycles Per Issued Instruction",
             "Issue Slots Busy", "Executed Ipc Active", "Waves Per SM")
STALL = "smsp__average_warps_issue_stalled_"


def ncu_rows(path: str) -> dict:
    """An `ncu --csv` log -> {kernel name (60 chars): {metric: [values, one per call]}}, durations
    in us under "us" (from gpu__time_duration.sum or the Speed-of-light section's Duration)."""
    import csv

    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    out: dict = {}
    for r in csv.DictReader(lines):
        name, metric = r.get("Kernel Name", "")[:60], r.get("Metric Name", "")
        try:
            v = float(r.get("Metric Value", "").replace(",", ""))
        except ValueError:
            continue
        if metric in ("gpu__time_duration.sum", "Duration"):
            v *= _TIME_UNITS.get(r.get("Metric Unit", "ns"), 1e-3)
        out.setdefault(name, {}).setdefault(metric, []).append(v)
    for m in out.values():      # the section's Duration stands in only where the raw metric is absent
        dur = m.pop("Duration", None)
        m["us"] = m.pop("gpu__time_duration.sum", dur)
        if m["us"] is None:
            del m["us"]
    return out


def ncu_summary(path: str) -> None:
    """Per kernel of an ncu CSV log: calls, GPU time in all and per call; where the log has more
    than durations (`--section ...`, stall-reason metrics), each collected figure's mean too."""
    per = ncu_rows(path)
    times = {k: m["us"] for k, m in per.items() if "us" in m}
    if not times:
        print(f"no kernel durations in {path}")
        return
    n_all = sum(len(v) for v in times.values())
    print(f"{n_all} kernels, {sum(sum(v) for v in times.values()):.1f} us on the GPU in all")
    print(f"{'kernel':60} {'calls':>6} {'us total':>9} {'us/call':>8}")
    order = sorted(times, key=lambda k: -sum(times[k]))
    for name in order:
        t = times[name]
        print(f"{name:60} {len(t):6d} {sum(t):9.1f} {sum(t) / len(t):8.1f}")
    for name in order:
        m = per[name]
        shown = [(k, v) for k, v in m.items() if k.startswith(NCU_SHOWN)]
        stalls = sorted(((k[len(STALL):].split("_per_")[0], sum(v) / len(v)) for k, v in m.items()
                         if k.startswith(STALL)), key=lambda kv: -kv[1])
        if not shown and not stalls:
            continue
        print(f"\n{name} ({len(times[name])} calls, {sum(times[name]) / len(times[name]):.1f} us/call)")
        for k, v in sorted(shown):
            print(f"    {k:40} {sum(v) / len(v):10.2f}")
        if stalls:
            print("    stalls (warps per issue): " + ", ".join(f"{k} {v:.2f}" for k, v in stalls if v >= 0.05))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("launch")
    p.add_argument("--n", type=int, default=200)
    p = sub.add_parser("decode")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", help="MLX-layout model: every weight resident")
    where.add_argument("--packed", help="packed model: experts in a GPU expert cache holding all of them")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--profile", action="store_true",
                   help="cudaProfilerStart/Stop around the last 3 steps of each path (run under ncu --profile-from-start off)")
    p = sub.add_parser("rows", help="rows-per-warp settings of qmv and the MoE kernels, checked and timed")
    p.add_argument("--reps", type=int, default=50)
    p = sub.add_parser("firstcalls", help="the first decode steps' fused ops timed one by one")
    p.add_argument("--dir", required=True)
    p = sub.add_parser("settings", help="decode under several kernel settings in one process")
    p.add_argument("--dir", required=True)
    p.add_argument("--settings", default="-;grid=1;grid=2;grid=4",
                   help="';'-separated settings, each space-separated key=value of " + ", ".join(SETTING_KEYS))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds over the settings (medians reported)")
    p.add_argument("--pipe-steps", type=int, default=128, help="decode steps of each pipelined timing")
    p.add_argument("--best", default=None, help="write the fastest setting's environment here")
    p.add_argument("--moe-shape", default="397b", help="shape set of the MoE block timed (check.MOE_SHAPES)")
    p.add_argument("--backend", default="cuda", help="kernel backend (twin: a CPU run of the sweep itself)")
    p = sub.add_parser("host", help="where the host's time goes in a pipelined decode")
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--top", type=int, default=25)
    p = sub.add_parser("loop", help="a bare pipelined decode for a while (for a sampling profiler)")
    p.add_argument("--dir", required=True)
    p.add_argument("--seconds", type=float, default=20.0)
    p = sub.add_parser("ncu", help="summarise an ncu CSV log per kernel")
    p.add_argument("csv")
    args = ap.parse_args(argv)
    if args.cmd == "launch":
        launch(args.n)
    elif args.cmd == "rows":
        rows_sweep(args.reps)
    elif args.cmd == "firstcalls":
        first_calls(args.dir)
    elif args.cmd == "settings":
        settings_sweep(args)
    elif args.cmd == "host":
        host_profile(args)
    elif args.cmd == "loop":
        host_loop(args)
    elif args.cmd == "ncu":
        ncu_summary(args.csv)
    else:
        decode(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
