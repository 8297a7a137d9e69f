"""Whole-model decode on a GPU: fused kernels vs the plain-MLX path.

    python -m llm_flashmoe.kernels.decode_bench --preset 397b --layers 4 --dir /tmp/fm397b

Writes a synthetic MLX-layout checkpoint (if absent), loads it all resident,
then for each path (plain: FLASHMOE_KERNELS=off; fused: the active backend):
prefills a prompt with the plain path, decodes N tokens and reports the
median ms per token, the embedding+head alone, and ms per layer. It also
feeds the same tokens through both paths and reports the largest logit
difference relative to the largest logit, and top-1 agreement; and, for a
bf16 model, the tolerance check: fused and plain bf16 each against the plain
path in float32 on the same weights (`tolerance_check`), on the first
--check-layers layers; the fused path passes if its error is at most
TOLERANCE_RATIO times the plain path's. Exits 1 if it fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np


def build(dest: Path, preset: str, layers: int) -> None:
    if (dest / "config.json").exists():
        return
    from .. import synth

    synth._write_tokenizer = lambda d: None      # no tokenizer needed to time the engine
    t0 = time.perf_counter()
    synth.write_synthetic(dest, preset=preset, layout="mlx", layers=layers)
    print(f"wrote {dest} in {time.perf_counter() - t0:.1f} s", flush=True)


def with_ops(model, ops, compile: bool | None = None) -> None:
    """Point every block of `model` at `ops` (None: the plain path); decode steps compiled as
    FLASHMOE_COMPILE says for those ops, or as `compile` says."""
    from ..engine.compiled import compile_default

    for layer in model.layers:
        layer.ops = layer.mixer.ops = layer.moe.ops = ops
        layer.compile = compile_default(ops) if compile is None else compile


def decode_times(model, prompt, steps: int, embed_head_only: bool = False, after_prefill=None,
                 fresh_tokens: bool = False) -> list[float]:
    """Prefill `prompt`, call `after_prefill()` if given, then time decode steps (seconds each,
    the first two dropped as warm-up). `fresh_tokens`: a new random token each step (random
    weights then route near uniformly, the pessimistic case for expert caches)."""
    split = decode_steps(model, prompt, steps, embed_head_only, after_prefill, fresh_tokens)
    return [b + e for b, e in split][2:]


def decode_steps(model, prompt, steps: int, embed_head_only: bool = False, after_prefill=None,
                 fresh_tokens: bool = False, before_step=None) -> list[tuple[float, float]]:
    """`decode_times`' steps, every one, each split into (building the graph, evaluating it) in
    seconds; `before_step(i)` is called before step i's clock starts."""
    with _fresh_cache(model, 0 if embed_head_only else None) as cache:
        mx.eval(model(prompt, cache, last_only=True))
        if after_prefill is not None:
            after_prefill()
        rng = np.random.default_rng(len(prompt) + steps)
        tok = [int(prompt[-1])]
        times = []
        for i in range(steps):
            if before_step is not None:
                before_step(i)
            mx.synchronize()
            t0 = time.perf_counter()
            logits = model(tok, cache, last_only=True)
            t1 = time.perf_counter()
            mx.eval(logits)
            mx.synchronize()
            times.append((t1 - t0, time.perf_counter() - t1))
            if fresh_tokens:
                tok = [int(rng.integers(0, 200000))]
    return times


@contextmanager
def _fresh_cache(model, first: int | None = None):
    """A new cache for `model`; with `first`, the model cut to its first `first` layers meanwhile
    (0: the embedding and the head timed alone)."""
    cache = model.make_cache()
    layers = model.layers
    if first is not None:
        model.layers = layers[:first]
        cache.layers = cache.layers[:first]
    try:
        yield cache
    finally:
        model.layers = layers


def heat(seconds: float = 0.5) -> None:
    """Keep the GPU busy for `seconds` before a timing, so that it starts from the steady state of
    a decode (clocks up, caches warm) rather than after an idle spell (compiling, the host's own
    work between timings). On the H200 the card's clocks, logged through a whole session, stayed
    at 1.8-1.98 GHz (P0) anyway: the two speeds short pipelined timings ran at (~80 or ~200 us per
    layer for the same setting) are the host's, which is the bound there. Nothing to do on the CPU."""
    if mx.default_device() == mx.cpu:
        return
    a = mx.random.normal((4096, 4096)).astype(mx.bfloat16) * 0.01
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = a
        for _ in range(16):
            b = (b @ a) * 0.5
        mx.eval(b)


def pipelined_time(model, prompt, steps: int, embed_head_only: bool = False, warmup: int = 16,
                   first: int | None = None) -> tuple[float, float]:
    """Seconds per token of greedy decode pipelined as `Session.generate` runs it where a step
    needs no host round trip: each token sampled on the device and the next step built on it and
    started before it is read back, so building a step overlaps the device running the one
    before. Averaged over `steps` steps after `warmup` (and `heat`) -> (seconds per token, of
    which waiting for the device): a wait near zero means the host is the bound. `first`: the
    model cut to its first `first` layers (`marginal_layer_time`)."""
    from ..engine.sampling import DeviceSampler, SamplingParams

    with _fresh_cache(model, 0 if embed_head_only else first) as cache:
        sample = DeviceSampler(SamplingParams(temperature=0.0))
        y = sample(model(prompt, cache, last_only=True)[-1])
        mx.async_eval(y)
        t0, wait = None, 0.0
        for i in range(warmup + steps):
            if i == warmup:
                y.item()
                heat()
                t0, wait = time.perf_counter(), 0.0
            following = sample(model.step(y, cache)[-1])
            mx.async_eval(following)
            tw = time.perf_counter()
            y.item()
            wait += time.perf_counter() - tw
            y = following
        y.item()
        return (time.perf_counter() - t0) / steps, wait / steps


def marginal_layer_time(model, prompt, steps: int, whole: float | None = None,
                        pairs: int = 1) -> tuple[float, float, float]:
    """A pipelined decode layer's cost without taking a separately timed embedding and head out:
    the whole model and its first half, each pipelined (`pipelined_time`) -> (seconds per layer =
    the difference over the layers between them, seconds per token for the rest = the whole
    model's time less its layers', seconds per token of the whole model). Taking embed+head timed
    alone out of the whole model's time understates the layers' cost where, in the whole model,
    the head's GPU time hides behind the next step's host work. `whole`: the whole model's time
    where the caller has it already (the first pair's). `pairs`: that many timings of each, in
    turn (whole, half, whole, half, ...), each half against the whole timed just before it: the
    medians, so that a host whose speed drifts between timings moves the figure less."""
    L = len(model.layers)
    half = L // 2
    wholes, diffs = [], []
    for i in range(max(1, pairs)):
        w = whole if i == 0 and whole is not None else pipelined_time(model, prompt, steps)[0]
        part = pipelined_time(model, prompt, steps, first=half)[0]
        wholes.append(w)
        diffs.append((w - part) / (L - half))
    per_layer, w = float(np.median(diffs)), float(np.median(wholes))
    return per_layer, w - L * per_layer, w


def pipe_summary(rounds: list[tuple], layers: int) -> str:
    """The pipelined rounds' medians, one line: each round is (ms/token, host waits ms, embed+head
    ms, us/layer with embed+head taken out, marginal us/layer, marginal rest ms/token)."""
    def median(column):   # of the figures a round has (a model of one layer has no marginal one)
        have = [v for v in column if not np.isnan(v)]
        return float(np.median(have)) if have else float("nan")

    tok, wait, eh, per, marg, rest = (median(c) for c in zip(*rounds))
    return (f"pipelined, median of {len(rounds)} rounds: {tok:.2f} ms/token (host waits {wait:.2f}), embed+head "
            f"{eh:.2f} ms, {per:.1f} us/layer; {layers} layers against {layers // 2}: {marg:.1f} us per layer, "
            f"the rest {rest:.2f} ms/token  -> 60 layers: {rest + 60 * marg / 1e3:.1f} ms/token "
            f"(marginal per round: {' '.join(f'{r[4]:.1f}' for r in rounds)})")


def logits_run(model, ops, prompt, steps: int) -> list[np.ndarray]:
    """Prefill `prompt` on the plain path, then decode `steps` given tokens (the prompt's,
    cycled) through `ops` -> float32 logits of the prefill's last token and of each step."""
    with_ops(model, None)
    cache = model.make_cache()
    outs = [model(prompt, cache, last_only=True)]
    with_ops(model, ops)
    for t in range(steps):
        outs.append(model([int(prompt[t % len(prompt)])], cache, last_only=True))
    mx.eval(outs)
    with_ops(model, None)
    return [np.array(x.astype(mx.float32)).reshape(-1) for x in outs]


def compare(model, fused, prompt, steps: int) -> tuple[float, float]:
    """Same tokens through both paths -> (max |diff| / max |logit|, top-1 agreement)."""
    got, ref = logits_run(model, fused, prompt, steps), logits_run(model, None, prompt, steps)
    errs = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(got, ref)]
    top1 = np.mean([a.argmax() == b.argmax() for a, b in zip(got, ref)])
    return float(max(errs)), float(top1)


def logits_error(got: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Decode-step logits against a reference: mean of |a - r|_2 / |r|_2 (rel), the largest
    max |a - r| / max |r| (max), and how often the arg-max agrees (top1)."""
    return {"rel": float(np.mean([np.linalg.norm(a - r) / np.linalg.norm(r) for a, r in zip(got, ref)])),
            "max": float(max(np.abs(a - r).max() / np.abs(r).max() for a, r in zip(got, ref))),
            "top1": float(np.mean([a.argmax() == r.argmax() for a, r in zip(got, ref)]))}


# The fused path is within bf16 tolerance when its error against float32 is at most this
# many times the plain path's in the same dtype (kernels keep float32 inside, the plain
# path rounds after each op, so neither is "the" bf16 answer; float32 is the arbiter).
TOLERANCE_RATIO = 1.5
TOLERANCE_FLOOR = 1e-4      # both near float32 exact: noise, not a failure


def tolerance_check(ref_model, model, fused, prompt, steps: int, layers=(None,), cache=None) -> list[dict]:
    """Fused and plain `model` (bf16) each against the plain float32 `ref_model` (same
    weights), on the first n layers for each n in `layers` (None: all). `cache` (a dict) keeps
    the float32 logits and the plain path's error between calls with other fused ops."""
    rows = []
    cache = {} if cache is None else cache
    for n in layers:
        saved = ref_model.layers, model.layers
        if n is not None:
            ref_model.layers, model.layers = ref_model.layers[:n], model.layers[:n]
        try:
            if (n, steps) not in cache:
                ref = logits_run(ref_model, None, prompt, steps)[1:]
                cache[n, steps] = ref, logits_error(logits_run(model, None, prompt, steps)[1:], ref)
            ref, plain = cache[n, steps]
            got = logits_error(logits_run(model, fused, prompt, steps)[1:], ref)
        finally:
            ref_model.layers, model.layers = saved
        ok = got["rel"] <= max(TOLERANCE_RATIO * plain["rel"], TOLERANCE_FLOOR)
        rows.append({"layers": len(model.layers) if n is None else n, "plain": plain, "fused": got, "ok": ok})
    return rows


def print_tolerance(rows, label: str, dtype) -> None:
    print(f"logits vs plain float32 ({label}, {dtype}, decode steps only): fused passes if its rel. "
          f"error <= {TOLERANCE_RATIO}x plain's")
    print(f"{'layers':>6} {'plain rel':>10} {'fused rel':>10} {'ratio':>6} {'plain max':>10} {'fused max':>10} "
          f"{'plain top1':>10} {'fused top1':>10} ok")
    for r in rows:
        p, f = r["plain"], r["fused"]
        print(f"{r['layers']:6d} {p['rel']:10.3e} {f['rel']:10.3e} {f['rel'] / max(p['rel'], 1e-30):6.2f} "
              f"{p['max']:10.3e} {f['max']:10.3e} {p['top1']:10.2f} {f['top1']:10.2f} "
              f"{'yes' if r['ok'] else 'NO'}", flush=True)


def variants(ref_model, model, fused, prompt, steps: int, layers, timing_steps: int = 16) -> bool:
    """The tolerance check and the decode time per layer of the fused ops compiled and op by op,
    with the norms in the matvecs' launches, with only one of the two (the input norm, or the
    router's add and norm) and with neither (norm_qmv made of the separate norm and qmv): which
    part of the fused path an error comes from, and what each costs."""
    from dataclasses import replace

    from . import plain

    split = plain.compose_norm_qmv(fused.qmv, fused.rms_norm, fused.add_rms_norm)

    def only(add: bool):
        return lambda x, xa, w, eps, lins: (fused.norm_qmv if (xa is not None) == add else split)(x, xa, w, eps, lins)

    L = len(model.layers)
    with_ops(model, None)
    eh = float(np.median(decode_times(model, prompt, timing_steps, embed_head_only=True))) * 1e3
    ok = True
    saved = {k: os.environ.get(k) for k in ("FLASHMOE_COMPILE", "FLASHMOE_FUSE_INPUT_NORM")}
    os.environ["FLASHMOE_FUSE_INPUT_NORM"] = "1"   # the engine asks norm_qmv; the variants choose what it fuses
    try:
        for label, o, comp in (("compiled, fused norms", fused, "1"), ("op by op, fused norms", fused, "0"),
                               ("compiled, input norm fused", replace(fused, norm_qmv=only(False)), "1"),
                               ("compiled, router add+norm fused", replace(fused, norm_qmv=only(True)), "1"),
                               ("compiled, separate norms", replace(fused, norm_qmv=split), "1"),
                               ("compiled, separate norms, routing launch of its own",
                                replace(fused, norm_qmv=split,
                                        moe_route_gate_up=plain.route_gate_up(fused.moe_route, fused.moe_gate_up)), "1")):
            os.environ["FLASHMOE_COMPILE"] = comp
            with_ops(model, o)
            tok = float(np.median(decode_times(model, prompt, timing_steps))) * 1e3
            with_ops(model, None)
            print(f"{label}: {tok:.2f} ms/token, {(tok - eh) / L * 1e3:.1f} us/layer (embed+head {eh:.2f} ms)", flush=True)
            rows = tolerance_check(ref_model, model, o, prompt, steps, layers)
            print_tolerance(rows, f"{o.backend}, {label}", model.dtype)
            ok = ok and all(r["ok"] for r in rows)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ok


def norm_bisect(model, fused, prompt) -> None:
    """Where the fused input norm's error (FLASHMOE_FUSE_INPUT_NORM=1) comes from on this backend:
    for each layer, one decode token's input projections of the layer's own input three ways on
    the same arrays: norm_qmv with the norm in the launch (NORM 1), the same with a zero residual
    added (NORM 2, the router's variant, which passes the tolerance), and the norm then qmv (the
    default path); then the layer's whole output with and without the fusion. Relative max
    differences against the default path, per projection."""
    from ..engine.linear import embedding_rows
    from ..engine.qwen35 import _in_proj

    with_ops(model, None)
    cache = model.make_cache()
    model(prompt, cache, last_only=True)
    with_ops(model, fused, False)
    ids = mx.array([int(prompt[0])], mx.int32)
    x = embedding_rows(model.embed, ids).astype(model.dtype)[None]
    rel = lambda a, b: float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()  # noqa: E731
                             / mx.maximum(mx.abs(b.astype(mx.float32)).max(), 1e-30))
    saved = os.environ.get("FLASHMOE_FUSE_INPUT_NORM")
    try:
        for i, (layer, c) in enumerate(zip(model.layers, cache.layers)):
            m = layer.mixer
            lins = ([m.in_proj_qkv, m.in_proj_z, m.in_proj_b, m.in_proj_a] if layer.is_linear
                    else [m.q_proj, m.k_proj, m.v_proj])
            w, eps = layer.input_norm, layer.eps
            ref = fused.qmv(fused.rms_norm(x, w, eps), lins)
            one = fused.norm_qmv(x, None, w, eps, lins)[0]
            two = fused.norm_qmv(x, mx.zeros_like(x), w, eps, lins)[0]
            mx.eval(ref, one, two)
            print(f"layer {i} ({'gdn' if layer.is_linear else 'attn'}): |x| max {float(mx.abs(x).max()):.3g}, "
                  f"|w| max {float(mx.abs(w).max()):.3g}; in-proj rel. diff against norm then qmv: NORM 1 "
                  + " ".join(f"{rel(a, b):.2e}" for a, b in zip(one, ref)) + "; NORM 2 "
                  + " ".join(f"{rel(a, b):.2e}" for a, b in zip(two, ref)), flush=True)
            outs = {}
            for mode in ("0", "1"):     # (a GatedDeltaNet layer's state is replaced, not written: a
                os.environ["FLASHMOE_FUSE_INPUT_NORM"] = mode      # shallow copy keeps it apart)
                outs[mode] = (_in_proj(fused, x, (w, eps), lins),
                              layer(x, copy.copy(c)) if layer.is_linear else mx.zeros(1))
                mx.eval(outs[mode])
            print("  the engine's _in_proj, fused against not: "
                  + " ".join(f"{rel(a, b):.2e}" for a, b in zip(outs["1"][0], outs["0"][0]))
                  + (f"; the layer's output: {rel(outs['1'][1], outs['0'][1]):.2e}" if layer.is_linear else ""),
                  flush=True)
            os.environ["FLASHMOE_FUSE_INPUT_NORM"] = "0"
            x = layer(x, c)
            mx.eval(x)
    finally:
        if saved is None:
            os.environ.pop("FLASHMOE_FUSE_INPUT_NORM", None)
        else:
            os.environ["FLASHMOE_FUSE_INPUT_NORM"] = saved
        with_ops(model, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="397b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--k", type=int, default=4, help="experts per token")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pipe-steps", type=int, default=256, help="decode steps of the pipelined timing")
    ap.add_argument("--pipe-rounds", type=int, default=3, help="pipelined timings (each after a warm-up)")
    ap.add_argument("--pipe-pairs", type=int, default=1,
                    help="per round, timings of the whole model and its first half in turn (medians)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the engine's)")
    ap.add_argument("--check-steps", type=int, default=16,
                    help="decode steps of the bf16-tolerance check against float32 (0: skip)")
    ap.add_argument("--check-layers", default="all", help="comma-separated layer counts for that check, e.g. 2,all")
    ap.add_argument("--norm-bisect", action="store_true",
                    help="only: where the fused input norm's error comes from, layer by layer (norm_bisect)")
    ap.add_argument("--variants", action="store_true",
                    help="only the tolerance check, compiled and op by op, with and without fused norms")
    args = ap.parse_args(argv)
    from ..engine.load import load_model
    from . import ops as kernel_ops

    dest = Path(args.dir or f"/tmp/fm-{args.preset}-{args.layers}")
    build(dest, args.preset, args.layers)
    t0 = time.perf_counter()
    model = load_model(dest, experts_per_token=min(args.k, 10 if args.preset == "397b" else 4),
                       dtype=getattr(mx, args.dtype) if args.dtype else None)
    print(f"loaded {dest} in {time.perf_counter() - t0:.1f} s, dtype {model.dtype}, "
          f"K={model.experts_per_token}, {len(model.layers)} layers", flush=True)
    from .overhead import touch

    touch(model)    # every weight on the device before any timing (not moved page by page inside it)
    fused = kernel_ops()
    if fused is None:
        print("no kernel backend active here")
        return 2
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, args.prompt).tolist()
    if args.norm_bisect:
        norm_bisect(model, fused, prompt)
        return 0
    if args.variants:
        ref = load_model(dest, experts_per_token=model.experts_per_token, dtype=mx.float32)
        layers = [int(n) if n != "all" else None for n in args.check_layers.split(",")]
        return 0 if variants(ref, model, fused, prompt, args.check_steps, layers) else 1
    t0 = time.perf_counter()
    err, top1 = compare(model, fused, prompt, 8)
    print(f"logits fused vs plain ({fused.backend}, {args.preset} L={len(model.layers)}): "
          f"max rel diff {err:.3e}, top-1 agreement {top1:.2f} ({time.perf_counter() - t0:.1f} s, "
          f"the kernels' first compilation included)", flush=True)
    if not args.no_timing:   # (first: the tolerance check below loads a float32 copy and takes longer)
        L = len(model.layers)
        rows = {}
        for name, o in (("plain", None), ("fused", fused)):
            with_ops(model, o)
            heat()
            tok = np.median(decode_times(model, prompt, args.steps)) * 1e3
            eh = np.median(decode_times(model, prompt, args.steps, embed_head_only=True)) * 1e3
            rows[name] = (tok, eh, (tok - eh) / L)
            print(f"{name:6} decode: {tok:8.2f} ms/token, embed+head {eh:6.2f} ms, "
                  f"{(tok - eh) / L * 1e3:7.1f} us/layer  -> 60 layers: {eh + 60 * (tok - eh) / L:7.1f} ms/token",
                  flush=True)
        print(f"speedup per layer {rows['plain'][2] / rows['fused'][2]:.2f}x", flush=True)
        with_ops(model, fused)
        pipe = []
        for r in range(args.pipe_rounds):
            whole, wait = pipelined_time(model, prompt, args.pipe_steps)
            tok, wait = whole * 1e3, wait * 1e3
            eh, ehw = (t * 1e3 for t in pipelined_time(model, prompt, args.pipe_steps, embed_head_only=True))
            print(f"fused, pipelined (as generate runs it): {tok:8.2f} ms/token (host waits {wait:5.2f}), embed+head "
                  f"{eh:6.2f} ms (waits {ehw:5.2f}), {(tok - eh) / L * 1e3:7.1f} us/layer  -> 60 layers: "
                  f"{eh + 60 * (tok - eh) / L:7.1f} ms/token", flush=True)
            per = rest = float("nan")
            if L >= 2:   # the same whole-model timing against the first half's
                per, rest, _ = marginal_layer_time(model, prompt, args.pipe_steps, whole, args.pipe_pairs)
                print(f"  the same, {L} layers against {L // 2}"
                      + (f" (medians of {args.pipe_pairs} pairs)" if args.pipe_pairs > 1 else "")
                      + f": {per * 1e6:7.1f} us per layer, the rest "
                      f"(embedding, head, sampling) {rest * 1e3:6.2f} ms/token  -> 60 layers: "
                      f"{(rest + 60 * per) * 1e3:7.1f} ms/token", flush=True)
            pipe.append((tok, wait, eh, (tok - eh) / L * 1e3, per * 1e6, rest * 1e3))
        if len(pipe) > 1:
            print(pipe_summary(pipe, L), flush=True)
        with_ops(model, None)
    tol_ok = True
    if model.dtype != mx.float32 and args.check_steps > 0:
        ref = load_model(dest, experts_per_token=model.experts_per_token, dtype=mx.float32)
        layers = [int(n) if n != "all" else None for n in args.check_layers.split(",")]
        t0 = time.perf_counter()
        rows = tolerance_check(ref, model, fused, prompt, args.check_steps, layers)
        print_tolerance(rows, f"{fused.backend}, {args.preset}", model.dtype)
        print(f"(the tolerance check took {time.perf_counter() - t0:.1f} s)", flush=True)
        tol_ok = all(r["ok"] for r in rows)
        del ref
    return 0 if tol_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
