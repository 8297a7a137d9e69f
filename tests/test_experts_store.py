"""The expert store: what it reads, and every damaged directory refused before a token."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.bench import format_table, run_bench
from llm_flashmoe.engine.load import load_model
from llm_flashmoe.errors import FlashMoeError
from llm_flashmoe.experts import format as fmt
from llm_flashmoe.experts.convert import convert_checkpoint
from llm_flashmoe.experts.store import ExpertStore
from llm_flashmoe.experts.verify import main as verify_main
from llm_flashmoe.experts.verify import verify_model


def greedy(model, prompt, steps, cold=False):
    """Logits of the prompt, then of `steps` greedy decode steps (`cold`: each step's experts
    come from disk)."""
    cache = model.make_cache()
    out = [model(prompt, cache)]
    for _ in range(steps):
        if cold:
            model.experts.drop_page_cache()
        out.append(model([int(mx.argmax(out[-1][-1]))], cache))
    return out


@pytest.fixture(scope="module")
def packed(tiny_mlx, tmp_path_factory):
    return convert_checkpoint(tiny_mlx, tmp_path_factory.mktemp("store") / "packed", progress=False)


@pytest.fixture(scope="module")
def small_packed(tmp_path_factory):
    """The `small` synthetic model written packed: every expert part a multiple of 4 KiB (O_DIRECT)."""
    from llm_flashmoe.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("store") / "small", preset="small", layout="packed",
                           progress=False)


def _o_direct_opens(path) -> bool:
    """Whether the file system of `path` takes O_DIRECT (tmpfs does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


@pytest.fixture
def damaged(packed, tmp_path):
    """A private copy to break."""
    return shutil.copytree(packed, tmp_path / "copy")


@pytest.mark.parametrize("reader", ["c", "python"])
def test_fetch_returns_the_requested_experts_bit_exact(packed, tiny_mlx, reader, monkeypatch):
    monkeypatch.setenv("FLASHMOE_NATIVE_READS", "1" if reader == "c" else "0")
    ref = load_model(tiny_mlx, dtype=mx.float32).experts  # ResidentExperts
    store = ExpertStore(packed, dtype=mx.float32)
    assert (store._native is not None) == (reader == "c")
    ids = np.array([0, 5, 17, 63])
    batch = store.fetch(3, ids)
    assert batch.lookup[ids].tolist() == [0, 1, 2, 3] and (batch.lookup >= 0).sum() == 4
    gate, up, down = ref.layers[3]
    for got, full in ((batch.gate, gate), (batch.up, up), (batch.down, down)):
        for part in ("weight", "scales", "biases"):
            assert mx.array_equal(getattr(got, part), getattr(full, part)[mx.array(ids)]).item()
        assert (got.bits, got.group_size) == (full.bits, full.group_size)
    # The batch stays valid across the next fetch (two buffer sets alternate).
    other = store.fetch(4, np.array([1, 2]))
    assert mx.array_equal(batch.down.weight, down.weight[mx.array(ids)]).item()
    assert other.gate.weight.shape[0] == 2
    # The copying fallback (MLX memory not host-writable) reads the same bytes.
    copying = ExpertStore(packed, dtype=mx.float32, zero_copy=False)
    b2 = copying.fetch(3, ids)
    assert mx.array_equal(b2.up.scales, batch.up.scales).item()
    assert mx.array_equal(b2.down.weight, batch.down.weight).item()
    store.close()
    copying.close()


@pytest.mark.parametrize("reader", ["c", "python"])
def test_stats_and_page_cache_hits(packed, reader, monkeypatch):
    monkeypatch.setenv("FLASHMOE_NATIVE_READS", "1" if reader == "c" else "0")
    store = ExpertStore(packed, threads=2)
    ids = np.arange(0, 64, 3)  # 22 experts: enough bytes for the thread pool
    store.drop_page_cache()
    store.read_experts(1, ids)
    cold_hits = store.stats.cache_hits
    store.stats.reset()
    store.read_experts(1, ids)
    s = store.stats
    assert s.experts == len(ids) and s.bytes == len(ids) * store.manifest.expert_bytes and s.read_seconds > 0
    if store.hit_method == "RWF_NOWAIT":
        assert s.cache_hits == len(ids)  # just read: all from the page cache
        assert cold_hits < len(ids)
    store.close()


def test_truncated_expert_file_is_refused_before_any_token(damaged):
    path = damaged / fmt.layer_file_name(5)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(FlashMoeError, match="experts-005.bin is truncated"):
        load_model(damaged)
    report = verify_model(damaged, progress=False)
    assert not report.ok and "truncated" in str(report)


def test_flipped_byte_is_found_by_verify(damaged, capsys):
    assert verify_model(damaged, progress=False).ok
    m = fmt.read_manifest(damaged)
    path = damaged / fmt.layer_file_name(2)
    offset = m.header_bytes + 9 * m.expert_stride + 12345
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    report = verify_model(damaged, progress=False)
    assert not report.ok and report.experts_checked == len(m.layers) * m.num_experts
    assert len(report.problems) == 1 and "experts-002.bin: 1 expert(s) fail their checksum (9)" in report.problems[0]
    assert verify_main([str(damaged), "--no-progress"]) == 1
    assert "DAMAGED" in capsys.readouterr().out


def test_missing_manifest(damaged):
    (damaged / fmt.MANIFEST_NAME).unlink()
    with pytest.raises(FlashMoeError, match="experts.json is missing.*Re-convert"):
        load_model(damaged)
    assert fmt.conversion_status(damaged).startswith("incomplete: experts.json missing")


def test_manifest_from_another_conversion_of_the_same_config(damaged, tiny_mlx, tmp_path):
    other = convert_checkpoint(tiny_mlx, tmp_path / "other", progress=False)
    shutil.copy(other / fmt.MANIFEST_NAME, damaged / fmt.MANIFEST_NAME)
    with pytest.raises(FlashMoeError, match="belongs to another conversion"):
        load_model(damaged)


def test_manifest_from_another_model(damaged, tmp_path):
    from llm_flashmoe.synth import write_synthetic

    other = write_synthetic(tmp_path / "two-layers", preset="tiny", layout="packed", layers=2, progress=False)
    shutil.copy(other / fmt.MANIFEST_NAME, damaged / fmt.MANIFEST_NAME)
    with pytest.raises(FlashMoeError, match="does not belong to .*config.json"):
        load_model(damaged)
    # Even with the other model's config beside it, the files say whose they are.
    shutil.copy(other / "config.json", damaged / "config.json")
    with pytest.raises(FlashMoeError, match="another conversion|another model"):
        load_model(damaged)


def test_swapped_layer_files(damaged):
    a, b = damaged / fmt.layer_file_name(1), damaged / fmt.layer_file_name(6)
    a.rename(damaged / "tmp")
    b.rename(a)
    (damaged / "tmp").rename(b)
    with pytest.raises(FlashMoeError, match="holds layer 6, not layer 1"):
        load_model(damaged)


def test_manifest_of_a_newer_format(damaged):
    path = damaged / fmt.MANIFEST_NAME
    d = json.loads(path.read_text())
    d["format_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(FlashMoeError, match="format version 99"):
        load_model(damaged)


def test_bench_reports_every_figure(packed):
    r = run_bench(packed, tokens=3, prompt_tokens=2, progress=False)
    assert r["cold"]["tokens"] == r["warm"]["tokens"] and len(r["warm"]["tokens"]) == 3
    for key in ("raw_pread_gb_s", "store_gb_s", "store_replay_gb_s", "hit_rate", "expert_io_ms_per_layer",
                "prompt_tok_s", "ttft_s", "bytes_per_token"):
        assert r["warm"][key] >= 0, key
    table = format_table(r)
    assert "raw pread GB/s" in table and "peak RSS" in table and "routing overlap" in table
    c = r["constraints"]
    assert c["free_tok_s"] > 0 and c["constrained_tok_s"] > 0 and 0 <= c["constraint_share"] < 1
    assert "JSON-schema constrained" in table


@pytest.mark.parametrize("reader", ["c", "python"])
def test_file_truncated_while_in_use_is_an_error_not_garbage(damaged, reader, monkeypatch):
    monkeypatch.setenv("FLASHMOE_NATIVE_READS", "1" if reader == "c" else "0")
    store = ExpertStore(damaged)
    path = damaged / store.manifest.layers[2].file
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - store.manifest.expert_stride)  # the last expert is gone
    store.fetch(2, np.array([0, 1]))  # still there
    with pytest.raises(FlashMoeError, match="truncated"):
        store.fetch(2, np.array([1, store.manifest.num_experts - 1]))
    store.close()


def test_prefetch_of_the_next_layers_experts(packed, monkeypatch):
    prompt = np.random.default_rng(3).integers(0, 248000, 6).tolist()

    monkeypatch.setenv("FLASHMOE_PREFETCH", "0")
    off = load_model(packed, dtype=mx.float32)
    assert all(l.moe.next_router is None for l in off.layers)
    ref = greedy(off, prompt, 5)
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1")
    on = load_model(packed, dtype=mx.float32)
    assert on.layers[0].moe.next_router is on.layers[1].moe.router and on.layers[-1].moe.next_router is None
    on.experts.readahead_below = 2.0  # announce even when the page cache serves every read (it does here)
    on.experts.stats.reset()
    got = greedy(on, prompt, 5)
    for r, g in zip(ref, got):
        assert mx.array_equal(r, g).item()  # announcing reads changes no result
    s = on.experts.stats
    L, K = len(on.layers), on.experts_per_token
    assert s.prefetched == 5 * (L - 1) * K           # every decode step, every layer but the last
    assert 0 <= s.prefetch_hits <= s.prefetched
    off.experts.close()
    on.experts.close()


def test_no_read_ahead_while_the_page_cache_serves_the_reads(packed):
    store = ExpertStore(packed, threads=2)
    if store.hit_method != "RWF_NOWAIT":
        store.close()
        pytest.fail("this test needs RWF_NOWAIT (Linux 4.14+) to tell cached reads")
    ids = np.arange(0, 64, 5)
    for _ in range(12):                     # the same experts again and again: all cached
        store.read_experts(2, ids)
    assert store.hit_rate > 0.9
    store.prefetch(3, np.array([1, 2]))
    assert store.stats.prefetched == 0      # suppressed
    store.drop_page_cache()
    for _ in range(12):
        store.drop_page_cache()
        store.read_experts(2, ids)          # cold reads pull the average down
    assert store.hit_rate < 0.9
    store.prefetch(3, np.array([1, 2]))
    assert store.stats.prefetched == 2
    store.close()


def _bytes_at(address: int, n: int) -> bytes:
    import ctypes

    return ctypes.string_at(int(address), n)


def test_page_cache_hits_are_used_in_place_and_misses_read(packed):
    store = ExpertStore(packed, dtype=mx.float32, threads=2)
    assert store.map_hits  # Linux, page-aligned experts, a quantization the CPU kernels read
    ids = np.array([2, 9, 30, 41])
    # The reference rows: read into the stacks (test_fetch_... checks those bit-exact).
    ref = store.fetch(3, ids)
    assert ref.gate.row_addresses is None
    want = [[[np.array(getattr(lin, part)[r].view(mx.uint8)).tobytes() for part in ("weight", "scales", "biases")]
             for r in range(len(ids))] for lin in (ref.gate, ref.up, ref.down)]
    store.drop_page_cache()
    store.read_experts(3, ids[:2])          # two of the four now in the page cache
    store.stats.reset()
    batch = store.fetch(3, ids, host_rows=True)
    s = store.stats
    assert s.in_place == 2 and s.cache_hits >= 2 and s.experts == 4
    lo, size = store._maps[3], store.manifest.layer_file_bytes()
    for p, got in enumerate((batch.gate, batch.up, batch.down)):
        addrs = got.row_addresses
        assert addrs.shape == (4, 3)
        for r in range(len(ids)):
            assert (lo <= addrs[r, 0] < lo + size) == (r < 2)  # the cached two in place, the rest read
            for j in range(3):
                assert _bytes_at(addrs[r, j], len(want[p][r][j])) == want[p][r][j]
        with pytest.raises(ValueError, match="only the CPU kernels"):
            got.gather(mx.zeros((1, 1, 1, 8)), mx.array([0]))
    # drop_page_cache really drops what our mappings held: nothing is in place after it.
    store.drop_page_cache()
    store.stats.reset()
    cold = store.fetch(3, ids, host_rows=True)
    assert store.stats.in_place == 0 and cold.gate.row_addresses is None
    store.close()


def test_in_place_decode_matches_reading_every_expert(packed, monkeypatch):
    from llm_flashmoe import kernels

    if kernels.active_backend() != "cpu":
        pytest.fail("this test needs the CPU kernels (a C compiler)")
    prompt = np.random.default_rng(5).integers(0, 248000, 5).tolist()

    monkeypatch.setenv("FLASHMOE_MAPPED_HITS", "0")
    off = load_model(packed, dtype=mx.float32)
    assert not off.experts.map_hits
    ref = greedy(off, prompt, 6)
    monkeypatch.setenv("FLASHMOE_MAPPED_HITS", "1")
    on = load_model(packed, dtype=mx.float32)
    greedy(on, prompt, 6)                   # the page cache holds these experts now
    on.experts.stats.reset()
    got = greedy(on, prompt, 6)
    assert on.experts.stats.in_place > 0 and off.experts.stats.in_place == 0
    for r, g in zip(ref, got):
        assert mx.array_equal(r, g).item()
    off.experts.close()
    on.experts.close()


def test_file_truncated_while_mapped_is_an_error_not_a_crash(damaged):
    store = ExpertStore(damaged, dtype=mx.float32)
    ids = np.array([0, 1])
    store.read_experts(2, ids)
    assert store.fetch(2, ids, host_rows=True).gate.row_addresses is not None  # mapped, in place
    path = damaged / store.manifest.layers[2].file
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - store.manifest.expert_stride)
    with pytest.raises(FlashMoeError, match="truncated"):
        store.fetch(2, ids, host_rows=True)
    store.close()


@pytest.mark.parametrize("cold_reads", ["copy", "readahead"])
def test_streaming_fetch_lands_every_expert_in_turn(packed, monkeypatch, cold_reads):
    # copy: the C pool reads misses into buffers; readahead: the kernel reads them into the page
    # cache (POSIX_FADV_WILLNEED), used in place through the mapping once mincore finds them
    monkeypatch.setenv("FLASHMOE_COLD_READS", cold_reads)
    store = ExpertStore(packed, dtype=mx.float32, threads=3)
    assert store.overlap  # the C reader, in-place hits: decode on the CPU computes while reads land
    ids = np.array([1, 7, 20, 33, 50])
    ref = store.fetch(4, ids)
    want = [[np.array(getattr(lin, part)[r].view(mx.uint8)).tobytes() for part in ("weight", "scales", "biases")]
            for lin in (ref.gate, ref.up, ref.down) for r in range(len(ids))]
    store.drop_page_cache()
    store.read_experts(4, ids[[1]])          # one of them cached: usable at once, in place
    store.stats.reset()
    batch, pending = store.fetch_streaming(4, ids)
    assert pending.ready.tolist() == [False, True, False, False, False] and pending.misses == [0, 2, 3, 4]
    for row in pending.misses:
        pending.wait(row)
        assert pending.ready[row]
    pending.finish()
    assert store.stats.experts == 5 and store.stats.in_place == 1
    assert store.stats.read_seconds > 0 or cold_reads == "readahead"   # (the readahead may have landed before)
    if cold_reads == "readahead":      # every row in the layer file's mapping, and in the page cache now
        base = store.mapped_layer(4) + store.manifest.header_bytes
        assert batch.gate.row_addresses[:, 0].tolist() == (base + ids * store.manifest.expert_stride).tolist()
        assert all(store._mapper.resident(int(a), store.manifest.expert_bytes) for a in batch.gate.row_addresses[:, 0])
    n = len(ids)
    for i, lin in enumerate((batch.gate, batch.up, batch.down)):
        for r in range(n):
            for j in range(3):
                assert _bytes_at(lin.row_addresses[r, j], len(want[i * n + r][j])) == want[i * n + r][j]
    store.close()


def test_direct_cold_reads_land_every_expert_and_leave_the_page_cache_alone(small_packed, monkeypatch, capsys):
    # direct: the C pool reads the misses with O_DIRECT into buffers; what distinguishes it from
    # copy is that the misses never enter the page cache. Where O_DIRECT does not open (tmpfs),
    # the store falls back to copies, with a notice: then the misses are read through the cache.
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    store = ExpertStore(small_packed, dtype=mx.float32, threads=3)
    m, layer = store.manifest, 1
    assert all(v % 4096 == 0 for v in (m.header_bytes, m.expert_stride, m.expert_bytes))
    assert all(c.offset % 4096 == 0 and c.nbytes % 4096 == 0 for c in store.components)
    direct = _o_direct_opens(small_packed / m.layers[layer].file)
    err = capsys.readouterr().err
    if direct:
        assert store.cold_reads == "direct" and store.direct_reads is True
        assert "FLASHMOE_COLD_READS=direct" not in err
    else:
        assert store.cold_reads == "copy" and store.direct_reads is False
        assert "FLASHMOE_COLD_READS=direct" in err and "copies instead" in err
    assert store.overlap
    ids = np.array([1, 4, 9, 12, 15])
    n = len(ids)
    ref = store.fetch(layer, ids)           # buffered preads: the reference bytes
    want = [[np.array(getattr(lin, part)[r].view(mx.uint8)).tobytes() for part in ("weight", "scales", "biases")]
            for lin in (ref.gate, ref.up, ref.down) for r in range(n)]
    store.drop_page_cache()
    store.read_experts(layer, ids[[1]])      # one of them cached: usable at once, in place
    store.stats.reset()
    batch, pending = store.fetch_streaming(layer, ids)
    assert pending.ready.tolist() == [False, True, False, False, False] and pending.misses == [0, 2, 3, 4]
    for row in pending.misses:
        pending.wait(row)
        assert pending.ready[row]
    pending.finish()
    assert store.stats.experts == n and store.stats.in_place == 1
    for i, lin in enumerate((batch.gate, batch.up, batch.down)):
        for r in range(n):
            for j in range(3):
                assert _bytes_at(lin.row_addresses[r, j], len(want[i * n + r][j])) == want[i * n + r][j]

    base = store.mapped_layer(layer)
    starts = base + store._offsets(ids)

    def pages_cached(a: int) -> list[bool]:
        return [store._mapper.resident(int(a) + p, 4096) for p in range(0, m.expert_bytes, 4096)]

    assert all(pages_cached(starts[1]))     # the one read with a buffered pread
    for row in pending.misses:              # direct: not a page of the misses cached; copy: all of them
        assert (not any(pages_cached(starts[row]))) if direct else all(pages_cached(starts[row]))

    if direct:  # read_direct (the benchmarks' replay): the experts' bytes in the buffers it returns
        store.drop_page_cache()
        buf = store.read_direct(layer, ids)
        for i in range(3):
            for r in range(n):
                for j in range(3):
                    c = store.components[3 * i + j]
                    assert buf.host[3 * i + j][r * c.nbytes : (r + 1) * c.nbytes].tobytes() == want[i * n + r][j]
        assert not any(any(pages_cached(a)) for a in starts)
    store.close()


def test_direct_cold_reads_fall_back_to_copies_where_parts_are_not_4k_aligned(packed, monkeypatch, capsys):
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    store = ExpertStore(packed, dtype=mx.float32)
    assert any(c.nbytes % 4096 for c in store.components)   # tiny: 1 KiB scales
    assert store.cold_reads == "copy" and store.direct_reads is False
    err = capsys.readouterr().err
    assert "FLASHMOE_COLD_READS=direct needs O_DIRECT on 4 KiB-aligned expert parts" in err
    assert "copies instead" in err
    store.close()


def test_unknown_cold_reads_value_is_refused(packed, monkeypatch):
    monkeypatch.setenv("FLASHMOE_COLD_READS", "bogus")
    with pytest.raises(FlashMoeError, match="FLASHMOE_COLD_READS='bogus'"):
        ExpertStore(packed)


def test_streaming_fetch_of_a_truncated_file_is_an_error(damaged):
    store = ExpertStore(damaged, dtype=mx.float32, threads=2)
    m = store.manifest
    store.drop_page_cache()
    batch, pending = store.fetch_streaming(2, np.array([0, 1]))
    pending.finish()
    path = damaged / m.layers[2].file
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - m.expert_stride)
    with pytest.raises(FlashMoeError, match="truncated"):
        store.fetch_streaming(2, np.array([3, m.num_experts - 1]))
    store.close()


@pytest.mark.parametrize("cold_reads", ["copy", "readahead"])
def test_decode_computing_while_reads_land_matches_read_then_compute(packed, monkeypatch, cold_reads):
    from llm_flashmoe.cpu import streamed

    calls = []
    real = streamed.moe_streamed
    monkeypatch.setattr(streamed, "moe_streamed", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = np.random.default_rng(9).integers(0, 248000, 4).tolist()

    monkeypatch.setenv("FLASHMOE_OVERLAP_READS", "0")
    seq = load_model(packed, dtype=mx.float32)
    ref = greedy(seq, prompt, 5, cold=True)
    assert not calls
    monkeypatch.setenv("FLASHMOE_OVERLAP_READS", "1")
    monkeypatch.setenv("FLASHMOE_COLD_READS", cold_reads)
    over = load_model(packed, dtype=mx.float32)
    got = greedy(over, prompt, 5, cold=True)
    assert len(calls) >= 5 * len(over.layers) // 2  # most layers' experts were streamed
    for r, g in zip(ref, got):
        a, b = np.array(r), np.array(g)
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())  # float32: summation order only
    seq.experts.close()
    over.experts.close()


def test_direct_reads_are_kept_in_the_host_cache_for_later_tokens(small_packed, monkeypatch):
    """With direct reads (nothing enters the page cache) the store keeps what it read in its own
    RAM cache: a later fetch of the same experts reads nothing; the least recently used slot
    goes first, never one of the batch being built or of the one before; dropping the cache
    (cold measurements) empties it; a bad size is an error."""
    m = fmt.read_manifest(small_packed)
    if not _o_direct_opens(small_packed / m.layers[0].file):   # (tmpfs: copies, no host cache)
        monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
        assert ExpertStore(small_packed, dtype=mx.float32).host_cache is None
        return
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    monkeypatch.setenv("FLASHMOE_HOST_CACHE_GB", "bogus")
    with pytest.raises(FlashMoeError, match="FLASHMOE_HOST_CACHE_GB"):
        ExpertStore(small_packed, dtype=mx.float32)
    monkeypatch.setenv("FLASHMOE_HOST_CACHE_GB", str(6 * m.expert_stride / 1e9))   # six slots
    store = ExpertStore(small_packed, dtype=mx.float32, threads=2)
    assert store.host_cache is not None and store.host_cache.slots == 6
    def parts(batch, r):   # expert row r's nine parts, as bytes (the buffers are reused: copy now)
        return [np.array(getattr(lin, part)[r].view(mx.uint8)).tobytes()
                for lin in (batch.gate, batch.up, batch.down) for part in ("weight", "scales", "biases")]

    ref = {e: parts(store.fetch(1, np.array([e])), 0) for e in range(8)}

    def check(batch, ids):
        for r, e in enumerate(ids):
            for k, want in enumerate(ref[e]):
                lin = (batch.gate, batch.up, batch.down)[k // 3]
                assert _bytes_at(lin.row_addresses[r, k % 3], len(want)) == want

    def fetch(ids):
        store.stats.reset()
        batch, pending = store.fetch_streaming(1, np.array(ids))
        pending.finish()
        check(batch, ids)
        return store.stats.bytes - store.stats.in_place * m.expert_bytes, pending

    store.drop_page_cache()
    read, pending = fetch([0, 1, 2])
    assert read == 3 * m.expert_bytes and pending.misses == [0, 1, 2]      # cold: all read
    read, pending = fetch([0, 1, 2])
    assert read == 0 and pending.all_ready and store.stats.in_place == 3    # kept: nothing read
    read, _ = fetch([3, 4])          # five slots used
    read, _ = fetch([5, 0])          # the sixth; 0 again becomes the most recent
    assert read == m.expert_bytes
    read, _ = fetch([6, 7])          # evicts 1 and 2 (least recent; 5 and 0 are the last batch)
    assert read == 2 * m.expert_bytes
    cached = {k[1] for k in store.host_cache.slot_of}
    assert cached == {0, 3, 4, 5, 6, 7}
    read, _ = fetch([1])
    assert read == m.expert_bytes    # evicted: read again, and right
    store.drop_page_cache()
    assert not store.host_cache.slot_of
    read, _ = fetch([6])
    assert read == m.expert_bytes
    store.close()


@pytest.mark.parametrize("model", ["packed", "small_packed"])
def test_stream_bench_times_decode_against_every_way_of_reading(model, request):
    """`cpu.bench --packed`: cold and warm decode beside expert I/O alone, replayed every way the
    store reads misses (copies, the kernel's readahead, and O_DIRECT where the expert parts are
    4 KiB-aligned and the file system takes it), the fastest one counting."""
    from llm_flashmoe.cpu.bench import stream_figures

    path = request.getfixturevalue(model)
    direct = model == "small_packed" and _o_direct_opens(path / fmt.read_manifest(path).layers[0].file)
    names = ["copies", "readahead"] + (["direct"] if direct else [])   # tiny: no third way, not a zero
    out = stream_figures(str(path), k=2, tokens=2, rounds=1)
    ways = [key for key in out if key.startswith("cold I/O ms alone")]
    assert ways == [f"cold I/O ms alone, {' / '.join(names)} (median)"]
    times = out[ways[0]]
    cold = out["cold (median of rounds)"]
    assert len(times) == len(names) and all(t > 0 for t in times)
    assert cold["expert I/O ms (alone)"] == pytest.approx(min(times), abs=0.06)
    assert times[names.index(out["fastest cold I/O way (median)"])] == min(times)   # (ties: rounded to 0.1 ms)
    assert cold["ms per token"] > 0 and cold["time / max(io, compute)"] > 0
    assert out["cold reads"] == "readahead" and out["warm (median of rounds)"]["used in place"] == 1.0


def test_speculative_reads_land_in_the_host_cache_only_once_verified(small_packed, tmp_path, monkeypatch):
    """With direct reads into the host cache, `prefetch` (the next layer's guesses, best first)
    reads the top FLASHMOE_PREFETCH_EXPERTS guesses not cached once the misses in flight have all
    landed; no fetch finds such a slot before the read has ended without error; a fetch that
    picks the guess waits for that read instead of reading again; a wrong guess's slot is an
    ordinary entry; a failed speculative read is an error at the next fetch and never found."""
    # A copy of its own: other tests' mappings of the shared model keep its pages in the page cache,
    # where the kernel keeps mapped pages however they are dropped (and a guess found in the page
    # cache is used in place, never read).
    small_packed = shutil.copytree(small_packed, tmp_path / "model")
    for f in small_packed.iterdir():     # written back, so that dropping its pages drops them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    m = fmt.read_manifest(small_packed)
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    if not _o_direct_opens(small_packed / m.layers[0].file):   # (tmpfs: copies, nothing to speculate)
        assert not ExpertStore(small_packed, dtype=mx.float32).speculative
        return
    monkeypatch.setenv("FLASHMOE_PREFETCH_EXPERTS", "x")
    with pytest.raises(FlashMoeError, match="FLASHMOE_PREFETCH_EXPERTS"):
        ExpertStore(small_packed, dtype=mx.float32)
    monkeypatch.setenv("FLASHMOE_PREFETCH_EXPERTS", "1")
    monkeypatch.setenv("FLASHMOE_OVERLAP_READS", "0")   # fetches not streamed: nothing looks in the cache
    store = ExpertStore(small_packed, dtype=mx.float32, threads=2)
    assert store.host_cache is not None and not store.speculative
    store.close()
    monkeypatch.setenv("FLASHMOE_OVERLAP_READS", "1")
    store = ExpertStore(small_packed, dtype=mx.float32, threads=2)
    assert store.speculative
    cache = store.host_cache

    def parts(batch, r):
        return [np.array(getattr(lin, part)[r].view(mx.uint8)).tobytes()
                for lin in (batch.gate, batch.up, batch.down) for part in ("weight", "scales", "biases")]

    ref = {e: parts(store.fetch(1, np.array([e])), 0) for e in range(m.num_experts)}

    def check(batch, ids):
        for r, e in enumerate(ids):
            for k, want in enumerate(ref[e]):
                lin = (batch.gate, batch.up, batch.down)[k // 3]
                assert _bytes_at(lin.row_addresses[r, k % 3], len(want)) == want

    store.drop_page_cache()
    store.stats.reset()
    batch, pending = store.fetch_streaming(0, np.array([0, 1, 2]))
    store.prefetch(1, np.array([9, 5, 6]))       # best guess first
    assert not cache.inflight                    # waits for layer 0's misses to land first
    for row in pending.misses:
        pending.wait(row)
    assert set(cache.inflight) == {(1, 9)}       # top-1 only, started once the misses landed
    pending.finish()
    assert cache.find(1, np.array([9]))[0] == -1 and (1, 9) not in cache.slot_of   # not before verified
    assert store.stats.prefetched == 1 and store.stats.experts == 3

    store.stats.reset()
    batch, pending = store.fetch_streaming(1, np.array([3, 9]))   # the router picks the guess
    assert pending.ready.tolist() == [False, True] and pending.misses == [0]   # awaited, not read again
    assert store.stats.prefetch_hits == 1 and store.stats.in_place == 1
    pending.finish()
    check(batch, [3, 9])
    assert store.stats.bytes - store.stats.in_place * m.expert_bytes == m.expert_bytes   # only 3 read

    # A guess already cached reads nothing; the next uncached one within the top N is read.
    monkeypatch.setattr(store, "speculate_experts", 2)
    # (the mapped reads of `check` above may have brought more of layer 1 into the page cache by
    # the kernel's readahead: out with it, and 3, 0 and 1 into the host cache)
    store.drop_page_cache()
    for layer, ids in ((1, [3]), (0, [0, 1])):      # read from the disk into the host cache
        batch, pending = store.fetch_streaming(layer, np.array(ids))
        pending.finish()
        assert all((layer, e) in cache.slot_of for e in ids)
    store.stats.reset()
    batch, pending = store.fetch_streaming(0, np.array([0, 1]))   # all cached: nothing in flight
    assert pending.all_ready and not pending.misses
    store.prefetch(1, np.array([3, 12, 13]))    # 3 is cached; 12 is read at once (the disk is free)
    assert set(cache.inflight) == {(1, 12)} and store.stats.prefetched == 1
    pending.finish()
    batch, pending = store.fetch_streaming(1, np.array([4, 5]))   # a wrong guess: 12 not picked
    pending.finish()
    check(batch, [4, 5])
    assert (1, 12) in cache.slot_of and store.stats.prefetch_hits == 0   # an ordinary entry now
    batch, pending = store.fetch_streaming(1, np.array([12]))
    assert pending.all_ready
    check(batch, [12])
    store.close()

    # A speculative read that fails (the file lost its last expert) is an error, never a slot.
    broken = shutil.copytree(small_packed, tmp_path / "broken")
    store = ExpertStore(broken, dtype=mx.float32, threads=2)
    path = broken / m.layers[1].file
    with open(path, "r+b") as f:                 # truncated while in use
        f.truncate(path.stat().st_size - m.expert_stride)
    store.drop_page_cache()
    batch, pending = store.fetch_streaming(0, np.array([0]))
    pending.finish()
    store.prefetch(1, np.array([m.num_experts - 1]))
    assert (1, m.num_experts - 1) in store.host_cache.inflight
    free = len(store.host_cache.free)
    with pytest.raises(FlashMoeError, match="truncated"):
        store.fetch(0, np.array([1]))            # the next read of any layer ends the failed one first
    assert store.host_cache.find(1, np.array([m.num_experts - 1]))[0] == -1
    assert not store.host_cache.inflight and len(store.host_cache.free) == free + 1
    store.close()
