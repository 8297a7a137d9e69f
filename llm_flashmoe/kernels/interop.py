"""Whether the fused kernels could be launched outside MLX's graph on CUDA. On the H200 MLX's own
bookkeeping per operation is now the decode step's bound, at about the 100 us a layer target
(issue 6). The way past it would be the step's launches captured once in a CUDA graph and replayed
on the arrays MLX keeps. That needs each array's device address. This module reads what an MLX
array's DLPack export gives: device, address, byte offset, shape, strides and dtype. On a CUDA
machine, `python -m llm_flashmoe.kernels.interop` also asks the driver what that address is, and
whether its bytes are the array's. A probe for that decision; nothing in the engine uses it.
On the H200 the export's address is the array's, but managed memory: MLX moves a buffer there
when the host asks for its address. The engine's way to a device address that leaves the buffer
alone is `experts.cuda.device_address` (a kernel reads it)."""

from __future__ import annotations

import ctypes
import sys

import mlx.core as mx
import numpy as np

DL_DEVICES = {1: "cpu", 2: "cuda", 3: "cuda host", 8: "metal", 13: "cuda managed"}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):   # DLPack's DLTensor (the head of DLManagedTensor)
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype, _get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def dlpack_info(a: mx.array) -> dict:
    """`a` evaluated, then its DLPack export read -> {device, device_id, address (of its first
    element: the buffer's plus the byte offset), byte_offset, shape, strides (in elements),
    dtype (DLPack's code, bits, lanes)}. The address holds while `a` lives."""
    mx.eval(a)
    capsule = a.__dlpack__()
    t = _DLTensor.from_address(_get_pointer(capsule, b"dltensor"))
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else None
    return {"device": DL_DEVICES.get(t.device.device_type, str(t.device.device_type)),
            "device_id": t.device.device_id, "address": (t.data or 0) + t.byte_offset,
            "byte_offset": t.byte_offset, "shape": shape, "strides": strides,
            "dtype": (t.dtype.code, t.dtype.bits, t.dtype.lanes)}


def host_bytes(info: dict, nbytes: int) -> bytes:
    """The first `nbytes` at a host array's address (`dlpack_info` of an array in host memory)."""
    if info["device"] != "cpu":
        raise ValueError(f"not host memory: {info['device']}")
    return ctypes.string_at(info["address"], nbytes)


def _cuda_facts(info: dict, want: bytes) -> list[str]:
    """What the CUDA driver says of an array's address (`info`, from `dlpack_info`): its memory
    type, whether it is managed, the thread's current context, and whether the bytes copied from
    it are `want`."""
    cu = ctypes.CDLL("libcuda.so.1")
    lines = []
    check = lambda r, what: lines.append(f"  {what}: CUresult {r}") if r else None  # noqa: E731
    check(cu.cuInit(0), "cuInit")
    ctx = ctypes.c_void_p()
    check(cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    lines.append(f"  current context on this thread: {hex(ctx.value) if ctx.value else 'none'}")
    if not ctx.value:   # the runtime's primary context, which MLX's allocations belong to
        dev = ctypes.c_int()
        check(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        lines.append(f"  primary context made current: {hex(ctx.value or 0)}")
    ptr = ctypes.c_uint64(info["address"])
    for attr, name in ((2, "memory type (1 host, 2 device, 4 unified)"), (8, "managed")):
        v = ctypes.c_uint32()
        r = cu.cuPointerGetAttribute(ctypes.byref(v), attr, ptr)
        lines.append(f"  {name}: {v.value if r == 0 else f'CUresult {r}'}")
    buf = ctypes.create_string_buffer(len(want))
    r = cu.cuMemcpyDtoH_v2(buf, ptr, ctypes.c_size_t(len(want)))
    lines.append(f"  cuMemcpyDtoH of {len(want)} bytes: " + (f"CUresult {r}" if r else
                 ("the array's bytes" if buf.raw == want else "NOT the array's bytes")))
    return lines


def probe_cases() -> list[tuple[str, mx.array, bytes]]:
    """(label, array, the bytes its address should hold in memory order): a view with a byte
    offset, a transposed view (its base's bytes), bf16."""
    base = mx.arange(48, dtype=mx.float32).reshape(6, 8)
    b16 = mx.arange(64).astype(mx.bfloat16)
    raw = np.array(base).tobytes()
    return [("float32 [6, 8]", base, raw), ("rows 2: of it (a byte offset)", base[2:], raw[2 * 8 * 4:]),
            ("its transpose (strides)", base.T, raw), ("bf16 [64]", b16, np.array(b16.view(mx.uint16)).tobytes())]


def probe() -> int:
    """Prints what the exports of `probe_cases` give on the default device, whether their
    addresses hold their bytes (on CUDA through the driver), and on CUDA the NVRTC library MLX
    loaded. Exit status 1 where an address does not hold its array's bytes (or cannot be read)."""
    print(f"mlx {mx.__version__}, default device {mx.default_device()}")
    cuda = mx.default_device() == mx.gpu and getattr(getattr(mx, "cuda", None), "is_available", lambda: False)()
    bad = 0
    for label, a, want in probe_cases():
        try:
            info = dlpack_info(a)
        except Exception as e:   # (an export this build does not give is an answer too)
            print(f"{label}: no DLPack export ({type(e).__name__}: {e}); __dlpack_device__ {a.__dlpack_device__()}")
            bad += 1
            continue
        print(f"{label}: {info}")
        if cuda:   # (through the driver whatever the export says: a device address read as host memory would crash)
            facts = _cuda_facts(info, want)
            bad += not any(f.endswith(": the array's bytes") for f in facts)
            print("\n".join(facts))
        elif info["device"] == "cpu":
            ok = host_bytes(info, len(want)) == want
            bad += not ok
            print(f"  host bytes at the address: {'the array' if ok else 'NOT the array'}")
    if cuda:
        k = mx.fast.cuda_kernel(name="fm_probe", input_names=["x"], output_names=["y"],
                                source="unsigned int i = threadIdx.x; y[i] = x[i] + 1.0f;")
        mx.eval(k(inputs=[mx.zeros((32,))], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                  output_shapes=[(32,)], output_dtypes=[mx.float32])[0])
        from ..experts.cuda import loaded_libraries

        print(f"NVRTC loaded by MLX: {loaded_libraries('nvrtc') or 'none found'}; "
              f"driver: {loaded_libraries('libcuda') or '?'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(probe())
