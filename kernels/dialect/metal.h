//@@ header
// Dialect layer, Metal side: names the kernel sources use for what differs between backends.
#include <metal_stdlib>
using namespace metal;
#define DEVICE_FN inline
#define GLOBAL device
#define SHARED threadgroup
#define SHARED_PTR threadgroup
#define THREAD_PTR thread
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define UNROLL _Pragma("clang loop unroll(full)")
#define NO_UNROLL _Pragma("clang loop unroll(disable)")
typedef long i64;
// no prefetch instruction: the loads themselves fetch
#define PREFETCH_L2(p) ((void)(p))
DEVICE_FN float shfl_xor(float v, int o) { return simd_shuffle_xor(v, ushort(o)); }
DEVICE_FN int shfl_xor(int v, int o) { return simd_shuffle_xor(v, ushort(o)); }
DEVICE_FN float f_exp(float x) { return metal::exp(x); }
DEVICE_FN float f_log1p(float x) { return metal::log(1.0f + x); }
DEVICE_FN float f_rsqrt(float x) { return metal::rsqrt(x); }
DEVICE_FN float f_cos(float x) { return metal::precise::cos(x); }
DEVICE_FN float f_sin(float x) { return metal::precise::sin(x); }
DEVICE_FN float f_rint(float x) { return metal::rint(x); }
DEVICE_FN float f_as_float(uint32_t u) { return as_type<float>(u); }
DEVICE_FN uint32_t f_as_uint(float f) { return as_type<uint32_t>(f); }
// Four byte products summed into c: the bytes of a as unsigned, those of b as signed (no such
// instruction here: the sum written out).
DEVICE_FN int dot4_u8s8(uint32_t a, uint32_t b, int c) {
  UNROLL for (int k = 0; k < 4; k++) c += int((a >> (8 * k)) & 0xFFu) * (int(b << (24 - 8 * k)) >> 24);
  return c;
}
// no asynchronous copy: a plain one, and nothing to wait for
DEVICE_FN void async_copy16(SHARED_PTR void* dst, const GLOBAL void* src) {
  *(SHARED_PTR uint4*)dst = *(const GLOBAL uint4*)src;
}
#define ASYNC_COMMIT()
#define ASYNC_WAIT(N)
#define WARP_SYNC() simdgroup_barrier(mem_flags::mem_threadgroup)
// no tensor-core product: common.kern's mma_rows16 sums its fragments with FMAs and shuffles
#define HAS_MMA 0
//@@ prologue
const int gx = int(threadgroup_position_in_grid.x);
const int gy = int(threadgroup_position_in_grid.y);
const int tid = int(thread_position_in_threadgroup.x);
const int nthreads = int(threads_per_threadgroup.x);
