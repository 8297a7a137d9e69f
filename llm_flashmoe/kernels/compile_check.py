"""Compile the generated CUDA kernel sources with the host's C++ compiler, before a GPU run.

    python -m llm_flashmoe.kernels.compile_check [--cxx g++ | --nvcc [--arch sm_90]] [--keep DIR]

Drives the CUDA launchers (gpu.py) through every case of `kernels.check` on the CPU, with
`mx.fast.cuda_kernel` replaced by a recorder, so each kernel is rendered exactly as a GPU run
would render it (same defines, same input and output names and dtypes). Each source is then
wrapped in a function of the signature MLX would give it and compiled with `-fsyntax-only`
against a small host shim of the CUDA names it uses, or, with --nvcc, compiled for real as a
__global__ function (ptxas reports each kernel's registers and spills). Syntax, type and template
errors show up here in seconds instead of in a device session; what only the GPU can tell
(numerics, speed) stays with `kernels.check`. Exits 1 if any source fails to compile.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

# Host stand-ins for what the CUDA dialect header and MLX's kernel wrapper provide.
SHIM = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
using std::min; using std::max;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
struct dim3_ { unsigned x, y, z; };
static dim3_ blockIdx, threadIdx, blockDim;
inline void __syncthreads() {}
inline void __syncwarp() {}
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline int __shfl_xor_sync(unsigned, int v, int) { return v; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
#define FM_HOST_MMA 1
inline void fm_host_mma(float*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t) {}
struct bf16 {
  uint16_t v;
  bf16() {}
  bf16(float f) { uint32_t u; std::memcpy(&u, &f, 4); v = uint16_t(u >> 16); }
  operator float() const { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
"""

C_TYPES = {mx.bfloat16: "bf16", mx.float16: "bf16", mx.float32: "float", mx.int32: "int32_t",
           mx.uint32: "uint32_t", mx.uint64: "uint64_t", mx.uint8: "uint8_t"}
CUDA_TYPES = {**C_TYPES, mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}
CUDA_PRELUDE = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cstdint>\n"


def kernel_params(spec: tuple, inputs, output_dtypes, types: dict) -> list[str]:
    """The parameters MLX gives a kernel of `spec` (name, input names, output names, body,
    header): its inputs, the shapes of those whose `NAME_shape` the body reads, its outputs."""
    _, ins, outs, body, _ = spec
    params = [f"const {types[a.dtype]}* {n}" for n, a in zip(ins, inputs)]
    params += [f"const int32_t* {n}_shape" for n in ins if f"{n}_shape" in body]
    return params + [f"{types[d]}* {n}" for n, d in zip(outs, output_dtypes)]


class _Recorder:
    """Stands in for one mx.fast.cuda_kernel: records the translation unit of each call."""

    def __init__(self, sink: dict, nvcc: bool, name, input_names, output_names, source, header):
        self.sink, self.nvcc = sink, nvcc
        self.spec = (name, list(input_names), list(output_names), source, header)

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        from .gpu import inline_sources

        name, _, _, body, header = self.spec
        body, header = inline_sources(body), inline_sources(header)   # the unit whole (no cache paths)
        types = CUDA_TYPES if self.nvcc else C_TYPES
        params = kernel_params(self.spec, inputs, output_dtypes, types)
        t, fn = types[dict(template)["T"]], "__global__ void" if self.nvcc else "void"
        self.sink[name] = ((CUDA_PRELUDE if self.nvcc else '#include "shim.h"\n') + f"{header}\n"
                           f"template <typename T> {fn} {name}({', '.join(params)}) {{\n{body}\n}}\n"
                           f"template {fn} {name}<{t}>({', '.join(p.rsplit(' ', 1)[0] for p in params)});\n")
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]


def render_all(nvcc: bool = False) -> dict[str, str]:
    """{kernel name: translation unit} for every kernel the check's cases launch, their
    tensor-core variants, their rings of asynchronous copies (FLASHMOE_QASYNC), their integer staging
    (FLASHMOE_QINT: 2 digits for bf16, 3 for float32), the MoE kernels' ADDRESSED mode (experts
    given by address: the GPU cache's host tier), and the launches that ask for the next launch's
    bytes ahead (FLASHMOE_DOWN_PF: the gate/up; FLASHMOE_NEXT_PF: gdn_step, decode_attention)."""
    from . import check, gpu

    units: dict[str, str] = {}
    kernels = gpu.GpuKernels("cuda")
    kernels._make = lambda **kw: _Recorder(units, nvcc, **kw)

    def addressed():
        for label in ("397b", "odd", "odd-4bit"):
            d = check.moe_inputs(label, mx.bfloat16)
            E, K, I, Is = d["E"], d["K"], d["gate"].weight.shape[1], d["sg"].out_features
            table, rows = mx.zeros((E, 9), mx.uint64), mx.zeros((K, 9), mx.uint64)
            kernels.moe_route_gate_up(check.rnd((E,)), K, True, table, d["x"], d["gate"], d["up"], d["sg"], d["su"])
            kernels.moe_gate_up(d["x"], rows, d["gate"], d["up"], d["sg"], d["su"])
            kernels.moe_down(check.rnd((K, I)), rows, d["w"], d["down"], check.rnd((Is,)), d["sd"], check.rnd((1,)),
                             d["res"])

    saved = (gpu.QMV_MMA, gpu.MOE_MMA, gpu.QASYNC, gpu.QINT, gpu.DOWN_PF, gpu.NEXT_PF)
    try:
        gpu.QMV_MMA, gpu.MOE_MMA, gpu.QINT = 0, frozenset(), 0   # the FMA forms, every case and dtype
        for _, make, labels in check.CASES:
            for label in labels:
                for dtype in (mx.bfloat16, mx.float32):
                    make(label, dtype)[0](kernels)
        addressed()
        # the tensor-core variants (FLASHMOE_QMV_MMA, FLASHMOE_MOE_MMA) of the bf16 cases
        gpu.QMV_MMA, gpu.MOE_MMA = 1, frozenset({"gateup", "down"})
        for name, make, labels in check.CASES:
            if name in ("qmv", "norm_qmv", "moe_gate_up", "moe_route_gate_up", "moe_down"):
                for label in labels:
                    make(label, mx.bfloat16)[0](kernels)
        addressed()
        # the ring of asynchronous copies (FLASHMOE_QASYNC) of the matrix-vector and gate/up cases
        gpu.QMV_MMA, gpu.MOE_MMA, gpu.QASYNC = 0, frozenset(), 3
        for name, make, labels in check.CASES:
            if name in ("qmv", "norm_qmv", "moe_gate_up", "moe_route_gate_up"):
                for label in labels:
                    make(label, mx.bfloat16)[0](kernels)
        # the integer staging (FLASHMOE_QINT) of the matrix-vector and MoE cases (moe_down's FMA form),
        # alone and with the ring
        for ring in (0, 3):
            gpu.QASYNC, gpu.QINT = ring, 1
            for name, make, labels in check.CASES:
                if name in ("qmv", "norm_qmv", "moe_gate_up", "moe_route_gate_up", "moe_down"):
                    for label in labels:
                        for dtype in (mx.bfloat16, mx.float32):
                            make(label, dtype)[0](kernels)
        # the gate/up launches asking for moe_down's rows ahead (FLASHMOE_DOWN_PF), QINT and tensor-core forms
        gpu.QASYNC, gpu.DOWN_PF = 0, 1
        for mma in (frozenset(), frozenset({"gateup"})):
            gpu.MOE_MMA = mma
            for label in ("397b", "odd", "odd-4bit"):
                d = check.moe_inputs(label, mx.bfloat16)
                then = (d["down"], d["sd"])
                kernels.moe_route_gate_up(check.rnd((d["E"],)), d["K"], True, None, d["x"], d["gate"], d["up"], d["sg"],
                                          d["su"], then=then)
                kernels.moe_gate_up(d["x"], d["rows"], d["gate"], d["up"], d["sg"], d["su"], then=then)
        # gdn_step and decode_attention asking for the output projection's matrix ahead (FLASHMOE_NEXT_PF)
        gpu.NEXT_PF = 1
        nxt = [check.qlinear(64, 256, 4, 64), check.qlinear(8, 256, 8, 64)]   # (only their sizes go in the source)
        for name, make in (("gdn_step", check.case_gdn), ("decode_attention", check.case_attention)):
            for label in ("397b", "odd"):
                for dtype in (mx.bfloat16, mx.float32):
                    args = check.case_args(make, label, dtype)
                    getattr(kernels, name)(*args, then=nxt)
    finally:
        gpu.QMV_MMA, gpu.MOE_MMA, gpu.QASYNC, gpu.QINT, gpu.DOWN_PF, gpu.NEXT_PF = saved
    # the benchmark kernel (`overhead bwfloor`), each variant, launched as bwfloor launches it
    from .overhead import stream_read

    for one_pass in (0, 1):
        for stage in (0, 1, 2):
            stream_read(lambda **kw: _Recorder(units, nvcc, **kw), f"fm_stream_read_{one_pass}{stage}", "cuda",
                        4096, 8, one_pass, stage)(mx.zeros((16384,), mx.uint32), mx.zeros((2048,), mx.bfloat16))
    return units


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cxx", default="g++", help="C++ compiler (default g++)")
    ap.add_argument("--nvcc", action="store_true", help="compile with nvcc for --arch; report registers, spills and stack frames")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", default=None, help="write the translation units to this folder")
    args = ap.parse_args(argv)
    tool = "nvcc" if args.nvcc else args.cxx
    if shutil.which(tool) is None:
        print(f"no compiler {tool!r} on PATH: install it or pass --cxx")
        return 2
    units = render_all(args.nvcc)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fm-compile-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "shim.h").write_text(SHIM)
    fails = 0
    for name, text in sorted(units.items()):
        path = work / f"{name}.{'cu' if args.nvcc else 'cpp'}"
        path.write_text(text)
        if args.nvcc:
            cmd = ["nvcc", "-std=c++17", f"-arch={args.arch}", "-c", "-Xptxas", "-v", "-o", os.devnull, str(path)]
        else:
            cmd = [args.cxx, "-std=c++17", "-fsyntax-only", "-w", f"-I{work}", str(path)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            fails += 1
            print(f"FAIL {name} ({path}):\n{r.stderr[:4000]}")
        elif args.nvcc:   # ptxas: "N bytes stack frame, N bytes spill stores, N bytes spill loads", "Used N registers"
            used = re.search(r"Used (\d+) registers", r.stderr)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
            # a stack frame without spills: an array the kernel indexes at run time, kept in local memory
            stack = re.search(r"(\d+) bytes stack frame", r.stderr)
            print(f"{name:34} {used.group(1) if used else '?':>4} registers, spills "
                  f"{spill.group(1) + '/' + spill.group(2) if spill else '?'} bytes (stores/loads), "
                  f"stack frame {stack.group(1) if stack else '?'} bytes")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(units)} kernel sources, {fails} failed to compile")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
