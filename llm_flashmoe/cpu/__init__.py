"""Fast CPU kernels (C, vectorised, multi-threaded) for the hot operations
when MLX runs on the CPU. See DESIGN.md for why they are a ctypes-loaded C
library rather than an MLX extension.

    build.py   compile kernels/cpu/*.c on first use, load, fallback notice
    ops.py     numpy-level calls: quantized matmul, MoE experts
    engine.py  the engine's hooks: MLX arrays in and out
    bench.py   achieved weight bandwidth against a numpy reference
"""

from .build import load as library  # noqa: F401
