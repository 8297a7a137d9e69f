"""The MoE block of one decode step while its experts are still being read (CPU kernels).

With experts streamed from disk, a layer's reads can only start once its router
has chosen, and used to be followed by all of the block's compute. Here the
reads run in the background (`ExpertStore.fetch_streaming`: each expert cut
across the reader threads, in turn, so the first lands early) while this
thread computes what needs no read: the shared expert and the routed experts
the page cache held (used in place), then each read expert as soon as it has
landed. Only the last expert's compute is left after the last read.

Same sums as `engine.moe_gate_up` + `engine.moe_down`, accumulated in another
order (float32 rounding differs, nothing else). The order is fixed (expert by
expert in routing order, then the shared expert, each expert's output in a row
of its own until then), so the result does not depend on which experts were in
memory: decode uses this whenever it streams, all experts ready or not, and
speculative reads (which make experts ready) change no logit.
"""

from __future__ import annotations

import math

import numpy as np

from . import ops as cops
from .engine import expert_qmats, f32, linear_qmat, load, prepare


def moe_streamed(x, rows: np.ndarray, scores, batch, pending, shared_gate, shared_up, shared_down,
                 shared_gate_logit, residual) -> np.ndarray:
    """residual + sum_k scores[k] * expert_{rows[k]}(x) + sigmoid(logit) * shared(x) -> float32 [H].

    `rows` [K]: rows of `batch` (an ExpertBatch with row addresses); `pending`: its PendingReads.
    Each expert's weighted output goes to a row of its own and the rows are added to the residual
    in one fixed order (k, then the shared expert) at the end: the result does not depend on which
    experts were in memory and in which order the others landed (speculative reads change what
    is ready, never the logits)."""
    lib = load()
    prepare([batch.gate, batch.up, batch.down, shared_gate, shared_up, shared_down])
    xn, wn, logit, res = f32([x, scores, shared_gate_logit, residual])
    xn = xn.reshape(1, -1)
    coef = wn.reshape(-1)
    r = np.asarray(rows).reshape(-1)
    K = len(r)
    parts = np.empty((K + 1, xn.shape[1]), np.float32)   # row k: expert k's weighted output; K: shared
    try:
        ready = [k for k in range(K) if pending.ready[r[k]]]
        # First what needs no read: the shared expert and the experts already in memory.
        g = expert_qmats(batch.gate, r[ready]) + [linear_qmat(shared_gate)]
        u = expert_qmats(batch.up, r[ready]) + [linear_qmat(shared_up)]
        d = expert_qmats(batch.down, r[ready]) + [linear_qmat(shared_down)]
        c = np.append(coef[ready], np.float32(1.0 / (1.0 + math.exp(-float(logit.reshape(-1)[0])))))
        _moe(lib, g, u, d, c, xn, parts, ready + [K])
        # Then each read expert as it lands, in landing order.
        k_of = {int(row): k for k, row in enumerate(r)}
        for row in pending.misses:    # every batch row is one of the K experts: rows are unique ids
            k = k_of[row]
            pending.wait(row)
            sel = r[k : k + 1]
            _moe(lib, expert_qmats(batch.gate, sel), expert_qmats(batch.up, sel), expert_qmats(batch.down, sel),
                 coef[k : k + 1], xn, parts, [k])
    finally:
        pending.finish()
    y = np.array(res.reshape(-1), dtype=np.float32, copy=True)
    for part in parts:
        y += part
    return y


def _moe(lib, g, u, d, coef, x, parts, dest) -> None:
    """parts[dest[i]] = coef[i] * expert_i(x) for the n experts given (one token each)."""
    n = len(g)
    out = np.zeros((n, x.shape[1]), np.float32)   # (accumulated into zeros: exactly coef * expert)
    cops.moe(lib, g, u, d, np.arange(n + 1, dtype=np.int32), np.arange(n, dtype=np.int32), coef,
             np.repeat(x, n, axis=0), out, accumulate=True)
    parts[dest] = out
