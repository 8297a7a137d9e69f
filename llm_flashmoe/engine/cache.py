"""Per-layer decoding state: KV caches and GatedDeltaNet states.

A full-attention layer keeps keys and values of every past token
(Hkv x Dh each: 30 KiB per token at 397B in bf16, both layers' worth).
A linear-attention layer keeps a constant-size state: the last K-1 inputs of
its causal conv and the recurrent matrix S (Hv x Dv x Dk, float32).
The recurrent state cannot be rewound, so a cache is only ever extended;
`ModelCache.tokens` records what it has seen so that a new prompt that
extends it can skip the shared prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

_KV_STEP = 256  # grow KV buffers in blocks of this many tokens
# ... or, for compiled decode steps (`reserve(ahead=True)`), by as many tokens as they hold, up
# to this many: each growth changes the buffers' shape, so the compiled step is traced again
# (a whole 60-layer step: ~40 ms), which doubling makes rare (256, 512, ..., then every 4096)
_KV_AHEAD_MAX = 4096


class KVCache:
    def __init__(self):
        self.keys: mx.array | None = None    # [1, Hkv, capacity, Dh]
        self.values: mx.array | None = None
        self.offset = 0

    def reserve(self, t: int, heads: int, dim: int, dtype, ahead: bool = False) -> None:
        """Room for t more tokens past the offset (buffers grown in blocks of _KV_STEP tokens;
        `ahead`: by at least what they hold, up to _KV_AHEAD_MAX, so that they change shape
        rarely)."""
        if self.keys is None or self.offset + t > self.keys.shape[2]:
            grow = ((t + _KV_STEP - 1) // _KV_STEP) * _KV_STEP
            if ahead and self.keys is not None:
                grow = max(grow, min(self.keys.shape[2], _KV_AHEAD_MAX) // _KV_STEP * _KV_STEP)
            shape = (1, heads, grow, dim)
            new_k, new_v = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[:, :, : self.offset], new_k], axis=2)
                self.values = mx.concatenate([self.values[:, :, : self.offset], new_v], axis=2)

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v [1, Hkv, T, Dh]; return all keys/values so far."""
        t = k.shape[2]
        self.reserve(t, k.shape[1], k.shape[3], k.dtype)
        self.keys[:, :, self.offset : self.offset + t] = k
        self.values[:, :, self.offset : self.offset + t] = v
        self.offset += t
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class LinearAttentionState:
    def __init__(self):
        self.conv: mx.array | None = None       # [1, K-1, conv_dim]
        self.recurrent: mx.array | None = None  # [1, Hv, Dv, Dk] float32

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv, self.recurrent) if a is not None]


@dataclass
class ModelCache:
    layers: list
    tokens: list[int] = field(default_factory=list)  # every token fed so far

    @property
    def offset(self) -> int:
        return len(self.tokens)

    def arrays(self) -> list[mx.array]:
        return [a for c in self.layers for a in c.state]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def mark(self) -> list:
        """Where every layer's state stands now, for `rewind` (cheap: references and offsets)."""
        return [c.offset if isinstance(c, KVCache) else (c.conv, c.recurrent) for c in self.layers]

    def rewind(self, mark: list) -> None:
        """Forget what was fed since `mark` (tokens not in `self.tokens`: a pipelined decode step
        built before its token was known to be wanted). A KV cache only moves its offset back
        (what lies past it is written over by the next token); the linear-attention states are
        immutable arrays, replaced per step, so the marked ones come back."""
        for c, m in zip(self.layers, mark):
            if isinstance(c, KVCache):
                c.offset = m
            else:
                c.conv, c.recurrent = m
