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


# MLX's CUDA quantized matmuls read past the end of what they multiply (0.32.4's qmm_sm80_kernel,
# MLX issue 3487: tile loads not bounded by the matrix's rows). Seen on the H200 (compute-sanitizer,
# sixteenth session): 16-byte reads 1-13 bytes past a [64, 128, 32] uint32 expert stack, and up to
# 96 bytes past the [4, 4] bf16 scales of a 4-row linear (the tiny preset's in_proj_a/b), in a
# prompt's matmuls, then "an illegal memory access" where nothing was mapped there. So on CUDA the
# stacks gather_qmm reads get one more leading row of room behind them, and quantized 2-D weights
# whose rows are not a multiple of the kernel's 128-row tile get room up to the next multiple.
QMM_TILE_ROWS = 128


def room_behind() -> bool:
    """Whether quantized weights need room behind their last row (MLX's CUDA backend)."""
    return mx.default_device() != mx.cpu and not mx.metal.is_available() and mx.cuda.is_available()


def with_room(a: mx.array, rows: int = 1) -> mx.array:
    """`a` (evaluated) as the first rows of a buffer `rows` leading rows longer: equal values, and
    reads a little past its end stay inside the buffer."""
    b = mx.concatenate([a, mx.zeros((rows, *a.shape[1:]), a.dtype)])[: a.shape[0]]
    mx.eval(b)
    return b


def stack_with_room(lin: Linear) -> Linear:
    """An expert stack whose parts each have a row of room behind (`with_room`)."""
    if not lin.quantized:
        return Linear(with_room(lin.weight))
    return Linear(with_room(lin.weight), with_room(lin.scales), with_room(lin.biases), lin.bits, lin.group_size)


def matrix_with_room(lin: Linear) -> Linear:
    """Where room_behind(): a quantized 2-D weight whose parts each have room behind up to a whole
    tile of rows (QMM_TILE_ROWS); any other weight, or elsewhere, `lin` as it is."""
    n = lin.weight.shape[0]
    pad = -n % QMM_TILE_ROWS
    if not lin.quantized or lin.weight.ndim != 2 or not pad or not room_behind():
        return lin
    return Linear(with_room(lin.weight, pad), with_room(lin.scales, pad), with_room(lin.biases, pad),
                  lin.bits, lin.group_size)


def embedding_rows(table: Linear, ids: mx.array) -> mx.array:
    """Rows `ids` of an embedding table (dense or quantized) -> [..., H]."""
    if table.quantized:
        return mx.dequantize(table.weight[ids], table.scales[ids], table.biases[ids],
                             group_size=table.group_size, bits=table.bits)
    return table.weight[ids]
