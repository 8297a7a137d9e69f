"""`ExpertStore`: a layer's selected experts read from the packed files with `pread`.

Per `fetch(layer, ids)`: `preadv`s issued by a small persistent thread pool
(in C, kernels/upload/upload.c in direct mode, where a compiler exists: each
expert cut into pieces so that a few experts still spread over the threads;
otherwise Python threads, one `preadv` per expert), each scattering the
expert's contiguous bytes on disk straight into nine stacked buffers
(gate/up/down x weight/scales/biases, row i = the i-th requested expert). Those buffers are MLX arrays
whose memory we write through a numpy view, started on a page boundary:

- no copy after the read: `mx.array(numpy)` would copy (8.4 GB/s here),
  while writing into MLX-owned memory costs nothing more than the read;
- page-aligned destinations copy from the page cache at 19.7 GB/s here,
  8 GB/s at MLX's default 24-byte-offset allocations.

Two buffer sets alternate, so the batch of one fetch stays valid until the
fetch after next; the MoE block evaluates its routing (and so everything
before it) before each fetch. Where MLX memory is not host-writable the
store falls back to page-aligned numpy buffers and one copy into MLX.

Page-cache hits are measured exactly with `preadv(..., RWF_NOWAIT)` (Linux
4.14+): a NOWAIT read that returns the whole expert was served from the page
cache; otherwise it is a miss and the rest is read normally.

Cold experts are never read through a mapping (SPEC: 5x slower). But when the
caller's kernels read rows by host address (the CPU kernels, `fetch(...,
host_rows=True)`), an expert that `mincore` finds wholly in the page cache is
used in place, through a read-only mapping of its layer file: no copy at all
(at 397B shapes the copy was a third of a warm decode step on 2 cores). Only
the misses are read. A file that shrank is caught by an `fstat` before its
mapping is used.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import FlashMoeError
from . import format as fmt
from .source import ExpertBatch, ExpertStats

PAGE = 4096
HUGE_PAGE = 2 << 20
INLINE_BYTES = 256 << 10  # smaller fetches are read by the calling thread alone
# FLASHMOE_DIRECT_DEPTH=N: O_DIRECT reads through Linux AIO instead of the threads' preads, one thread
# keeping N pieces in flight; FLASHMOE_DIRECT_PIECE_KB their size (0: an expert over the depth, about
# one expert in flight so that the first lands early). Off by default: into the same huge-page
# buffers it read as fast alone and decoded slower (depth 8: 152 against 126 ms per token; depth 4:
# 131), see llm_flashmoe/cpu/DESIGN.md.
DIRECT_DEPTH = 0
DIRECT_PIECE = 0
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_HAVE_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED")
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux 5.14+: map the pages now, one call, instead of faulting them in use


class _Mapper:
    """Read-only shared mappings of the layer files, and `mincore` over experts' pages."""

    def __init__(self):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap, self.munmap, self.mincore, self.madvise = libc.mmap, libc.munmap, libc.mincore, libc.madvise
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.populate = os.environ.get("FLASHMOE_MAP_POPULATE", "0").strip() not in ("0", "off", "no", "false")
        self._vec = np.zeros(0, np.uint8)

    def map(self, fd: int, size: int) -> int:
        import mmap as _mmap

        addr = self.mmap(None, size, _mmap.PROT_READ, _mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == (1 << 64) - 1:
            return 0
        return addr

    def resident(self, addr: int, nbytes: int) -> bool:
        """Whether every page of [addr, addr + nbytes) (page aligned) is in the page cache."""
        pages = -(-nbytes // PAGE)
        if len(self._vec) < pages:
            self._vec = np.zeros(pages, np.uint8)
        if self.mincore(addr, nbytes, self._vec.ctypes.data) != 0:
            return False
        return bool((self._vec[:pages] & 1).all())

    def prepare(self, addr: int, nbytes: int) -> None:
        if self.populate:
            self.madvise(addr, nbytes, _MADV_POPULATE_READ)  # best effort: faults map the rest


def _default_threads() -> int:
    # Reads from the page cache are copies bound by cores; cold reads want a
    # deeper queue than cores. Four covers both on the machines we measured.
    return max(4, min(8, os.cpu_count() or 4))


class _Buffers:
    """Nine stacked component buffers for up to `capacity` experts."""

    def __init__(self, components: list[fmt.Component], capacity: int, zero_copy: bool, huge: bool = False):
        import mlx.core as mx

        self.capacity, self.zero_copy = capacity, zero_copy
        self.host: list[np.ndarray] = []  # per component: uint8 [capacity * nbytes], page aligned
        self.typed: list = []             # per component: mx.array [capacity, *shape] (zero-copy only)
        self._keep = []
        for c in components:
            size = capacity * c.nbytes
            if zero_copy:
                # a page to align the start, at least a page of room behind the end (engine/linear.py's
                # with_room: MLX's CUDA gather_qmm reads a little past a stack's last row)
                raw = mx.zeros((size + 2 * PAGE,), mx.uint8)
                mx.eval(raw)
                view = np.array(raw, copy=False)
                k = (-view.__array_interface__["data"][0]) % PAGE
                typed = raw[k : k + size].view(_mx_dtype(c.dtype)).reshape(capacity, *c.shape)
                mx.eval(typed)
                self.host.append(view[k : k + size])
                self.typed.append(typed)
                self._keep.append(raw)
            else:
                import mmap

                # anonymous: page aligned. `huge`: on transparent huge pages, advised before the first
                # touch and aligned to 2 MiB (direct reads into 4 KiB pages are split into requests of
                # at most max_segments pages and ran at half the disk's speed here: DESIGN.md)
                # (private: Python's default, a shared anonymous mapping, is shmem, which takes no THP here)
                k = HUGE_PAGE if huge and size >= HUGE_PAGE else 0
                mem = (mmap.mmap(-1, size + k, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if k
                       else mmap.mmap(-1, max(size, 1)))
                if k and hasattr(mem, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                    try:
                        mem.madvise(mmap.MADV_HUGEPAGE)
                    except OSError:
                        pass
                self._keep.append(mem)
                view = np.frombuffer(mem, np.uint8)
                a = (-view.__array_interface__["data"][0]) % HUGE_PAGE if k else 0
                self.host.append(view[a : a + size])
        self.addresses = [h.__array_interface__["data"][0] for h in self.host]  # row 0 of each component
        # Per row, the iovecs of one expert's components, in file order.
        self.iovecs = [[memoryview(h[r * c.nbytes : (r + 1) * c.nbytes]) for h, c in zip(self.host, components)]
                       for r in range(capacity)]

    def arrays(self, components: list[fmt.Component], n: int) -> list:
        """The first n rows of every component as mx.arrays."""
        import mlx.core as mx

        if self.zero_copy:
            return [t[:n] for t in self.typed]
        out = []
        for h, c in zip(self.host, components):
            a = h[: n * c.nbytes].view(fmt.NUMPY_DTYPES[c.dtype]).reshape(n, *c.shape)
            a = mx.array(a)  # the one copy of the fallback path
            out.append(a.view(mx.bfloat16) if c.dtype == "bfloat16" else a)
        return out


def _mx_dtype(name: str):
    import mlx.core as mx

    return {"uint32": mx.uint32, "bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[name]


def _cpu_kernels_active() -> bool:
    from .. import kernels

    try:
        return kernels.active_backend() == "cpu"
    except Exception:
        return False


def _cpu_kernels_read(bits: int, group: int) -> bool:
    """Whether the CPU kernels read experts of this quantization (rows by address)."""
    from ..cpu import ops as cops

    return cops.supported(bits, group)


def mlx_memory_is_host_writable() -> bool:
    """Whether writes through a numpy view of an MLX array are seen by MLX (CPU, unified memory)."""
    import mlx.core as mx

    try:
        a = mx.zeros((PAGE,), mx.uint8)
        mx.eval(a)
        v = np.array(a, copy=False)
        if not v.flags.writeable:
            return False
        v[7] = 42
        return int(a[7].item()) == 42
    except Exception:
        return False


def read_full(fd: int, views: list, offset: int, nbytes: int, probe: bool) -> bool:
    """Read `nbytes` at `offset` into `views`; True if the page cache served all of it."""
    done = 0
    if probe:
        try:
            done = os.preadv(fd, views, offset, _RWF_NOWAIT)
        except BlockingIOError:
            done = 0
        if done == nbytes:
            return True
    while done < nbytes:
        n = os.preadv(fd, _remaining(views, done), offset + done)
        if n <= 0:
            raise FlashMoeError(f"short read at byte {offset + done}: the expert file was truncated while in use.")
        done += n
    return False


def _remaining(views: list, skip: int) -> list:
    out = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        out.append(v[skip:])
        skip = 0
    return out


class _HostCache:
    """Experts read with O_DIRECT, kept in anonymous memory for later tokens: the page cache's
    job, which direct reads skip. (layer, expert) -> slot, least recently used first; slots of
    the batch being built and of the one before are never given away.

    Speculative reads (`reserve`) write slots that are in neither `slot_of` nor `free` until
    the read has ended without error (`commit`: then they are ordinary entries) or failed
    (`discard`): no fetch can find a slot whose bytes are still landing."""

    def __init__(self, components: list[fmt.Component], slots: int):
        self.buf = _Buffers(components, slots, zero_copy=False, huge=True)   # (direct reads land here)
        self.slots = slots
        self.slot_of: OrderedDict = OrderedDict()
        self.free = list(range(slots))
        self.last: set[int] = set()
        self.before: set[int] = set()   # the batch before `last`
        self.inflight: dict = {}        # (layer, expert) -> slot of a speculative read in flight

    def clear(self) -> None:
        self.slot_of.clear()
        self.free = list(range(self.slots))
        self.last, self.before = set(), set()
        self.inflight = {}

    def reserve(self, layer: int, ids, keep: set[int]) -> np.ndarray:
        """Slots for a speculative read of experts `ids` (not cached), invisible to `find` until
        `commit`: free ones first, then the least recently used outside `keep`, the last two
        batches. Fewer than asked (none) where nothing can be given away: a guess never fails."""
        keep = keep | self.last | self.before
        out = []
        for e in ids:
            slot = self._take(keep)
            if slot is None:
                break
            self.inflight[(layer, int(e))] = slot
            out.append(slot)
        return np.array(out, np.int64)

    def commit(self) -> list:
        """The speculative reads ended without error: their slots become ordinary entries
        (the most recently used). Returns their keys."""
        keys = list(self.inflight)
        for key, slot in self.inflight.items():
            self.slot_of[key] = slot
        self.inflight = {}
        return keys

    def discard(self) -> None:
        """The speculative reads failed: their slots are free again, never found."""
        self.free.extend(self.inflight.values())
        self.inflight = {}

    def find(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Per expert, its slot (-1: not cached); hits become the most recently used."""
        out = np.full(len(ids), -1, np.int64)
        for i, e in enumerate(ids):
            slot = self.slot_of.get((layer, int(e)))
            if slot is not None:
                self.slot_of.move_to_end((layer, int(e)))
                out[i] = slot
        return out

    def place(self, layer: int, ids: np.ndarray, keep: set[int]) -> np.ndarray:
        """Slots for experts `ids` (not cached): free ones first, then the least recently used
        outside `keep` and the previous batch."""
        keep = keep | self.last
        out = np.empty(len(ids), np.int64)
        for i, e in enumerate(ids):
            slot = self._take(keep)
            if slot is None:
                raise FlashMoeError("the expert cache is smaller than one layer's experts: raise "
                                    "FLASHMOE_HOST_CACHE_GB.")
            self.slot_of[(layer, int(e))] = slot
            keep = keep | {slot}
            out[i] = slot
        return out

    def _take(self, keep: set[int]) -> int | None:
        """A slot to fill: a free one, else the least recently used entry's outside `keep`
        (forgotten), else None."""
        if self.free:
            return self.free.pop()
        key = next((k for k, v in self.slot_of.items() if v not in keep), None)
        return None if key is None else self.slot_of.pop(key)


class ExpertStore:
    """Streams experts of a packed model directory; an `ExpertSource`."""

    def __init__(self, model_dir: str | Path, manifest: fmt.Manifest | None = None, *, dtype=None,
                 threads: int | None = None, zero_copy: bool | None = None):
        import mlx.core as mx

        self.dir = Path(model_dir)
        self.manifest = m = manifest or fmt.read_manifest(self.dir)
        if [c.name for c in m.components] != [f"{p}.{q}" for p in fmt.PROJECTIONS for q in fmt.PARTS]:
            raise FlashMoeError(f"{self.dir / fmt.MANIFEST_NAME}: unexpected expert components; re-convert.")
        self.components = m.components
        self.dtype = dtype or (mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
        self.stats = ExpertStats()
        self.trace: list | None = None  # set to a list to record (layer, ids) of every fetch
        self.fds: list[int] = []
        try:
            for i, entry in enumerate(m.layers):
                path = self.dir / entry.file
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise FlashMoeError(f"cannot open expert file {path}: {e.strerror}; re-convert the model.") from e
                self.fds.append(fd)
                fmt.check_layer_file(m, i, fd, path)
        except BaseException:
            self.close()
            raise
        self.probe = _RWF_NOWAIT is not None and self._nowait_works()
        self.hit_method = "RWF_NOWAIT" if self.probe else None
        self.zero_copy = mlx_memory_is_host_writable() if zero_copy is None else zero_copy
        self.threads = threads or _default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="flashmoe-read")
        self._native = self._native_reader(self.threads)
        # Decode on the CPU kernels reads bf16 scales as stored; converting them to float32
        # first was an MLX evaluation per layer (~0.9 ms at 397B shapes, warm).
        self.raw_scales = self.dtype == mx.float32 and _cpu_kernels_active()
        self._slots: list[_Buffers | None] = [None, None]
        self._next = 0
        self._lookup = np.full(m.num_experts, -1, np.int32)
        self._announced: dict[int, np.ndarray] = {}
        self.hit_rate = 0.0          # moving average of the page-cache hit rate of reads (RWF_NOWAIT)
        self.readahead_below = 0.9   # `prefetch` announces only while that rate is below this
        self._bits, self._group = m.bits, m.group_size
        # In-place use of page-cache hits (fetch(..., host_rows=True)); FLASHMOE_MAPPED_HITS=0: off.
        self.map_hits = (os.environ.get("FLASHMOE_MAPPED_HITS", "1").strip().lower() not in ("0", "off", "no", "false")
                         and m.header_bytes % PAGE == 0 and m.expert_stride % PAGE == 0
                         and _cpu_kernels_read(m.bits, m.group_size)
                         and hasattr(os, "posix_fadvise") and os.uname().sysname == "Linux")
        self._mapper: _Mapper | None = None
        self._maps: list[int] = [0] * len(m.layers)  # per layer: address of its file's mapping (0: none yet)
        self._in_flight = 0  # experts of a fetch_streaming read still running
        self._read_layer: int | None = None   # layer of the last read started (its errors name the file)
        # How fetch_streaming reads misses: `readahead` (default: POSIX_FADV_WILLNEED, the kernel
        # reads them into the page cache, used in place once mincore finds them; no copy, and the
        # page cache stays the cache), `copy` (the C pool preads them into buffers) or `direct`
        # (the C pool reads them with O_DIRECT: no page-cache pages to allocate, insert and later
        # reclaim, ~5x less CPU per byte and faster here; what it reads is kept in a RAM cache of
        # our own, `_HostCache`). 8 streamed 397B layers on 2 cores, cold: readahead 212-304 ms/token
        # against copy 234-335 (8 runs each, alternating); see llm_flashmoe/cpu/DESIGN.md for direct.
        self.cold_reads = os.environ.get("FLASHMOE_COLD_READS", "readahead").strip().lower()
        if self.cold_reads not in ("copy", "readahead", "direct"):
            raise FlashMoeError(f"FLASHMOE_COLD_READS={self.cold_reads!r}: use readahead, copy or direct.")
        self._direct_fds: dict[int, int] = {}   # layer -> its file opened with O_DIRECT
        self._replay_buffers: _Buffers | None = None   # read_direct's
        self.direct_reads = self._direct_possible()
        if self.cold_reads == "direct" and not self.direct_reads:
            print("flashmoe: FLASHMOE_COLD_READS=direct needs O_DIRECT on 4 KiB-aligned expert parts and the C "
                  "reader; reading with copies instead.", file=sys.stderr)
            self.cold_reads = "copy"
        # Direct reads submitted asynchronously (FLASHMOE_DIRECT_DEPTH > 0: Linux AIO, one thread keeping
        # `direct_depth` pieces in flight) where the kernel allows it; else the pool's threads pread.
        self.direct_depth, self.direct_piece = self._direct_settings()
        self.direct_async = False
        self._enable_async(notice=self.cold_reads == "direct")
        # Direct reads leave nothing in the page cache: keep them in RAM instead
        # (FLASHMOE_HOST_CACHE_GB, default: half the memory available at open, at most the files).
        self.host_cache = self._make_host_cache() if self.cold_reads == "direct" else None
        self._readahead = None
        # Speculative reads (direct reads with a host cache; `prefetch`): the next layer's top
        # guessed experts read into host-cache slots once this layer's misses have landed, while
        # the disk would otherwise idle through the last expert's compute and the next layer's
        # mixer and router. FLASHMOE_PREFETCH_EXPERTS: how many of the top guesses (default 2: with
        # direct reads into huge pages a 397B expert reads in ~3.5 ms, one guess no longer fills that
        # gap; 8 streamed layers, cold, 137-140 against 150-151 ms per token with 1, interleaved; a
        # real read of the next layer waits for at most the speculative reads in flight).
        try:
            self.speculate_experts = max(0, int(os.environ.get("FLASHMOE_PREFETCH_EXPERTS", "2")))
        except ValueError:
            raise FlashMoeError("FLASHMOE_PREFETCH_EXPERTS: give a number of experts (default 2).") from None
        self._spec_request = None     # (layer, ranked guesses) waiting for this layer's reads to land
        self._spec_keys: set = set()  # (layer, expert) read speculatively, not yet asked for
        self._reads_done = True       # the read in flight (if any) has landed every expert it must
        self.cache_hit_rate = 0.0     # moving average of the share of fetched experts needing no read
        self.speculate_below = 0.9    # speculate only while that rate is below this
        # Decode on the CPU kernels computes while the misses are read (fetch_streaming);
        # FLASHMOE_OVERLAP_READS=0: read, then compute.
        self.overlap = (self.map_hits and self._native is not None and os.environ.get(
            "FLASHMOE_OVERLAP_READS", "1").strip().lower() not in ("0", "off", "no", "false"))

    @staticmethod
    def _direct_settings() -> tuple[int, int]:
        try:
            depth = int(os.environ.get("FLASHMOE_DIRECT_DEPTH", str(DIRECT_DEPTH)))
            piece_kb = int(os.environ.get("FLASHMOE_DIRECT_PIECE_KB", str(DIRECT_PIECE >> 10)))
        except ValueError:
            raise FlashMoeError("FLASHMOE_DIRECT_DEPTH / FLASHMOE_DIRECT_PIECE_KB: give whole numbers "
                                f"(defaults {DIRECT_DEPTH} and {DIRECT_PIECE >> 10}).") from None
        if not 0 <= depth <= 256 or piece_kb < 0 or piece_kb % (PAGE >> 10):
            raise FlashMoeError("FLASHMOE_DIRECT_DEPTH: 0 (threads' preads) to 256; FLASHMOE_DIRECT_PIECE_KB: "
                                "a multiple of 4 (0: an expert over the depth).")
        return depth, piece_kb << 10

    def _enable_async(self, notice: bool) -> None:
        """Asynchronous direct reads where O_DIRECT works and the kernel gives an AIO context;
        else (with a one-line notice when direct reads were asked for) the threads' preads."""
        self.direct_async = False
        if not self.direct_reads or self.direct_depth == 0:
            return
        try:
            self._native.make_async(self.direct_depth)
        except OSError as e:
            if notice:
                print(f"flashmoe: asynchronous O_DIRECT reads unavailable (Linux AIO: {e.strerror}); reading "
                      f"with {self.threads} threads' preads instead.", file=sys.stderr)
            return
        self.direct_async = True

    @staticmethod
    def _native_reader(threads: int):
        """The C reader pool (kernels/upload/upload.c, direct mode), or None: Python threads."""
        if os.environ.get("FLASHMOE_NATIVE_READS", "1").strip().lower() in ("0", "off", "no", "false"):
            return None
        from .native import NativeUploader, load

        lib = load()
        return NativeUploader.direct(lib, threads) if lib is not None else None

    def _nowait_works(self) -> bool:
        try:
            os.preadv(self.fds[0], [bytearray(16)], 0, _RWF_NOWAIT) if self.fds else None
            return bool(self.fds)
        except BlockingIOError:
            return True
        except OSError:
            return False

    # -- reading ------------------------------------------------------------
    def read_experts(self, layer: int, expert_ids: np.ndarray, rows: np.ndarray | None = None,
                     capacity: int = 0, record: bool = True) -> _Buffers:
        """Read experts `expert_ids` of `layer` into the next buffer set (row rows[i], by default i,
        holds expert_ids[i]); the set has at least `capacity` rows."""
        n = len(expert_ids)
        rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)
        buf = self._buffers_for(max(n, capacity))
        fd, m = self.fds[layer], self.manifest
        base, stride, nbytes, probe = m.header_bytes, m.expert_stride, m.expert_bytes, self.probe
        self._read_layer = layer
        t0 = time.perf_counter()
        if n == 0:
            hits = 0
        elif self._native is not None:
            hits = self._read_native(fd, expert_ids, rows, buf)
        else:
            jobs = [(fd, buf.iovecs[r], base + int(e) * stride, nbytes, probe) for r, e in zip(rows, expert_ids)]
            if n <= 1 or self.threads == 1 or n * nbytes < INLINE_BYTES:
                hits = _read_jobs(jobs)
            else:  # this thread reads one share itself: one fewer wake-up to wait for
                parts = min(self.threads, n)
                futures = [self._pool.submit(_read_jobs, jobs[k::parts]) for k in range(1, parts)]
                hits = _read_jobs(jobs[0::parts]) + sum(f.result() for f in futures)
        dt = time.perf_counter() - t0
        s = self.stats
        s.experts += n
        s.bytes += n * nbytes
        announced = self._announced.pop(layer, None)
        if announced is not None:
            s.prefetch_hits += int(np.isin(expert_ids, announced).sum())
        if self.probe and n:
            self.hit_rate = 0.8 * self.hit_rate + 0.2 * hits / n  # recent page-cache hit rate
        s.read_seconds += dt
        s.cache_hits += hits
        if self.trace is not None and record:
            self.trace.append((layer, np.array(expert_ids, copy=True)))
        return buf

    def _buffers_for(self, need: int) -> _Buffers:
        """The next of the two buffer sets, with at least `need` rows (after any read in flight)."""
        self._settle()
        i = self._next
        self._next ^= 1
        buf = self._slots[i]
        if buf is None or buf.capacity < need:
            cap = min(self.manifest.num_experts, max(8, -(-need // 8) * 8))
            self._slots[i] = None  # free the old set first
            buf = self._slots[i] = _Buffers(self.components, cap, self.zero_copy)
        return buf

    def _read_native(self, fd: int, expert_ids, rows: np.ndarray, buf: _Buffers) -> int:
        from .native import PIECE_CAP, piece_for

        m = self.manifest
        ids = np.asarray(expert_ids, np.int64)
        try:
            hit_bytes = self._native.run(fd, self._offsets(ids), rows,
                                         m.expert_bytes, self.components, buf.addresses,
                                         piece_for(len(ids), m.expert_bytes, self.threads, PIECE_CAP), self.probe)
        except OSError as e:
            raise self._read_error(e) from e
        return int(round(hit_bytes / m.expert_bytes))

    def fetch(self, layer: int, expert_ids: np.ndarray, *, gather: bool = False,
              host_rows: bool = False) -> ExpertBatch:
        ids = np.asarray(expert_ids, np.int64)
        n = len(ids)
        in_place = self._in_place(layer, ids) if host_rows and not gather and self.map_hits and n else None
        if in_place is None:
            buf = self.read_experts(layer, ids, record=False)
        else:
            miss = np.flatnonzero(~in_place)
            buf = self.read_experts(layer, ids[miss], rows=miss, capacity=n, record=False)
        if self.trace is not None:
            self.trace.append((layer, ids.copy()))
        addresses = None if in_place is None else self._row_addresses(layer, ids, in_place, buf)
        return self._batch(ids, buf, addresses, gather)

    def _batch(self, ids: np.ndarray, buf: "_Buffers", addresses: np.ndarray | None,
               gather: bool = False) -> ExpertBatch:
        from ..engine.linear import Linear

        n = len(ids)
        a = buf.arrays(self.components, n)
        dt = self.dtype
        if not gather and self.raw_scales:
            dt = None  # the CPU kernels read the stored (bf16) scales themselves: no conversion
        lin = []
        for p in range(3):
            w, s, b = a[3 * p : 3 * p + 3]
            if dt is not None and s.dtype != dt:
                s, b = s.astype(dt), b.astype(dt)
            lin.append(Linear(w, s, b, self._bits, self._group,
                              row_addresses=None if addresses is None else addresses[:, 3 * p : 3 * p + 3]))
        lookup = np.full(self.manifest.num_experts, -1, np.int32)
        lookup[ids] = np.arange(n, dtype=np.int32)
        return ExpertBatch(lin[0], lin[1], lin[2], lookup)

    def fetch_streaming(self, layer: int, expert_ids: np.ndarray) -> tuple[ExpertBatch, "PendingReads"]:
        """`fetch(..., host_rows=True)` that returns before the misses have landed: the batch's
        rows are where they will be, `PendingReads` says which are usable now (page-cache hits,
        in place) and waits for the others, read in turn so that the first lands early."""
        ids = np.asarray(expert_ids, np.int64)
        n = len(ids)
        self._spec_request = None   # a guess for this layer not started by now is stale
        if self._native is None or not self.map_hits or n == 0:
            return self.fetch(layer, ids, host_rows=True), PendingReads(self, np.ones(n, bool), [])
        in_place = self._in_place(layer, ids)
        if in_place is None:
            in_place = np.zeros(n, bool)
        miss = np.flatnonzero(~in_place)
        buf = self._buffers_for(n)
        if self.trace is not None:
            self.trace.append((layer, ids.copy()))
        if self.cold_reads == "readahead" and len(miss) and self._maps[layer]:
            # The kernel reads the misses into the page cache (no copy), used in place once there.
            m = self.manifest
            self._read_layer = layer
            self._readahead = self._pool.submit(_advise, self.fds[layer], self._offsets(ids[miss]), m.expert_bytes)
            self.stats.experts += len(miss)
            self.stats.bytes += len(miss) * m.expert_bytes
            batch = self._batch(ids, buf, self._row_addresses(layer, ids, np.ones(n, bool), buf))
            return batch, PendingReads(self, in_place.copy(), miss,
                                       mapped=self._maps[layer] + self._offsets(ids))
        if self.host_cache is not None:   # direct reads, kept in RAM for later tokens
            return self._fetch_cached(layer, ids, in_place, buf)
        if len(miss):
            self._start_reads(layer, ids[miss], miss, buf, direct=self.cold_reads == "direct")
        batch = self._batch(ids, buf, self._row_addresses(layer, ids, in_place, buf))
        return batch, PendingReads(self, in_place.copy(), miss)

    def _fetch_cached(self, layer: int, ids: np.ndarray, in_place: np.ndarray, buf: "_Buffers"):
        """fetch_streaming's misses from the host cache, or read into it with O_DIRECT."""
        cache, m = self.host_cache, self.manifest
        slots = np.full(len(ids), -1, np.int64)
        slots[~in_place] = cache.find(layer, ids[~in_place])
        ready = in_place | (slots >= 0)
        miss = np.flatnonzero(~ready)
        k = int((slots >= 0).sum())
        s = self.stats
        s.experts += k
        s.bytes += k * m.expert_bytes
        s.in_place += k
        if self._spec_keys:   # speculative reads of this layer that the router picked
            s.prefetch_hits += sum((layer, int(e)) in self._spec_keys for e in ids[slots >= 0])
            self._spec_keys = {key for key in self._spec_keys if key[0] != layer}
        if len(ids):   # (page-cache hits used in place count too: neither needs a read)
            self.cache_hit_rate = 0.8 * self.cache_hit_rate + 0.2 * float(ready.mean())
        if len(miss):
            slots[miss] = cache.place(layer, ids[miss], keep={int(v) for v in slots if v >= 0})
            self._start_reads(layer, ids[miss], slots[miss], cache.buf, direct=True)
        cache.before, cache.last = cache.last, {int(v) for v in slots if v >= 0}
        batch = self._batch(ids, buf, self._row_addresses(layer, ids, in_place, cache.buf, rows=slots))
        return batch, PendingReads(self, ready, miss, on_landed=self._reads_landed if len(miss) else None)

    # -- speculative reads (direct reads with a host cache) -------------------
    @property
    def speculative(self) -> bool:
        """Whether `prefetch` reads guesses into the host cache (direct reads) instead of
        announcing them to the kernel's readahead: only where decode's fetches are streamed
        (`fetch_streaming`, the CPU kernels), the one path that looks in the host cache."""
        return (self.host_cache is not None and self.speculate_experts > 0 and self.overlap
                and self.raw_scales)

    def wants_prefetch(self, layer: int) -> bool:
        """Whether a guess of `layer`'s experts would be used now (the caller can skip making it)."""
        if self.speculative:
            return self.cache_hit_rate < self.speculate_below
        return _HAVE_FADVISE and self.hit_rate <= self.readahead_below

    def _reads_landed(self) -> None:
        """Every miss of the fetch in flight has landed: the disk is about to idle. Start the
        speculative read waiting for that moment, if any."""
        self._reads_done = True
        if self._spec_request is not None:
            self._start_speculation()

    def _start_speculation(self) -> None:
        layer, ranked = self._spec_request
        self._spec_request = None
        self._settle()   # the pool's job has landed everything: it ends at once
        cache = self.host_cache
        want = [int(e) for e in ranked[: self.speculate_experts] if (layer, int(e)) not in cache.slot_of]
        if want and self.map_hits and self.mapped_layer(layer):   # page-cache hits are used in place
            base, nbytes = self._maps[layer], self.manifest.expert_bytes
            want = [e for e in want if not self._mapper.resident(int(base + self._offsets([e])[0]), nbytes)]
        if not want:
            return
        slots = cache.reserve(layer, want, keep=set())
        if len(slots):
            self._start_reads(layer, np.array(want[: len(slots)], np.int64), slots, cache.buf, direct=True,
                              speculative=True)

    def _make_host_cache(self) -> "_HostCache | None":
        m = self.manifest
        want = os.environ.get("FLASHMOE_HOST_CACHE_GB", "auto").strip().lower()
        try:
            nbytes = _mem_available() // 2 if want in ("", "auto") else int(float(want) * 1e9)
        except ValueError:
            raise FlashMoeError(f"FLASHMOE_HOST_CACHE_GB={want!r}: give a size in GB, or auto.") from None
        slots = min(nbytes // m.expert_stride, m.num_experts * len(m.layers))
        return _HostCache(self.components, int(slots)) if slots > 0 else None

    def _direct_possible(self) -> bool:
        """Whether misses can be read with O_DIRECT: every expert part starts and ends on a 4 KiB
        boundary in the file and in the buffers, the C reader is there, and the file system takes it."""
        m = self.manifest
        if (not hasattr(os, "O_DIRECT") or self._native is None or not self.fds
                or any(v % PAGE for v in (m.header_bytes, m.expert_stride, m.expert_bytes))
                or any(c.offset % PAGE or c.nbytes % PAGE for c in self.components)):
            return False
        try:
            self._direct_fd(0)
        except OSError:   # e.g. tmpfs: no O_DIRECT
            return False
        return True

    def _direct_fd(self, layer: int) -> int:
        fd = self._direct_fds.get(layer)
        if fd is None:
            fd = self._direct_fds[layer] = os.open(self.dir / self.manifest.layers[layer].file,
                                                   os.O_RDONLY | os.O_DIRECT)
        return fd

    def read_direct(self, layer: int, expert_ids: np.ndarray) -> _Buffers:
        """Read experts with O_DIRECT and wait (the I/O of FLASHMOE_COLD_READS=direct alone, for
        benchmarks): as decode reads them into the host cache, with the same reader, into buffers on
        huge pages like the cache's (set aside for this; returned)."""
        ids = np.asarray(expert_ids, np.int64)
        self._settle()
        buf = self._replay_buffers
        if buf is None or buf.capacity < len(ids):
            self._replay_buffers = None   # (the old set first)
            buf = self._replay_buffers = _Buffers(self.components, max(8, -(-len(ids) // 8) * 8), False, huge=True)
        self._start_reads(layer, ids, np.arange(len(ids)), buf, direct=True)
        self._settle()
        return buf

    def _offsets(self, ids: np.ndarray) -> np.ndarray:
        """File offsets of experts `ids` in their layer file."""
        m = self.manifest
        return m.header_bytes + np.asarray(ids, np.int64) * m.expert_stride

    def _wait_resident(self, addr: int, patience: float = float("inf")) -> None:
        """Until the expert mapped at `addr` is wholly in the page cache (or `patience` seconds)."""
        t0 = time.perf_counter()
        while (not self._mapper.resident(addr, self.manifest.expert_bytes)
               and time.perf_counter() - t0 < patience):
            time.sleep(0.0002)

    def _start_reads(self, layer: int, ids: np.ndarray, rows: np.ndarray, buf: "_Buffers",
                     direct: bool = False, speculative: bool = False) -> None:
        from .native import MIN_PIECE

        m = self.manifest
        # Each expert cut across every thread, pieces taken in expert order: expert 0 lands first.
        # (Pieces are whole multiples of MIN_PIECE and parts 4 KiB-aligned: O_DIRECT takes them.)
        # Asynchronous direct reads: pieces of direct_piece bytes, direct_depth of them in flight.
        asynchronous = direct and self.direct_async
        self._read_layer = layer
        share = self.direct_depth if asynchronous else self.threads
        piece = ((asynchronous and self.direct_piece)
                 or max(MIN_PIECE, -(-m.expert_bytes // share // MIN_PIECE) * MIN_PIECE))
        t0 = time.perf_counter()
        try:
            # direct: the misses are known, no page-cache probe
            fd, probe = (self._direct_fd(layer), False) if direct else (self.fds[layer], self.probe)
            self._native.start(fd, self._offsets(ids), rows, m.expert_bytes, self.components, buf.addresses,
                               piece, probe, asynchronous=asynchronous)
        except OSError as e:
            raise self._read_error(e) from e
        s = self.stats
        if speculative:   # counted as experts (and bytes) when a fetch asks for them
            s.prefetched += len(ids)
        else:
            s.experts += len(ids)
            s.bytes += len(ids) * m.expert_bytes
        s.read_seconds += time.perf_counter() - t0
        self._in_flight = len(ids)
        self._reads_done = speculative   # a speculative read is waited for by nobody

    def _settle(self) -> None:
        """End the streaming read in flight, if any (before the next read, or its buffers' reuse)."""
        if self._in_flight:
            n, self._in_flight = self._in_flight, 0
            t0 = time.perf_counter()
            cache = self.host_cache
            try:
                hit_bytes = self._native.finish()
            except OSError as e:
                if cache is not None:
                    cache.discard()   # a speculative read that failed is never found
                raise self._read_error(e) from e
            finally:
                self.stats.read_seconds += time.perf_counter() - t0
                self._reads_done = True
            if cache is not None and cache.inflight:   # verified like every read: now usable
                self._spec_keys.update(cache.commit())
            hits = int(round(hit_bytes / self.manifest.expert_bytes))
            self.stats.cache_hits += hits
            if self.probe:
                self.hit_rate = 0.8 * self.hit_rate + 0.2 * hits / n

    def read_ahead(self, layer: int, expert_ids: np.ndarray) -> None:
        """Have the kernel read experts into the page cache and wait until they are all there (the
        I/O of FLASHMOE_COLD_READS=readahead alone, for benchmarks)."""
        offsets = self._offsets(expert_ids)
        base = self.mapped_layer(layer)
        _advise(self.fds[layer], offsets, self.manifest.expert_bytes)
        for off in offsets:
            self._wait_resident(int(base + off))

    def _end_readahead(self) -> None:
        """The readahead requests of the last streaming fetch submitted (its errors raised)."""
        ra, self._readahead = self._readahead, None
        if ra is not None:
            try:
                ra.result()
            except OSError as e:
                raise self._read_error(e) from e

    def _wait_landed(self, i: int) -> None:
        t0 = time.perf_counter()
        try:
            self._native.wait(i)
        except OSError as e:
            self._in_flight = 0
            raise self._read_error(e) from e
        finally:
            self.stats.read_seconds += time.perf_counter() - t0

    def _read_error(self, e: OSError) -> FlashMoeError:
        """The error of a failed or short read (`_read_layer`: the file of the read that failed)."""
        layer = self._read_layer
        what = "expert file" if layer is None else str(self.dir / self.manifest.layers[layer].file)
        return FlashMoeError(f"reading experts failed ({e.strerror}): the {what} was truncated or "
                             "damaged while in use; run llm flashmoe verify.")

    # -- page-cache hits used in place (host_rows) -----------------------------
    def _in_place(self, layer: int, ids: np.ndarray) -> np.ndarray | None:
        """Per expert, whether it is wholly in the page cache and will be used in place through
        the layer file's mapping; None when no expert is (everything is read as usual)."""
        t0 = time.perf_counter()
        m = self.manifest
        base = self.mapped_layer(layer)
        if base == 0:
            self.map_hits = False  # mmap refused (rlimits): read everything
            return None
        size = os.fstat(self.fds[layer]).st_size
        if size < m.layer_file_bytes():
            path = self.dir / m.layers[layer].file
            raise FlashMoeError(f"{path} has {size} bytes, expected {m.layer_file_bytes()}: the expert file was "
                                "truncated while in use; run llm flashmoe verify.")
        mapper, nbytes = self._mapper, m.expert_bytes
        starts = base + self._offsets(ids)
        hit = np.array([mapper.resident(int(a), nbytes) for a in starts], bool)
        if not hit.any():
            self.stats.read_seconds += time.perf_counter() - t0
            return None
        for a in starts[hit]:
            mapper.prepare(int(a), nbytes)
        k = int(hit.sum())
        s = self.stats
        s.experts += k
        s.bytes += k * nbytes
        s.cache_hits += k
        s.in_place += k
        s.read_seconds += time.perf_counter() - t0
        if self.probe:
            self.hit_rate = 0.8 * self.hit_rate + 0.2 * k / len(ids)
        return hit

    def mapped_layer(self, layer: int) -> int:
        """The address of a read-only shared mapping of `layer`'s file (made once), 0 if refused."""
        if self._mapper is None:
            self._mapper = _Mapper()
        if self._maps[layer] == 0:
            self._maps[layer] = self._mapper.map(self.fds[layer], self.manifest.layer_file_bytes())
        return self._maps[layer]

    def _row_addresses(self, layer: int, ids: np.ndarray, in_place: np.ndarray, buf: _Buffers,
                       rows: np.ndarray | None = None) -> np.ndarray:
        """int64 [n, 9]: per expert, the host address of each component (page cache, or row
        rows[i] of `buf`, by default row i)."""
        mapped = self._maps[layer] + self._offsets(ids)
        out = np.empty((len(ids), len(self.components)), np.int64)
        rows = np.arange(len(ids), dtype=np.int64) if rows is None else np.maximum(rows, 0)
        for j, c in enumerate(self.components):
            out[:, j] = np.where(in_place, mapped + c.offset, buf.addresses[j] + rows * c.nbytes)
        return out

    def prefetch(self, layer: int, expert_ids: np.ndarray) -> None:
        """Announce experts a later fetch of `layer` will probably want (best guess first).

        With direct reads into the host cache (`speculative`): the top FLASHMOE_PREFETCH_EXPERTS
        guesses not cached are read into host-cache slots as soon as the misses of the fetch in
        flight have landed (at once if none is in flight), one read behind them; a fetch that
        picks one waits for that read instead of reading again, a wrong guess's slot is an
        ordinary least-recently-used entry. Otherwise the kernel reads them into the page cache
        in the background (POSIX_FADV_WILLNEED), while the engine computes."""
        if self.speculative:
            if self.cache_hit_rate >= self.speculate_below:
                return   # the host cache serves the reads: a guess would only compete with them
            self._spec_request = (layer, np.array(expert_ids, np.int64))
            if self._reads_done:
                if self.host_cache.inflight:   # a guess still being read: never wait for it here
                    self._spec_request = None
                else:
                    self._start_speculation()
            return
        if not _HAVE_FADVISE or self.hit_rate > self.readahead_below:
            # Reads come from the page cache already: a wrong guess would only start disk
            # reads that compete with compute (measured: -25% tokens/s warm on 2 cores).
            return
        _advise(self.fds[layer], self._offsets(expert_ids), self.manifest.expert_bytes)
        self._announced[layer] = np.array(expert_ids, copy=True)
        self.stats.prefetched += len(expert_ids)

    def set_threads(self, threads: int) -> None:
        """Use `threads` reader threads from now on."""
        self._pool.shutdown(wait=True)
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flashmoe-read")
        if self._native is not None:
            self._native.close()
            self._native = self._native_reader(threads)
            self._enable_async(notice=False)

    # -- page cache -----------------------------------------------------------
    def drop_page_cache(self) -> None:
        """Ask the kernel to drop this model's expert pages (cold-start measurements).
        Pages our own mappings hold are unmapped first: the kernel keeps mapped pages."""
        if self._mapper is not None:
            for addr in self._maps:
                if addr:
                    self._mapper.madvise(addr, self.manifest.layer_file_bytes(), _MADV_DONTNEED)
        for fd in self.fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if getattr(self, "host_cache", None) is not None:   # (and what direct reads kept in RAM)
            self._settle()
            self.host_cache.clear()
            self._spec_keys, self._spec_request = set(), None

    def close(self) -> None:
        if getattr(self, "_in_flight", 0):
            try:
                self._settle()
            except FlashMoeError:
                pass
        for fd in getattr(self, "_direct_fds", {}).values():
            os.close(fd)
        self._direct_fds = {}
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()
            self._native = None
        mapper, maps = getattr(self, "_mapper", None), getattr(self, "_maps", [])
        if mapper is not None:
            for addr in maps:
                if addr:
                    mapper.munmap(addr, self.manifest.layer_file_bytes())
            self._maps = [0] * len(maps)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class PendingReads:
    """The experts of a `fetch_streaming` batch: `ready` rows are usable now; `wait(row)`
    blocks until that row's expert has landed; `misses` lists the other rows in landing order.
    `mapped` (readahead mode): each row's address in its layer file's mapping, where the kernel's
    readahead puts the misses; a row has landed when `mincore` finds all its pages."""

    # a row not in the page cache after this long is used anyway (its faults read what is missing)
    READAHEAD_PATIENCE_S = 5.0

    def __init__(self, store: ExpertStore, ready: np.ndarray, misses, mapped: np.ndarray | None = None,
                 on_landed=None):
        self.store, self.ready, self.mapped = store, ready, mapped
        self.misses = [int(r) for r in misses]
        self._order = {r: i for i, r in enumerate(self.misses)}
        self._on_landed = on_landed   # called once every miss has landed (the disk is free)

    @property
    def all_ready(self) -> bool:
        return bool(self.ready.all())

    def wait(self, row: int) -> None:
        if self.ready[row]:
            return
        if self.mapped is None:
            self.store._wait_landed(self._order[row])
        else:
            t0 = time.perf_counter()
            self.store._wait_resident(int(self.mapped[row]), self.READAHEAD_PATIENCE_S)
            self.store.stats.read_seconds += time.perf_counter() - t0
        self.ready[row] = True
        if self.ready.all():
            self._landed()

    def _landed(self) -> None:
        """Every miss has landed: the hook, once."""
        if self._on_landed is not None:
            hook, self._on_landed = self._on_landed, None
            hook()

    def finish(self) -> None:
        """Every read done (counted in the store's stats); raises the reads' error, if any."""
        if not self.ready.all():
            if self.mapped is None:
                self.store._settle()
            else:
                for row in self.misses:
                    self.wait(row)
            self.ready[:] = True
        self._landed()
        if self.mapped is not None:
            self.store._end_readahead()


def _mem_available() -> int:
    """Bytes of memory available (Linux MemAvailable; elsewhere a quarter of physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _advise(fd: int, offsets: np.ndarray, nbytes: int) -> None:
    """Ask the kernel to read each expert into the page cache (in order; returns once submitted)."""
    for off in offsets:
        os.posix_fadvise(fd, int(off), nbytes, os.POSIX_FADV_WILLNEED)


def _read_jobs(jobs) -> int:
    hits = 0
    for fd, views, offset, nbytes, probe in jobs:
        hits += read_full(fd, views, offset, nbytes, probe)
    return hits


def open_packed_model(model_dir: str | Path, cfg, *, dtype=None, threads: int | None = None):
    """(resident weights {internal name: mx.array}, ExpertStore) of a packed directory."""
    from ..checkpoint import check_tensors
    from ..safetensors_io import SafetensorsFile

    model_dir = Path(model_dir)
    m = fmt.read_manifest(model_dir)
    E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    shapes = {c.name: c.shape for c in m.components}
    if (m.num_experts != E or len(m.layers) != cfg.num_hidden_layers
            or shapes.get("gate_proj.scales") != (I, H // m.group_size)
            or shapes.get("down_proj.scales") != (H, I // m.group_size)
            or shapes.get("down_proj.weight") != (H, I * m.bits // 32)):
        raise FlashMoeError(
            f"{model_dir / fmt.MANIFEST_NAME} describes {len(m.layers)} layers of {m.num_experts} experts that do "
            f"not match config.json ({cfg.num_hidden_layers} layers, {E} experts of width {I}): the manifest "
            "comes from another model. Re-convert the model.")
    path = model_dir / m.resident["file"]
    if not path.is_file():
        raise FlashMoeError(f"{path} is missing; re-convert the model (llm flashmoe convert).")
    if path.stat().st_size != m.resident["bytes"]:
        raise FlashMoeError(f"{path} has {path.stat().st_size} bytes, the manifest says {m.resident['bytes']}: "
                            "it is truncated or from another conversion. Re-convert the model.")
    store = ExpertStore(model_dir, m, dtype=dtype, threads=threads)
    try:
        with SafetensorsFile(path) as f:
            if f.metadata.get("flashmoe_model_id") != m.model_id:
                raise FlashMoeError(f"{path} belongs to another conversion than {fmt.MANIFEST_NAME}; re-convert.")
            weights = {name: f.read(name) for name in f.tensors}
        check_tensors(weights, cfg, experts=False, source=str(model_dir))
    except BaseException:
        store.close()
        raise
    return weights, store
