"""Whole-model logits with the CPU kernels against the plain-MLX path.

    python -m llm_flashmoe.cpu.logits_check --preset 397b --layers 2 [--model DIR]

One model object serves both sides: its decode hooks (`.ops` of every block)
are switched to None for the plain path, so the weights are loaded once.
The tests run this on the `tiny` preset; the `397b` preset (2 layers, about
7 GB written and held in memory) is too big for CI and is run by hand.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import mlx.core as mx
import numpy as np


def set_ops(model, ops) -> None:
    for layer in model.layers:
        for block in (layer, layer.mixer, layer.moe):
            block.ops = ops


def compare_decode(model, prompt: list[int], steps: int) -> float:
    """Max relative logit error over a prefill then `steps` greedy decode steps."""
    fused = model.layers[0].ops
    assert fused is not None and fused.backend == "cpu"
    caches = [model.make_cache(), model.make_cache()]
    errs = []
    tokens = [prompt, prompt]
    for _ in range(steps + 1):
        outs = []
        for side, cache in enumerate(caches):
            set_ops(model, fused if side == 0 else None)
            outs.append(model(tokens[side], cache, last_only=True)[-1])
        mx.eval(outs)
        ref = np.asarray(outs[1], np.float64)
        errs.append(float(np.abs(np.asarray(outs[0]) - ref).max() / np.abs(ref).max()))
        nxt = int(np.argmax(ref))
        tokens = [[nxt], [nxt]]
    set_ops(model, fused)
    return max(errs)


def main(argv=None) -> int:
    from ..engine.load import load_model
    from ..synth import write_synthetic

    ap = argparse.ArgumentParser(prog="python -m llm_flashmoe.cpu.logits_check", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="397b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--model", help="an existing MLX-layout checkpoint instead of writing one")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flashmoe-logits-") as tmp:
        path = args.model or write_synthetic(f"{tmp}/m", preset=args.preset, layout="mlx", layers=args.layers)
        model = load_model(path, dtype=mx.float32, experts_per_token=4)
        prompt = np.random.default_rng().integers(0, 248000, 4).tolist()
        err = compare_decode(model, prompt, steps=args.steps)
    ok = err < 1e-4
    print(f"max relative logit error, cpu kernels vs plain MLX: {err:.2e} ({'ok' if ok else 'FAILED'}, bound 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
