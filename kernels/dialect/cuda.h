//@@ header
// Dialect layer, CUDA side: names the kernel sources use for what differs between backends.
#define DEVICE_FN __device__ __forceinline__
#define GLOBAL
#define SHARED __shared__
#define SHARED_PTR
#define THREAD_PTR
#define BARRIER() __syncthreads()
#define UNROLL _Pragma("unroll")
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
//@@ prologue
const int gx = int(blockIdx.x);
const int gy = int(blockIdx.y);
const int tid = int(threadIdx.x);
const int nthreads = int(blockDim.x);
