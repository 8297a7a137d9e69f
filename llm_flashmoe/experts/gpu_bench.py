"""GPU expert streaming on CUDA: upload throughput, the cache's logits, decode with the cache.

    python -m llm_flashmoe.experts.gpu_bench upload --packed DIR [--experts 64]
    python -m llm_flashmoe.experts.gpu_bench check  --packed DIR
    python -m llm_flashmoe.experts.gpu_bench decode --packed DIR [--resident MLXDIR] [--fractions 25,50,100]
    python -m llm_flashmoe.experts.gpu_bench profile --packed DIR
    python -m llm_flashmoe.experts.gpu_bench hostread --packed DIR
    python -m llm_flashmoe.experts.gpu_bench firstuse --packed DIR

upload: expert bytes already in the page cache into MLX GPU arrays, in one run:
  the store's path (preadv into MLX buffers, which CUDA then migrates as managed
  memory when a kernel touches them), the cache's transport (pinned pieces +
  cudaMemcpyAsync) for several thread counts and piece sizes, and the limits:
  page cache -> pinned memory alone, pinned -> GPU copies alone, and the cold disk.
check: logits with the GPU cache on and off, decode and prefill, must be identical.
profile: the cost of the host round trip per layer (all experts cached, device lookup
  against the host path) and the host's share of fetches at partial sizes.
hostread: can kernels read experts from host memory directly (cudaHostRegister of the
  page cache's mapping; a cudaHostAlloc buffer; device memory beside), at what rate.
firstuse: when does the host tier's first use stall, and on what: registers every layer
  file's mapping, then times single kernel reads (first and second use) of a word, of
  7 MB, and of one word per 4 KiB page, per layer, with the kernel compiled beforehand,
  printing the kernel's pinned/locked memory and the page cache's dirty bytes between.
decode: the 397B-shaped model streamed with GPU caches of several sizes (warm page
  cache; and cold for the middle size), per layer: expert read+upload, the rest;
  hit rate; tokens/s extrapolated to 60 layers; beside the all-resident fused
  decode and mlx-lm's qwen3_5_moe on the same weights (--resident, MLX layout).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def warm_files(paths) -> float:
    """Read files once (into the page cache) -> GB/s."""
    total, t0 = 0, time.perf_counter()
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
    return _gbs(total, time.perf_counter() - t0)


def upload(args) -> int:
    import mlx.core as mx

    from . import cuda
    from .cache import CudaTransport
    from .store import ExpertStore

    store = ExpertStore(args.packed)
    m = store.manifest
    rt = cuda.runtime()
    n = min(args.experts, m.num_experts)
    rng = np.random.default_rng(0)
    layer = 0
    ids = np.sort(rng.choice(m.num_experts, n, replace=False))
    total = n * m.expert_bytes
    print(f"cudart {rt.path} (runtime {rt.version}); {n} experts of {m.expert_bytes} bytes = {total / 1e6:.0f} MB "
          f"per trial, layer {layer}", flush=True)

    # cold disk, then warm: the files of layer 0 read once
    f0 = Path(args.packed) / m.layers[layer].file
    store.drop_page_cache()
    print(f"disk cold read (1 thread, 64 MB reads, {f0.name}): {warm_files([f0]):.2f} GB/s", flush=True)
    print(f"page cache read (1 thread, same file): {warm_files([f0]):.2f} GB/s", flush=True)

    rows = []
    # 1. the store's path: preadv into MLX buffers, first GPU touch migrates them
    dts = []
    for _ in range(args.trials):
        t0 = time.perf_counter()
        batch = store.fetch(layer, ids)
        parts = [batch.gate, batch.up, batch.down]
        arrays = [a for p in parts for a in (p.weight, p.scales, p.biases)]
        mx.eval([mx.sum(a.astype(mx.float32)) for a in arrays])
        dts.append(time.perf_counter() - t0)
    ref = arrays  # the last fetch's buffers stay valid: the store is not asked again
    rows.append(("store buffers (managed) + first GPU touch", store.threads, "-", total, min(dts)))

    # 2. the cache's transport
    dtypes = [a.dtype for a in ref]
    ok_all = True
    for threads in args.threads:
        for piece_mb, native in [(p, nat) for p in args.pieces for nat in (False, True)]:
            tr = CudaTransport(threads, int(piece_mb * (1 << 20)), native=native)
            buf = tr.alloc(store.components, n, dtypes)
            r = np.arange(n)
            tr.load(store, layer, ids, buf, r)  # warm-up: pinned buffers, streams
            dts = []
            for _ in range(args.trials):
                mx.synchronize()
                t0 = time.perf_counter()
                tr.load(store, layer, ids, buf, r)
                dts.append(time.perf_counter() - t0)
            ok = all(mx.array_equal(_bits(a), _bits(b)).item() for a, b in zip(buf.typed, ref))
            ok_all &= ok
            rows.append((f"pinned pieces + cudaMemcpyAsync, {tr.name}{'' if ok else '  BYTES DIFFER'}", threads,
                         piece_mb, total, min(dts)))
            tr.close()
            del buf

    # 2b. decode-sized fetches: a layer's few misses, cut into pieces across the threads
    small = []
    for threads, native in [(t, nat) for t in args.threads for nat in (False, True)]:
        tr = CudaTransport(threads, native=native)
        buf = tr.alloc(store.components, 8, dtypes)
        for k in (1, 2, 4):
            sel = ids[:k]
            tr.load(store, layer, sel, buf, np.arange(k))
            dts = []
            for t in range(20):
                sel = ids[(t * k) % (n - k):(t * k) % (n - k) + k]
                t0 = time.perf_counter()
                tr.load(store, layer, sel, buf, np.arange(k))
                dts.append(time.perf_counter() - t0)
            small.append((k, threads, tr.name, float(np.median(dts))))
        tr.close()
        del buf

    # 3. limits: page cache -> pinned alone; pinned -> GPU alone
    piece = 4 << 20
    nthreads = max(args.threads)
    bufs = [rt.host_alloc(piece) for _ in range(nthreads)]
    fd, base, stride = store.fds[layer], m.header_bytes, m.expert_stride
    jobs = [(base + int(e) * stride + p0, min(piece, m.expert_bytes - p0)) for e in ids
            for p0 in range(0, m.expert_bytes, piece)]

    def read_share(k):
        view = cuda.host_view(bufs[k], piece)
        for off, nb in jobs[k::nthreads]:
            os.preadv(fd, [view[:nb]], off)

    with ThreadPoolExecutor(nthreads) as ex:
        list(ex.map(read_share, range(nthreads)))
        t0 = time.perf_counter()
        list(ex.map(read_share, range(nthreads)))
        rows.append(("page cache -> pinned (read only)", nthreads, 4, total, time.perf_counter() - t0))
    dst = mx.zeros((total,), mx.uint8)
    mx.eval(dst)
    addr = cuda.device_address(dst)
    for nstreams in (1, 4):
        streams = [rt.stream() for _ in range(nstreams)]
        for rep in range(2):
            t0 = time.perf_counter()
            for i, off in enumerate(range(0, total, piece)):
                rt.copy_async(addr + off, bufs[i % nthreads], min(piece, total - off), streams[i % nstreams])
            for s in streams:
                rt.sync_stream(s)
            dt = time.perf_counter() - t0
        rows.append((f"pinned -> GPU cudaMemcpyAsync, {nstreams} stream(s)", 1, 4, total, dt))
    for b in bufs:
        rt.free_host(b)

    print(f"\n{'path':58} {'threads':>7} {'piece MB':>8} {'GB/s':>7}")
    for name, th, pc, nb, dt in rows:
        print(f"{name:58} {th:>7} {pc!s:>8} {_gbs(nb, dt):7.2f}")
    print(f"\n{'decode-sized fetch (warm)':30} {'threads':>7} {'us/fetch':>9} {'GB/s':>7}")
    for k, th, name, dt in small:
        print(f"{f'{k} expert(s), {name}':30} {th:>7} {dt * 1e6:9.0f} {_gbs(k * m.expert_bytes, dt):7.2f}")
    store.close()
    return 0 if ok_all else 1


def _bits(a):
    import mlx.core as mx

    return a.view(mx.uint16) if a.dtype in (mx.bfloat16, mx.float16) else a


def _run_tokens(model, prompt, steps):
    import mlx.core as mx

    cache = model.make_cache()
    outs = [model(prompt, cache, last_only=True)]
    tok = int(mx.argmax(outs[-1][-1]))
    for _ in range(steps):
        outs.append(model([tok], cache, last_only=True))
        tok = int(mx.argmax(outs[-1][-1]))
    mx.eval(outs)
    return outs


def check(args) -> int:
    import mlx.core as mx

    from ..engine.load import load_model
    from .cache import ExpertCache

    prompt = np.random.default_rng(1).integers(0, 1000, 24).tolist()
    from .cache import transport_kind

    if transport_kind() is None:
        print("no GPU expert cache on this machine (it is used with MLX on CUDA; "
              "FLASHMOE_CACHE_TRANSPORT=host forces it on elsewhere)")
        return 1
    off = load_model(args.packed, gpu_cache="off", experts_per_token=args.k)
    # On the CPU the store's decode computes experts as their reads land (FLASHMOE_OVERLAP_READS),
    # summing them in landing order, which depends on what the page cache holds at that moment:
    # the reference reads first, then computes, in the cached path's order.
    off.experts.overlap = False
    ref = _run_tokens(off, prompt, args.steps)
    off.experts.close()
    ok = True
    for setting in args.settings:
        on = load_model(args.packed, gpu_cache=setting, experts_per_token=args.k)
        if not isinstance(on.experts, ExpertCache):
            print(f"gpu_cache={setting}: no GPU cache was set up")
            return 1
        got = _run_tokens(on, prompt, args.steps)
        got2 = _run_tokens(on, prompt, args.steps)  # the same again, now partly from the cache
        diff = [i for i, (a, b, c) in enumerate(zip(ref, got, got2))
                if not (mx.array_equal(a, b).item() and mx.array_equal(a, c).item())]
        same = not diff
        if diff:
            i = diff[0]
            err = float(mx.abs(got[i].astype(mx.float32) - ref[i].astype(mx.float32)).max())
            print(f"  first differing call {i} (0 = prompt), max |diff| {err:.3e}; differing: {diff}")
        s = on.experts.stats
        print(f"gpu_cache={setting} ({on.experts.slots} slots): logits identical to the uncached store over "
              f"{len(ref)} calls x 2: {'yes' if same else 'NO'}; GPU-cache hits {s.gpu_hits} of {s.experts}",
              flush=True)
        ok &= same
        on.experts.close()
        del on
    return 0 if ok else 1


def _fill(cache, rng) -> None:
    """Bring the pool to a steady state: every layer's experts in random order."""
    for layer in range(cache.layers):
        order = rng.permutation(cache.num_experts)
        step = max(1, min(cache.slots // max(cache.layers, 1), 64))
        for i in range(0, len(order), step):
            cache.fetch(layer, np.sort(order[i:i + step]))


def decode(args) -> int:
    import mlx.core as mx

    from ..engine.load import load_model
    from ..kernels.decode_bench import decode_times
    from .cache import ExpertCache

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, 16).tolist()
    results = []
    packed = Path(args.packed)
    from . import format as fmt

    m = fmt.read_manifest(packed)
    files = [packed / e.file for e in m.layers]
    print(f"page cache warm-up of {len(files)} expert files: {warm_files(files):.2f} GB/s", flush=True)
    eh = None
    for pct in args.fractions:
        model = load_model(packed, gpu_cache=f"{pct}%", experts_per_token=args.k)
        c = model.experts
        if not isinstance(c, ExpertCache):
            print(f"{pct}%: no GPU cache set up")
            return 1
        L = len(model.layers)
        if eh is None:
            eh = float(np.median(decode_times(model, prompt, 12, embed_head_only=True)) * 1e3)
        if c.slots >= c.layers * c.num_experts:
            t0 = time.perf_counter()
            c.preload()
            print(f"preloaded all {c.filled} experts in {time.perf_counter() - t0:.2f} s", flush=True)
        else:
            _fill(c, rng)
        t0 = time.perf_counter()
        decode_times(model, prompt, 6)      # warm-up
        print(f"warm-up (prompt + 6 decode steps, the first of this cache's shape) {time.perf_counter() - t0:.2f} s",
              flush=True)
        for state in (["warm", "cold"] if pct in args.cold else ["warm"]):
            if state == "cold":
                c.drop_page_cache()
            mark = {}

            def start(c=c, mark=mark):
                c.stats.reset()
                mark["up"] = c.upload_seconds

            steps = args.steps if state == "warm" else max(4, args.steps // 3)
            times = decode_times(model, prompt, steps + 2, after_prefill=start, fresh_tokens=True)
            s = c.stats
            tok_ms = float(np.median(times) * 1e3)
            per_layer = (tok_ms - eh) / L
            up_ms = (c.upload_seconds - mark["up"]) * 1e3 / ((steps + 2) * L)   # mean per layer
            hit = s.gpu_hits / s.experts if s.experts else 0.0
            if c.host_tier:  # decode does not count hits (no round trip): the cached share instead
                hit = c.filled / (c.layers * c.num_experts)
            pc = s.cache_hits / max(s.experts - s.gpu_hits, 1)
            t60 = eh + 60 * per_layer
            tier = " tier" if c.host_tier else ""
            results.append((f"{pct}% {state}{tier}", c.slots, hit, pc, up_ms, per_layer, t60))
            s.reset()
            print(f"gpu cache {pct}% ({c.slots} slots){tier}, {state}: {tok_ms:.2f} ms/token for {L} layers "
                  f"(median of {steps}; embed+head {eh:.2f} ms), hit rate {hit:.2f}, page-cache hits of the reads "
                  f"{pc:.2f}, read+upload {up_ms:.3f} ms per layer (mean), {per_layer:.3f} ms per layer in all "
                  f"-> 60 layers {t60:.1f} ms/token = {1000 / t60:.1f} tok/s", flush=True)
        c.close()
        del model, c
        mx.clear_cache()

    resident = None
    if args.resident:
        from ..kernels.overhead import touch

        model = load_model(args.resident, experts_per_token=args.k)
        touch(model)    # move every weight to the GPU first (the loader's arrays start in managed memory)
        L = len(model.layers)
        tok = float(np.median(decode_times(model, prompt, args.steps, fresh_tokens=True)) * 1e3)
        reh = float(np.median(decode_times(model, prompt, 12, embed_head_only=True)) * 1e3)
        resident = (tok - reh) / L
        print(f"all resident (fused kernels): {tok:.2f} ms/token, embed+head {reh:.2f} ms, {resident:.3f} ms per layer "
              f"-> 60 layers {reh + 60 * resident:.1f} ms/token", flush=True)
        del model
        mx.clear_cache()
        try:
            from mlx_lm.models.cache import make_prompt_cache
            from mlx_lm.utils import load_model as mlx_lm_load

            from mlx.utils import tree_flatten

            ref, _ = mlx_lm_load(Path(args.resident))
            touch([a for _, a in tree_flatten(ref.parameters())])
            cache = make_prompt_cache(ref)
            mx.eval(ref(mx.array([prompt]), cache=cache))
            times = []
            t = prompt[-1]
            fresh = np.random.default_rng(len(prompt) + args.steps)     # the same tokens as decode_times'
            for i in range(args.steps):
                mx.synchronize()
                t0 = time.perf_counter()
                mx.eval(ref(mx.array([[t]]), cache=cache))
                times.append(time.perf_counter() - t0)
                t = int(fresh.integers(0, 200000))
            lt = float(np.median(times) * 1e3)
            print(f"mlx-lm qwen3_5_moe, all resident, same weights and tokens: {lt:.2f} ms/token "
                  f"-> {(lt - reh) / L:.3f} ms per layer (taking our embed+head)", flush=True)
        except Exception as e:  # a reference, not the subject: report and go on
            print(f"mlx-lm reference not run: {type(e).__name__}: {e}")

    print(f"\n{'cache':14} {'slots':>6} {'hit':>5} {'pc hit':>6} {'up ms/L':>8} {'ms/L':>7} {'ms/tok@60':>9} {'tok/s':>6}")
    for name, slots, hit, pc, up, pl, t60 in results:
        print(f"{name:14} {slots:6d} {hit:5.2f} {pc:6.2f} {up:8.3f} {pl:7.3f} {t60:9.1f} {1000 / t60:6.1f}")
    if resident is not None:
        print(f"{'resident':14} {'':>6} {'':>5} {'':>6} {'':>8} {resident:7.3f}")
    return 0


def _timed_fetch(cache) -> dict:
    """Time the engine's calls of cache.fetch (host side: lookups, eviction, reads, uploads)."""
    acc = {"s": 0.0, "n": 0}
    real = cache.fetch

    def fetch(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            acc["s"] += time.perf_counter() - t0
            acc["n"] += 1

    cache.fetch = fetch  # the engine looks fetch up on the instance
    return acc


def profile(args) -> int:
    """Where a layer's time goes with the GPU cache: the all-cached decode through the
    device-side lookup (one evaluation per token) against the same through the host path
    (the router's ids read back every layer, rows sent from the host, as at 25-50%), and
    the host's share of the fetch, at 100% and at the partial sizes."""
    import mlx.core as mx

    from ..engine.load import load_model
    from ..kernels.decode_bench import decode_times

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, 16).tolist()
    packed = Path(args.packed)
    from . import format as fmt

    m = fmt.read_manifest(packed)
    warm_files([packed / e.file for e in m.layers])
    model = load_model(packed, gpu_cache="100%", experts_per_token=args.k)
    c = model.experts
    L = len(model.layers)
    c.preload()
    eh = float(np.median(decode_times(model, prompt, 12, embed_head_only=True)) * 1e3)
    decode_times(model, prompt, 4)
    dev = (float(np.median(decode_times(model, prompt, args.steps, fresh_tokens=True)) * 1e3) - eh) / L
    c.resident_batch = lambda layer: None   # force the host round trip with every expert cached
    acc = _timed_fetch(c)
    decode_times(model, prompt, 4)
    acc["s"], acc["n"] = 0.0, 0
    host = (float(np.median(decode_times(model, prompt, args.steps, fresh_tokens=True)) * 1e3) - eh) / L
    fetch_ms = acc["s"] * 1e3 / max(acc["n"], 1)
    print(f"100%, all cached: device lookup {dev:.3f} ms/layer; host round trip {host:.3f} ms/layer "
          f"(of which cache.fetch on the host {fetch_ms:.3f} ms, no uploads): the round trip costs "
          f"{host - dev:.3f} ms/layer", flush=True)
    c.close()
    del model, c
    mx.clear_cache()
    for pct in args.fractions:
        if pct >= 100:
            continue
        model = load_model(packed, gpu_cache=f"{pct}%", experts_per_token=args.k)
        c = model.experts
        _fill(c, rng)
        decode_times(model, prompt, 4)
        acc = _timed_fetch(c)
        up0 = c.upload_seconds
        c.stats.reset()
        times = decode_times(model, prompt, args.steps, fresh_tokens=True)
        n = acc["n"]
        per_layer = (float(np.median(times)) * 1e3 - eh) / L
        up = (c.upload_seconds - up0) * 1e3 / max(n, 1)
        f = acc["s"] * 1e3 / max(n, 1)
        hit = c.stats.gpu_hits / max(c.stats.experts, 1)
        print(f"{pct}%: {per_layer:.3f} ms/layer, hit rate {hit:.2f}: cache.fetch {f:.3f} ms/layer, of which "
              f"read+upload {up:.3f}, bookkeeping {f - up:.3f}; everything else {per_layer - f:.3f} "
              f"(the all-cached host path's rest: {host - fetch_ms:.3f})", flush=True)
        c.close()
        del model, c
        mx.clear_cache()
    return 0


def hostread(args) -> int:
    """Can a kernel read experts straight from host memory (no upload, no host round trip)?
    Registers a read-only mapping of a layer file (page cache) with cudaHostRegister, then times
    a kernel that reads N bytes through the mapped pointer, beside the same kernel on device
    memory and on a cudaHostAlloc'd buffer."""
    import mlx.core as mx

    from ..errors import FlashMoeError
    from . import cuda
    from .store import ExpertStore

    rt = cuda.runtime()
    store = ExpertStore(args.packed)
    path = store.dir / store.manifest.layers[0].file
    size = store.manifest.layer_file_bytes()
    print(f"page cache warm-up: {warm_files([path]):.2f} GB/s", flush=True)
    addr = store.mapped_layer(0)   # the host tier's mapping (a unified address: the kernel uses it as is)
    sources = {}
    t0 = time.perf_counter()
    try:
        rt.register_host(addr, size)
        sources["registered page cache"] = addr
        print(f"cudaHostRegister(file mapping, {size / 1e9:.2f} GB): ok in {time.perf_counter() - t0:.2f} s", flush=True)
    except FlashMoeError as e:
        print(f"cudaHostRegister(file mapping, {size / 1e9:.2f} GB): {e}", flush=True)
    nbytes = min(size, args.mb << 20)
    pinned = rt.host_alloc(nbytes)
    cuda.host_view(pinned, nbytes)[:] = np.frombuffer(os.pread(store.fds[0], nbytes, 0), np.uint8)
    sources["cudaHostAlloc buffer"] = pinned
    dev = mx.zeros((nbytes // 4,), mx.uint32)
    mx.eval(dev)
    sources["device memory"] = cuda.device_address(dev)
    kern = mx.fast.cuda_kernel(
        name="fm_host_read", input_names=["ptr", "n16"], output_names=["out"],
        source="""
            const uint4* p = reinterpret_cast<const uint4*>(ptr[0]);
            long long n = n16[0];
            long long stride = (long long)gridDim.x * blockDim.x;
            long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            unsigned int acc = 0;
            for (long long i = t; i < n; i += stride) { uint4 v = p[i]; acc ^= v.x ^ v.y ^ v.z ^ v.w; }
            out[t] = acc;""")
    threads = 132 * 8 * 256
    for name, base in sources.items():
        for mb in sorted({min(nbytes >> 20, x) for x in (7, 14, 28, 64, args.mb)}):
            n = mb << 20
            ptr = mx.array([base], mx.uint64)
            n16 = mx.array([n // 16], mx.int64)
            times = []
            for i in range(7):
                mx.synchronize()
                t0 = time.perf_counter()
                out = kern(inputs=[ptr, n16], grid=(threads, 1, 1), threadgroup=(256, 1, 1),
                           output_shapes=[(threads,)], output_dtypes=[mx.uint32])[0]
                mx.eval(out)
                mx.synchronize()
                times.append(time.perf_counter() - t0)
            t = float(np.median(times[2:]))
            print(f"kernel reads {mb:4d} MB from {name:22}: {t * 1e6:9.1f} us = {_gbs(n, t):6.1f} GB/s", flush=True)
    rt.free_host(pinned)
    if "registered page cache" in sources:
        rt.unregister_host(addr)
    store.close()
    return 0


def _mem_line() -> str:
    st = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    mi = dict(l.split(":", 1) for l in open("/proc/meminfo") if ":" in l)
    pick = lambda d, k: d.get(k, "?").strip().replace(" kB", "k")  # noqa: E731
    return (f"VmPin {pick(st, 'VmPin')} VmLck {pick(st, 'VmLck')} VmRSS {pick(st, 'VmRSS')} | "
            f"Cached {pick(mi, 'Cached')} Dirty {pick(mi, 'Dirty')} Writeback {pick(mi, 'Writeback')} "
            f"Unevictable {pick(mi, 'Unevictable')} Mlocked {pick(mi, 'Mlocked')}")


def firstuse(args) -> int:
    """The host tier's first-use stall, taken apart (see the module's docstring)."""
    import mlx.core as mx

    from . import cuda
    from .store import ExpertStore

    rt = cuda.runtime()
    store = ExpertStore(args.packed)
    m = store.manifest
    size = m.layer_file_bytes()
    L = len(m.layers)
    print(f"page cache warm-up: {warm_files([store.dir / l.file for l in m.layers]):.2f} GB/s", flush=True)
    print("before:", _mem_line(), flush=True)
    kern = mx.fast.cuda_kernel(
        name="fm_first_use", input_names=["ptr", "nbytes", "step"], output_names=["out"],
        source="""
            const unsigned char* p = reinterpret_cast<const unsigned char*>(ptr[0]);
            long long n = nbytes[0], s = step[0];
            long long stride = (long long)gridDim.x * blockDim.x;
            long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            unsigned int acc = 0;
            for (long long i = t * s; i < n; i += stride * s) acc ^= p[i];
            out[t] = acc;""")
    threads = 132 * 4 * 256

    def read(base: int, nbytes: int, step: int) -> float:
        mx.synchronize()
        t0 = time.perf_counter()
        out = kern(inputs=[mx.array([base], mx.uint64), mx.array([nbytes], mx.int64), mx.array([step], mx.int64)],
                   grid=(threads, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(threads,)], output_dtypes=[mx.uint32])[0]
        mx.eval(out)
        mx.synchronize()
        return time.perf_counter() - t0

    dev = mx.zeros((1 << 20,), mx.uint32)
    mx.eval(dev)
    print(f"kernel compile + first launch on device memory: {read(cuda.device_address(dev), 4 << 20, 4096) * 1e3:.1f} ms; "
          f"again {read(cuda.device_address(dev), 4 << 20, 4096) * 1e3:.2f} ms", flush=True)
    bases = []
    for layer in range(L):
        base = store.mapped_layer(layer)
        t0 = time.perf_counter()
        rt.register_host(base, size)
        bases.append(base)
        print(f"layer {layer}: cudaHostRegister {size / 1e9:.2f} GB in {time.perf_counter() - t0:.3f} s | {_mem_line()}", flush=True)
    plans = [("one byte at 0", 1, 1), ("7 MB", 7 << 20, 1), ("one byte per 4 KiB page, whole file", size, 4096)]
    for layer, base in enumerate(bases):
        name, nbytes, step = plans[layer % len(plans)]
        t1 = read(base, nbytes, step)
        t2 = read(base, nbytes, step)
        tw = read(base, size, 4096)
        tw2 = read(base, size, 4096)
        print(f"layer {layer}: first read ({name}) {t1 * 1e3:.1f} ms, second {t2 * 1e3:.2f} ms; then every page "
              f"{tw * 1e3:.1f} ms, again {tw2 * 1e3:.1f} ms | {_mem_line()}", flush=True)
    for base in bases:
        rt.unregister_host(base)
    print("after unregister:", _mem_line(), flush=True)
    store.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("upload")
    u.add_argument("--packed", required=True)
    u.add_argument("--experts", type=int, default=64)
    u.add_argument("--trials", type=int, default=3)
    u.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16])
    u.add_argument("--pieces", type=lambda s: [float(x) for x in s.split(",")], default=[4])
    c = sub.add_parser("check")
    c.add_argument("--packed", required=True)
    c.add_argument("--steps", type=int, default=12)
    c.add_argument("--k", type=int, default=4, help="experts per token")
    c.add_argument("--settings", type=lambda s: s.split(","), default=["25%", "100%"])
    d = sub.add_parser("decode")
    d.add_argument("--packed", required=True)
    d.add_argument("--resident", default=None)
    d.add_argument("--steps", type=int, default=24)
    d.add_argument("--k", type=int, default=4, help="experts per token")
    d.add_argument("--fractions", type=lambda s: [int(x) for x in s.split(",")], default=[25, 50, 100])
    d.add_argument("--cold", type=lambda s: [int(x) for x in s.split(",")], default=[50])
    pr = sub.add_parser("profile")
    pr.add_argument("--packed", required=True)
    pr.add_argument("--steps", type=int, default=16)
    pr.add_argument("--k", type=int, default=4, help="experts per token")
    pr.add_argument("--fractions", type=lambda s: [int(x) for x in s.split(",")], default=[50])
    h = sub.add_parser("hostread")
    h.add_argument("--packed", required=True)
    h.add_argument("--mb", type=int, default=256, help="largest read")
    f = sub.add_parser("firstuse")
    f.add_argument("--packed", required=True)
    args = ap.parse_args(argv)
    return {"upload": upload, "check": check, "decode": decode, "profile": profile,
            "hostread": hostread, "firstuse": firstuse}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
