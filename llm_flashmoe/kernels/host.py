"""Where the host's time goes in a pipelined decode (on the H200 the host's work per layer is as
long as the GPU's at 397B shapes, and the bound with smaller ones): the build / launch / wait
split with the graph's census and a Python profile (`host`), and a bare pipelined loop for a
profiler or kernels/cudatrace (`loop`). Run through `python -m llm_flashmoe.kernels.overhead
host|loop ...`."""

from __future__ import annotations

import gc
import os
from pathlib import Path
import re
import time

import mlx.core as mx
import numpy as np

from .overhead import census_line, graph_census, touch


def host_profile(args) -> None:
    """Where the host's time goes in a pipelined decode: per token, building the step (Python,
    the compiled layers' calls) against `mx.async_eval` (MLX encoding and launching the kernels)
    against waiting for the device; building split per layer kind; then the build's Python
    profile. Compiled and op by op. A small model (the tiny preset) shows the host's share best:
    the same kernels per layer, little GPU time."""
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


def pad_inputs(n: int) -> None:
    """Every fused launch after this takes `n` more input arrays, which it does not read
    (distinct float32 [4] arrays made once, as weights are distinct arrays; the kernels are
    made again with them in their signature). What each input costs the host (`loop
    --pad-inputs`) is what taking the weights' scales and biases into their codes' buffer
    would save: a GatedDeltaNet layer's launches take 63 arrays, 26 of them those."""
    from . import gpu

    if n <= 0:
        return
    pads = [mx.full((4,), float(i), mx.float32) for i in range(n)]
    mx.eval(pads)
    names = tuple(f"fm_pad{i}" for i in range(n))
    made = gpu.GpuKernels.kernel

    def kernel(self, name, inputs, outputs, defines):
        launch = made(self, name, tuple(inputs) + names, outputs, defines)
        return lambda *a, inputs, **kw: launch(*a, inputs=[*inputs, *pads], **kw)

    gpu.GpuKernels.kernel = kernel


def host_loop(args) -> None:
    """A bare pipelined decode for `args.seconds` (as generate runs it: build the next step, launch
    it, then wait for this one's token), nothing timed inside: the process a sampling profiler
    (`perf record`, step `perf` of kernels/gpu_session.sh) watches to see where MLX's host time
    per operation goes. Prints the time per step at the end; preloaded with kernels/cudatrace
    (step `cudatrace`), also the CUDA calls made per step and the time spent in them.""" 
    from ..engine.load import load_model
    from ..engine.sampling import DeviceSampler, SamplingParams

    pad_inputs(getattr(args, "pad_inputs", 0))
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
    if args.gc == "freeze":     # the objects made so far (the model's) out of the collector's way
        gc.freeze()
    elif args.gc == "off":
        gc.disable()
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
    print(f"{n} steps in {dt:.1f} s: {dt / n * 1e6:.0f} us per token, {dt / n / len(model.layers) * 1e6:.0f} per layer"
          f" (Python's collector: {args.gc})" + (f" (each launch given {args.pad_inputs} more inputs)"
                                                  if getattr(args, "pad_inputs", 0) > 0 else ""), flush=True)
    if trace is not None:
        import ctypes

        trace.cudatrace_dump(ctypes.c_long(n))


def _cudatrace():
    """kernels/cudatrace's library where the process runs with it preloaded (LD_PRELOAD), else None."""
    import ctypes

    lib = ctypes.CDLL(None)
    return lib if hasattr(lib, "cudatrace_dump") else None


def stacks_summary(path: str, top: int = 40, keep: str | None = None) -> dict:
    """py-spy's raw (folded) samples of a process (`record --native -f raw`: a line per stack,
    "frame;frame;...;leaf count", the first frame naming the thread) summed: per thread, and for
    the busiest thread (the one that builds and launches the steps) the functions most often on
    top of the stack (self) and anywhere in it (inclusive: counted once per stack), as shares of
    that thread's samples. `keep`: only stacks through a frame containing it. Prints the tables
    and returns {"threads": {name: samples}, "self": {fn: samples}, "inclusive": {fn: samples}}."""
    from collections import Counter

    threads, stacks = Counter(), {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or " " not in line:
            continue
        text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = text.split(";")
        thread = frames[0] if frames[0].startswith("thread") else "-"
        body = frames[1:] if thread != "-" else frames
        if keep and not any(keep in f for f in body):
            continue
        threads[thread] += int(count)
        stacks.setdefault(thread, []).append((body, int(count)))
    if not threads:
        raise SystemExit(f"{path}: no samples" + (f" through a frame containing {keep!r}" if keep else ""))
    main, total = threads.most_common(1)[0]

    def name(f: str) -> str:   # "fn (file:line)" -> "fn (file)": one row per function; an address
        f = re.sub(r" \(([^():]*)(:\d+)?\)$", r" (\1)", f)       # without a symbol -> its library's row
        return re.sub(r"^0x[0-9a-f]+ ", "? ", f)

    own, incl = Counter(), Counter()
    for body, c in stacks[main]:
        names = [name(f) for f in body] or ["?"]
        own[names[-1]] += c
        for f in set(names):
            incl[f] += c
    print(f"{path}: {sum(threads.values())} samples; per thread: "
          + ", ".join(f"{t} {c}" for t, c in threads.most_common(6)))
    for title, table in (("self", own), ("inclusive", incl)):
        print(f"busiest thread ({main}, {total} samples), {title}, % of its samples:")
        for f, c in table.most_common(top):
            print(f"  {100 * c / total:6.2f}  {f[:150]}")
    return {"threads": dict(threads), "self": dict(own), "inclusive": dict(incl)}
