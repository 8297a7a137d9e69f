"""`ExpertCache`: a pool of expert slots in GPU memory in front of the `ExpertStore`.

On a discrete GPU an expert travels disk -> page cache -> GPU memory. The
cache keeps recently and frequently used experts in a fixed pool of slots in
GPU memory, so a hit costs no read and no copy: the MoE kernels read the
pool directly, by slot (an `ExpertBatch` whose stacks are the pool and whose
lookup maps expert id -> slot). A miss is read from the packed file and
uploaded into a slot chosen by frequency-weighted eviction: the slot with the
lowest `uses * 10 + last_use` (`last_use` counts fetches; the reference CUDA
port found this beat plain LRU), never a slot the current fetch needs.

Transports move the bytes:

- `CudaTransport` (CUDA): worker threads `preadv` pieces of the missing
  experts into pinned host buffers and queue `cudaMemcpyAsync` of each piece
  into its slot on their own stream, double-buffered, so reads, copies and
  the next piece overlap; the fetch waits for the streams before the MoE
  kernels are queued.
- `HostTransport` (memory the host can write: CPU, unified memory): `preadv`
  straight into the slots. On unified-memory machines the OS page cache is
  already the cache, so `ExpertCache` is off there by default; this
  transport exists for tests and for forcing the cache on.

Slot reuse is safe without extra synchronisation: a fetch happens after the
router's ids were read back, which forces every earlier kernel (all readers
of the pool so far) to finish.

A fetch needing more experts than the pool has slots (a long prompt's layer),
and a prompt's fetch when the pool is too large for MLX's `gather_qmm` (32-bit
offsets), get a compact batch instead: cached experts copied from the pool on
the device, the others read into it, nothing evicted.

When the pool holds every expert of every layer (`resident_batch`), decode
looks the router's choice up in a table in GPU memory, with no round trip to
the host: the all-in-GPU-memory case runs like a resident model.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import FlashMoeError
from . import format as fmt
from .source import ExpertBatch
from .store import ExpertStore, read_full



def parse_cache_size(value: str | int | float | None, *, slot_bytes: int, total_slots: int,
                     free_bytes: int | None) -> int:
    """Slots for a cache size given as 'auto', 'off'/'0', '50%' (of all experts), '40GB'/'512MB', or a slot count.

    'auto' takes the GPU memory that is free (`free_bytes`) less 8 GiB of headroom for
    activations, caches and MLX's own pool, and never more slots than experts (`wrap_store`
    also keeps one layer's experts free for the compact batches of long prompts)."""
    v = "auto" if value is None else str(value).strip().lower()
    if v in ("", "auto"):
        if free_bytes is None:
            return 0
        return max(0, min(total_slots, (free_bytes - (8 << 30)) // slot_bytes))
    if v in ("off", "0", "none", "no", "false"):
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|gb|gib|mb|mib|g|m)?", v)
    if not m:
        raise FlashMoeError(f"FLASHMOE_GPU_CACHE={value!r} is not a size: use auto, off, a percentage of the "
                            "experts (50%), a size (40GB, 512MB) or a number of expert slots.")
    n, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        slots = int(total_slots * n / 100)
    elif unit in ("gb", "g"):
        slots = int(n * 1e9) // slot_bytes
    elif unit == "gib":
        slots = int(n * (1 << 30)) // slot_bytes
    elif unit in ("mb", "m"):
        slots = int(n * 1e6) // slot_bytes
    elif unit == "mib":
        slots = int(n * (1 << 20)) // slot_bytes
    else:
        slots = int(n)
    return max(0, min(total_slots, slots))


class PoolBuffers:
    """Nine stacked component arrays of `rows` experts, and where each row of each lives."""

    def __init__(self, typed: list, address: list[int] | None = None, host: list[np.ndarray] | None = None,
                 keep: list | None = None):
        self.typed = typed      # per component: mx.array [rows, *shape]
        self.address = address  # per component: device address of row 0 (CUDA)
        self.host = host        # per component: uint8 numpy view of the whole buffer (host-writable memory)
        self._keep = keep or []


class HostTransport:
    """Read straight into host-writable MLX memory (CPU, unified memory)."""

    name = "host"

    def __init__(self, threads: int = 4):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flashmoe-cache") if threads > 1 else None

    def alloc(self, components: list[fmt.Component], rows: int, dtypes: list) -> PoolBuffers:
        import mlx.core as mx

        typed, host, keep = [], [], []
        for c, dt in zip(components, dtypes):
            raw = mx.zeros((rows * c.nbytes,), mx.uint8)
            mx.eval(raw)
            view = np.array(raw, copy=False)
            if not view.flags.writeable:
                raise FlashMoeError("the GPU expert cache's host transport needs host-writable MLX memory.")
            t = raw.view(dt).reshape(rows, *c.shape)
            mx.eval(t)
            typed.append(t)
            host.append(view)
            keep.append(raw)
        return PoolBuffers(typed, host=host, keep=keep)

    def load(self, store: ExpertStore, layer: int, expert_ids, buf: PoolBuffers, rows) -> int:
        comps, m = store.components, store.manifest
        fd, base, stride, nbytes = store.fds[layer], m.header_bytes, m.expert_stride, m.expert_bytes
        jobs = []
        for e, r in zip(expert_ids, rows):
            views = [memoryview(h[int(r) * c.nbytes:(int(r) + 1) * c.nbytes]) for h, c in zip(buf.host, comps)]
            jobs.append((fd, views, base + int(e) * stride, nbytes, store.probe))
        if self._pool is None or len(jobs) < 2:
            return sum(read_full(*j) for j in jobs)
        return sum(self._pool.map(lambda j: read_full(*j), jobs))

    def copy_rows(self, src: PoolBuffers, src_rows, dst: PoolBuffers, dst_rows, components) -> None:
        for hs, hd, c in zip(src.host, dst.host, components):
            for a, b in zip(src_rows, dst_rows):
                hd[int(b) * c.nbytes:(int(b) + 1) * c.nbytes] = hs[int(a) * c.nbytes:(int(a) + 1) * c.nbytes]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class CudaTransport:
    """Pinned host buffers + `cudaMemcpyAsync` into device memory, one stream per worker."""

    def __init__(self, threads: int | None = None, piece_bytes: int | None = None, rt=None, native: bool = True):
        from . import cuda
        from .native import PIECE_CAP

        piece_bytes = piece_bytes or PIECE_CAP
        self.rt = rt or cuda.runtime()
        self.threads = threads or max(4, min(16, os.cpu_count() or 8))
        self.piece = piece_bytes
        self._local = threading.local()
        self._workers: list = []  # (stream, [pinned ptr x2], [event x2]) per worker thread
        self._lock = threading.Lock()
        self._pool = None
        self._d2d = None  # the stream of device-to-device copies (copy_rows), made on first use
        self._native = self._native_pinned = None
        lib = None
        if native:
            from . import native as nat

            lib = nat.load()
        if lib is not None:  # the C pool (native.py says why)
            memcpy_async, stream_sync = self.rt.native_functions(lib)
            self._native_pinned = [self.rt.host_alloc(piece_bytes) for _ in range(2 * self.threads)]
            streams = [self.rt.stream() for _ in range(self.threads)]
            self._native = nat.NativeUploader(lib, self.threads, piece_bytes, self._native_pinned, streams,
                                              memcpy_async, stream_sync)
        else:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="flashmoe-upload")

    @property
    def name(self) -> str:
        return "cuda-native" if self._native is not None else "cuda-python"

    def _piece_for(self, n: int, size: int) -> int:
        from .native import piece_for

        return piece_for(n, size, self.threads, self.piece)

    def _worker(self):
        w = getattr(self._local, "w", None)
        if w is None:
            rt = self.rt
            w = self._local.w = [rt.stream(), [rt.host_alloc(self.piece) for _ in range(2)],
                                 [rt.event() for _ in range(2)], 0, [False, False]]
            with self._lock:
                self._workers.append(w)
        return w

    def alloc(self, components: list[fmt.Component], rows: int, dtypes: list) -> PoolBuffers:
        import mlx.core as mx

        from .cuda import device_address

        typed, address = [], []
        for c, dt in zip(components, dtypes):
            # a row of room behind the last (engine/linear.py's with_room: MLX's gather_qmm reads past it)
            t = mx.zeros((rows + 1, *c.shape), dt)[:rows]
            mx.eval(t)
            typed.append(t)
            address.append(device_address(t))  # plain device memory; the host never asks for it
        return PoolBuffers(typed, address=address)

    def _pieces(self, store: ExpertStore, layer: int, expert_ids, buf: PoolBuffers, rows) -> list:
        """(fd, file offset, nbytes, [(dst address, offset in piece, nbytes)]) per piece."""
        comps, m = store.components, store.manifest
        fd, base, stride, size = store.fds[layer], m.header_bytes, m.expert_stride, m.expert_bytes
        piece = self._piece_for(len(expert_ids), size)
        out = []
        for e, r in zip(expert_ids, rows):
            start = base + int(e) * stride
            for p0 in range(0, size, piece):
                p1 = min(size, p0 + piece)
                segs = []
                for c, addr in zip(comps, buf.address):
                    a, b = max(p0, c.offset), min(p1, c.offset + c.nbytes)
                    if a < b:
                        segs.append((addr + int(r) * c.nbytes + (a - c.offset), a - p0, b - a))
                out.append((fd, start + p0, p1 - p0, segs))
        return out

    def _run(self, pieces, probe: bool) -> int:
        """Read and queue the copies of `pieces` on this thread's stream; page-cache hits in bytes."""
        from .cuda import host_view

        rt = self.rt
        w = self._worker()
        stream, pinned, events = w[0], w[1], w[2]
        hit_bytes = 0
        for fd, offset, nbytes, segs in pieces:
            k = w[3]
            w[3] ^= 1
            if w[4][k]:
                rt.wait_event(events[k])  # the copy out of this buffer is done
            view = host_view(pinned[k], nbytes)
            if read_full(fd, [view], offset, nbytes, probe):
                hit_bytes += nbytes
            for dst, off, n in segs:
                rt.copy_async(dst, pinned[k] + off, n, stream)
            rt.record(events[k], stream)
            w[4][k] = True
        rt.sync_stream(stream)
        w[4] = [False, False]
        return hit_bytes

    def copy_rows(self, src: PoolBuffers, src_rows, dst: PoolBuffers, dst_rows, components) -> None:
        """Device-to-device copies of whole rows (experts) between pools."""
        from .cuda import cudaMemcpyDeviceToDevice

        if self._d2d is None:
            self._d2d = self.rt.stream()
        for sa, da, c in zip(src.address, dst.address, components):
            for a, b in zip(src_rows, dst_rows):
                self.rt.copy_async(da + int(b) * c.nbytes, sa + int(a) * c.nbytes, c.nbytes, self._d2d,
                                   cudaMemcpyDeviceToDevice)
        self.rt.sync_stream(self._d2d)

    def load(self, store: ExpertStore, layer: int, expert_ids, buf: PoolBuffers, rows) -> int:
        m = store.manifest
        if self._native is not None:
            ids = np.asarray(expert_ids, np.int64)
            hit_bytes = self._native.run(store.fds[layer], m.header_bytes + ids * m.expert_stride, np.asarray(rows),
                                         m.expert_bytes, store.components, buf.address,
                                         self._piece_for(len(ids), m.expert_bytes), store.probe)
            return int(round(hit_bytes / m.expert_bytes))
        pieces = self._pieces(store, layer, expert_ids, buf, rows)
        if not pieces:
            return 0
        parts = min(self.threads, len(pieces))
        futures = [self._pool.submit(self._run, pieces[k::parts], store.probe) for k in range(parts)]
        hit_bytes = sum(f.result() for f in futures)
        # in whole experts, as the store counts hits
        return int(round(hit_bytes / store.manifest.expert_bytes))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._native is not None:
            self._native.close()
            self._native = None
            for p in self._native_pinned:
                self.rt.free_host(p)
        for w in self._workers:
            for p in w[1]:
                self.rt.free_host(p)
        self._workers = []


def transport_kind() -> str | None:
    """'cuda' where MLX runs on CUDA, 'host' when FLASHMOE_CACHE_TRANSPORT=host forces the
    host transport (unified memory, tests), else None: no GPU expert cache."""
    import mlx.core as mx

    want = os.environ.get("FLASHMOE_CACHE_TRANSPORT", "auto").strip().lower()
    if want == "host":
        return "host"
    if want not in ("", "auto", "cuda"):
        raise FlashMoeError(f"FLASHMOE_CACHE_TRANSPORT={want!r}: use auto, cuda or host.")
    if mx.default_device() == mx.cpu or not mx.cuda.is_available():
        return None
    return "cuda"


def default_transport():
    """The transport of `transport_kind()`, or None."""
    kind = transport_kind()
    return HostTransport() if kind == "host" else CudaTransport() if kind == "cuda" else None


class ExpertCache:
    """An `ExpertSource`: `slots` experts of any layers kept in GPU memory, the rest from `store`."""

    def __init__(self, store: ExpertStore, slots: int, transport=None):
        import mlx.core as mx

        self.store = store
        m = store.manifest
        self.num_experts, self.layers = m.num_experts, len(m.layers)
        self.slots = int(slots)
        if self.slots < 1:
            raise FlashMoeError("the GPU expert cache needs at least one slot.")
        self.transport = transport or CudaTransport()
        self.stats = store.stats
        dt = store.dtype
        self._dtypes = []
        for c in store.components:
            want = {"uint32": mx.uint32, "bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[c.dtype]
            self._dtypes.append(want)
        self._scale_dtype = dt
        self.pool = self.transport.alloc(store.components, self.slots, self._dtypes)
        # Scales stored in another dtype than the compute dtype (bf16 files, float32 on the CPU) are
        # converted per fetch: a conversion made once would keep the pool's contents of that moment.
        self._convert = any(d != dt for c, d in zip(store.components, self._dtypes) if not c.name.endswith("weight"))
        self._pool_linears = None if self._convert else self._linears(self.pool, self.slots)
        self._overflow: PoolBuffers | None = None
        self.key = np.full(self.slots, -1, np.int64)                         # slot -> layer * E + expert
        self.where = np.full(self.layers * self.num_experts, -1, np.int64)   # layer * E + expert -> slot
        self.uses = np.zeros(self.slots, np.int64)
        self.last = np.zeros(self.slots, np.int64)
        self.clock = 0
        self.upload_seconds = 0.0
        self.filled = 0  # slots holding an expert
        # MLX's gather_qmm (prompt processing) addresses a stack with 32-bit offsets: a pool
        # larger than this many rows is handed to it as a compact copy of the rows needed.
        self.max_gather_rows = (2**31 - 1) // max(c.nbytes for c in store.components)
        self._device_lookup = None
        # resident_batch's answers per layer, kept while the table they index stays the same
        self._batches: dict = {}
        self._batches_table = self._batches_linears = None
        # Host tier (enable_host_tier): every expert's nine part addresses, GPU slot or pinned page cache.
        self.host_tier = False
        self._table: np.ndarray | None = None   # uint64 [layers, E, 9]
        self._device_table = None
        self._registered: list[int] = []

    def _linears(self, buf: PoolBuffers, n: int):
        from ..engine.linear import Linear

        a = [t[:n] if t.shape[0] != n else t for t in buf.typed]
        out = []
        for p in range(3):
            w, s, b = a[3 * p: 3 * p + 3]
            if s.dtype != self._scale_dtype:
                s, b = s.astype(self._scale_dtype), b.astype(self._scale_dtype)
            out.append(Linear(w, s, b, self.store._bits, self.store._group))
        return out

    @property
    def resident_experts(self) -> int:
        return int((self.key >= 0).sum())

    def resident_batch(self, layer: int) -> ExpertBatch | None:
        """When the pool holds every expert of every layer: the pool with a lookup table in GPU
        memory, so that decode needs no round trip to the host for the router's choice.
        With the host tier: always, the table holding each expert's part addresses."""
        import mlx.core as mx

        if self.host_tier and self.filled < self.layers * self.num_experts:
            if self._device_table is None:
                self._device_table = mx.array(self._table)
            return self._batch(layer, self._device_table, all_in_gpu=False)
        if self.filled < self.layers * self.num_experts:
            return None
        if self._device_lookup is None:
            self._device_lookup = mx.array(self.where.reshape(self.layers, self.num_experts).astype(np.int32))
        return self._batch(layer, self._device_lookup, all_in_gpu=True)

    def _batch(self, layer: int, table, all_in_gpu: bool) -> ExpertBatch:
        """Layer `layer`'s batch over the whole pool with its row of `table` (the device lookup or
        the host tier's addresses), kept until the table is replaced: decode asks for it every
        token, and compiled decode steps are keyed on the stacks it hands out."""
        if self._batches_table is not table:
            self._batches_table, self._batches = table, {}
            self._batches_linears = self._pool_linears or self._linears(self.pool, self.slots)
        batch = self._batches.get(layer)
        if batch is None:
            g, u, d = self._batches_linears
            E = self.num_experts
            batch = self._batches[layer] = ExpertBatch(g, u, d, self.where[layer * E:(layer + 1) * E].astype(np.int32),
                                                       table[layer], all_in_gpu=all_in_gpu)
        return batch

    def preload(self, progress=None) -> None:
        """Read experts into the pool, layer by layer, until it is full (all of them if they fit)."""
        step = max(1, min(self.slots, 64))
        for layer in range(self.layers):
            if self.filled >= self.slots:
                break
            for i in range(0, self.num_experts, step):
                if self.filled >= self.slots:
                    break
                ids = np.arange(i, min(i + step, self.num_experts, i + self.slots - self.filled))
                self.fetch(layer, ids)
                if progress is not None:
                    progress(self.filled)

    def fetch(self, layer: int, expert_ids: np.ndarray, *, gather: bool = False,
              host_rows: bool = False) -> ExpertBatch:
        ids = np.asarray(expert_ids, np.int64)
        n, E = len(ids), self.num_experts
        s = self.stats
        s.experts += n
        if n > self.slots or (gather and self.slots > self.max_gather_rows):
            return self._fetch_compact(layer, ids)
        keys = layer * E + ids
        slots = self.where[keys]
        hit = slots >= 0
        s.gpu_hits += int(hit.sum())
        miss = np.flatnonzero(~hit)
        if len(miss):
            score = self.uses * 10 + self.last
            score[self.key < 0] = -1                       # empty slots first
            score[slots[hit]] = np.iinfo(np.int64).max      # never evict what this fetch uses
            victims = np.argpartition(score, len(miss) - 1)[: len(miss)] if len(miss) < self.slots \
                else np.arange(self.slots)
            old = self.key[victims]
            self.where[old[old >= 0]] = -1
            self.filled += int((old < 0).sum())
            self.key[victims] = keys[miss]
            self.where[keys[miss]] = victims
            self.uses[victims] = 0
            slots[miss] = victims
            self._load(layer, ids[miss], self.pool, victims)
            if self.host_tier:
                self._retable(np.concatenate([old[old >= 0], keys[miss]]))
        self.clock += 1
        self.uses[slots] += 1
        self.last[slots] = self.clock
        lookup = np.full(E, -1, np.int32)
        lookup[ids] = slots
        g, u, d = self._pool_linears or self._linears(self.pool, self.slots)
        return ExpertBatch(g, u, d, lookup)

    # -- host tier: misses read by the kernels from pinned page cache --------------
    def enable_host_tier(self) -> bool:
        """Let decode's MoE kernels read the experts the pool lacks straight from the page cache
        (the layer files mapped read-only and pinned with cudaHostRegister; host memory itself with
        the host transport), over the bus, with no upload and no round trip to the host: the
        router's choice becomes a row of a table of part addresses, in GPU memory. Needs every
        layer file in RAM (pinning reads in what is missing) and no scale conversion. False (with
        nothing changed) where that cannot be had."""
        if self.host_tier:
            return True
        if self._convert or self._pool_linears is None:
            return False
        store, m = self.store, self.store.manifest
        size = m.layer_file_bytes()
        bases = []
        try:
            for layer in range(self.layers):
                bases.append(store.mapped_layer(layer))
                if bases[-1] == 0:
                    raise FlashMoeError(f"mmap of {store.dir / m.layers[layer].file} failed")
                if hasattr(self.transport, "rt"):
                    self.transport.rt.register_host(bases[-1], size)
                    self._registered.append(bases[-1])
        except FlashMoeError as e:
            self._unregister()
            print(f"flashmoe: host tier off ({e})", file=sys.stderr)
            return False
        if self._registered:
            print(f"flashmoe: host tier on: {len(bases) * size / 1e9:.1f} GB of expert files pinned in the page "
                  "cache for the GPU (FLASHMOE_HOST_TIER=off to keep them unpinned)", file=sys.stderr)
        comps = store.components
        offs = np.array([c.offset for c in comps], np.uint64)
        E = self.num_experts
        files = np.array(bases, np.uint64)[:, None, None] + np.uint64(m.header_bytes)
        files = files + (np.arange(E, dtype=np.uint64) * np.uint64(m.expert_stride))[None, :, None]
        self._host_addresses = files + offs[None, None, :]                     # [L, E, 9]
        self._slot_base = np.array(self._pool_addresses(), np.uint64)          # [9]
        self._slot_bytes = np.array([c.nbytes for c in comps], np.uint64)
        self._table = self._host_addresses.copy()
        self.host_tier = True
        self._retable(np.flatnonzero(self.where >= 0))
        return True

    def _pool_addresses(self) -> list[int]:
        if self.pool.address is not None:
            return list(self.pool.address)
        return [h.__array_interface__["data"][0] for h in self.pool.host]

    def _retable(self, keys: np.ndarray) -> None:
        """Table entries of `keys` (layer * E + expert): their slot, or the pinned page cache."""
        if len(keys) == 0:
            return
        t = self._table.reshape(-1, len(self._slot_base))
        slots = self.where[keys]
        cached = slots >= 0
        t[keys] = self._host_addresses.reshape(-1, len(self._slot_base))[keys]
        if cached.any():
            t[keys[cached]] = self._slot_base[None, :] + slots[cached].astype(np.uint64)[:, None] * self._slot_bytes[None, :]
        self._device_table = None  # uploaded again by the next decode step

    def _unregister(self) -> None:
        for base in self._registered:
            self.transport.rt.unregister_host(base)
        self._registered = []

    def _load(self, layer: int, ids: np.ndarray, buf: PoolBuffers, rows) -> None:
        s = self.stats
        nbytes = self.store.manifest.expert_bytes
        t0 = time.perf_counter()
        s.cache_hits += self.transport.load(self.store, layer, ids, buf, rows)
        dt = time.perf_counter() - t0
        s.bytes += len(ids) * nbytes
        s.read_seconds += dt
        self.upload_seconds += dt
        if self.store.trace is not None:
            self.store.trace.append((layer, np.array(ids, copy=True)))

    def _overflow_buffers(self) -> PoolBuffers:
        if self._overflow is None:
            self._overflow = self.transport.alloc(self.store.components, self.num_experts, self._dtypes)
        return self._overflow

    def _fetch_compact(self, layer: int, ids: np.ndarray) -> ExpertBatch:
        """`ids` in rows 0..n-1 of the overflow buffer: cached ones copied from the pool, the rest read."""
        buf = self._overflow_buffers()
        slots = self.where[layer * self.num_experts + ids]
        hit = slots >= 0
        self.stats.gpu_hits += int(hit.sum())
        rows = np.arange(len(ids))
        if hit.any():
            self.transport.copy_rows(self.pool, slots[hit], buf, rows[hit], self.store.components)
        if not hit.all():
            self._load(layer, ids[~hit], buf, rows[~hit])
        g, u, d = self._linears(buf, len(ids))
        lookup = np.full(self.num_experts, -1, np.int32)
        lookup[ids] = rows
        return ExpertBatch(g, u, d, lookup)

    def prefetch(self, layer: int, expert_ids: np.ndarray) -> None:
        """Announce probable experts of `layer`: those not in the pool go to the store's read-ahead."""
        ids = np.asarray(expert_ids, np.int64)
        missing = ids[self.where[layer * self.num_experts + ids] < 0]
        if len(missing):
            self.store.prefetch(layer, missing)

    def drop_page_cache(self) -> None:
        self.store.drop_page_cache()

    def clear(self) -> None:
        """Forget every cached expert (the pool's memory stays allocated)."""
        self.key[:] = -1
        self.where[:] = -1
        self.uses[:] = 0
        self.last[:] = 0
        self.filled = 0
        self._device_lookup = None
        if self.host_tier:
            self._table = self._host_addresses.copy()
            self._device_table = None

    def close(self) -> None:
        self._device_table = None
        self._unregister()
        self.host_tier = False
        self.transport.close()
        self.store.close()


def wrap_store(store: ExpertStore, setting: str | None = None):
    """`store`, or an `ExpertCache` in front of it where a GPU cache applies (CUDA, size not off).

    `setting`: FLASHMOE_GPU_CACHE's syntax (see `parse_cache_size`); default: that variable, else 'auto'."""
    setting = os.environ.get("FLASHMOE_GPU_CACHE", "auto") if setting is None else setting
    if str(setting).strip().lower() in ("off", "0", "none", "no", "false"):
        return store
    transport = default_transport()
    if transport is None:
        return store
    m = store.manifest
    free = transport.rt.mem_info()[0] if hasattr(transport, "rt") else None
    if free is not None:  # room for the compact batch of a long prompt's layer, allocated later
        free -= m.num_experts * m.expert_bytes
    slots = parse_cache_size(setting, slot_bytes=m.expert_bytes, total_slots=m.num_experts * len(m.layers),
                             free_bytes=free)
    if slots < 1:
        transport.close()
        return store
    cache = ExpertCache(store, slots, transport)
    if slots < m.num_experts * len(m.layers) and host_tier_wanted(m.layer_file_bytes() * len(m.layers)):
        cache.enable_host_tier()
    return cache


def host_tier_wanted(expert_bytes: int) -> bool:
    """FLASHMOE_HOST_TIER: auto (default: on where every expert file fits in half the RAM) | on | off.

    The first decode step of a process stalls for ~20 s on the H200 with the tier or without it
    (`kernels.overhead decode`: 21.3 and 19.8 s in two processes in a row, the second with MLX's
    kernel cache filled by the first; cause under study). An earlier reading blamed the tier;
    `gpu_bench firstuse` found registering 3.6 GB of page cache takes 0.1-0.2 s (the pages are
    pinned then) and a kernel's first read through it 0.2-0.5 ms."""
    want = os.environ.get("FLASHMOE_HOST_TIER", "auto").strip().lower()
    if want in ("off", "0", "no", "false"):
        return False
    if want in ("on", "1", "yes", "true"):
        return True
    if want not in ("", "auto"):
        raise FlashMoeError(f"FLASHMOE_HOST_TIER={want!r}: use auto, on or off.")
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return False
    return expert_bytes <= ram // 2
