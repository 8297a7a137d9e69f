"""The few CUDA runtime calls the GPU expert cache needs, through ctypes.

MLX's CUDA build already loads the CUDA runtime (libcudart); we bind the
same library, so our copies run in MLX's context on the same device. No
new dependency: nothing here is imported unless MLX runs on CUDA.

Why not numpy views of MLX arrays, as on the CPU? On CUDA, MLX keeps GPU
results in device memory and moves a buffer to managed memory the moment
the host asks for its address (`Buffer::raw_ptr`); the GPU then faults it
back page by page, which is the 1.5-1.8 GB/s upload path measured before
this module existed. Instead the expert cache asks a one-line kernel for
the device address of its pool (`device_address`): the pool stays plain
device memory, the host never touches it, and `cudaMemcpyAsync` from
pinned host memory fills it at PCIe speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

from ..errors import FlashMoeError

cudaMemcpyHostToDevice = 1
cudaMemcpyDeviceToHost = 2
cudaMemcpyDeviceToDevice = 3
cudaMemcpyDefault = 4
cudaHostAllocPortable = 1
cudaHostRegisterMapped = 2
cudaHostRegisterReadOnly = 8
cudaStreamNonBlocking = 1
cudaEventDisableTiming = 2
cudaMemLocationTypeDevice = 1


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def loaded_libraries(fragment: str) -> list[str]:
    """The shared objects this process has mapped whose file name contains `fragment`, in the
    order they were first mapped (Linux's /proc/self/maps; elsewhere none)."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if fragment in os.path.basename(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def _candidates() -> list[str]:
    """libcudart paths: the one this process already loaded first (MLX's), then usual places."""
    found = loaded_libraries("libcudart.so")
    import site
    import sys

    roots = [*getattr(site, "getsitepackages", lambda: [])(), *sys.path]
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "lib", "libcudart.so*")))
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    lib = ctypes.util.find_library("cudart")
    if lib:
        found.append(lib)
    found += ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    return found


class CudaRuntime:
    """A handful of cudart functions; every call raises FlashMoeError on failure."""

    def __init__(self):
        errors = []
        self.lib = None
        for path in _candidates():
            try:
                self.lib = ctypes.CDLL(path)
                self.path = path
                break
            except OSError as e:
                errors.append(f"{path}: {e}")
        if self.lib is None:
            raise FlashMoeError("cannot load the CUDA runtime (libcudart) that MLX's CUDA build uses; "
                                "set FLASHMOE_GPU_CACHE=off to stream experts without the GPU cache. "
                                + "; ".join(errors[-3:]))
        L = self.lib
        vp, sz, ci = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        for name, args in {
            "cudaGetErrorString": [ci],
            "cudaRuntimeGetVersion": [ctypes.POINTER(ci)],
            "cudaGetDevice": [ctypes.POINTER(ci)],
            "cudaDeviceGetAttribute": [ctypes.POINTER(ci), ci, ci],
            "cudaMemGetInfo": [ctypes.POINTER(sz), ctypes.POINTER(sz)],
            "cudaHostAlloc": [ctypes.POINTER(vp), sz, ctypes.c_uint],
            "cudaFreeHost": [vp],
            "cudaStreamCreateWithFlags": [ctypes.POINTER(vp), ctypes.c_uint],
            "cudaStreamDestroy": [vp],
            "cudaStreamSynchronize": [vp],
            "cudaMemcpyAsync": [vp, vp, sz, ci, vp],
            "cudaMemcpy": [vp, vp, sz, ci],
            "cudaEventCreateWithFlags": [ctypes.POINTER(vp), ctypes.c_uint],
            "cudaEventRecord": [vp, vp],
            "cudaEventSynchronize": [vp],
            "cudaEventDestroy": [vp],
            "cudaDeviceSynchronize": [],
            "cudaHostRegister": [vp, sz, ctypes.c_uint],
            "cudaHostUnregister": [vp],
            "cudaProfilerStart": [],
            "cudaProfilerStop": [],
        }.items():
            fn = getattr(L, name)
            fn.argtypes = args
            fn.restype = ctypes.c_char_p if name == "cudaGetErrorString" else ci
        v = ci()
        self.check(L.cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
        self.version = v.value
        d = ci()
        self.check(L.cudaGetDevice(ctypes.byref(d)), "cudaGetDevice")
        self.device = d.value

    def check(self, err: int, what: str) -> None:
        if err != 0:
            msg = self.lib.cudaGetErrorString(err)
            raise FlashMoeError(f"CUDA error in {what}: {msg.decode() if msg else err}")

    def sm_count(self) -> int:
        """The current device's multiprocessors."""
        if getattr(self, "_sms", None) is None:
            dev, n = ctypes.c_int(), ctypes.c_int()
            self.check(self.lib.cudaGetDevice(ctypes.byref(dev)), "cudaGetDevice")
            self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(n), 16, dev.value),   # cudaDevAttrMultiProcessorCount
                       "cudaDeviceGetAttribute")
            self._sms = n.value
        return self._sms

    def mem_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value

    def host_alloc(self, nbytes: int) -> int:
        p = ctypes.c_void_p()
        self.check(self.lib.cudaHostAlloc(ctypes.byref(p), nbytes, cudaHostAllocPortable), f"cudaHostAlloc({nbytes})")
        return p.value

    def register_host(self, ptr: int, nbytes: int) -> None:
        """Pin host memory (here: a read-only file mapping) and map it for kernels, which then
        read it at the same address over the bus (unified addressing)."""
        self.check(self.lib.cudaHostRegister(ctypes.c_void_p(ptr), nbytes, cudaHostRegisterReadOnly | cudaHostRegisterMapped),
                   f"cudaHostRegister({nbytes} bytes)")

    def unregister_host(self, ptr: int) -> None:
        self.lib.cudaHostUnregister(ctypes.c_void_p(ptr))

    def free_host(self, ptr: int) -> None:
        self.lib.cudaFreeHost(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(s), cudaStreamNonBlocking), "cudaStreamCreate")
        return s.value

    def sync_stream(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def event(self) -> int:
        e = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreateWithFlags(ctypes.byref(e), cudaEventDisableTiming), "cudaEventCreate")
        return e.value

    def record(self, event: int, stream: int) -> None:
        self.check(self.lib.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cudaEventRecord")

    def wait_event(self, event: int) -> None:
        self.check(self.lib.cudaEventSynchronize(ctypes.c_void_p(event)), "cudaEventSynchronize")

    def copy_async(self, dst: int, src: int, nbytes: int, stream: int, kind: int = cudaMemcpyHostToDevice) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, kind,
                                            ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def native_functions(self, lib) -> tuple[int, int]:
        """Addresses of cudaMemcpyAsync and cudaStreamSynchronize, for the C upload engine."""
        return (ctypes.cast(self.lib.cudaMemcpyAsync, ctypes.c_void_p).value,
                ctypes.cast(self.lib.cudaStreamSynchronize, ctypes.c_void_p).value)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self.check(self.lib.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, kind), "cudaMemcpy")


_runtime: CudaRuntime | None = None


def host_view(ptr: int, nbytes: int):
    """A writable numpy uint8 view of `nbytes` of host memory at `ptr` (a pinned buffer)."""
    import numpy as np

    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))


def runtime() -> CudaRuntime:
    global _runtime
    if _runtime is None:
        _runtime = CudaRuntime()
    return _runtime


_ADDRESS_KERNEL = None


def device_address(a) -> int:
    """The device address of evaluated MLX array `a`'s first element, read by a kernel.

    Asking from the host (numpy, the buffer protocol) would move `a` to managed
    memory; a kernel sees the plain device pointer. The result stays valid while
    `a` (or a view of it) is alive and the host never asks for `a`'s memory.
    """
    import mlx.core as mx

    global _ADDRESS_KERNEL
    if _ADDRESS_KERNEL is None:
        _ADDRESS_KERNEL = mx.fast.cuda_kernel(
            name="fm_device_address", input_names=["a"], output_names=["out"],
            source="if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = (unsigned long long)(&a[0]);")
    out = _ADDRESS_KERNEL(inputs=[a], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                          output_dtypes=[mx.uint64])[0]
    return int(out.item())

