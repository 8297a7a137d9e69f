"""The packed model directory written by `llm flashmoe convert` (FORMAT.md).

    config.json, tokenizer files    as in the source checkpoint (quantization updated)
    resident.safetensors            every non-expert tensor, internal names
    experts-NNN.bin                 one per MoE layer: a 16 KiB header, then
                                    expert e at HEADER_BYTES + e * expert_stride
    experts.json                    the manifest (this module's `Manifest`)
    complete                        written last; without it the directory is unfinished

An expert is gate_proj, up_proj, down_proj, each weight|scales|biases, back
to back (`components`); its stride is its size rounded up to ALIGNMENT.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FlashMoeError

MANIFEST_NAME = "experts.json"
COMPLETE_NAME = "complete"
STATE_NAME = "convert-state.json"  # present only while a conversion is unfinished
RESIDENT_NAME = "resident.safetensors"
FORMAT_NAME = "llm-flashmoe packed experts"
FORMAT_VERSION = 1
# Every expert starts on a 16 KiB boundary of its file: the page size of
# Apple Silicon, a multiple of 4 KiB pages, and no padding at all for the
# 397B expert (7,077,888 = 432 x 16 KiB). Larger (2 MiB) alignment would
# waste up to 2 MiB per expert for the smaller models.
ALIGNMENT = 16384
HEADER_BYTES = ALIGNMENT
MAGIC = b"FMOEXP\x00\x01"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")

# Component dtypes as stored (numpy dtype used to hold the bytes).
NUMPY_DTYPES = {"uint32": np.uint32, "bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


def layer_file_name(layer: int) -> str:
    return f"experts-{layer:03d}.bin"


@dataclass(frozen=True)
class Component:
    """One tensor of an expert: e.g. `gate_proj.scales`, bytes [offset, offset+nbytes)."""

    name: str
    dtype: str  # key of NUMPY_DTYPES
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def layout_components(parts: list[tuple[str, str, tuple[int, ...]]]) -> tuple[list[Component], int, int]:
    """(components, expert_bytes, expert_stride) for parts [(name, dtype, shape)] in order."""
    comps, offset = [], 0
    for name, dtype, shape in parts:
        nbytes = int(np.prod(shape)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        comps.append(Component(name, dtype, tuple(int(s) for s in shape), offset, nbytes))
        offset += nbytes
    return comps, offset, -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass
class LayerEntry:
    file: str
    crc32: list[int]  # per expert, over its expert_bytes


@dataclass
class Manifest:
    model_id: str  # random per conversion; also in every layer header and the resident file
    config_sha256: str  # of config.json as written by the conversion
    num_experts: int
    expert_bytes: int
    expert_stride: int
    bits: int
    group_size: int
    components: list[Component]
    layers: list[LayerEntry]
    resident: dict  # {"file", "bytes", "crc32"}
    source: dict = field(default_factory=dict)  # {"path", "layout", "expert_bits"}: informative
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    alignment: int = ALIGNMENT
    header_bytes: int = HEADER_BYTES
    checksum: str = "crc32"

    def layer_file_bytes(self) -> int:
        return self.header_bytes + self.num_experts * self.expert_stride

    def to_json(self) -> str:
        d = asdict(self)
        order = ["format", "format_version", "model_id", "config_sha256", "source", "checksum", "alignment",
                 "header_bytes", "num_experts", "expert_bytes", "expert_stride", "bits", "group_size",
                 "components", "resident", "layers"]
        d = {k: d[k] for k in order}
        # One line per layer keeps the file readable and diffable.
        layers = d.pop("layers")
        comps = d.pop("components")
        text = json.dumps(d, indent=1)[:-2]
        text += ',\n "components": [\n  ' + ",\n  ".join(json.dumps(c, separators=(",", ":")) for c in comps) + "\n ]"
        rows = ",\n  ".join(json.dumps(l, separators=(",", ":")) for l in layers)
        return text + ',\n "layers": [\n  ' + rows + "\n ]\n}\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT_NAME:
                raise FlashMoeError(f"{source} is not an llm-flashmoe manifest.")
            if d.get("format_version") != FORMAT_VERSION:
                raise FlashMoeError(
                    f"{source} has format version {d.get('format_version')}; this llm-flashmoe reads version "
                    f"{FORMAT_VERSION}. Re-convert the model with this version (llm flashmoe convert).")
            d["components"] = [Component(c["name"], c["dtype"], tuple(c["shape"]), c["offset"], c["nbytes"])
                               for c in d["components"]]
            d["layers"] = [LayerEntry(**l) for l in d["layers"]]
            return cls(**d)
        except FlashMoeError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise FlashMoeError(f"{source} is not a valid manifest ({e}); re-convert the model.") from e


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a small file under a temporary name, fsync, rename."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def layer_header(model_id: str, layer: int, m_or_fields: dict) -> bytes:
    """The HEADER_BYTES-long header of a layer file: magic, JSON length, JSON, zeros."""
    blob = json.dumps({"model_id": model_id, "layer": layer, **m_or_fields}, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<I", len(blob)) + blob
    assert len(head) <= HEADER_BYTES
    return head + b"\0" * (HEADER_BYTES - len(head))


def header_fields(m: Manifest) -> dict:
    return {"num_experts": m.num_experts, "expert_bytes": m.expert_bytes, "expert_stride": m.expert_stride}


def check_layer_file(m: Manifest, layer: int, fd: int, path: Path) -> None:
    """Size and header of one opened layer file against the manifest, before any token."""
    size = os.fstat(fd).st_size
    want = m.layer_file_bytes()
    if size != want:
        what = "truncated" if size < want else "longer than the manifest says"
        raise FlashMoeError(
            f"{path} is {what} ({size} bytes, expected {want}); the conversion was interrupted or the file "
            f"was damaged. Re-run `llm flashmoe convert` into a new directory, or restore the file.")
    head = os.pread(fd, HEADER_BYTES, 0)
    if head[:8] != MAGIC:
        raise FlashMoeError(f"{path} is not an llm-flashmoe expert file (bad magic); re-convert the model.")
    (n,) = struct.unpack("<I", head[8:12])
    try:
        h = json.loads(head[12 : 12 + n])
    except ValueError as e:
        raise FlashMoeError(f"{path} has a corrupt header ({e}); re-convert the model.") from e
    if h.get("model_id") != m.model_id:
        raise FlashMoeError(
            f"{path} belongs to another conversion (model id {h.get('model_id')}, manifest says {m.model_id}): "
            "the manifest or the expert files were copied from another model. Re-convert the model.")
    if h.get("layer") != layer or h.get("expert_stride") != m.expert_stride:
        raise FlashMoeError(
            f"{path} holds layer {h.get('layer')}, not layer {layer}: files were renamed or swapped. "
            "Restore them or re-convert the model.")


def is_packed_dir(model_dir: str | Path) -> bool:
    """True for a directory written (or being written) by `llm flashmoe convert`."""
    d = Path(model_dir)
    return any((d / n).exists() for n in (MANIFEST_NAME, COMPLETE_NAME, STATE_NAME, RESIDENT_NAME))


def conversion_status(model_dir: str | Path) -> str:
    """"complete", or "incomplete: ..." saying what to do, from the files alone (no checksums)."""
    d = Path(model_dir)
    if not (d / COMPLETE_NAME).exists():
        try:
            st = json.loads((d / STATE_NAME).read_text())
            done = f"{len(st.get('layers_done', {}))} of {st.get('num_layers', '?')} layers done; "
        except (OSError, ValueError):
            done = ""
        return f"incomplete: conversion not finished ({done}run the same convert command again to resume)"
    if not (d / MANIFEST_NAME).is_file():
        return f"incomplete: {MANIFEST_NAME} missing (re-convert the model)"
    return "complete"


def read_manifest(model_dir: str | Path) -> Manifest:
    """The manifest of a finished packed directory, or a FlashMoeError saying what to do."""
    d = Path(model_dir)
    if not (d / COMPLETE_NAME).exists():
        hint = ""
        state = d / STATE_NAME
        if state.exists():
            try:
                st = json.loads(state.read_text())
                hint = (f" ({len(st.get('layers_done', {}))} of {st.get('num_layers', '?')} layers done). "
                        f"Resume it with: llm flashmoe convert {st.get('source', {}).get('path', 'SRC')} {d}")
            except ValueError:
                pass
        raise FlashMoeError(
            f"{d} is an unfinished conversion{hint or '. Resume it by running the same llm flashmoe convert command again'}"
            "; it is not used until the conversion completes.")
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise FlashMoeError(
            f"{path} is missing: without it the expert files cannot be read. Re-convert the model "
            "(llm flashmoe convert SRC DIR) into a new directory.")
    m = Manifest.from_json(path.read_text(), str(path))
    config = d / "config.json"
    if config.is_file() and sha256_file(config) != m.config_sha256:
        raise FlashMoeError(
            f"{path} does not belong to {config} (config checksum differs): the manifest or config was copied "
            "from another model. Re-convert the model.")
    return m
