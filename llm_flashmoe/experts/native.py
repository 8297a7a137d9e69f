"""The expert upload engine in C (kernels/upload/upload.c), built on first use.

A decode step uploads a layer's few missing experts (2-3 of 7 MB at 397B
shapes): the work is a few dozen pieces, and Python threads spent more time
waking up and contending for the interpreter lock than reading (a fetch of two
experts from the page cache took 1.2 ms with a Python thread pool, 11 GB/s).
The C pool reads and queues copies with no Python in the loop.

Built like the CPU kernels (llm_flashmoe/cpu/build.py: the system C compiler,
cached by source and compiler hash), but with no CPU-specific flags: it moves
bytes, it does not compute. No compiler: the Python transport is used.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "sources" / "upload" / "upload.c"
_lib: list = []


def build() -> Path:
    from ..cpu.build import compile_cached

    return compile_cached("flashmoe_upload", [SOURCE], ["-O2", "-std=c11", "-fPIC", "-shared", "-pthread"])


def load() -> ctypes.CDLL | None:
    """The library, or None (with the reason in `load.error`) where it cannot be built."""
    if _lib:
        return _lib[0]
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        load.error = str(e)
        _lib.append(None)
        return None
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fm_uploader_new.argtypes = [I32, I64, P, P, P, P]
    lib.fm_uploader_new.restype = P
    lib.fm_upload_run.argtypes = [P, I32, P, P, I64, I64, I32, P, P, P, I64, I32]
    lib.fm_upload_run.restype = I64
    lib.fm_upload_start.argtypes = [P, I32, P, P, I64, I64, I32, P, P, P, I64, I32, P]
    lib.fm_upload_start.restype = I64
    lib.fm_upload_start_async.argtypes = [P, I32, P, P, I64, I64, I32, P, P, P, I64, P]
    lib.fm_upload_start_async.restype = I64
    lib.fm_uploader_async.argtypes = [P, I32]
    lib.fm_uploader_async.restype = I64
    lib.fm_upload_wait_expert.argtypes = [P, I64]
    lib.fm_upload_wait_expert.restype = I64
    lib.fm_upload_finish.argtypes = [P]
    lib.fm_upload_finish.restype = I64
    lib.fm_uploader_free.argtypes = [P]
    lib.fm_uploader_free.restype = None
    _lib.append(lib)
    return lib


load.error = ""


MIN_PIECE = 256 << 10
PIECE_CAP = 4 << 20  # H200: 4 MiB pieces beat 1 MiB (25.6 vs 12.8 GB/s through Python threads)


def piece_for(n: int, size: int, threads: int, cap: int) -> int:
    """Piece size for n experts of `size` bytes over `threads`: a few experts (decode: a
    layer's misses) are cut finer so that every thread has a share; at most `cap`."""
    share = -(-n * size // threads)
    return min(cap, max(MIN_PIECE, -(-share // MIN_PIECE) * MIN_PIECE))


def function_address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class NativeUploader:
    """A C thread pool that reads expert pieces into pinned buffers and queues their copies.

    `pinned`: 2 buffers of `piece_cap` bytes per thread; `streams`: one per thread;
    `memcpy_async`, `stream_sync`: addresses of cudaMemcpyAsync / cudaStreamSynchronize
    (or the library's host stand-ins, `host_functions()`). `direct()` makes one that reads
    straight into host-writable destinations (no staging, no copies)."""

    @classmethod
    def direct(cls, lib, threads: int) -> "NativeUploader":
        return cls(lib, threads, 0, [], [], 0, 0)

    def __init__(self, lib, threads: int, piece_cap: int, pinned: list[int], streams: list[int],
                 memcpy_async: int, stream_sync: int):
        self.lib = lib
        P = ctypes.c_void_p
        self._pinned = (P * len(pinned))(*pinned) if pinned else None
        self._streams = (P * len(streams))(*streams) if streams else None
        self.handle = lib.fm_uploader_new(threads, piece_cap, self._pinned, self._streams, memcpy_async, stream_sync)
        if not self.handle:
            raise MemoryError("fm_uploader_new failed")
        self.piece_cap = piece_cap
        self._tables: dict = {}
        self._job = None
        self.async_depth = 0

    def make_async(self, depth: int) -> None:
        """Give this (direct) uploader a Linux AIO context of `depth` requests, for
        `start(..., asynchronous=True)`. Raises OSError where the kernel has none or refuses one."""
        r = self.lib.fm_uploader_async(self.handle, depth)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        self.async_depth = depth

    def run(self, fd: int, file_offsets: np.ndarray, rows: np.ndarray, expert_bytes: int, components,
            bases: list[int], piece: int, probe: bool) -> int:
        """Upload; page-cache hit bytes. Raises OSError on a failed read, RuntimeError on a failed copy."""
        self.start(fd, file_offsets, rows, expert_bytes, components, bases, piece, probe, landed=False)
        return self.finish()

    def start(self, fd: int, file_offsets: np.ndarray, rows: np.ndarray, expert_bytes: int, components,
              bases: list[int], piece: int, probe: bool, landed: bool = True, asynchronous: bool = False) -> None:
        """The same job in the background; `wait(i)` for expert i (direct mode, `landed`), then
        `finish()`, which must end every started job before the next starts. `asynchronous`
        (after `make_async`; `fd` opened with O_DIRECT, no probe): one thread keeps up to the
        context's depth of pieces in flight through Linux AIO instead of each thread preading."""
        if asynchronous and (not self.async_depth or probe):
            raise ValueError("asynchronous reads need make_async() and no page-cache probe")
        if self._job is not None:
            raise RuntimeError("an expert read is still in flight: finish() it first")
        key = tuple(bases)
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = (np.array([c.offset for c in components], np.int64),
                                     np.array([c.nbytes for c in components], np.int64),
                                     np.array(bases, np.uint64))
        offs = np.ascontiguousarray(file_offsets, np.int64)
        rws = np.ascontiguousarray(rows, np.int64)
        counters = np.zeros(len(offs), np.int64) if landed else None
        self._job = (offs, rws, t, counters)  # alive until finish(): the C job points into them
        args = (self.handle, fd, offs.ctypes.data, rws.ctypes.data, len(offs), expert_bytes, len(components),
                t[0].ctypes.data, t[1].ctypes.data, t[2].ctypes.data, piece)
        cnt = None if counters is None else counters.ctypes.data
        if asynchronous:
            r = self.lib.fm_upload_start_async(*args, cnt)
        else:
            r = self.lib.fm_upload_start(*args, int(bool(probe)), cnt)
        if r < 0:
            self._job = None
            _raise(r)

    def wait(self, i: int) -> None:
        """Block until expert i of the job in flight has landed."""
        r = self.lib.fm_upload_wait_expert(self.handle, i)
        if r < 0:
            self.finish()  # (raises the job's error)
            _raise(r)

    def finish(self) -> int:
        """Wait for the job in flight; its page-cache hit bytes."""
        if self._job is None:
            return 0
        r = self.lib.fm_upload_finish(self.handle)
        self._job = None
        if r < 0:
            _raise(r)
        return int(r)

    def close(self) -> None:
        if self.handle:
            try:
                self.finish()
            except (OSError, RuntimeError):
                pass
            self.lib.fm_uploader_free(self.handle)
            self.handle = None


def _raise(r: int):
    if r <= -1000:
        raise RuntimeError(f"CUDA {'copy' if r == -1001 else 'stream synchronisation'} failed during an expert upload")
    raise OSError(-r, f"expert read failed: {os.strerror(-r)}")


def host_functions(lib) -> tuple[int, int]:
    """The library's host-memory stand-ins for cudaMemcpyAsync and cudaStreamSynchronize."""
    return function_address(lib.fm_host_memcpy_async), function_address(lib.fm_host_stream_sync)
