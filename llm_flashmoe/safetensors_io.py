"""Safetensors files read tensor by tensor with `pread`, and written streaming.

`mx.load` reads a whole file at once; a 397B shard or a synthetic layer of
several GB must instead be read (and written) one tensor, or one slice of a
tensor, at a time so that memory stays near the size of that piece.

Format: 8-byte little-endian header length, a JSON header mapping names to
{dtype, shape, data_offsets: [begin, end]} relative to the end of the header,
then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import FlashMoeError

# safetensors dtype -> (numpy dtype used to hold the raw bytes, bytes per element)
_DTYPES = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # numpy has no bfloat16: carried as raw uint16
    "U32": (np.uint32, 4),
    "I32": (np.int32, 4),
    "U8": (np.uint8, 1),
    "I8": (np.int8, 1),
    "I64": (np.int64, 8),
    "F64": (np.float64, 8),
    "BOOL": (np.bool_, 1),
    "F8_E4M3": (np.uint8, 1),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One .safetensors file; tensors are read on demand with `os.pread`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FlashMoeError(f"cannot open {self.path}: {e.strerror}") from e
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise FlashMoeError(f"{self.path} is truncated (no safetensors header); re-download it.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FlashMoeError(f"{self.path} is truncated or not a safetensors file.")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except json.JSONDecodeError as e:
            raise FlashMoeError(f"{self.path} has a corrupt safetensors header ({e}).") from e
        base = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            begin, end = h["data_offsets"]
            info = TensorInfo(name, h["dtype"], tuple(h["shape"]), base + begin, end - begin)
            if info.offset + info.nbytes > size:
                raise FlashMoeError(
                    f"{self.path} is truncated: tensor {name} ends at byte "
                    f"{info.offset + info.nbytes} but the file has {size} bytes; re-download it."
                )
            self.tensors[name] = info

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read_numpy(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` (or a slice of its first axis) as numpy; BF16 as uint16."""
        info = self.tensors[name]
        np_dtype, width = _DTYPES[info.dtype]
        shape = info.shape
        offset, nbytes = info.offset, info.nbytes
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            assert step == 1
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset += start * row_bytes
            nbytes = (stop - start) * row_bytes
            shape = (stop - start,) + shape[1:]
        buf = bytearray(nbytes)
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise FlashMoeError(f"{self.path}: short read of tensor {name}; the file may be truncated.")
            done += n
        return np.frombuffer(buf, dtype=np_dtype).reshape(shape)

    def read(self, name: str, rows: slice | None = None):
        """Tensor `name` as an mx.array with its real dtype (bf16 included)."""
        import mlx.core as mx

        a = mx.array(self.read_numpy(name, rows))
        dtype = self.tensors[name].dtype
        if dtype == "BF16":
            a = a.view(mx.bfloat16)
        return a


def numpy_to_safetensors_dtype(a) -> str:
    """The safetensors dtype name of a numpy array or mx.array."""
    name = str(a.dtype).split(".")[-1]
    table = {
        "float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32",
        "int32": "I32", "uint8": "U8", "int8": "I8", "int64": "I64", "float64": "F64",
        "bool": "BOOL", "bool_": "BOOL",
    }
    return table[name]


def as_bytes(a) -> bytes | memoryview:
    """Raw little-endian bytes of a numpy array or mx.array (bf16 included)."""
    if not isinstance(a, np.ndarray):
        import mlx.core as mx

        if a.dtype == mx.bfloat16:
            a = a.view(mx.uint16)
        a = np.array(a, copy=False)
    return memoryview(np.ascontiguousarray(a)).cast("B")


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are declared up front.

    Declare every tensor (name, dtype, shape), then `write` their bytes in
    declaration order, in as many pieces as wanted: memory stays near the
    size of one piece. The file is written to a temporary name and renamed
    into place by `close`, so a crash never leaves a half-written file under
    the final name.
    """

    def __init__(self, path: str | Path, tensors: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        header: dict = {"__metadata__": metadata or {"format": "mlx"}}
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in tensors:
            nbytes = _DTYPES[dtype][1] * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._index = 0
        self._left = self._order[0][1] if self._order else 0

    def write(self, name: str, data) -> None:
        """Append bytes of tensor `name` (which must be the current tensor)."""
        while self._left == 0 and self._index < len(self._order) - 1:
            self._index += 1
            self._left = self._order[self._index][1]
        expected = self._order[self._index][0]
        if name != expected:
            raise ValueError(f"wrote {name} while {expected} was expected next")
        raw = as_bytes(data)
        if len(raw) > self._left:
            raise ValueError(f"too many bytes for {name}")
        self._f.write(raw)
        self._left -= len(raw)

    def close(self) -> None:
        if self._index != len(self._order) - 1 or self._left:
            if self._order:
                raise ValueError(f"{self.path}: not every declared tensor was written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a dict of small tensors (numpy or mx) at once, atomically."""
    items = list(tensors.items())
    w = SafetensorsWriter(path, [(n, numpy_to_safetensors_dtype(a), tuple(a.shape)) for n, a in items], metadata)
    for n, a in items:
        w.write(n, a)
    w.close()


def iter_checkpoint_files(model_dir: str | Path) -> Iterator[Path]:
    """The .safetensors files of a checkpoint directory, sharded or not."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise FlashMoeError(f"{index} is not a valid safetensors index ({e}).") from e
        for name in sorted(set(weight_map.values())):
            p = model_dir / name
            if not p.is_file():
                raise FlashMoeError(f"{p} is listed in {index.name} but missing; the download is incomplete.")
            yield p
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FlashMoeError(f"no .safetensors weights found in {model_dir}.")
    yield from files
