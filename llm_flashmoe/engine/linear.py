"""Linear layers as plain data: a dense or affine-quantized weight matrix.

One `Linear` holds either a dense weight [out, in] or an MLX affine
quantized triple (weight uint32 [out, in*bits/32], scales and biases
[out, in/group]). A stack of experts is the same with a leading expert axis.
The functions here are the plain-MLX reference for every matmul the model
does; fused kernels are tested against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass
class Linear:
    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0
    group_size: int = 0
    # Stacked experts only: int64 [n, 3] host addresses of each row's (weight, scales, biases)
    # where rows lie outside the arrays (the expert store's page-cache mappings). Only the CPU
    # kernels read them; a source sets them only when asked (ExpertSource.fetch(host_rows=True)).
    row_addresses: object = None

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., in] -> [..., out]"""
        if self.quantized:
            return mx.quantized_matmul(
                x, self.weight, self.scales, self.biases,
                transpose=True, group_size=self.group_size, bits=self.bits,
            )
        return x @ self.weight.swapaxes(-1, -2)

    def gather(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """Per-row expert matmul: x [..., 1, in] with indices [...] into the
        expert axis of this stacked weight -> [..., 1, out]."""
        if self.row_addresses is not None:
            raise ValueError("this expert stack's rows lie outside its arrays (row_addresses): "
                             "only the CPU kernels can read it")
        if self.quantized:
            return mx.gather_qmm(
                x, self.weight, self.scales, self.biases, rhs_indices=indices,
                transpose=True, group_size=self.group_size, bits=self.bits,
                sorted_indices=sorted_indices,
            )
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def cast(self, dtype: mx.Dtype) -> "Linear":
        """Floating parts in `dtype` (quantized codes stay uint32)."""
        if self.quantized:
            return Linear(self.weight, self.scales.astype(dtype), self.biases.astype(dtype),
                          self.bits, self.group_size)
        return Linear(self.weight.astype(dtype))


# MLX's CUDA quantized matmuls read a little past the last row of the stack they multiply (0.32.4's
# qmm_sm80_kernel, MLX issue 3487: tile loads not bounded by the matrix's end). Seen on the H200
# (compute-sanitizer, sixteenth session): 16-byte reads 1-13 bytes past a [64, 128, 32] uint32 expert
# stack in the tiny preset's prompt, then "an illegal memory access" where nothing was mapped there.
# Stacks that gather_qmm reads on CUDA therefore get one more leading row of room behind them.
def room_behind() -> bool:
    """Whether stacks for gather_qmm need room behind their last row (MLX's CUDA backend)."""
    return mx.default_device() != mx.cpu and not mx.metal.is_available() and mx.cuda.is_available()


def with_room(a: mx.array) -> mx.array:
    """`a` (evaluated) as the first rows of a buffer one leading row longer: equal values, and
    reads a little past its end stay inside the buffer."""
    b = mx.concatenate([a, mx.zeros((1, *a.shape[1:]), a.dtype)])[: a.shape[0]]
    mx.eval(b)
    return b


def stack_with_room(lin: Linear) -> Linear:
    """An expert stack whose parts each have a row of room behind (`with_room`)."""
    if not lin.quantized:
        return Linear(with_room(lin.weight))
    return Linear(with_room(lin.weight), with_room(lin.scales), with_room(lin.biases), lin.bits, lin.group_size)


def embedding_rows(table: Linear, ids: mx.array) -> mx.array:
    """Rows `ids` of an embedding table (dense or quantized) -> [..., H]."""
    if table.quantized:
        return mx.dequantize(table.weight[ids], table.scales[ids], table.biases[ids],
                             group_size=table.group_size, bits=table.bits)
    return table.weight[ids]
