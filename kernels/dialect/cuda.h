//@@ header
// Dialect layer, CUDA side: names the kernel sources use for what differs between backends.
#define DEVICE_FN __device__ __forceinline__
#define GLOBAL
#define SHARED __shared__
#define SHARED_PTR
#define THREAD_PTR
#define BARRIER() __syncthreads()
#define UNROLL _Pragma("unroll")
#define NO_UNROLL _Pragma("unroll 1")
typedef long long i64;
// a hint that the line holding p will be read soon: fetch it into L2 (no wait, no fault)
#define PREFETCH_L2(p) asm volatile("prefetch.global.L2 [%0];" ::"l"(p))
DEVICE_FN float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
DEVICE_FN int shfl_xor(int v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
DEVICE_FN float f_exp(float x) { return expf(x); }
DEVICE_FN float f_log1p(float x) { return log1pf(x); }
DEVICE_FN float f_rsqrt(float x) { return rsqrtf(x); }
DEVICE_FN float f_cos(float x) { return cosf(x); }
DEVICE_FN float f_sin(float x) { return sinf(x); }
DEVICE_FN float f_rint(float x) { return rintf(x); }
DEVICE_FN float f_as_float(uint32_t u) { return __uint_as_float(u); }
DEVICE_FN uint32_t f_as_uint(float f) { return __float_as_uint(f); }
// Four byte products summed into c: the bytes of a as unsigned, those of b as signed (dp4a.u32.s32,
// sm_61+; elsewhere, and on the host shims, the same sum written out).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
DEVICE_FN int dot4_u8s8(uint32_t a, uint32_t b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
#else
DEVICE_FN int dot4_u8s8(uint32_t a, uint32_t b, int c) {
  UNROLL for (int k = 0; k < 4; k++) c += int((a >> (8 * k)) & 0xFFu) * (int(b << (24 - 8 * k)) >> 24);
  return c;
}
#endif
// Copies of 16 bytes from device to shared memory that run while the thread goes on (sm_80+:
// cp.async): async_copy16 starts one, ASYNC_COMMIT closes the thread's group of copies started
// since the last, ASYNC_WAIT(N) (N a constant) waits until at most the N newest groups are still
// in flight. The thread then sees the bytes; the other lanes of its warp after WARP_SYNC. Without
// cp.async (and on the host shims, unless FM_HOST_ASYNC) a plain copy.
#define WARP_SYNC() __syncwarp()
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
DEVICE_FN void async_copy16(SHARED_PTR void* dst, const GLOBAL void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
}
#define ASYNC_COMMIT() asm volatile("cp.async.commit_group;" ::: "memory")
#define ASYNC_WAIT(N) asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory")
#elif defined(FM_HOST_ASYNC) && FM_HOST_ASYNC
DEVICE_FN void async_copy16(SHARED_PTR void* dst, const GLOBAL void* src) { fm_async_copy16(dst, src); }
#define ASYNC_COMMIT() fm_async_commit()
#define ASYNC_WAIT(N) fm_async_wait(N)
#else
DEVICE_FN void async_copy16(SHARED_PTR void* dst, const GLOBAL void* src) {
  *(SHARED_PTR uint4*)dst = *(const GLOBAL uint4*)src;
}
#define ASYNC_COMMIT()
#define ASYNC_WAIT(N)
#endif
// One m16n8k16 tensor-core product, D += A B: bf16 A (16x16) and B (16x8), f32 accumulators, each
// lane holding the PTX ISA's fragments of mma.sync.aligned.m16n8k16.row.col (a0..a3: rows
// lane/4 and lane/4+8, columns 2(lane%4)+{0,1} and +8; b0, b1: rows 2(lane%4)+{0,1} and +8,
// column lane/4; d0..d3: rows lane/4 and lane/4+8, columns 2(lane%4)+{0,1}). Two bf16 to a
// register, the lower column or row in the low half. On the host (kernels.emulate, compile_check)
// the shim's fm_host_mma stands in for it, with the same fragments.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define HAS_MMA 1
DEVICE_FN void mma_bf16_16816(THREAD_PTR float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                              uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#elif defined(FM_HOST_MMA) && FM_HOST_MMA
#define HAS_MMA 1
DEVICE_FN void mma_bf16_16816(THREAD_PTR float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                              uint32_t b0, uint32_t b1) {
  fm_host_mma(d, a0, a1, a2, a3, b0, b1);
}
#else
#define HAS_MMA 0
#endif
//@@ bounds
// (after the kernel's #defines) MIN_GROUPS > 0: the kernel is compiled for MIN_GROUPS thread groups of
// MAX_THREADS resident per multiprocessor (__launch_bounds__: registers held to fit). MLX writes the
// kernel's `__global__ void name(` after this header, so the attribute rides on __global__, spelled as
// crt/host_defines.h spells it (nvcc and NVRTC alike).
#if defined(MIN_GROUPS) && MIN_GROUPS > 0
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__(MAX_THREADS, MIN_GROUPS)
#endif
//@@ prologue
const int gx = int(blockIdx.x);
const int gy = int(blockIdx.y);
const int tid = int(threadIdx.x);
const int nthreads = int(blockDim.x);
