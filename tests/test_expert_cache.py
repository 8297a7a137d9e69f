"""The GPU expert cache's slot pool, run on the CPU through its host transport.

The CUDA transport differs only in how bytes reach a slot (pinned buffer +
cudaMemcpyAsync); slot choice, eviction, lookup and the MoE reading the pool
by slot are this same code, checked here against the uncached store.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.engine.load import load_model
from llm_flashmoe.errors import FlashMoeError
from llm_flashmoe.experts import convert as conv
from llm_flashmoe.experts.cache import ExpertCache, HostTransport, parse_cache_size, wrap_store
from llm_flashmoe.experts.store import ExpertStore

PROMPT = np.random.default_rng(5).integers(0, 248000, 24).tolist()


@pytest.fixture(scope="module")
def packed(tiny_mlx, tmp_path_factory):
    return conv.convert_checkpoint(tiny_mlx, tmp_path_factory.mktemp("cache") / "packed", progress=False)


def run(model, steps=6):
    """Logits of a 4-token chunk, a 20-token chunk (the sorted MoE path), then greedy decode steps."""
    cache = model.make_cache()
    outs = [model(PROMPT[:4], cache), model(PROMPT[4:], cache)]
    token = int(mx.argmax(outs[-1][-1]))
    for _ in range(steps):
        outs.append(model([token], cache))
        token = int(mx.argmax(outs[-1][-1]))
    return outs


def with_cache(model, slots):
    model.experts = cache = ExpertCache(model.experts, slots, HostTransport(threads=2))
    for layer in model.layers:
        layer.moe.experts = cache
    return cache


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_logits_identical_with_cache_on_and_off(packed, fraction):
    plain = load_model(packed, dtype=mx.float32, gpu_cache="off")
    assert isinstance(plain.experts, ExpertStore)  # no GPU here: nothing wraps the store
    ref = run(plain)
    model = load_model(packed, dtype=mx.float32)
    m = model.experts.manifest
    slots = max(8, int(fraction * m.num_experts * len(m.layers)))
    cache = with_cache(model, slots)
    got = run(model)
    # twice over the same state: the second pass is served (partly) from the pool
    got2 = run(model)
    for r, a, b in zip(ref, got, got2):
        assert mx.array_equal(r, a).item() and mx.array_equal(r, b).item()
    s = cache.stats
    assert s.gpu_hits > 0
    assert s.bytes == (s.experts - s.gpu_hits) * m.expert_bytes
    assert cache.resident_experts <= slots
    # the bookkeeping is a bijection between cached keys and slots
    used = cache.key[cache.key >= 0]
    assert len(set(used.tolist())) == len(used)
    assert all(cache.where[k] == s_ for s_, k in enumerate(cache.key) if k >= 0)
    assert (cache.where >= 0).sum() == len(used)
    plain.experts.close()
    cache.close()


def test_pool_rows_hold_the_experts_bytes(packed):
    model = load_model(packed, dtype=mx.float32)
    store = model.experts
    cache = ExpertCache(store, 16, HostTransport(threads=1))
    ids = np.array([3, 9, 60])
    batch = cache.fetch(2, ids)
    ref = store.fetch(2, ids)
    for k, e in enumerate(ids):
        row = int(batch.lookup[e])
        for lin, rlin in ((batch.gate, ref.gate), (batch.up, ref.up), (batch.down, ref.down)):
            r = int(ref.lookup[e])
            assert mx.array_equal(lin.weight[row], rlin.weight[r]).item()
            assert mx.array_equal(lin.scales[row], rlin.scales[r]).item()
            assert mx.array_equal(lin.biases[row], rlin.biases[r]).item()
    assert (batch.lookup >= 0).sum() == 3
    cache.close()


def test_frequency_weighted_eviction(packed):
    model = load_model(packed, dtype=mx.float32)
    cache = ExpertCache(model.experts, 4, HostTransport(threads=1))
    for _ in range(3):                      # expert 1 of layer 0: used often
        cache.fetch(0, np.array([1]))
    cache.fetch(0, np.array([2, 3, 4]))     # pool full: 1 (3 uses), 2, 3, 4 (1 use each)
    cache.fetch(0, np.array([5]))           # evicts the least valuable: 2 (oldest of the single uses)
    cached = {int(k) for k in cache.key if k >= 0}
    assert cached == {1, 3, 4, 5}
    before = cache.stats.gpu_hits
    b = cache.fetch(0, np.array([1, 5]))    # both hits, nothing read
    assert cache.stats.gpu_hits - before == 2
    assert b.lookup[1] >= 0 and b.lookup[5] >= 0
    # a fetch never evicts an expert it uses itself: 3 misses with 1 hit in a 4-slot pool
    b = cache.fetch(1, np.array([1, 7, 8]))
    b2 = cache.fetch(0, np.array([1, 10, 11, 12]))
    assert len({int(b2.lookup[e]) for e in (1, 10, 11, 12)}) == 4
    # layers are separate keys: expert 1 of layer 1 is not expert 1 of layer 0
    assert cache.where[0 * cache.num_experts + 1] != cache.where[1 * cache.num_experts + 1] or \
        cache.where[1 * cache.num_experts + 1] == -1
    cache.close()


def test_fetch_larger_than_the_pool_bypasses_it(packed):
    model = load_model(packed, dtype=mx.float32)
    store = model.experts
    cache = ExpertCache(store, 4, HostTransport(threads=2))
    ids = np.arange(0, 40, 3)
    batch = cache.fetch(1, ids)
    ref = store.fetch(1, ids)
    for e in ids:
        a, r = int(batch.lookup[e]), int(ref.lookup[e])
        assert mx.array_equal(batch.down.weight[a], ref.down.weight[r]).item()
    assert cache.resident_experts == 0  # nothing was cached
    cache.close()


def test_cache_size_parsing():
    kw = dict(slot_bytes=1000, total_slots=400)
    assert parse_cache_size("50%", free_bytes=None, **kw) == 200
    assert parse_cache_size("off", free_bytes=10**12, **kw) == 0
    assert parse_cache_size("0.2MB", free_bytes=None, **kw) == 200
    assert parse_cache_size("250", free_bytes=None, **kw) == 250
    assert parse_cache_size("9999", free_bytes=None, **kw) == 400          # never more slots than experts
    assert parse_cache_size("auto", free_bytes=None, **kw) == 0            # no GPU memory figure: no cache
    assert parse_cache_size("auto", free_bytes=(8 << 30) + 5000, **kw) == 5
    with pytest.raises(FlashMoeError, match="FLASHMOE_GPU_CACHE"):
        parse_cache_size("lots", free_bytes=None, **kw)


def test_no_gpu_cache_on_the_cpu(packed, monkeypatch):
    monkeypatch.setenv("FLASHMOE_GPU_CACHE", "50%")
    model = load_model(packed, dtype=mx.float32)
    assert isinstance(model.experts, ExpertStore)      # the page cache is the cache here
    assert wrap_store(model.experts, "100%") is model.experts
    model.experts.close()


class HostMemoryRuntime:
    """The CUDA runtime calls of CudaTransport carried out in host memory (memmove for
    cudaMemcpyAsync), so that its piece splitting, double buffering and per-thread
    streams run here; on the GPU the same code drives the real runtime."""

    def __init__(self):
        import ctypes

        self.ctypes, self._bufs, self.copies = ctypes, {}, 0

    def host_alloc(self, n):
        b = self.ctypes.create_string_buffer(n)
        self._bufs[self.ctypes.addressof(b)] = b
        return self.ctypes.addressof(b)

    def free_host(self, p):
        self._bufs.pop(p)

    def stream(self):
        return 0

    def event(self):
        return 0

    def record(self, e, s):
        pass

    def wait_event(self, e):
        pass

    def sync_stream(self, s):
        pass

    def copy_async(self, dst, src, n, stream, kind=None):
        self.ctypes.memmove(dst, src, n)
        self.copies += 1

    def native_functions(self, lib):
        from llm_flashmoe.experts.native import host_functions

        return host_functions(lib)


@pytest.mark.parametrize("native", [False, True], ids=["python", "c"])
def test_cuda_transport_pieces_land_in_the_right_slots(packed, native):
    from llm_flashmoe.experts.cache import CudaTransport
    from llm_flashmoe.experts.native import load

    class Transport(CudaTransport):
        def alloc(self, components, rows, dtypes):
            buf = HostTransport(threads=1).alloc(components, rows, dtypes)
            buf.address = [h.__array_interface__["data"][0] for h in buf.host]
            return buf

    rt = HostMemoryRuntime()
    # pieces of 5000 bytes: not a divisor of any component, so pieces straddle components
    transport = Transport(threads=3, piece_bytes=5000, rt=rt, native=native)
    assert transport.name == ("cuda-native" if native else "cuda-python")
    assert load() is not None, load.error  # the C engine builds here (gcc in CI)
    plain = load_model(packed, dtype=mx.float32, gpu_cache="off")
    ref = run(plain)
    model = load_model(packed, dtype=mx.float32)
    m = model.experts.manifest
    cache = model.experts = ExpertCache(model.experts, m.num_experts * len(m.layers) // 4, transport)
    for layer in model.layers:
        layer.moe.experts = cache
    got = run(model)
    for r, a in zip(ref, got):
        assert mx.array_equal(r, a).item()
    if not native:
        assert rt.copies > cache.stats.bytes // 5000
    assert cache.stats.cache_hits > 0  # page-cache hits counted in whole experts
    plain.experts.close()
    cache.close()
    assert not rt._bufs  # every pinned buffer freed


def test_prompt_batches_are_compact_when_the_pool_is_too_large_for_gather(packed):
    plain = load_model(packed, dtype=mx.float32, gpu_cache="off")
    ref = run(plain)
    model = load_model(packed, dtype=mx.float32)
    m = model.experts.manifest
    cache = with_cache(model, m.num_experts * len(m.layers) // 2)
    cache.max_gather_rows = 8          # stands for 2**31 bytes: every prompt fetch goes compact
    for _ in range(2):
        got = run(model)
        for r, a in zip(ref, got):
            assert mx.array_equal(r, a).item()
    assert cache.stats.gpu_hits > 0
    plain.experts.close()
    cache.close()


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_a_full_pool_decodes_without_host_lookups(packed, monkeypatch, compiled):
    # the fused decode path with the kernels' plain twins (the GPU's code path, run here),
    # and its decode steps compiled (FLASHMOE_COMPILE, on by default on GPUs)
    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.setenv("FLASHMOE_COMPILE", "0")
    plain = load_model(packed, dtype=mx.float32, gpu_cache="off")
    ref = run(plain)
    monkeypatch.setenv("FLASHMOE_COMPILE", compiled)
    model = load_model(packed, dtype=mx.float32)
    m = model.experts.manifest
    cache = with_cache(model, m.num_experts * len(m.layers))
    assert cache.resident_batch(0) is None
    cache.preload()
    assert cache.filled == cache.slots and cache.resident_batch(0) is not None
    fetches = []
    cache.fetch = lambda *a, **k: fetches.append(a) or ExpertCache.fetch(cache, *a, **k)
    hits0 = cache.stats.gpu_hits
    got = run(model)
    for r, a in zip(ref, got):
        assert mx.array_equal(r, a).item()
    # the two prompt chunks fetched (one per layer each); the decode steps never did
    assert len(fetches) == 2 * len(model.layers)
    # compiled: every layer's MoE (with the GatedDeltaNet mixer where there is one) is one graph
    kinds = sorted(key[0] for layer in model.layers for key in layer._compiled)
    assert kinds == ([] if compiled == "0" else sorted("attn" if not l.is_linear else "layer" for l in model.layers))
    # decode's hits are counted on the host, compiled or not: K per layer per step at least
    assert cache.stats.gpu_hits - hits0 >= 6 * len(model.layers) * model.experts_per_token
    plain.experts.close()
    cache.close()


def test_host_tier_decodes_misses_from_the_page_cache_by_address(packed, monkeypatch):
    # Decode never waits for the host: the router's choice selects rows of a table of part
    # addresses (pool slot, or the layer file's mapping), read by the kernels' twins here.
    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    plain = load_model(packed, dtype=mx.bfloat16, gpu_cache="off")
    def run(model, steps=3):  # short: bfloat16 on the CPU is slow
        cache = model.make_cache()
        outs = [model(PROMPT[:3], cache)]
        for _ in range(steps):
            outs.append(model([int(mx.argmax(outs[-1][-1]))], cache))
        return outs

    ref = run(plain)
    model = load_model(packed, dtype=mx.bfloat16)
    m = model.experts.manifest
    cache = with_cache(model, m.num_experts * len(m.layers) // 2)
    assert cache.resident_batch(0) is None            # partial pool, no tier: the host path
    assert cache.enable_host_tier()
    E = m.num_experts
    # every table entry points at the expert's bytes: its slot, or its place in the file
    table = cache._table.reshape(len(m.layers) * E, 9)
    for key in np.random.default_rng(0).choice(len(table), 12, replace=False):
        layer, e = divmod(int(key), E)
        want = ExpertStore.fetch(cache.store, layer, np.array([e]))
        for j, a in enumerate((want.gate.weight, want.gate.scales, want.gate.biases, want.up.weight, want.up.scales,
                               want.up.biases, want.down.weight, want.down.scales, want.down.biases)):
            raw = np.array(a[0].view(mx.uint8) if a.dtype != mx.bfloat16 else a[0].view(mx.uint16)).tobytes()
            assert ctypes.string_at(int(table[key, j]), len(raw)) == raw
    fetches = []
    cache.fetch = lambda *a, **k: fetches.append(a) or ExpertCache.fetch(cache, *a, **k)
    got = run(model)
    for r, a in zip(ref, got):
        assert mx.array_equal(r, a).item()
    assert len(fetches) == len(model.layers)          # the prompt only: decode never fetched
    assert cache.resident_batch(1).all_in_gpu is False
    plain.experts.close()
    cache.close()


@pytest.mark.parametrize("mode", ["full pool", "full pool, whole steps", "host tier"])
def test_device_resolved_caches_decode_pipelined(packed, monkeypatch, mode):
    """With the router's choice resolved on the device (a pool holding every expert, or the host
    tier's address table), generation is pipelined (each step built before the token before it is
    read back) and answers token for token as the step-by-step loop does, two turns in a row,
    fetching nothing while it decodes; also with each decode step one compiled graph of the
    whole model, the pool's lookup table one of its inputs."""
    from llm_flashmoe.engine.generate import Session
    from llm_flashmoe.engine.qwen35 import Qwen35Model
    from llm_flashmoe.engine.sampling import SamplingParams

    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.setenv("FLASHMOE_COMPILE", "1")
    whole = mode.endswith("whole steps")
    monkeypatch.setenv("FLASHMOE_COMPILE_ATTENTION", "1" if whole else "0")
    monkeypatch.setenv("FLASHMOE_COMPILE_STEP", "1" if whole else "0")
    mode = mode.split(",")[0]
    steps = []
    real = Qwen35Model.step
    monkeypatch.setattr(Qwen35Model, "step", lambda self, token, c: steps.append(1) or real(self, token, c))
    # (the host tier reads the files' bf16 scales in place: a bf16 model, slow on the CPU: short runs)
    model = load_model(packed, dtype=mx.float32 if mode == "full pool" else mx.bfloat16)
    n = 6 if mode == "full pool" else 3
    m = model.experts.manifest
    E = m.num_experts * len(m.layers)
    cache = with_cache(model, E if mode == "full pool" else E // 2)
    assert not model.pipelinable()                    # partial pool, no tier: the host decides
    if mode == "full pool":
        cache.preload()
    else:
        assert cache.enable_host_tier()
    assert model.pipelinable()
    fetches = []
    cache.fetch = lambda *a, **k: fetches.append(a) or ExpertCache.fetch(cache, *a, **k)
    greedy = SamplingParams(temperature=0.0)
    outs = {}
    for pipe in ("0", "auto"):
        monkeypatch.setenv("FLASHMOE_PIPELINE", pipe)
        steps.clear()
        fetches.clear()
        s = Session(model)
        first = list(s.generate(PROMPT[:6], max_tokens=n, params=greedy))
        second = list(s.generate(PROMPT[:6] + first + PROMPT[6:9], max_tokens=n, params=greedy))
        outs[pipe] = (first, second)
        # the prompts fetched (one fetch per layer per prompt chunk); decode never did
        assert len(fetches) == 2 * len(model.layers)
        assert bool(steps) == (pipe == "auto")
    assert outs["auto"] == outs["0"]
    # whole steps: one trace, through the pool's lookup tables (a key per layer: lookup or not)
    assert [k[3] for key in model.whole_step.traces for k in key] == ([True] * len(model.layers) if whole else [])
    cache.close()
