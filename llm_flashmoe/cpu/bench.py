"""Achieved weight bandwidth of the CPU kernels, beside a reference measured
in the same run: numpy reductions over 1 GiB buffers, one per core, in
parallel threads. Every figure is a ratio to that reference (the machines
are shared; absolute numbers drift with the neighbours' load).

    python -m llm_flashmoe.cpu.bench [--rounds 5] [--no-head] [--model DIR]

`kernel_figures()` times the 397B-shaped matvecs (K=4 routed experts plus
the shared one through the MoE kernel; the linear-attention projections;
the output head) on random weights larger than the caches. `decode_figures()`
times whole decode steps of a model held in RAM (e.g. a synthetic `397b`
checkpoint) per layer against bytes read per layer / reference bandwidth.
The reference is re-measured in every round, interleaved with the kernels,
and each figure is the best round (the one least disturbed by neighbours).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

GIB = 1 << 30


def reference_bandwidth(threads: int | None = None, nbytes: int = GIB, buffers: list | None = None) -> float:
    """Bytes/s of `threads` numpy float32 sums over `nbytes` each, run in parallel threads."""
    threads = threads or len(os.sched_getaffinity(0))
    bufs = buffers or [np.ones(nbytes // 4, np.float32) for _ in range(threads)]
    ts = [threading.Thread(target=np.add.reduce, args=(b,)) for b in bufs]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(b.nbytes for b in bufs) / (time.perf_counter() - t0)


def _random_qmat(rng, rows, cols, bits=4, group=64, scale_dtype=np.float32, copies=1):
    from . import ops

    keep, mats = [], []
    for _ in range(copies):
        w = rng.integers(0, 2**32, (rows, cols * bits // 32), dtype=np.uint32)
        if scale_dtype == "bf16":
            s = (rng.standard_normal((rows, cols // group)).astype(np.float32) * 0.01).view(np.uint32)
            s = (s >> 16).astype(np.uint16)
            b = s.copy()
        else:
            s = rng.standard_normal((rows, cols // group)).astype(scale_dtype) * 0.01
            b = s.copy()
        keep.append((w, s, b))
        mats.append(ops.qmat(w, s, b, bits, group))
    nbytes = sum(a.nbytes for a in keep[0])
    return keep, mats, nbytes


def kernel_figures(rounds: int = 5, head: bool = True, seed: int = 0, pool_experts: int = 40) -> dict:
    """{name: {"GB/s", "ratio"}} for the 397B-shaped matvecs, with "reference GB/s"."""
    from . import ops
    from .build import load

    lib = load()
    if lib is None:
        raise RuntimeError("CPU kernels unavailable")
    rng = np.random.default_rng(seed)
    H, I = 4096, 1024
    # Routed experts as the expert store holds them (bf16 scales), more than fit in any cache.
    eg, g_m, g_b = _random_qmat(rng, I, H, scale_dtype="bf16", copies=pool_experts)
    eu, u_m, u_b = _random_qmat(rng, I, H, scale_dtype="bf16", copies=pool_experts)
    ed, d_m, d_b = _random_qmat(rng, H, I, scale_dtype="bf16", copies=pool_experts)
    # Resident weights (float32 scales, as the engine holds them on the CPU); two copies so a
    # round never finds the last round's weights in cache.
    sh = [_random_qmat(rng, r, c, copies=2) for r, c in [(I, H), (I, H), (H, I)]]
    proj_in = [_random_qmat(rng, r, H, copies=2) for r in (12288, 8192, 64, 64)]
    proj_out = _random_qmat(rng, H, 8192, copies=2)
    lm = _random_qmat(rng, 248320, H) if head else None
    threads = lib.fm_threads()
    ref_bufs = [np.ones(GIB // 4, np.float32) for _ in range(threads)]
    x = rng.standard_normal((1, H)).astype(np.float32)
    x2 = rng.standard_normal((1, 8192)).astype(np.float32)
    K = 4
    best: dict[str, float] = {}

    def timed(name, nbytes, fn):
        t0 = time.perf_counter()
        fn()
        bw = nbytes / (time.perf_counter() - t0)
        best[name] = max(best.get(name, 0.0), bw)

    for r in range(rounds):
        best["reference"] = max(best.get("reference", 0.0), reference_bandwidth(buffers=ref_bufs))
        c = r % 2
        for _ in range(3):
            ids = rng.choice(pool_experts, K, replace=False)
            gate = [g_m[i] for i in ids] + [sh[0][1][c]]
            up = [u_m[i] for i in ids] + [sh[1][1][c]]
            down = [d_m[i] for i in ids] + [sh[2][1][c]]
            nbytes = K * (g_b + u_b + d_b) + sh[0][2] + sh[1][2] + sh[2][2]
            offs, toks = np.arange(K + 2, dtype=np.int32), np.zeros(K + 1, np.int32)
            coef = np.full(K + 1, 0.25, np.float32)
            timed("moe experts (K=4 + shared)", nbytes, lambda: ops.moe(lib, gate, up, down, offs, toks, coef, x))
        for j in range(3):  # alternate copies: never the previous call's weights
            cj = (c + j) % 2
            timed("projections in (qkv, z, b, a)", sum(p[2] for p in proj_in),
                  lambda: ops.qmm(lib, [p[1][cj] for p in proj_in], x))
            timed("projection out (8192 -> 4096)", proj_out[2], lambda: ops.qmm(lib, [proj_out[1][cj]], x2))
        if lm is not None:
            timed("lm_head (248320 x 4096)", lm[2], lambda: ops.qmm(lib, lm[1], x))
    ref = best.pop("reference")
    out = {"threads": threads, "reference GB/s": round(ref / 1e9, 2)}
    for k, v in best.items():
        out[k] = {"GB/s": round(v / 1e9, 2), "ratio": round(v / ref, 3)}
    return out


def _linear_bytes(lin) -> int:
    return sum(a.nbytes for a in (lin.weight, lin.scales, lin.biases) if a is not None)


def layer_bytes(model, i: int, k: int) -> int:
    """Bytes a decode step reads in layer i: resident weights, k experts, recurrent state."""
    from ..engine.linear import Linear

    layer = model.layers[i]
    total = 0
    for block in (layer.mixer, layer.moe):
        for v in vars(block).values():
            if isinstance(v, Linear):
                total += _linear_bytes(v)
    gate, up, down = model.experts.layers[i]
    E = gate.weight.shape[0]
    total += k * sum(_linear_bytes(l) for l in (gate, up, down)) // E
    if layer.is_linear:
        m = layer.mixer
        total += m.Hv * m.Dv * m.Dk * 4
    return total


def decode_figures(model_dir: str, k: int = 4, tokens: int = 8, rounds: int = 3) -> dict:
    """Per-layer decode time of a model held in RAM against bytes read per layer / reference."""
    import mlx.core as mx

    from ..engine.load import load_model
    from ..engine.linear import embedding_rows

    model = load_model(model_dir, dtype=mx.float32, experts_per_token=k)
    backend = model.layers[0].ops.backend if model.layers[0].ops is not None else "plain"
    cache = model.make_cache()
    model([1, 2, 3], cache, last_only=True)
    n_layers = len(model.layers)
    per_layer_bytes = sum(layer_bytes(model, i, k) for i in range(n_layers)) / n_layers
    threads = len(os.sched_getaffinity(0))
    ref_bufs = [np.ones(GIB // 4, np.float32) for _ in range(threads)]
    best_ref, best_layer, refs, layers = 0.0, float("inf"), [], []
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        refs.append(reference_bandwidth(buffers=ref_bufs))
        best_ref = max(best_ref, refs[-1])
        for _ in range(tokens):
            ids = mx.array(rng.integers(0, 248000, 1).astype(np.int32))
            x = embedding_rows(model.embed, ids).astype(model.dtype)[None]
            mx.eval(x)
            t0 = time.perf_counter()
            for layer, c in zip(model.layers, cache.layers):
                x = layer(x, c)
            mx.eval(x)
            layers.append((time.perf_counter() - t0) / n_layers)
            best_layer = min(best_layer, layers[-1])
            cache.tokens.append(0)
    bound = per_layer_bytes / best_ref
    return {"backend": backend, "layers": n_layers, "k": k, "reference GB/s": round(best_ref / 1e9, 2),
            "bytes per layer (MB)": round(per_layer_bytes / 1e6, 1), "ms per layer": round(best_layer * 1e3, 2),
            "bound ms per layer": round(bound * 1e3, 2), "time / bound": round(best_layer / bound, 3),
            # The VM's memory bandwidth swings within a run (25-50 GB/s): the same with medians, for context.
            "reference GB/s, every round": [round(r / 1e9, 1) for r in refs],
            "median time / median-reference bound": round(float(np.median(layers)) * float(np.median(refs))
                                                          / per_layer_bytes, 3)}


def stream_figures(model_dir: str, k: int = 4, tokens: int = 6, seed: int = 0, rounds: int = 3) -> dict:
    """Decode of a packed model whose experts are streamed by the expert store, cold
    (page cache dropped) and warm (the same tokens again: the same experts, now
    cached), against expert I/O time and compute time measured separately in the
    same run: I/O by replaying the recorded reads alone (cold: after dropping the
    cache again, every way the store can read misses, the fastest counting), compute
    as decode time minus the time spent in reads.
    Teacher-forced random tokens from a one-token prompt make every pass route alike.
    Times per token cover the layers (embedding and output head excluded). Each of `rounds`
    rounds measures all of it; the median of each figure and every round's ratio are reported."""
    import mlx.core as mx

    from ..engine.linear import embedding_rows
    from ..engine.load import load_model

    model = load_model(model_dir, dtype=mx.float32, experts_per_token=k)
    store = model.experts
    if not hasattr(store, "drop_page_cache"):
        raise RuntimeError(f"{model_dir} is not a packed directory (experts are not streamed)")
    seq = np.random.default_rng(seed).integers(0, 248000, tokens + 1).tolist()

    def decode_pass():
        cache = model.make_cache()
        store.trace = []
        store.stats.reset()
        total = 0.0
        for t in seq:
            x = embedding_rows(model.embed, mx.array([t])).astype(model.dtype)[None]
            mx.eval(x)
            t0 = time.perf_counter()
            for layer, c in zip(model.layers, cache.layers):
                x = layer(x, c)
            mx.eval(x)
            total += time.perf_counter() - t0
        n = len(seq)
        st = store.stats
        used = max(st.experts, 1)
        spec = (st.prefetched / n, st.prefetch_hits / max(st.prefetched, 1))
        return (total / n, st.read_seconds / n, (st.cache_hits / used, st.in_place / used, spec), store.trace,
                st.bytes / n)

    def replay(trace, read) -> float:
        """Expert I/O alone, per token: the recorded reads again through `read`."""
        store.trace = None  # (recording would extend the list being replayed)
        t0 = time.perf_counter()
        for layer, ids in trace:
            read(layer, ids)
        return (time.perf_counter() - t0) / len(seq)

    # The ways the store can read misses: copies into buffers; the kernel's readahead into the
    # page cache; and, where every expert part is 4 KiB-aligned and the file system takes it,
    # O_DIRECT reads into buffers (absent otherwise, not zero).
    ways = [("copies", store.read_experts), ("readahead", store.read_ahead)]
    if getattr(store, "direct_reads", False):
        ways.append(("direct", store.read_direct))
    names = [name for name, _ in ways]

    def replay_cold(trace):
        """Every way the store can read misses, each from a dropped page cache; the fastest counts."""
        times = []
        for _, read in ways:
            store.drop_page_cache()
            times.append(replay(trace, read))
        return np.array(times)

    # Warm up code paths (and the kernel build), then start cold. The warm-up is cold too: it faults
    # in the pages of the store's own memory that cold decode reads into (the host cache's slots;
    # first touches cost ~1 ms per MB on this VM, once per process), as they are in a long run.
    store.drop_page_cache()
    trace = decode_pass()[3]
    runs = []
    for _ in range(rounds):  # the disk and the memory bandwidth drift: pair figures within a round
        # Expert I/O alone, cold, just before and just after the cold decode (the disk's speed
        # drifts: the mean of both), then warm. The same tokens route alike in every pass.
        io_before = replay_cold(trace)
        store.drop_page_cache()
        cold, cold_reads, cold_hits, trace, nbytes = decode_pass()
        io_ways = (io_before + replay_cold(trace)) / 2   # in the order of `names`
        io_cold = float(io_ways.min())                    # the fastest way counts
        # warm: from the page cache (copies). Direct reads leave nothing there: read the experts in first.
        replay(trace, store.read_ahead)
        io_warm = replay(trace, store.read_experts)
        warm, warm_reads, warm_hits, _, _ = decode_pass()
        compute = min(cold - cold_reads, warm - warm_reads)
        runs.append({"cold": (cold, cold_reads, io_cold, cold_hits), "warm": (warm, warm_reads, io_warm, warm_hits),
                     "compute": compute, "io ways": io_ways})
    out = {"layers": len(model.layers), "k": k, "tokens": len(seq), "rounds": rounds,
           "expert MB per token": round(nbytes / 1e6, 1),
           "overlap of reads and compute": bool(getattr(store, "overlap", False)),
           "cold reads": getattr(store, "cold_reads", "copy"),
           "prefetch": ("speculative direct reads" if getattr(store, "speculative", False) else "readahead")
                       if model.layers[0].moe.next_router is not None else "off",
           f"cold I/O ms alone, {' / '.join(names)} (median)": [round(float(np.median([r["io ways"][i] for r in runs]))
                                                                      * 1e3, 1) for i in range(len(names))],
           "fastest cold I/O way (median)": names[int(np.argmin([np.median([r["io ways"][i] for r in runs])
                                                                 for i in range(len(names))]))]}
    for name in ("cold", "warm"):
        rows = []
        for r in runs:
            t, reads, io, (hits, in_place, (guessed, guess_hits)) = r[name]
            rows.append({"ms per token": t * 1e3, "tokens/s (layers only)": 1 / t, "reads within decode ms": reads * 1e3,
                         "expert I/O ms (alone)": io * 1e3, "compute ms": r["compute"] * 1e3,
                         "page-cache hit rate": hits, "used in place": in_place, "read GB/s (alone)": nbytes / io / 1e9,
                         # guesses read (or announced) ahead of their layer, and the share its router then picked
                         "prefetched experts per token": guessed, "prefetch hit rate": guess_hits,
                         "time / max(io, compute)": t / max(io, r["compute"])})
        med = {key: round(float(np.median([row[key] for row in rows])), 3) for key in rows[0]}
        med["time / max(io, compute), every round"] = [round(row["time / max(io, compute)"], 3) for row in rows]
        out[name + " (median of rounds)"] = med
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-head", action="store_true")
    ap.add_argument("--model", help="also time decode per layer of this model (held in RAM)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--packed", help="also time streamed decode (cold, warm) of this packed model")
    ap.add_argument("--stream-rounds", type=int, default=3, help="rounds of the streamed decode figures (median)")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    print(json.dumps({"load average (1 min)": round(load, 2)}))
    if not args.skip_kernels:
        print(json.dumps(kernel_figures(args.rounds, head=not args.no_head), indent=1))
    if args.model:
        print(json.dumps(decode_figures(args.model, rounds=args.rounds), indent=1))
    if args.packed:
        print(json.dumps(stream_figures(args.packed, rounds=args.stream_rounds), indent=1))


if __name__ == "__main__":
    main()
