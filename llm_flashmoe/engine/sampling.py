"""Choosing the next token from logits: greedy, or temperature with top-k,
top-p and min-p filtering, reproducible for a given seed.

`Sampler` runs on numpy float32 logits of one position ([V], about 1 MB at
248k vocabulary): the filters sort at most top-k candidates, so this costs
well under a millisecond next to a decode step. `DeviceSampler` makes the
same choice with MLX ops where the logits are, for the pipelined decode
(engine/generate.py), which builds each step before its token is read back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6   # 0 means greedy
    top_p: float = 0.95
    top_k: int = 20            # 0 means no limit
    min_p: float = 0.0
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        finite = np.isfinite(logits)
        n_finite = int(finite.sum())
        if n_finite == 0:
            raise ValueError("every token is masked: nothing can be sampled")
        # Candidates: the top-k (or every finite) logits, best first.
        k = n_finite if p.top_k <= 0 else min(p.top_k, n_finite)
        cand = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
        cand = cand[np.argsort(-logits[cand], kind="stable")]
        cand = cand[np.isfinite(logits[cand])]
        probs = np.exp(logits[cand] - logits[cand[0]])
        probs /= probs.sum()
        keep = np.ones(len(cand), bool)
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p.
            before = np.cumsum(probs) - probs
            keep &= before < p.top_p
        keep[0] = True
        cand, probs = cand[keep], probs[keep]
        probs /= probs.sum()
        return int(cand[self.rng.choice(len(cand), p=probs)])


class DeviceSampler:
    """The same choice as `Sampler` (the same filters, the same distribution), made by MLX ops on
    the logits where they are, so that a decode step's token is an array the next step can be built
    on before it is computed (pipelined decode: `Session.generate`). Greedy picks the same token as
    `Sampler` (the first of equal maxima); with a temperature the draw comes from MLX's generator,
    reproducible for a seed but not the same draws as `Sampler`'s."""

    def __init__(self, params: SamplingParams, vocab_size: int | None = None):
        import mlx.core as mx

        self.params, self.vocab_size = params, vocab_size
        self.key = mx.random.key(params.seed) if params.seed is not None else None

    def __call__(self, logits):
        """float32 logits [V] (an mx.array) -> the token, an int32 scalar array (lazy)."""
        import mlx.core as mx

        p = self.params
        if self.vocab_size is not None:
            logits = logits[: self.vocab_size]      # rows past the tokenizer's are never sampled
        if p.temperature <= 0:
            return mx.argmax(logits).astype(mx.int32)
        logits = logits / p.temperature
        n = logits.shape[0]
        k = n if p.top_k <= 0 else min(p.top_k, n)
        # candidates best first: the top k, or every logit (a full sort only without top-k)
        cand = mx.argpartition(-logits, k - 1)[:k] if k < n else mx.arange(n)
        vals = logits[cand]
        order = mx.argsort(-vals)
        cand, vals = cand[order], vals[order]
        probs = mx.softmax(vals)
        keep = mx.ones(vals.shape, dtype=mx.bool_)
        if p.min_p > 0:
            keep = keep & (probs >= p.min_p * probs[0])
        if p.top_p < 1.0:
            keep = keep & ((mx.cumsum(probs) - probs) < p.top_p)   # the smallest prefix reaching top_p
        keep = keep | (mx.arange(k) == 0)
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        pick = mx.random.categorical(mx.where(keep, vals, -mx.inf), key=key)
        return cand[pick].astype(mx.int32)
