// cudatrace: an LD_PRELOAD library that counts and times the CUDA runtime and driver calls a
// process makes through the dynamic linker (MLX's CUDA encoder: graph nodes, graph updates and
// launches, events, allocations), to see how much of MLX's host time per operation is spent
// inside CUDA and how much in MLX's own work. `overhead loop` resets the counts after its
// warm-up (cudatrace_reset) and prints them per decode step at the end (cudatrace_dump), found
// through ctypes; calls made through function pointers the CUDA runtime looked up itself (a
// statically linked runtime) are not seen.
//
// Every wrapped function takes only integer and pointer arguments (or small structs of them,
// passed the same way on x86-64), so one forwarding shape with 12 integer arguments serves all.
// Build: gcc -O2 -shared -fPIC -o libcudatrace.so cudatrace.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef long (*fn12)(long, long, long, long, long, long, long, long, long, long, long, long);

struct entry {
  const char* name;
  fn12 real;
  long calls;
  double us;
};

#define NAMES(X)                                                                               \
  X(cuGraphAddKernelNode) X(cuGraphAddKernelNode_v2) X(cuLaunchKernel) X(cuLaunchKernelEx)     \
  X(cuGraphKernelNodeGetParams) X(cuGraphKernelNodeGetParams_v2) X(cuModuleGetFunction)        \
  X(cuCtxGetCurrent) X(cuCtxSetCurrent) X(cuGraphAddDependencies) X(cuGraphAddDependencies_v2)  \
  X(cuGraphExecUpdate) X(cuGraphExecUpdate_v2) X(cuGraphLaunch) X(cuGraphInstantiateWithFlags)  \
  X(cuGraphCreate) X(cuGraphDestroy) X(cuEventRecord) X(cuStreamWaitEvent) X(cuLaunchHostFunc)  \
  X(cuMemAllocManaged) X(cuMemAlloc_v2) X(cuMemFree_v2) X(cuMemAllocAsync) X(cuMemFreeAsync)    \
  X(cudaGraphAddKernelNode) X(cudaGraphAddDependencies) X(cudaGraphAddDependencies_v2)         \
  X(cudaGraphExecUpdate) X(cudaGraphInstantiate) X(cudaGraphInstantiateWithFlags)             \
  X(cudaGraphLaunch) X(cudaGraphCreate) X(cudaGraphDestroy) X(cudaGraphExecDestroy)             \
  X(cudaGraphAddEmptyNode) X(cudaGraphAddChildGraphNode) X(cudaGraphGetNodes)                   \
  X(cudaStreamBeginCapture) X(cudaStreamEndCapture) X(cudaEventRecord) X(cudaEventRecordWithFlags) \
  X(cudaStreamWaitEvent) X(cudaEventQuery) X(cudaEventSynchronize) X(cudaStreamSynchronize)     \
  X(cudaLaunchHostFunc) X(cudaLaunchKernel) X(cudaMalloc) X(cudaMallocManaged) X(cudaMallocAsync) \
  X(cudaFree) X(cudaFreeAsync) X(cudaMemPrefetchAsync) X(cudaMemPrefetchAsync_v2) X(cudaMemAdvise) \
  X(cudaMemAdvise_v2) X(cudaMemcpyAsync) X(cudaSetDevice) X(cudaGetDevice) X(cudaGetLastError)  \
  X(cudaPeekAtLastError) X(cudaStreamGetCaptureInfo)

#define ENUM(n) E_##n,
enum { NAMES(ENUM) N_ENTRIES };
#define INIT(n) {#n, 0, 0, 0.0},
static struct entry table[N_ENTRIES] = {NAMES(INIT)};

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

// The real function: next in the global scope, else in the CUDA library already loaded that
// has it (Python loads extensions, and with them MLX and the CUDA libraries, with RTLD_LOCAL:
// out of RTLD_NEXT's reach). A call nothing can forward stops the process with a message.
static const char* const LIBS[] = {"libcuda.so.1", "libcudart.so.13", "libcudart.so.12", "libcudart.so", 0};

static fn12 find_real(const char* name) {
  void* p = dlsym(RTLD_NEXT, name);
  for (int i = 0; !p && LIBS[i]; i++) {
    void* h = dlopen(LIBS[i], RTLD_NOLOAD | RTLD_LAZY);
    if (h) p = dlsym(h, name);
  }
  if (!p) {
    fprintf(stderr, "cudatrace: no library to forward %s to\n", name);
    abort();
  }
  return (fn12)p;
}

static long forward(int i, long a, long b, long c, long d, long e, long f, long g, long h, long j,
                    long k, long l, long m) {
  struct entry* en = &table[i];
  if (!en->real) en->real = find_real(en->name);
  double t = now_us();
  long r = en->real(a, b, c, d, e, f, g, h, j, k, l, m);
  en->us += now_us() - t;
  en->calls++;
  return r;
}

#define WRAP(n)                                                                                  \
  long n(long a, long b, long c, long d, long e, long f, long g, long h, long j, long k, long l, \
         long m) {                                                                               \
    return forward(E_##n, a, b, c, d, e, f, g, h, j, k, l, m);                                   \
  }
NAMES(WRAP)

void cudatrace_reset(void) {
  for (int i = 0; i < N_ENTRIES; i++) table[i].calls = 0, table[i].us = 0.0;
}

// Per step (`steps` of them since the reset): each function's calls and microseconds, most first.
void cudatrace_dump(long steps) {
  int order[N_ENTRIES];
  for (int i = 0; i < N_ENTRIES; i++) order[i] = i;
  for (int i = 0; i < N_ENTRIES; i++)
    for (int j = i + 1; j < N_ENTRIES; j++)
      if (table[order[j]].us > table[order[i]].us) { int t = order[i]; order[i] = order[j]; order[j] = t; }
  double all = 0.0;
  for (int i = 0; i < N_ENTRIES; i++) all += table[i].us;
  if (steps < 1) steps = 1;
  printf("cudatrace: %.1f us per step inside the CUDA calls below (%ld steps)\n", all / steps, steps);
  printf("%-32s %12s %12s %10s\n", "function", "calls/step", "us/step", "us/call");
  for (int i = 0; i < N_ENTRIES; i++) {
    struct entry* en = &table[order[i]];
    if (!en->calls) continue;
    printf("%-32s %12.1f %12.1f %10.2f\n", en->name, (double)en->calls / steps, en->us / steps, en->us / en->calls);
  }
  fflush(stdout);
}
