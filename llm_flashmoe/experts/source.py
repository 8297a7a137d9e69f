"""Where the MoE block gets its experts' weights from.

The model never indexes expert weights itself: for each layer it asks an
`ExpertSource` for the experts the router chose and gets an `ExpertBatch`,
stacks of gate/up/down weights plus a lookup table from global expert id to
row of those stacks. `ResidentExperts` (everything in memory) and the
SSD-backed `ExpertStore` (experts/store.py) are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..engine.linear import Linear


@dataclass
class ExpertBatch:
    gate: Linear  # stacked [n, I, H(packed)]
    up: Linear    # stacked [n, I, H(packed)]
    down: Linear  # stacked [n, H, I(packed)]
    lookup: np.ndarray  # int32 [E]: global expert id -> row in the stacks (-1: absent)
    device_lookup: object = None  # the same as an mx.array, where a source keeps one (no host round trip)
    all_in_gpu: bool = True       # device_lookup's experts are all in GPU memory (hits); False: some are
                                  # read over the bus from pinned host memory (device_lookup: addresses)


@dataclass
class ExpertStats:
    """Counters since the last `reset`, summed over layers."""

    experts: int = 0
    bytes: int = 0
    read_seconds: float = 0.0
    cache_hits: int = 0  # experts read that the OS page cache served
    gpu_hits: int = 0    # experts found in the GPU expert cache (no read at all)
    prefetched: int = 0       # experts announced ahead of their layer (`prefetch`)
    prefetch_hits: int = 0    # experts read that had been announced
    in_place: int = 0         # page-cache hits used where they lie (mapped; no copy), within cache_hits

    def reset(self) -> None:
        self.experts = self.bytes = self.cache_hits = self.gpu_hits = 0
        self.prefetched = self.prefetch_hits = self.in_place = 0
        self.read_seconds = 0.0


class ExpertSource(Protocol):
    stats: ExpertStats

    def fetch(self, layer: int, expert_ids: np.ndarray, *, gather: bool = False,
              host_rows: bool = False) -> ExpertBatch:
        """The weights of `expert_ids` (sorted, unique) of MoE layer `layer`.

        `gather`: the rows will be read by MLX's `gather_qmm` (prompt processing), whose
        offsets are 32-bit: the stacks must stay under 2**31 bytes each.
        `host_rows`: the caller's kernels (the CPU ones) find rows by host address: the
        source may leave rows outside the stacks and give their addresses in the stacks'
        `Linear.row_addresses` (the store does so for experts already in the page cache)."""
        ...


@dataclass
class ResidentExperts:
    """All experts of all layers held in memory (tests, small models)."""

    layers: list[tuple[Linear, Linear, Linear]]  # per layer: full [E, ...] stacks
    stats: ExpertStats = field(default_factory=ExpertStats)

    def fetch(self, layer: int, expert_ids: np.ndarray, *, gather: bool = False,
              host_rows: bool = False) -> ExpertBatch:
        gate, up, down = self.layers[layer]
        n_experts = gate.weight.shape[0]
        self.stats.experts += len(expert_ids)
        return ExpertBatch(gate, up, down, np.arange(n_experts, dtype=np.int32))
