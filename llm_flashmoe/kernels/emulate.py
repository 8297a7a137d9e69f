"""Run the generated CUDA kernel sources on the CPU, one OS thread per GPU thread.

    python -m llm_flashmoe.kernels.emulate [--cases tiny,odd] [--only NAMES]
    FLASHMOE_QMV_MMA=1 FLASHMOE_MOE_MMA=1 python -m llm_flashmoe.kernels.emulate   (the tensor-core paths;
        FLASHMOE_EMULATE_MMA=0: their products summed as Metal sums them)

A check of the kernels' numerics without a GPU: each launch of the CUDA launchers (gpu.py) is
compiled with the host's g++ against an executing shim (kernels/compile_check's shim, plus
threads): a block's threads are std::threads, `__syncthreads` a block barrier, a warp shuffle an
exchange through memory between two warp barriers, blocks run one after another. The results are
compared with the plain twins run in float32 (the `kernels.check` verdict and bounds), on the
check's small shape sets, and the MoE kernels also in ADDRESSED mode (experts given by their
parts' host addresses: the GPU cache's host tier) through the same addresses the CPU twin reads.
Each L2 prefetch a kernel asks for must lie inside one of its launch's buffers (else the launch
raises); the lines asked for are kept per input (`_Launch.prefetched`), for tests of what a launch
asks for ahead. It says nothing about speed, and Metal is not covered. Slow (a thread per lane):
small shapes only.
"""

from __future__ import annotations

import argparse
import ctypes
from dataclasses import replace
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .compile_check import C_TYPES, kernel_params
from .gpu import inline_sources

# What the CUDA dialect and MLX's wrapper provide, made to run: thread-local indices, a block
# barrier, warp shuffles through memory. (Blocks run one at a time, so `static` shared memory
# is the block's.)
SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <thread>
#include <vector>
using std::min; using std::max;
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
struct dim3_ { unsigned x, y, z; };
static thread_local dim3_ blockIdx, threadIdx;
static dim3_ blockDim;
static std::barrier<>* fm_block_barrier;
static std::barrier<>* fm_warp_barrier[32];
static uint64_t fm_xchg[1024];
inline void __syncthreads() { fm_block_barrier->arrive_and_wait(); }
inline void __syncwarp() { fm_warp_barrier[threadIdx.x >> 5]->arrive_and_wait(); }
// cp.async as its semantics allow at the latest: a copy lands in shared memory only when a wait
// takes its group, so a kernel reading a stage before waiting for it reads stale bytes here.
#define FM_HOST_ASYNC 1
struct fm_copy { void* dst; const void* src; };
static thread_local std::vector<std::vector<fm_copy>> fm_async_groups;
static thread_local std::vector<fm_copy> fm_async_open;
inline void fm_async_copy16(void* dst, const void* src) { fm_async_open.push_back({dst, src}); }
inline void fm_async_commit() { fm_async_groups.push_back(fm_async_open); fm_async_open.clear(); }
inline void fm_async_wait(int n) {
  while (int(fm_async_groups.size()) > n) {
    for (const fm_copy& c : fm_async_groups.front()) std::memcpy(c.dst, c.src, 16);
    fm_async_groups.erase(fm_async_groups.begin());
  }
}
template <typename V> inline V fm_shfl_xor(V v, int o) {
  const unsigned t = threadIdx.x, w = t >> 5;
  uint64_t u = 0; std::memcpy(&u, &v, sizeof(V));
  fm_warp_barrier[w]->arrive_and_wait();
  fm_xchg[t] = u;
  fm_warp_barrier[w]->arrive_and_wait();
  u = fm_xchg[(w << 5) | ((t & 31) ^ unsigned(o))];
  V r; std::memcpy(&r, &u, sizeof(V));
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return fm_shfl_xor(v, o); }
inline int __shfl_xor_sync(unsigned, int v, int o) { return fm_shfl_xor(v, o); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
#if FM_HOST_MMA
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 as the PTX ISA lays out its fragments: each
// lane's registers go to the warp's table, then each lane works out its four elements of D from
// the lanes that hold its row of A and its column of B (groupID = lane / 4, tig = lane % 4:
// A's a0 row g, a1 row g+8, a2 row g cols +8, a3 row g+8 cols +8, columns 2 tig + {0,1};
// B's b0 rows 2 tig + {0,1}, b1 rows +8, column g; D's d0,d1 row g, d2,d3 row g+8, columns 2 tig + {0,1}).
static uint32_t fm_mma_frag[1024][6];
inline float fm_bf_half(uint32_t u, int hi) { uint32_t b = (hi ? (u >> 16) : (u & 0xFFFFu)) << 16; float f; std::memcpy(&f, &b, 4); return f; }
inline void fm_host_mma(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const unsigned t = threadIdx.x, w = t >> 5, l = t & 31;
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  std::memcpy(fm_mma_frag[t], mine, sizeof(mine));
  fm_warp_barrier[w]->arrive_and_wait();
  auto A = [&](int row, int k) {
    const uint32_t u = fm_mma_frag[(w << 5) | (4 * (row & 7) + ((k & 7) >> 1))][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return fm_bf_half(u, k & 1);
  };
  auto B = [&](int k, int col) {
    const uint32_t u = fm_mma_frag[(w << 5) | (4 * col + ((k & 7) >> 1))][4 + (k >= 8 ? 1 : 0)];
    return fm_bf_half(u, k & 1);
  };
  float out[4];
  for (int i = 0; i < 4; i++) {
    const int row = int(l >> 2) + 8 * (i >> 1), col = 2 * int(l & 3) + (i & 1);
    float s = d[i];
    for (int k = 0; k < 16; k++) s += A(row, k) * B(k, col);
    out[i] = s;
  }
  fm_warp_barrier[w]->arrive_and_wait();
  for (int i = 0; i < 4; i++) d[i] = out[i];
}
#endif
// PREFETCH_L2 (an L2 hint on the GPU) checked and recorded: each address must lie inside one of the
// launch's buffers (fm_bufs, set by fm_launch); the log keeps (buffer index, offset) of each.
#include <mutex>
static std::mutex fm_pf_mu;
static std::vector<std::pair<const char*, int64_t>> fm_bufs;
static std::vector<int64_t> fm_pf_log;
static int64_t fm_pf_bad = 0;
inline void fm_prefetch(const void* p) {
  const char* c = (const char*)p;
  std::lock_guard<std::mutex> g(fm_pf_mu);
  for (size_t i = 0; i < fm_bufs.size(); i++)
    if (c >= fm_bufs[i].first && c < fm_bufs[i].first + fm_bufs[i].second) {
      fm_pf_log.push_back((int64_t(i) << 40) | int64_t(c - fm_bufs[i].first));
      return;
    }
  fm_pf_bad++;
}
extern "C" int64_t fm_prefetch_count() { return int64_t(fm_pf_log.size()); }
extern "C" int64_t fm_prefetch_take(int64_t* out) {
  for (size_t i = 0; i < fm_pf_log.size(); i++) out[i] = fm_pf_log[i];
  const int64_t bad = fm_pf_bad;
  fm_pf_log.clear(); fm_pf_bad = 0;
  return bad;
}
struct bf16 {   // round to nearest even, as MLX converts
  uint16_t v;
  bf16() {}
  bf16(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); v = uint16_t(u >> 16); }
  operator float() const { uint32_t u = uint32_t(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
"""

_LIBS: dict[str, ctypes.CDLL] = {}


def _np_view(a: mx.array) -> np.ndarray:
    """The bytes of `a` as a contiguous numpy array (bf16/fp16 as uint16)."""
    if a.dtype in (mx.bfloat16, mx.float16):
        return np.ascontiguousarray(np.array(a.view(mx.uint16)))
    return np.ascontiguousarray(np.array(a))


def _np_inplace(a: mx.array, name: str) -> np.ndarray:
    """`a`'s own memory as a numpy array, for a kernel that writes the input in place (as the GPU
    kernel writes the buffer MLX hands it). Refused unless `a` is a whole row-contiguous buffer:
    MLX would hand the GPU kernel a copy of anything else, and the write would be lost."""
    mx.eval(a)
    v = a.view(mx.uint16) if a.dtype in (mx.bfloat16, mx.float16) else a
    mx.eval(v)
    arr = np.array(v, copy=False)
    if not arr.flags.c_contiguous or arr.size != a.size or arr.strides[-1] != arr.itemsize:
        raise ValueError(f"{name}: written in place, but not a whole row-contiguous buffer")
    return arr


class _Launch:
    """Stands in for one mx.fast.cuda_kernel: compiles the kernel for the host and runs it."""

    def __init__(self, workdir: Path, name, input_names, output_names, source, header):
        self.workdir = workdir
        self.spec = (name, list(input_names), list(output_names), source, header)
        # the body and header the compiler reads (the CUDA launches' are #includes of files)
        self.body, self.header = inline_sources(source), inline_sources(header)

    def shaped(self) -> list[str]:
        """Inputs whose shape the body reads (MLX passes `NAME_shape` for those its source names)."""
        return [n for n in self.spec[1] if f"{n}_shape" in self.spec[3]]

    def _library(self, inputs, output_dtypes, template) -> tuple[ctypes.CDLL, str]:
        name, body, header = self.spec[0], self.body, self.header
        header = header.replace('#define PREFETCH_L2(p) asm volatile("prefetch.global.L2 [%0];" ::"l"(p))',
                                "#define PREFETCH_L2(p) fm_prefetch((const void*)(p))")
        params = kernel_params(self.spec, inputs, output_dtypes, C_TYPES)
        t = C_TYPES[dict(template)["T"]]
        casts = [f"({p.rsplit(' ', 1)[0]})a[{i}]" for i, p in enumerate(params)]
        # FLASHMOE_EMULATE_MMA=0: the tensor-core products summed as Metal sums them (FMAs, shuffles)
        mma = os.environ.get("FLASHMOE_EMULATE_MMA", "1").strip() != "0"
        text = (f"#define FM_HOST_MMA {int(mma)}\n" + SHIM + header + f"\ntemplate <typename T> void {name}({', '.join(params)}) {{\n{body}\n}}\n"
                f'extern "C" void fm_launch(void** a, const int64_t* sizes, int n, int gx, int gy, int tx) {{\n'
                f"  fm_bufs.clear();\n"
                f"  for (int i = 0; i < n; i++) fm_bufs.push_back({{(const char*)a[i], sizes[i]}});\n"
                f"  blockDim = {{unsigned(tx), 1, 1}};\n"
                f"  std::barrier<> block(tx); fm_block_barrier = &block;\n"
                f"  std::vector<std::barrier<>*> warps;\n"
                f"  for (int w = 0; w < tx / 32; w++) warps.push_back(fm_warp_barrier[w] = new std::barrier<>(32));\n"
                f"  for (int by = 0; by < gy; by++) for (int bx = 0; bx < gx; bx++) {{\n"
                f"    std::vector<std::thread> th;\n"
                f"    for (int t = 0; t < tx; t++) th.emplace_back([=] {{\n"
                f"      blockIdx = {{unsigned(bx), unsigned(by), 0}}; threadIdx = {{unsigned(t), 0, 0}};\n"
                f"      {name}<{t}>({', '.join(casts)});\n"
                f"    }});\n"
                f"    for (auto& x : th) x.join();\n"
                f"  }}\n"
                f"  for (auto* w : warps) delete w;\n"
                f"}}\n")
        key = hashlib.sha1(text.encode()).hexdigest()[:16]
        lib = _LIBS.get(key)
        if lib is None:
            src, so = self.workdir / f"{name}_{key}.cpp", self.workdir / f"{name}_{key}.so"
            src.write_text(text)
            r = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-pthread", "-o", str(so), str(src)],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{name}: g++ failed ({src}):\n{r.stderr[:3000]}")
            lib = _LIBS[key] = ctypes.CDLL(str(so))
            lib.fm_prefetch_count.restype = lib.fm_prefetch_take.restype = ctypes.c_int64
        return lib, key

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None, **_):
        lib, _ = self._library(inputs, output_dtypes, template)
        # inputs the body writes through a cast pointer, `(GLOBAL T*)NAME)`: their own memory
        ins = [_np_inplace(a, n) if f"(GLOBAL T*){n})" in self.body else _np_view(a)
               for n, a in zip(self.spec[1], inputs)]
        by_name = dict(zip(self.spec[1], inputs))
        ins += [np.array(by_name[n].shape, np.int32) for n in self.shaped()]
        outs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            o = _np_view(mx.zeros(shape, dt))
            if init_value is not None and mx.issubdtype(dt, mx.floating):   # poison, as the GPU check does
                o[...] = _np_view(mx.full((1,), init_value, dt))
            outs.append(o)
        bufs = ins + outs
        args = (ctypes.c_void_p * len(bufs))(*[a.ctypes.data for a in bufs])
        sizes = (ctypes.c_int64 * len(bufs))(*[a.nbytes for a in bufs])
        tx = threadgroup[0]
        lib.fm_launch(args, sizes, ctypes.c_int(len(bufs)), ctypes.c_int(grid[0] // tx),
                      ctypes.c_int(grid[1] // max(threadgroup[1], 1)), ctypes.c_int(tx))
        n_log = lib.fm_prefetch_count()
        log = (ctypes.c_int64 * max(1, n_log))()
        bad = lib.fm_prefetch_take(log)
        if bad:
            raise RuntimeError(f"{self.spec[0]}: {bad} L2 prefetches outside the launch's buffers")
        names = self.spec[1] + [f"{n}_shape" for n in self.shaped()] + self.spec[2]
        self.prefetched = {}   # input or output name -> offsets of the lines asked for
        for v in log[:n_log]:
            self.prefetched.setdefault(names[v >> 40], set()).add(v & ((1 << 40) - 1))
        res = []
        for o, dt in zip(outs, output_dtypes):
            a = mx.array(o)
            res.append(a.view(dt) if dt in (mx.bfloat16, mx.float16) else a)
        return res


def emulated_kernels(workdir: Path, poison: bool = True):
    from .gpu import GpuKernels

    k = GpuKernels("cuda", poison=poison)
    k._make = lambda **kw: _Launch(workdir, **kw)
    return k


def host_table(stacks: tuple, rows: np.ndarray, keep: list) -> mx.array:
    """uint64 [len(rows), 9]: host addresses of the parts of experts `rows` of the stacks
    (gate, up, down) x (weight, scales, biases), ADDRESSED mode's input, in host copies of the
    stacks appended to `keep` (which must outlive every use of the addresses)."""
    out = np.zeros((len(rows), 9), np.uint64)
    for p, lin in enumerate(stacks):
        for j, a in enumerate((lin.weight, lin.scales, lin.biases)):
            host = _np_view(a)
            keep.append(host)
            per = host[0].nbytes
            out[:, 3 * p + j] = [host.ctypes.data + int(r) * per for r in rows]
    return mx.array(out)


def run(labels=("tiny", "odd"), only=None) -> int:
    from . import check, plain

    work = Path(tempfile.mkdtemp(prefix="fm-emulate-"))
    kern = emulated_kernels(work)
    fails = 0
    print(f"{'kernel':18} {'shape':12} {'dtype':8} {'rel.err':>9} {'bound':>7} {'plain':>9} ok")

    def verdict(name, label, dt, got, ref, plain_got=None):
        nonlocal fails
        err, perr, ok = check.judge(got, ref, plain_got, dt)
        fails += not ok
        print(f"{name:18} {label:12} {str(dt).split('.')[-1]:8} {err:9.2e} {check.BOUND[dt]:7.0e} {perr:9.2e} "
              f"{'yes' if ok else 'NO'}", flush=True)

    for name, make, case_labels in check.CASES:
        if only and name not in only:
            continue
        for label in case_labels:
            # a shape set's variants go with it ("tiny" runs "tiny+add", "odd" runs "odd-4bit")
            if label not in labels and label.split("+")[0].split("-")[0] not in labels:
                continue
            for dt in (mx.bfloat16, mx.float32):
                if dt == mx.float32 and name == "MoE block":
                    continue
                f, t, t32 = make(label, dt)
                verdict(name, label, dt, f(kern), t32(), t())
    # the benchmark kernel (overhead bwfloor): every word read once, whatever the variant
    if not only or "stream_read" in only:
        from .overhead import stream_read

        nv = 4999
        w = mx.array(np.random.randint(0, 2**32, size=4 * nv, dtype=np.uint64).astype(np.uint32))
        want = np.bitwise_xor.reduce(np.array(w))
        for groups, one_pass, stage in ((3, 0, 0), (2, 0, 1), (5, 1, 0), (4, 1, 1), (4, 1, 2)):
            out = stream_read(lambda **kw: _Launch(work, **kw), f"fm_bw_{groups}{one_pass}{stage}", "cuda", nv,
                              groups, one_pass, stage)(w, mx.zeros((2048,), mx.bfloat16))
            same = np.bitwise_xor.reduce(np.array(out)) == want
            fails += not same
            print(f"{'stream_read':18} {f'{groups}/{one_pass}/{stage}':12} {'uint32':8} every word read once: "
                  f"{'yes' if same else 'NO'}", flush=True)
    # the fused routing against moe_route's launch: the same picks in the same order and the same
    # weights, bit for bit (bf16 and float32 logits; 40, 64 and 512 experts: a lane holds 2 or 16)
    if not only or "moe_route_gate_up" in only:
        for E in (40, 64, 512):
            lin = lambda e, o, i: check.qlinear(o, i, 4, 64, mx.bfloat16, e)   # noqa: E731
            gate, up, sg, su = lin(E, 16, 64), lin(E, 16, 64), lin(None, 16, 64), lin(None, 16, 64)
            for dt in (mx.bfloat16, mx.float32):
                logits = check.rnd((E,), dt, 2.0)
                _, _, rows, w = kern.moe_route_gate_up(logits, 4, True, None, check.rnd((64,)), gate, up, sg, su)
                ids, w1 = kern.moe_route(logits, 4, True)
                same = np.array_equal(np.array(rows), np.array(ids)) and np.array_equal(np.array(w), np.array(w1))
                fails += not same
                print(f"{'moe_route_gate_up':18} {f'E={E}':12} {str(dt).split('.')[-1]:8} picks and weights "
                      f"{'equal to' if same else 'DIFFERENT from'} moe_route's", flush=True)
    # ADDRESSED mode: the experts' parts by host address, against the twins reading the same addresses
    for label in [m for m in check.MOE_SHAPES if m in labels or m.split("-")[0] in labels]:
        if only and not {"moe_gate_up", "moe_down", "moe_route_gate_up"} & set(only):
            continue
        d = check.moe_inputs(label, mx.bfloat16)
        stacks, keep = (d["gate"], d["up"], d["down"]), []
        rows = host_table(stacks, np.array(d["rows"]), keep)
        table = host_table(stacks, np.arange(d["E"]), keep)
        K, I, Is = d["K"], d["gate"].weight.shape[1], d["sg"].out_features
        up32 = check.up32
        # the reference: the float32 twins on the same experts given by row
        x, ids = d["x"], d["rows"]
        verdict("moe_gate_up", label + "+addr", mx.bfloat16, kern.moe_gate_up(x, rows, *stacks[:2], d["sg"], d["su"]),
                plain.moe_gate_up(*up32((x, ids, *stacks[:2], d["sg"], d["su"]))))
        h, hs, g = check.rnd((K, I)), check.rnd((Is,)), check.rnd((1,))
        verdict("moe_down", label + "+addr", mx.bfloat16, kern.moe_down(h, rows, d["w"], d["down"], hs, d["sd"], g, d["res"]),
                plain.moe_down(*up32((h, ids, d["w"], d["down"], hs, d["sd"], g, d["res"]))))
        logits = check.rnd((d["E"],), scale=2.0)
        h, hs, got_rows, w = kern.moe_route_gate_up(logits, K, True, table, x, *stacks[:2], d["sg"], d["su"])
        ref_ids, ref_w = plain.moe_route(logits, K, True)
        ref_h, ref_hs = plain.moe_gate_up(*up32((x, ref_ids, *stacks[:2], d["sg"], d["su"])))
        # the same experts (any order: the twin's top-k is unordered): their addresses, weights, h
        got_order, ref_order = np.argsort(np.array(got_rows)[:, 0]), np.argsort(np.array(ref_ids))
        same = np.array_equal(np.array(got_rows)[got_order], np.array(table)[np.array(ref_ids)][ref_order])
        fails += not same
        print(f"{'moe_route_gate_up':18} {label + '+addr':12} {'bfloat16':8} rows {'equal' if same else 'DIFFER'}")
        verdict("moe_route_gate_up", label + "+addr", mx.bfloat16,
                [h[mx.array(got_order)], hs, w[mx.array(got_order)]], [ref_h[mx.array(ref_order)], ref_hs, ref_w[mx.array(ref_order)]])
    print("all emulated kernels pass" if not fails else f"{fails} FAILED")
    return 1 if fails else 0


def norms(trials: int = 3) -> int:
    """Whether the kernels' RMSNorms round as MLX's rms_norm does (`rms_out` in common.kern:
    TX(w * TX(x * r))), in bf16: the emulated add_rms_norm's n, norm_qmv's projections against
    qmv of MLX's rms_norm (the same staged input gives the same sums, bit for bit), and the dims
    past the rope of qk_norm_rope's q and k. A different rounding changes about a quarter of the
    normed values by one bit, enough to flip a router's top-k against the plain path's. The
    elements that differ are counted; a few may, where the two sums of squares round apart."""
    from . import check, plain

    kern = emulated_kernels(Path(tempfile.mkdtemp(prefix="fm-emulate-")), poison=False)
    bf = mx.bfloat16
    counts: dict = {}

    def count(name, got, ref):
        a, b = (np.array(t.astype(mx.float32)) for t in (got, ref))
        n, d = counts.get(name, (0, 0))
        counts[name] = (n + a.size, d + int((a != b).sum()))

    H, eps = 1024, 1e-6
    for _ in range(trials):
        x, y = check.rnd((1, H), scale=3.0), check.rnd((1, H), scale=2.0)
        w = (1.0 + 0.3 * check.rnd((H,), mx.float32)).astype(bf)
        _, n = kern.add_rms_norm(x, y, w, eps)
        count("add_rms_norm n", n, plain.add_rms_norm(x, y, w, eps)[1])
        lins = [check.qlinear(96, H), check.qlinear(64, H)]
        for xadd in (None, y):
            got, _, _ = kern.norm_qmv(x, xadd, w, eps, lins)
            ref = kern.qmv(plain.rms_norm(x if xadd is None else x + xadd, w, eps), lins)
            for g, r in zip(got, ref):
                count("norm_qmv " + ("add+norm" if xadd is not None else "norm"), g, r)
        Dh, rope, Hq, Hkv = 256, 64, 2, 1
        qg, k = check.rnd((Hq, 2 * Dh), scale=2.0), check.rnd((1, Hkv, 1, Dh), scale=2.0)
        qw, kw = ((1.0 + 0.3 * check.rnd((Dh,), mx.float32)).astype(bf) for _ in range(2))
        qo, ko = kern.qk_norm_rope(qg, k, qw, kw, 5, rope, 1e7, eps, Hkv)
        qr, kr = plain.qk_norm_rope(qg, k, qw, kw, 5, rope, 1e7, eps, Hkv)
        count("qk_norm_rope past the rope", mx.concatenate([qo[:, rope:].reshape(-1), ko[..., rope:].reshape(-1)]),
              mx.concatenate([qr[:, rope:].reshape(-1), kr[..., rope:].reshape(-1)]))
    bad = 0
    for name, (n, d) in counts.items():
        ok = d <= n // 1000
        bad += not ok
        print(f"{name:28} {d:5d} of {n:6d} bf16 values differ from MLX's rms_norm path  {'ok' if ok else 'NO'}")
    return 1 if bad else 0


def decode(layers: int = 4, steps: int = 3) -> int:
    """A `tiny` synthetic model's decode (bf16) through the emulated CUDA kernels, op by op, and
    through the plain path, each against the plain path in float32 (decode_bench's verdict); then
    a full-attention layer's compiled-step math against op by op (`kv_write_check`). Four layers:
    the fourth is a full-attention layer."""
    from .. import synth
    from ..engine.load import load_model
    from . import OP_NAMES, Ops, plain
    from .decode_bench import print_tolerance, tolerance_check

    work = Path(tempfile.mkdtemp(prefix="fm-emulate-"))
    synth._write_tokenizer = lambda d: None   # the engine needs no tokenizer
    synth.write_synthetic(work / "m", preset="tiny", layout="mlx", layers=layers, progress=False)
    ref = load_model(work / "m", dtype=mx.float32)
    model = load_model(work / "m", dtype=mx.bfloat16)
    table = emulated_kernels(work, poison=False).table()
    fused = Ops("cuda", **{op: table.get(op, plain.OPS[op]) for op in OP_NAMES})   # as ops() builds it
    fused = replace(fused, qk_norm_rope_kv=plain.compose_qk_norm_rope_kv(fused.qk_norm_rope))
    os.environ["FLASHMOE_COMPILE"] = "0"   # the emulator runs eagerly: nothing to trace
    rows = tolerance_check(ref, model, fused, [3, 1, 4, 1, 5], steps)
    print_tolerance(rows, f"emulated cuda, tiny L={layers}", mx.bfloat16)
    same = kv_write_check(model, fused, work)
    return 0 if all(r["ok"] for r in rows) and same else 1


def kv_write_check(model, fused, work: Path, steps: int = 4) -> bool:
    """A full-attention layer's decode as the compiled step computes it (`Attention.decode_math`:
    the KV buffers, the position and the length as arrays, the token's key and value written by
    qk_norm_rope_kv), run eagerly through the emulated kernels with the write in place
    (FLASHMOE_KV_INPLACE=1) and by slice updates, against the op-by-op path (`decode_fused`,
    KVCache.update) on the same inputs: the same outputs and KV buffers, bit for bit."""
    from ..engine.cache import KVCache
    from . import gpu
    from .decode_bench import with_ops

    layer = next(l for l in model.layers if not l.is_linear)
    att, norm = layer.mixer, (layer.input_norm, layer.eps)
    H = layer.input_norm.size
    xs = [(mx.random.normal((1, 1, H)) * 2).astype(model.dtype) for _ in range(steps)]
    prompt = mx.random.normal((1, 5, H)).astype(model.dtype)

    def run(ops, math: bool):
        with_ops(model, ops, False)
        cache = KVCache()
        att(prompt, cache)                 # a prefill (plain math) into the cache
        outs = []
        for x in xs:
            if math:
                cache.reserve(1, att.Hkv, att.Dh, att.q_norm.dtype, ahead=True)
                pos, n = mx.array([cache.offset], mx.int32), mx.array([cache.offset + 1], mx.int32)
                y, cache.keys, cache.values = att.decode_math(x, cache.keys, cache.values, pos, n, norm)
                cache.offset += 1
            else:
                y = att.decode_fused(x, cache, norm)
            outs.append(np.array(y.astype(mx.float32)))
        kv = [np.array(a[:, :, :cache.offset].astype(mx.float32)) for a in (cache.keys, cache.values)]
        with_ops(model, None)
        return outs, kv

    ref = run(fused, False)
    ok = True
    for inplace in ("0", "1"):
        gpu.configure({**os.environ, "FLASHMOE_KV_INPLACE": inplace})
        table = emulated_kernels(work, poison=False).table()
        ops = replace(fused, qk_norm_rope_kv=table["qk_norm_rope_kv"]) if inplace == "1" else fused
        got = run(ops, True)
        same = all(np.array_equal(a, b) for a, b in zip(got[0] + got[1], ref[0] + ref[1]))
        ok &= same
        print(f"attention layer's compiled-step math run eagerly, KV written "
              f"{'in place (qk_norm_rope_kv)' if inplace == '1' else 'by slice updates'}: outputs and KV "
              f"buffers {'equal to' if same else 'DIFFERENT from'} op by op's, {steps} steps", flush=True)
    gpu.configure()
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="tiny,odd", help="shape sets of kernels.check (small ones: a thread per lane)")
    ap.add_argument("--only", default=None, help="comma-separated kernel names")
    ap.add_argument("--norms", action="store_true",
                    help="instead: whether the kernels' RMSNorms round as MLX's rms_norm does (bf16, bit for bit)")
    ap.add_argument("--decode", action="store_true",
                    help="instead: a tiny model's decode through the emulated kernels against plain float32")
    args = ap.parse_args(argv)
    if shutil.which("g++") is None:
        print("the emulator compiles the kernels with g++ (C++20), which is not on PATH: install g++.")
        return 2
    mx.set_default_device(mx.cpu)
    if args.decode:
        return decode()
    if args.norms:
        return norms()
    return run(tuple(args.cases.split(",")), set(args.only.split(",")) if args.only else None)


if __name__ == "__main__":
    sys.exit(main())
