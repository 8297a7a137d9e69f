"""Whole-model decode on a GPU: fused kernels vs the plain-MLX path.

    python -m llm_flashmoe.kernels.decode_bench --preset 397b --layers 4 --dir /tmp/fm397b

Writes a synthetic MLX-layout checkpoint (if absent), loads it all resident,
then for each path (plain: FLASHMOE_KERNELS=off; fused: the active backend):
prefills a prompt with the plain path, decodes N tokens and reports the
median ms per token, the embedding+head alone, and ms per layer. It also
feeds the same tokens through both paths and reports the largest logit
difference relative to the largest logit, and top-1 agreement.
"""

from __future__ import annotations

import argparse
import os
import time
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


def with_ops(model, ops) -> None:
    """Point every block of `model` at `ops` (None: the plain path)."""
    for layer in model.layers:
        layer.ops = layer.mixer.ops = layer.moe.ops = ops


def decode_times(model, prompt, steps: int, embed_head_only: bool = False) -> list[float]:
    cache = model.make_cache()
    layers = model.layers
    if embed_head_only:
        model.layers = []
        cache.layers = []
    mx.eval(model(prompt, cache, last_only=True))
    tok = [int(prompt[-1])]
    times = []
    for _ in range(steps):
        mx.synchronize()
        t0 = time.perf_counter()
        logits = model(tok, cache, last_only=True)
        mx.eval(logits)
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    model.layers = layers
    return times[2:]


def compare(model, fused, prompt, steps: int) -> tuple[float, float]:
    """Same tokens through both paths -> (max |diff| / max |logit|, top-1 agreement)."""
    res = {}
    for name, o in (("plain", None), ("fused", fused)):
        with_ops(model, o)
        cache = model.make_cache()
        with_ops(model, None)
        outs = [model(prompt, cache, last_only=True)]       # prefill: plain path for both
        with_ops(model, o)
        for t in range(steps):
            outs.append(model([int(prompt[t % len(prompt)])], cache, last_only=True))
        mx.eval(outs)
        res[name] = [np.array(x.astype(mx.float32)) for x in outs]
    errs = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(res["fused"], res["plain"])]
    top1 = np.mean([a.argmax() == b.argmax() for a, b in zip(res["fused"], res["plain"])])
    return float(max(errs)), float(top1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="397b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--k", type=int, default=4, help="experts per token")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the engine's)")
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
    fused = kernel_ops()
    if fused is None:
        print("no kernel backend active here")
        return 2
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, args.prompt).tolist()
    err, top1 = compare(model, fused, prompt, 8)
    print(f"logits fused vs plain ({fused.backend}, {args.preset} L={len(model.layers)}): "
          f"max rel diff {err:.3e}, top-1 agreement {top1:.2f}", flush=True)
    if args.no_timing:
        return 0
    L = len(model.layers)
    rows = {}
    for name, o in (("plain", None), ("fused", fused)):
        with_ops(model, o)
        tok = np.median(decode_times(model, prompt, args.steps)) * 1e3
        eh = np.median(decode_times(model, prompt, args.steps, embed_head_only=True)) * 1e3
        rows[name] = (tok, eh, (tok - eh) / L)
        print(f"{name:6} decode: {tok:8.2f} ms/token, embed+head {eh:6.2f} ms, "
              f"{(tok - eh) / L * 1e3:7.1f} us/layer  -> 60 layers: {eh + 60 * (tok - eh) / L:7.1f} ms/token",
              flush=True)
    print(f"speedup per layer {rows['plain'][2] / rows['fused'][2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
