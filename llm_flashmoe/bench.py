"""python -m llm_flashmoe.bench DIR: decode and prompt speed of a packed model.

The figures of shared/BENCHMARKS.md, cold (expert pages dropped with
posix_fadvise(DONTNEED)) and warm (the same prompt again: the same experts,
now in the page cache), with the same run's references: the raw `pread`
loop (plain threads, page-aligned buffers, the same expert offsets in the
same order) and the store replaying those reads without compute.
Greedy decoding from a fixed random prompt; per-layer figures extrapolate
to the 60 layers of the real model.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import FlashMoeError

REAL_LAYERS = 60


def run_bench(model_dir: str | Path, *, tokens: int = 16, prompt_tokens: int = 4, experts_per_token: int | None = None,
              threads: int | None = None, cold: bool = True, warm: bool = True, seed: int = 0,
              constraints: bool = True, progress: bool = True) -> dict:
    """Measure `model_dir` (a converted directory); -> a dict of figures (see `format_table`)."""
    import mlx.core as mx

    from .engine.load import load_model
    from .experts.store import ExpertStore

    say = (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    t0 = time.perf_counter()
    model = load_model(model_dir, experts_per_token=experts_per_token)
    store = model.experts
    if not isinstance(store, ExpertStore):
        raise FlashMoeError(f"{model_dir} keeps its experts in memory; the benchmark measures a converted "
                            "directory (llm flashmoe convert SRC DEST).")
    if threads:
        store.set_threads(threads)
    cfg, m = model.cfg, store.manifest
    res: dict = {
        "model_dir": str(model_dir), "layers": cfg.num_hidden_layers, "experts": cfg.num_experts,
        "experts_per_token": model.experts_per_token, "expert_bytes": m.expert_bytes, "bits": m.bits,
        "threads": store.threads, "zero_copy": store.zero_copy, "hit_method": store.hit_method,
        "load_s": time.perf_counter() - t0, "prompt_tokens": prompt_tokens, "decode_tokens": tokens,
        "dtype": str(model.dtype),
    }
    say(f"loaded in {res['load_s']:.1f} s; {cfg.num_hidden_layers} layers, K={model.experts_per_token}")
    prompt = np.random.default_rng(seed).integers(0, 248000, prompt_tokens).tolist()

    phases = [p for p, on in (("cold", cold), ("warm", warm)) if on]
    trace: list = []
    for phase in phases:
        if phase == "cold":
            store.drop_page_cache()
        store.trace = []
        say(f"{phase}: prompt of {prompt_tokens} tokens, then {tokens} decoded")
        res[phase] = _decode(model, store, prompt, tokens)
        if not trace:
            trace = store.trace[res[phase].pop("prompt_fetches"):]
        else:
            res[phase].pop("prompt_fetches")
        store.trace = None
    if len(phases) == 2 and res["cold"]["tokens"] != res["warm"]["tokens"]:
        raise FlashMoeError("cold and warm runs decoded different tokens; the model is not deterministic here.")

    # References on the decode reads (same offsets, same order, same threads).
    say(f"references: {len(trace)} layer reads replayed, raw pread vs store")
    ref = _RawReader(store)
    for phase in phases:
        if phase == "cold":  # the same offsets cannot be read cold twice at once: alternate whole passes
            raw_t, mine_t, hits = [], [], []
            for order in (("raw", "store"), ("store", "raw")):
                for who in order:
                    store.drop_page_cache()
                    if who == "raw":
                        raw_t.append(ref.replay(trace))
                    else:
                        t, h = _store_replay(store, trace)
                        mine_t.append(t)
                        hits.append(h)
            raw_s, mine_s, hit = min(raw_t), min(mine_t), hits[int(np.argmin(mine_t))]
        else:  # warm: interleave fetch by fetch so both see the same machine (shared, noisy)
            _store_replay(store, trace)
            raw_s = mine_s = 0.0
            for k, (layer, ids) in enumerate(trace * 2):
                for who in (("raw", "store") if k % 2 else ("store", "raw")):
                    if who == "raw":
                        raw_s += ref.replay([(layer, ids)])
                    else:
                        t, h = _store_replay(store, [(layer, ids)])
                        mine_s += t
            hit = _store_replay(store, trace)[1]
        nbytes = sum(len(ids) for _, ids in trace) * m.expert_bytes * (2 if phase == "warm" else 1)
        res[phase]["raw_pread_gb_s"] = nbytes / raw_s / 1e9
        res[phase]["store_replay_gb_s"] = nbytes / mine_s / 1e9
        res[phase]["store_replay_hits"] = hit
    ref.close()

    res["expert_compute_ms_per_layer"] = _expert_compute_ms(model, store, trace)
    res["head_ms"] = _head_ms(model)
    res["routing_overlap"] = _overlap(trace, cfg.num_hidden_layers)
    if constraints:
        from .constrain.cost import measure_constraint_cost

        say("constraints: the same decode, free and constrained to a JSON schema")
        res["constraints"] = measure_constraint_cost(model, model_dir, tokens=max(tokens, 8))
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["mlx_active_bytes"] = mx.get_active_memory()
    res["mlx_peak_bytes"] = mx.get_peak_memory()
    for phase in phases:
        r = res[phase]
        L = cfg.num_hidden_layers
        per_layer = (r["decode_ms_per_token"] - res["head_ms"]) / L
        r["ms_per_layer"] = per_layer
        r["expert_io_ms_per_layer"] = r["read_s"] * 1000 / max(1, r["n_decode"]) / L
        r["rest_ms_per_layer"] = per_layer - r["expert_io_ms_per_layer"] - res["expert_compute_ms_per_layer"]
        r["tok_s_at_60_layers"] = 1000 / (per_layer * REAL_LAYERS + res["head_ms"])
        bytes_per_token = r["bytes_per_token"]
        r["io_bound_ms_per_token"] = bytes_per_token / (r["raw_pread_gb_s"] * 1e9) * 1000
        r["store_vs_raw"] = r["store_gb_s"] / r["raw_pread_gb_s"] if r["raw_pread_gb_s"] else 0.0
        r["store_replay_vs_raw"] = r["store_replay_gb_s"] / r["raw_pread_gb_s"] if r["raw_pread_gb_s"] else 0.0
    store.close()
    return res


def _decode(model, store, prompt: list[int], n: int) -> dict:
    import mlx.core as mx

    cache = model.make_cache()
    store.stats.reset()
    t0 = time.perf_counter()
    logits = model(prompt, cache, last_only=True)
    token = int(mx.argmax(logits[-1]))
    ttft = time.perf_counter() - t0
    prompt_stats = (store.stats.experts, store.stats.bytes, store.stats.read_seconds, store.stats.cache_hits)
    prompt_fetches = len(store.trace)
    out, per_token = [token], []
    store.stats.reset()
    t1 = time.perf_counter()
    for _ in range(n - 1):
        ts = time.perf_counter()
        logits = model([token], cache, last_only=True)
        token = int(mx.argmax(logits[-1]))
        per_token.append(time.perf_counter() - ts)
        out.append(token)
    decode_s = time.perf_counter() - t1
    s = store.stats
    steps = max(1, n - 1)
    return {
        "tokens": out, "ttft_s": ttft, "prompt_tok_s": len(prompt) / ttft,
        "prompt_experts": prompt_stats[0], "prompt_read_s": prompt_stats[2],
        "n_decode": n - 1, "decode_tok_s": (n - 1) / decode_s if decode_s else 0.0,
        "decode_ms_per_token": 1000 * decode_s / steps, "ms_per_token_min": 1000 * min(per_token or [0]),
        "experts_per_token_read": s.experts / steps, "bytes_per_token": s.bytes / steps, "read_s": s.read_seconds,
        "store_gb_s": s.bytes / s.read_seconds / 1e9 if s.read_seconds else 0.0,
        "hit_rate": s.cache_hits / s.experts if s.experts else 0.0, "prompt_fetches": prompt_fetches,
    }


class _RawReader:
    """The reference: plain threads, one `pread` per expert into page-aligned buffers."""

    def __init__(self, store):
        self.fds, self.m, self.threads = store.fds, store.manifest, store.threads
        self.pool = ThreadPoolExecutor(self.threads)
        self.cap = 0
        self.rows: list = []

    def _ensure(self, n: int) -> None:
        if n > self.cap:
            self.mem = mmap.mmap(-1, n * self.m.expert_stride)  # anonymous: page aligned
            view = memoryview(self.mem)
            self.rows = [view[r * self.m.expert_stride : r * self.m.expert_stride + self.m.expert_bytes]
                         for r in range(n)]
            self.cap = n

    def replay(self, trace) -> float:
        """Seconds to read every (layer, ids) of `trace`."""
        m = self.m
        t0 = time.perf_counter()
        for layer, ids in trace:
            self._ensure(len(ids))
            fd = self.fds[layer]
            jobs = [(fd, self.rows[r], m.header_bytes + int(e) * m.expert_stride) for r, e in enumerate(ids)]
            parts = min(self.threads, len(jobs))
            list(self.pool.map(_raw_reads, [jobs[k::parts] for k in range(parts)]))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.pool.shutdown()


def _raw_reads(jobs) -> None:
    for fd, view, offset in jobs:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError("short read")
            done += n


def _store_replay(store, trace) -> tuple[float, float]:
    """(seconds, page-cache hit share) of the store reading every (layer, ids) of `trace`."""
    hits0, n0 = store.stats.cache_hits, store.stats.experts
    t0 = time.perf_counter()
    for layer, ids in trace:
        store.read_experts(layer, ids)
    dt = time.perf_counter() - t0
    n = store.stats.experts - n0
    return dt, (store.stats.cache_hits - hits0) / n if n else 0.0


def _expert_compute_ms(model, store, trace) -> float:
    """One decode token's expert matmuls of one layer, timed alone (K experts, ids from the trace)."""
    import mlx.core as mx

    layer, ids = trace[-1] if trace else (0, np.arange(model.experts_per_token))
    batch = store.fetch(layer, ids)
    H = model.cfg.hidden_size
    x = mx.random.normal((1, 1, 1, H)).astype(model.dtype)  # one token, as SparseMoE shapes it
    idx = mx.arange(len(ids))[None]                           # [1, K]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        g = batch.gate.gather(x, idx)
        u = batch.up.gather(x, idx)
        y = batch.down.gather((g * mx.sigmoid(g) * u).astype(model.dtype), idx)
        mx.eval(y)
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def _head_ms(model) -> float:
    """Final norm + lm_head for one token (and the embedding row), timed alone."""
    import mlx.core as mx

    x = mx.random.normal((1, model.cfg.hidden_size)).astype(model.dtype)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        mx.eval(model.head(x))  # the same path decoding takes
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)  # shared machines: the least disturbed run


def _overlap(trace, n_layers: int) -> float:
    """Mean share of a token's experts that the previous token also used, same layer."""
    last: dict = {}
    shares = []
    for layer, ids in trace:
        s = set(int(i) for i in ids)
        if layer in last and s:
            shares.append(len(s & last[layer]) / len(s))
        last[layer] = s
    return float(np.mean(shares)) if shares else 0.0


def format_table(r: dict) -> str:
    phases = [p for p in ("cold", "warm") if p in r]
    rows = [
        ("decode tokens/s", "decode_tok_s", "{:.2f}"),
        ("decode ms/token", "decode_ms_per_token", "{:.0f}"),
        ("ms/layer (all)", "ms_per_layer", "{:.1f}"),
        ("  expert I/O ms/layer", "expert_io_ms_per_layer", "{:.1f}"),
        ("  rest ms/layer", "rest_ms_per_layer", "{:.1f}"),
        ("tokens/s at 60 layers (extrapolated)", "tok_s_at_60_layers", "{:.3f}"),
        ("prompt tokens/s", "prompt_tok_s", "{:.2f}"),
        ("time to first token s", "ttft_s", "{:.2f}"),
        ("experts read / token", "experts_per_token_read", "{:.1f}"),
        ("expert MB / token", "bytes_per_token", "mb"),
        ("page-cache hit rate (RWF_NOWAIT)", "hit_rate", "{:.0%}"),
        ("store read GB/s (in decode)", "store_gb_s", "{:.2f}"),
        ("store read GB/s (replay)", "store_replay_gb_s", "{:.2f}"),
        ("raw pread GB/s (reference)", "raw_pread_gb_s", "{:.2f}"),
        ("store / raw (in decode)", "store_vs_raw", "{:.0%}"),
        ("store / raw (replay)", "store_replay_vs_raw", "{:.0%}"),
        ("I/O bound ms/token at raw GB/s", "io_bound_ms_per_token", "{:.0f}"),
    ]
    out = [f"| figure | {' | '.join(phases)} |", "|---|" + "---|" * len(phases)]
    for label, key, f in rows:
        cells = []
        for p in phases:
            v = r[p].get(key)
            cells.append("-" if v is None else (f"{v / 1e6:.0f}" if f == "mb" else f.format(v)))
        out.append(f"| {label} | {' | '.join(cells)} |")
    out.append(f"| expert compute ms/layer (K experts, alone) | {r['expert_compute_ms_per_layer']:.1f} |"
               + " |" * (len(phases) - 1))
    out.append(f"| head ms/token (lm_head alone) | {r['head_ms']:.1f} |" + " |" * (len(phases) - 1))
    out.append(f"| routing overlap, consecutive tokens | {r['routing_overlap']:.0%} |" + " |" * (len(phases) - 1))
    out.append(f"| peak RSS GB | {r['peak_rss_bytes'] / 1e9:.2f} |" + " |" * (len(phases) - 1))
    out.append(f"| MLX active / peak GB | {r['mlx_active_bytes'] / 1e9:.2f} / {r['mlx_peak_bytes'] / 1e9:.2f} |"
               + " |" * (len(phases) - 1))
    if "constraints" in r:
        c = r["constraints"]
        out.append(f"| decode tokens/s free / JSON-schema constrained (warm) | {c['free_tok_s']:.2f} / "
                   f"{c['constrained_tok_s']:.2f} |" + " |" * (len(phases) - 1))
        out.append(f"| constraint share of decode time | {c['constraint_share']:.1%} "
                   f"({c['constraint_ms_per_token']:.2f} ms/token) |" + " |" * (len(phases) - 1))
    head = (f"{r['model_dir']}: {r['layers']} layers, {r['experts']} experts, K={r['experts_per_token']}, "
            f"{r['bits']}-bit experts of {r['expert_bytes']:,} bytes, {r['threads']} reader threads, "
            f"zero-copy {'on' if r['zero_copy'] else 'off'}, {r['dtype']}")
    return head + "\n\n" + "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llm_flashmoe.bench", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=16, help="tokens to decode (default 16)")
    ap.add_argument("--prompt-tokens", type=int, default=4, help="random prompt length (default 4)")
    ap.add_argument("--experts-per-token", type=int, default=None, help="K (default: the model's)")
    ap.add_argument("--threads", type=int, default=None, help="reader threads (default: the store's)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache run")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-cache run")
    ap.add_argument("--no-constraints", action="store_true", help="skip measuring the cost of constrained decoding")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    try:
        r = run_bench(args.model_dir, tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                      experts_per_token=args.experts_per_token, threads=args.threads,
                      cold=not args.no_cold, warm=not args.no_warm, constraints=not args.no_constraints)
    except FlashMoeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    print(format_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
