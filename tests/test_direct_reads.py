"""O_DIRECT reads: the C reader's threads' preads (the default) or Linux AIO (FLASHMOE_DIRECT_DEPTH,
kernels/upload/upload.c) into buffers on huge pages: every byte lands where it belongs, a failed or
short read is an error naming the file, and where AIO is not to be had the store says so once and
reads with its threads' preads."""

from __future__ import annotations

import errno
import os

import mlx.core as mx
import numpy as np
import pytest

from llm_flashmoe.errors import FlashMoeError
from llm_flashmoe.experts import format as fmt
from llm_flashmoe.experts.native import NativeUploader, load
from llm_flashmoe.experts.store import HUGE_PAGE, ExpertStore, _Buffers

K = 4096
# an expert of 9 parts, all multiples of 4 KiB (O_DIRECT), of unequal sizes
SIZES = [64 * K, 4 * K, 4 * K, 64 * K, 4 * K, 4 * K, 16 * K, 8 * K, 12 * K]


def _components() -> list[fmt.Component]:
    out, off = [], 0
    for i, n in enumerate(SIZES):
        out.append(fmt.Component(name=f"c{i}", dtype="uint8", shape=(n,), offset=off, nbytes=n))
        off += n
    return out


EXPERT = sum(SIZES)
HEADER = K


@pytest.fixture(scope="module")
def lib():
    lib = load()
    if lib is None:
        pytest.skip(f"no C compiler: {load.error}")
    return lib


@pytest.fixture
def expert_file(tmp_path):
    """A file of 12 experts of random bytes after a 4 KiB header; (path, its bytes)."""
    data = np.random.default_rng(1).integers(0, 256, HEADER + 12 * EXPERT, dtype=np.uint8).tobytes()
    path = tmp_path / "experts.bin"
    path.write_bytes(data)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        pytest.skip("the file system does not take O_DIRECT (tmpfs)")
    os.close(fd)
    return path, data


def _async_uploader(lib, depth: int) -> NativeUploader:
    u = NativeUploader.direct(lib, 3)
    try:
        u.make_async(depth)
    except OSError as e:
        u.close()
        pytest.skip(f"no Linux AIO here ({e.strerror})")
    return u


def _expected(data: bytes, e: int, c: fmt.Component) -> bytes:
    a = HEADER + e * EXPERT + c.offset
    return data[a : a + c.nbytes]


def _read_one_and_check(u, fd, data, comps, buf, e: int, row: int, piece: int) -> None:
    """A job of its own: expert e into row `row`, asynchronously; every byte of it lands there."""
    u.start(fd, HEADER + np.array([e]) * EXPERT, np.array([row]), EXPERT, comps, buf.addresses, piece, False,
            asynchronous=True)
    u.finish()
    for c, h in zip(comps, buf.host):
        assert h[row * c.nbytes : (row + 1) * c.nbytes].tobytes() == _expected(data, e, c)


@pytest.mark.parametrize("depth,piece", [(1, 16 * K), (3, 20 * K), (8, 64 * K), (8, 1 << 20)])
@pytest.mark.parametrize("huge", [False, True])
def test_async_direct_reads_land_every_byte_in_its_row(lib, expert_file, depth, piece, huge):
    # pieces smaller than a part, straddling parts, or the whole expert; rows out of order
    path, data = expert_file
    comps = _components()
    buf = _Buffers(comps, 8, zero_copy=False, huge=huge)
    for h in buf.host:
        h[:] = 0xAB
    u = _async_uploader(lib, depth)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        ids = np.array([11, 0, 5, 7, 3])
        rows = np.array([4, 0, 6, 1, 2])
        u.start(fd, HEADER + ids * EXPERT, rows, EXPERT, comps, buf.addresses, piece, False, asynchronous=True)
        for i in range(len(ids)):
            u.wait(i)     # landed: all its bytes there
            for c, h in zip(comps, buf.host):
                r = rows[i]
                assert h[r * c.nbytes : (r + 1) * c.nbytes].tobytes() == _expected(data, ids[i], c)
        assert u.finish() == 0
        for c, h in zip(comps, buf.host):   # rows not read are untouched
            for r in (3, 5, 7):
                assert (h[r * c.nbytes : (r + 1) * c.nbytes] == 0xAB).all()
        # the same uploader, a second job (the AIO context is kept)
        _read_one_and_check(u, fd, data, comps, buf, 2, 3, piece)
    finally:
        os.close(fd)
        u.close()


@pytest.mark.parametrize("cut", [72 * K, 88 * K, 88 * K + 1000])
def test_async_direct_read_of_a_truncated_file_is_an_error_and_the_reader_goes_on(lib, expert_file, cut):
    # the file ends inside the last expert, on a 4 KiB boundary or not: a short read, an error
    # (not a landed expert); the reader then serves the next job
    path, data = expert_file
    with open(path, "r+b") as f:
        f.truncate(HEADER + 11 * EXPERT + cut)
    comps = _components()
    buf = _Buffers(comps, 4, zero_copy=False)
    u = _async_uploader(lib, 4)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        ids = np.array([1, 11])
        u.start(fd, HEADER + ids * EXPERT, np.arange(2), EXPERT, comps, buf.addresses, 16 * K, False,
                asynchronous=True)
        with pytest.raises(OSError) as e:
            u.wait(1)
        assert e.value.errno == errno.EIO   # short: the file ends early
        with pytest.raises(OSError):   # (already ended, raised; nothing in flight now)
            u.start(fd, HEADER + ids * EXPERT, np.arange(2), EXPERT, comps, buf.addresses, 16 * K, False,
                    asynchronous=True)
            u.finish()
        _read_one_and_check(u, fd, data, comps, buf, 4, 3, 16 * K)
    finally:
        os.close(fd)
        u.close()


def test_asynchronous_reads_need_a_context(lib, expert_file):
    path, _ = expert_file
    u = NativeUploader.direct(lib, 2)
    try:
        with pytest.raises(ValueError):
            u.start(0, np.array([HEADER]), np.array([0]), EXPERT, _components(), [0] * 9, K, False,
                    asynchronous=True)
    finally:
        u.close()


def test_huge_buffers_are_aligned_and_distinct():
    comps = [fmt.Component(name="w", dtype="uint8", shape=(2 << 20,), offset=0, nbytes=2 << 20),
             fmt.Component(name="s", dtype="uint8", shape=(K,), offset=2 << 20, nbytes=K)]
    buf = _Buffers(comps, 3, zero_copy=False, huge=True)
    assert buf.addresses[0] % HUGE_PAGE == 0 and buf.addresses[1] % K == 0
    buf.host[0][:] = 1
    buf.host[1][:] = 2
    assert (buf.host[0] == 1).all() and (buf.host[1] == 2).all() and len(buf.host[0]) == 3 * (2 << 20)


# -- the store --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_packed(tmp_path_factory):
    """The `small` synthetic model written packed: every expert part a multiple of 4 KiB."""
    from llm_flashmoe.synth import write_synthetic

    path = write_synthetic(tmp_path_factory.mktemp("direct") / "small", preset="small", layout="packed",
                           progress=False)
    m = fmt.read_manifest(path)
    try:
        os.close(os.open(path / m.layers[0].file, os.O_RDONLY | os.O_DIRECT))
    except (OSError, AttributeError):
        pytest.skip("the file system does not take O_DIRECT (tmpfs)")
    return path


def _reference(store: ExpertStore, layer: int, ids) -> list:
    """Each expert's 9 parts as bytes, read with ordinary preads."""
    m = store.manifest
    out = []
    for e in ids:
        raw = os.pread(store.fds[layer], m.expert_bytes, m.header_bytes + int(e) * m.expert_stride)
        out.append([raw[c.offset : c.offset + c.nbytes] for c in store.components])
    return out


def _check_batch(batch, want) -> None:
    import ctypes

    for i, lin in enumerate((batch.gate, batch.up, batch.down)):
        for r in range(len(want)):
            for j in range(3):
                n = len(want[r][3 * i + j])
                assert ctypes.string_at(int(lin.row_addresses[r, j]), n) == want[r][3 * i + j]


def test_store_reads_misses_asynchronously_every_byte_exact(small_packed, monkeypatch, capsys):
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    monkeypatch.setenv("FLASHMOE_DIRECT_DEPTH", "8")         # (off by default)
    monkeypatch.setenv("FLASHMOE_DIRECT_PIECE_KB", "64")   # several pieces per expert, across parts
    store = ExpertStore(small_packed, dtype=mx.float32, threads=2)
    try:
        if not store.direct_async:
            assert "asynchronous O_DIRECT reads unavailable" in capsys.readouterr().err
            pytest.skip("no Linux AIO here")
        assert store.direct_reads and store.direct_piece == 64 << 10
        layer, ids = 1, np.array([3, 8, 0, 14, 6])
        want = _reference(store, layer, ids)
        store.drop_page_cache()
        batch, pending = store.fetch_streaming(layer, ids)
        assert pending.misses == [0, 1, 2, 3, 4]
        for row in pending.misses:
            pending.wait(row)
        pending.finish()
        _check_batch(batch, want)
        cache = store.host_cache   # landed in the cache's huge-page buffers, found there next time
        assert all(cache.buf.addresses[k] % HUGE_PAGE == 0 for k, c in enumerate(store.components)
                   if c.nbytes * cache.slots >= HUGE_PAGE)
        batch, pending = store.fetch_streaming(layer, ids)
        assert pending.all_ready
        _check_batch(batch, want)
        buf = store.read_direct(layer, ids)   # the benchmarks' replay: the same reader
        for r in range(len(ids)):
            for k, c in enumerate(store.components):
                assert buf.host[k][r * c.nbytes : (r + 1) * c.nbytes].tobytes() == want[r][k]
    finally:
        store.close()


def test_store_falls_back_to_threads_where_aio_is_unavailable(small_packed, monkeypatch, capsys):
    def refuse(self, depth):
        raise OSError(38, "Function not implemented")

    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    monkeypatch.setenv("FLASHMOE_DIRECT_DEPTH", "8")
    monkeypatch.setattr(NativeUploader, "make_async", refuse)
    store = ExpertStore(small_packed, dtype=mx.float32, threads=2)
    try:
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "asynchronous O_DIRECT reads unavailable" in ln]
        assert len(lines) == 1 and "Function not implemented" in lines[0] and "preads instead" in lines[0]
        assert store.cold_reads == "direct" and store.direct_reads and not store.direct_async
        layer, ids = 1, np.array([5, 1, 9])
        want = _reference(store, layer, ids)
        store.drop_page_cache()
        batch, pending = store.fetch_streaming(layer, ids)
        pending.finish()
        _check_batch(batch, want)
    finally:
        store.close()
    # readahead mode (direct reads only in the benchmarks' replay): no notice
    monkeypatch.setenv("FLASHMOE_COLD_READS", "readahead")
    ExpertStore(small_packed, dtype=mx.float32, threads=2).close()
    assert "asynchronous" not in capsys.readouterr().err


@pytest.mark.parametrize("depth", [None, "0"])
def test_threads_preads_by_default_into_huge_pages_and_bad_values_are_refused(small_packed, monkeypatch, capsys,
                                                                              depth):
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    if depth is None:
        monkeypatch.delenv("FLASHMOE_DIRECT_DEPTH", raising=False)
    else:
        monkeypatch.setenv("FLASHMOE_DIRECT_DEPTH", depth)
    store = ExpertStore(small_packed, dtype=mx.float32, threads=2)
    try:
        assert store.direct_reads and not store.direct_async and store.direct_depth == 0
        cache = store.host_cache
        assert all(cache.buf.addresses[k] % HUGE_PAGE == 0 for k, c in enumerate(store.components)
                   if c.nbytes * cache.slots >= HUGE_PAGE)
        assert "asynchronous" not in capsys.readouterr().err
        layer, ids = 0, np.array([2, 7])
        want = _reference(store, layer, ids)
        batch, pending = store.fetch_streaming(layer, ids)
        pending.finish()
        _check_batch(batch, want)
    finally:
        store.close()
    for name, value in (("FLASHMOE_DIRECT_DEPTH", "deep"), ("FLASHMOE_DIRECT_DEPTH", "300"),
                        ("FLASHMOE_DIRECT_PIECE_KB", "6")):
        monkeypatch.setenv("FLASHMOE_DIRECT_DEPTH", "8")
        monkeypatch.setenv("FLASHMOE_DIRECT_PIECE_KB", "1024")
        monkeypatch.setenv(name, value)
        with pytest.raises(FlashMoeError, match=name):
            ExpertStore(small_packed, dtype=mx.float32, threads=2)


@pytest.mark.parametrize("depth", ["0", "8"])   # threads' preads, AIO
def test_store_direct_read_of_a_truncated_file_names_it(small_packed, tmp_path, monkeypatch, depth):
    import shutil

    copy = shutil.copytree(small_packed, tmp_path / "copy")
    monkeypatch.setenv("FLASHMOE_COLD_READS", "direct")
    monkeypatch.setenv("FLASHMOE_DIRECT_DEPTH", depth)
    store = ExpertStore(copy, dtype=mx.float32, threads=2)
    try:
        if depth != "0" and not store.direct_async:
            pytest.skip("no Linux AIO here")
        m = store.manifest
        layer = len(m.layers) - 1
        path = copy / m.layers[layer].file
        last = m.num_experts - 1
        with open(path, "r+b") as f:   # the last expert cut in half while in use
            f.truncate(m.header_bytes + last * m.expert_stride + m.expert_bytes // 2)
        with pytest.raises(FlashMoeError, match="truncated") as e:
            store.read_direct(layer, np.array([0, last]))
        assert m.layers[layer].file in str(e.value)
        with pytest.raises(FlashMoeError, match="truncated"):   # fetch_streaming (fstat: caught early)
            batch, pending = store.fetch_streaming(layer, np.array([last]))
            pending.finish()
    finally:
        store.close()
