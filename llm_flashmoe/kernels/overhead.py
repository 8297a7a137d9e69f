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

`firstcalls`: the first decode steps' fused ops timed one by one (the kernels' compilation).
The other commands live beside this module and run through its command line: `rows` and
`settings` (sweeps.py), `host` and `loop` (host.py), `ncu` (ncu.py).
"""

from __future__ import annotations

import argparse
import math
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


# bwfloor: the bytes of a 397B decode layer's launches (4-bit codes with their bf16 scales and
# biases), MB: the router and shared gate, moe_down, out_proj/o_proj, the MoE gate/up, q|k|v,
# GatedDeltaNet in_proj; the output head
BW_SIZES_MB = (1.2, 11.8, 18.9, 23.6, 40.2, 47.5, 572.0)


def stream_read(make, name: str, backend: str, nv: int, groups: int, one_pass: int, stage: int):
    """Kernel stream_read (kernels/bench.kern) over nv 16-byte words in `groups` thread groups of
    256, made by `make` (mx.fast.cuda_kernel or metal_kernel, or the emulator's) -> a call
    (w uint32 [4 nv], x [2048]) -> uint32 [groups * 8], whose xor is that of w's words where x is
    zeros (with `stage`, each thread xors in the bits of one staged value)."""
    from .source import render

    header, body = render("stream_read", backend,
                          {"NV": nv, "BW_U": 4, "NGROUPS": groups, "ONE_PASS": one_pass, "STAGE": stage})
    k = make(name=name, input_names=["w", "x"], output_names=["out"], source=body, header=header)

    def call(w, x):
        return k(inputs=[w, x], template=[("T", x.dtype)], grid=(groups * 256, 1, 1), threadgroup=(256, 1, 1),
                 output_shapes=[(groups * 8,)], output_dtypes=[mx.uint32])[0]
    return call


def bw_floor(backend: str, sizes_mb=BW_SIZES_MB, reps: int = 20, runs: int = 5) -> list[dict]:
    """What a launch that only reads as many bytes as each of a decode layer's launches costs here
    (kernel stream_read, kernels/bench.kern), four ways: "wave", 4 groups per multiprocessor
    striding over all of it (one wave); "wave_staged", the same with each group first staging an
    input behind a barrier, as our kernels do; "groups_staged", a short-lived staged group per
    64 KB (about what a qmv launch without FLASHMOE_GRID gives each group: in_proj 644 groups for
    47.5 MB), so several waves; "groups_normed", the same with the input RMS-normalized by each
    group, as the launches with the input norm fused do. Kernels are named fm_bw_<variant>_<MB>
    for ncu; wall time per call from `reps` calls per graph, median of `runs` (MLX's per-operation
    cost included: under ncu, the GPU time alone) -> a row per size and variant."""
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    sms = 32   # (Metal: a guess at the GPU cores)
    if backend == "cuda":
        from ..experts.cuda import runtime

        sms = runtime().sm_count()
    x = mx.zeros((2048,), mx.bfloat16)
    rows = []
    for mb in sizes_mb:
        nv = int(mb * 1e6) // 16
        # calls go round distinct buffers, 240 MB or more in all, so that they read DRAM, not the
        # L2 cache (50 MB on the H200) that a smaller buffer read again would sit in, as a decode
        # step's weights never do
        ws = [mx.zeros((nv * 4,), mx.uint32) for _ in range(max(1, math.ceil(240 / mb)))]
        mx.eval(ws, x)
        one_pass_groups = max(1, nv * 16 // 65536)
        for variant, groups, one_pass, stage in (("wave", 4 * sms, 0, 0), ("wave_staged", 4 * sms, 0, 1),
                                                 ("groups_staged", one_pass_groups, 1, 1),
                                                 ("groups_normed", one_pass_groups, 1, 2)):
            k = stream_read(make, f"fm_bw_{variant}_{mb:g}MB".replace(".", "p"), backend, nv, groups, one_pass, stage)

            def call(i, k=k):
                return k(ws[i % len(ws)], x)

            for _ in range(2):
                mx.eval([call(i) for i in range(reps)])
            times = []
            for _ in range(runs):
                mx.synchronize()
                t0 = time.perf_counter()
                mx.eval([call(i) for i in range(reps)])
                mx.synchronize()
                times.append((time.perf_counter() - t0) / reps * 1e6)
            us = float(np.median(times))
            rows.append({"MB": mb, "variant": variant, "groups": groups, "us": us, "GBps": mb * 1e3 / us})
            print(f"{mb:8.1f} MB  {variant:14} {groups:7d} groups  {us:8.1f} us per call  {mb * 1e3 / us:7.0f} GB/s",
                  flush=True)
    return rows


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
def main(argv=None) -> int:
    from .host import host_loop, host_profile, stacks_summary
    from .ncu import check_marked, ncu_compare, ncu_compare_marked, ncu_summary
    from .sweeps import SETTING_KEYS, ncu_settings, rows_sweep, settings_sweep

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
    p.add_argument("--tolerance", type=int, default=0,
                   help="also each round's bf16-tolerance ratio per setting on this many layers (0: none)")
    p = sub.add_parser("host", help="where the host's time goes in a pipelined decode")
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--top", type=int, default=25)
    p = sub.add_parser("loop", help="a bare pipelined decode for a while (for a sampling profiler)")
    p.add_argument("--dir", required=True)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--gc", choices=("on", "freeze", "off"), default="on",
                   help="Python's collector in the loop: as it is, with the objects made before it frozen, or off")
    p.add_argument("--pad-inputs", type=int, default=0,
                   help="every fused launch takes this many more (unread) input arrays: what an input costs the host")
    p = sub.add_parser("stacks", help="summarise py-spy's raw samples (record --native -f raw): per thread, "
                                      "the busiest thread's functions, self and inclusive")
    p.add_argument("raw")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--keep", default=None, help="only stacks through a frame containing this")
    p = sub.add_parser("ncu", help="summarise an ncu CSV log per kernel, or compare several per kernel family")
    p.add_argument("csv", nargs="+")
    p.add_argument("--labels", default=None, help="comma-separated names of the logs' settings (several logs)")
    p.add_argument("--marked", default=None,
                   help="one log of `ncusettings`: its ';'-separated settings, compared per kernel family")
    p.add_argument("--layers", type=int, default=0,
                   help="with --marked: the model's layers, to split each setting's time per layer and the head")
    p.add_argument("--steps", type=int, default=3, help="with --layers: the decode steps profiled per setting")
    p.add_argument("--check-log", default=None,
                   help="one log of `kernels.check --ncu-marks` and that run's output: GPU time per call, fused and plain")
    p = sub.add_parser("bwfloor", help="what launches that only read a decode layer's launches' bytes cost here")
    p.add_argument("--reps", type=int, default=20, help="calls per graph")
    p.add_argument("--runs", type=int, default=5, help="graphs timed (the median reported)")
    p = sub.add_parser("ncusettings", help="several kernel settings' decode steps in one process, each after a "
                                           "marker kernel (run under ncu --profile-from-start off)")
    p.add_argument("--dir", required=True)
    p.add_argument("--settings", required=True,
                   help="';'-separated settings, each space-separated key=value of " + ", ".join(SETTING_KEYS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--profiled", type=int, default=3, help="the last this many steps of each setting profiled")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--backend", default="cuda", help="kernel backend (twin: a CPU run of the flow itself)")
    p = sub.add_parser("downids", help="moe_down's time per expert set, twice over, per setting (run under ncu; "
                                       "--summary LOG reads the log)")
    p.add_argument("--settings", default="-",
                   help="';'-separated settings, each space-separated key=value of " + ", ".join(SETTING_KEYS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backend", default="cuda", help="kernel backend (twin: a CPU run of the flow itself)")
    p.add_argument("--summary", default=None, help="an ncu CSV log of a run: print its times per set")
    p.add_argument("--gate-up", action="store_true",
                   help="each moe_down after the gate/up launch of the same experts, as in a decode step")
    p.add_argument("--repeat", type=int, default=1,
                   help="moe_down launched this many times in a row on each set (the later calls: its bytes "
                        "and their address translations at hand)")
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
    elif args.cmd == "stacks":
        stacks_summary(args.raw, args.top, args.keep)
    elif args.cmd == "bwfloor":
        from . import active_backend

        backend = active_backend()
        if backend not in ("cuda", "metal"):
            print(f"bwfloor needs a GPU kernel backend (active: {backend}).")
            return 2
        bw_floor(backend, reps=args.reps, runs=args.runs)
    elif args.cmd == "ncusettings":
        ncu_settings(args)
    elif args.cmd == "downids":
        from .sweeps import down_ids, down_ids_summary

        if args.summary:
            down_ids_summary(args.summary, args.settings.split(";"), args.rounds, args.repeat)
        else:
            down_ids(args)
    elif args.cmd == "ncu":
        if args.check_log is not None:
            if len(args.csv) != 1:
                ap.error("--check-log takes one log")
            check_marked(args.csv[0], args.check_log)
        elif args.marked is not None:
            if len(args.csv) != 1:
                ap.error("--marked takes one log")
            ncu_compare_marked(args.csv[0], args.marked.split(";"), args.layers, args.steps)
        elif len(args.csv) == 1:
            ncu_summary(args.csv[0])
        else:
            labels = args.labels.split(",") if args.labels else [Path(c).stem for c in args.csv]
            if len(labels) != len(args.csv):
                ap.error(f"--labels names {len(labels)} settings for {len(args.csv)} logs")
            ncu_compare(args.csv, labels)
    else:
        decode(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
