"""Choosing the next token from logits: greedy, or temperature with top-k,
top-p and min-p filtering, reproducible for a given seed.

Runs on numpy float32 logits of one position ([V], about 1 MB at 248k
vocabulary): the filters sort at most top-k candidates, so this costs well
under a millisecond next to a decode step.
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
