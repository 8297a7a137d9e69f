"""A published checkpoint -> a packed model directory (format.py), layer by layer.

Sources: MLX-converted (quantized; experts repacked bit-exact unless
re-quantized), Hugging Face bf16/fp16 (quantized here: 4-bit affine, group
64, router and shared-expert gate at 8 bits, as the published MLX
conversion does), and synthetic weights (synth.py generators, for
benchmarks bigger than the disk could hold twice).

Resumable: `convert-state.json` records what is done (the resident file,
then each layer file, each renamed into place once complete); running the
same command again continues from there. Memory stays near one chunk of
experts (~64 MB) or one block of rows of a resident tensor; free disk needed
is the output that remains, no more.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import ModuleSpec, _CENTRED_NORMS, iter_published_tensors, model_modules, tensor_name, tensor_shapes
from ..config import ModelConfig, parse_config
from ..errors import FlashMoeError
from ..safetensors_io import _DTYPES, SafetensorsWriter
from . import format as fmt
from .progress import Progress, human_bytes

CHUNK_BYTES = 64 << 20  # expert bytes (or dense source bytes) handled at once
ROWS_ELEMS = 1 << 24    # elements of a resident tensor read at once
_ST_TO_FMT = {"U32": "uint32", "BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_FMT_TO_ST = {v: k for k, v in _ST_TO_FMT.items()}


@dataclass
class Quantized:
    """One projection of n experts in MLX affine form; raw numpy (bf16 carried as uint16)."""

    weight: np.ndarray  # uint32 [n, out, in*bits/32]
    scales: np.ndarray  # [n, out, in/group]
    biases: np.ndarray
    bits: int
    group_size: int
    float_dtype: str    # "bfloat16" | "float16" | "float32"


def _mx_float(a: np.ndarray, float_dtype: str):
    import mlx.core as mx

    m = mx.array(a)
    return m.view(mx.bfloat16) if float_dtype == "bfloat16" else m


def _np_raw(a) -> np.ndarray:
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a)


def quantize_dense(x, bits: int, group_size: int) -> Quantized:
    """Dense mx.array [n, out, in] (bf16/fp16; fp32 is taken as bf16) -> Quantized."""
    import mlx.core as mx

    if x.dtype == mx.float32:
        x = x.astype(mx.bfloat16)
    w, s, b = mx.quantize(x, group_size=group_size, bits=bits)
    fd = "bfloat16" if s.dtype == mx.bfloat16 else "float16"
    return Quantized(_np_raw(w), _np_raw(s), _np_raw(b), bits, group_size, fd)


def requantize(q: Quantized, bits: int, group_size: int) -> Quantized:
    """The same projection at another bit width: bytes untouched when nothing changes."""
    import mlx.core as mx

    if q.bits == bits and q.group_size == group_size:
        return q
    dense = mx.dequantize(mx.array(q.weight), _mx_float(q.scales, q.float_dtype), _mx_float(q.biases, q.float_dtype),
                          group_size=q.group_size, bits=q.bits)
    return quantize_dense(dense, bits, group_size)


# -- sources -------------------------------------------------------------------

class _PublishedSource:
    """An MLX or Hugging Face checkpoint directory, read tensor by tensor."""

    def __init__(self, src: Path):
        self.dir = src
        path = src / "config.json"
        if not path.is_file():
            raise FlashMoeError(f"{path} not found: SRC must be a Qwen3.5 MoE checkpoint directory "
                                "(config.json, tokenizer files, *.safetensors).")
        self.raw_config = json.loads(path.read_text())
        self.cfg = parse_config(self.raw_config, str(path))
        self.tensors: dict[str, tuple] = {}
        layouts = set()
        for name, layout, f, published in iter_published_tensors(src):
            self.tensors[name] = (f, published)
            layouts.add(layout)
            if f.tensors[published].dtype == "F8_E4M3":
                raise FlashMoeError(f"{src} holds fp8 weights ({published}); converting fp8 checkpoints is not "
                                    "supported yet. Use the bf16 or the MLX 4-bit checkpoint.")
        layouts.discard("?")
        if len(layouts) != 1:
            raise FlashMoeError(f"{src} mixes tensor layouts {sorted(layouts)} or has no Qwen3.5 text weights.")
        self.layout = layouts.pop()
        self.sha = fmt.sha256_file(path)

    def info(self) -> dict:
        return {"path": str(self.dir.resolve()), "layout": self.layout, "config_sha256": self.sha}

    def _get(self, name: str):
        if name not in self.tensors:
            raise FlashMoeError(f"{self.dir}: tensor {name} is missing from the checkpoint; the download is "
                                "incomplete or this is not a Qwen3.5 MoE text checkpoint.")
        return self.tensors[name]

    def _rows(self, name: str, want_shape: tuple[int, ...]):
        """A tensor read in blocks of rows, as raw numpy, checked against `want_shape` (any 1-axis fold)."""
        f, pub = self._get(name)
        info = f.tensors[pub]
        if int(np.prod(info.shape)) != int(np.prod(want_shape)) or info.shape[0] != want_shape[0]:
            raise FlashMoeError(f"{self.dir}: tensor {pub} has shape {list(info.shape)}, expected "
                                f"{list(want_shape)} from config.json; the weights do not belong to this config.")
        per = max(1, ROWS_ELEMS // max(1, int(np.prod(info.shape[1:]))))
        for start in range(0, info.shape[0], per):
            a = f.read_numpy(pub, rows=slice(start, min(info.shape[0], start + per)))
            yield a.reshape(a.shape[0], *want_shape[1:]) if len(want_shape) > 1 else a.reshape(-1)

    def copy_files(self, dest: Path) -> None:
        for p in sorted(self.dir.iterdir()):
            if (p.is_file() and p.suffix in (".json", ".jinja", ".txt", ".model", ".tiktoken")
                    and p.name not in ("config.json", "model.safetensors.index.json", fmt.MANIFEST_NAME,
                                       fmt.STATE_NAME) and p.stat().st_size < (64 << 20)):
                shutil.copyfile(p, dest / p.name)


class MLXSource(_PublishedSource):
    """MLX-converted checkpoint: every tensor is copied, experts repacked."""

    def target_config(self) -> dict:
        return dict(self.raw_config)

    def module_tensors(self, mod: ModuleSpec, cfg: ModelConfig):
        for name, shape in tensor_shapes(cfg, mod).items():
            f, pub = self._get(name)
            yield name, f.tensors[pub].dtype, shape, (lambda n=name, s=shape: self._rows(n, s))

    def expert_quant(self) -> tuple[int, int, str]:
        """(bits, group, float dtype) of the experts, read from the tensor shapes."""
        f, pub = self._get("layers.0.mlp.experts.down_proj.weight")
        fs, pubs = self._get("layers.0.mlp.experts.down_proj.scales")
        inner = self.cfg.moe_intermediate_size
        bits = f.tensors[pub].shape[-1] * 32 // inner
        group = inner // fs.tensors[pubs].shape[-1]
        return bits, group, _ST_TO_FMT[fs.tensors[pubs].dtype]

    def experts(self, layer: int, e0: int, e1: int) -> list:
        bits, group, fd = self.expert_quant()
        out = []
        for proj in fmt.PROJECTIONS:
            base = f"layers.{layer}.mlp.experts.{proj}."
            parts = []
            for part in fmt.PARTS:
                f, pub = self._get(base + part)
                parts.append(f.read_numpy(pub, rows=slice(e0, e1)))
            out.append(Quantized(*parts, bits, group, fd))
        return out

    def dense_expert_bytes(self) -> int:
        return 0


class HFSource(_PublishedSource):
    """Hugging Face checkpoint: linear layers quantized to 4-bit g64 (router, shared gate 8-bit)."""

    def target_config(self) -> dict:
        raw = dict(self.raw_config)
        qc = raw.get("quantization_config")
        if qc:
            raise FlashMoeError(f"{self.dir}/config.json declares quantization_config {qc.get('quant_method', qc)}; "
                                "only bf16/fp16 Hugging Face checkpoints (or MLX ones) can be converted.")
        q = {"group_size": 64, "bits": 4, "mode": "affine"}
        for i in range(self.cfg.num_hidden_layers):  # as the published MLX conversion
            for m in ("mlp.gate", "mlp.shared_expert_gate"):
                q[f"language_model.model.layers.{i}.{m}"] = {"group_size": 64, "bits": 8}
        raw["quantization"] = q
        raw["quantization_config"] = q
        return raw

    def _float_dtype(self, name: str) -> str:
        f, pub = self._get(name)
        d = f.tensors[pub].dtype
        return "F16" if d == "F16" else "BF16"

    def module_tensors(self, mod: ModuleSpec, cfg: ModelConfig):
        import mlx.core as mx

        q = cfg.quant_for(mod.name) if mod.kind in ("linear", "embedding") else None
        if q is None:
            name = tensor_name(mod)
            f, pub = self._get(name)
            dtype = f.tensors[pub].dtype
            shape = mod.shape
            centred = name == "norm.weight" or name.endswith(_CENTRED_NORMS)

            def pieces(name=name, shape=shape, centred=centred, dtype=dtype):
                for a in self._rows(name, shape):
                    if centred:  # zero-centred in HF files: 1 + w, rounded once as mlx-lm does
                        a = _mx_float(a, "bfloat16" if dtype == "BF16" else "x")
                        a = (a.astype(mx.float32) + 1.0).astype(a.dtype)
                    yield a
            yield name, dtype, shape, pieces
            return
        src = mod.name + ".weight"
        fdt = self._float_dtype(src)
        shapes = tensor_shapes(cfg, mod)
        names = list(shapes)
        state: dict = {}

        def weight_pieces():
            f, pub = self._get(src)
            raw_dt = f.tensors[pub].dtype
            scales, biases = [], []
            for a in self._rows(src, mod.shape):
                x = _mx_float(a, "bfloat16" if raw_dt == "BF16" else "x")
                w, s, b = mx.quantize(x if x.dtype != mx.float32 else x.astype(mx.bfloat16),
                                      group_size=q.group_size, bits=q.bits)
                scales.append(s)
                biases.append(b)
                yield w
            state["s"], state["b"] = scales, biases

        yield names[0], "U32", shapes[names[0]], weight_pieces
        yield names[1], fdt, shapes[names[1]], lambda: iter(state.pop("s"))
        yield names[2], fdt, shapes[names[2]], lambda: iter(state.pop("b"))

    def expert_quant(self) -> tuple[int, int, str]:
        return 4, 64, "float16" if self._float_dtype("layers.0.mlp.experts.down_proj") == "F16" else "bfloat16"

    def experts(self, layer: int, e0: int, e1: int) -> list:
        f, pub = self._get(f"layers.{layer}.mlp.experts.gate_up_proj")
        gu = _mx_float(f.read_numpy(pub, rows=slice(e0, e1)), _ST_TO_FMT.get(f.tensors[pub].dtype, "x"))
        f, pub = self._get(f"layers.{layer}.mlp.experts.down_proj")
        down = _mx_float(f.read_numpy(pub, rows=slice(e0, e1)), _ST_TO_FMT.get(f.tensors[pub].dtype, "x"))
        I = self.cfg.moe_intermediate_size
        if gu.shape[1:] != (2 * I, self.cfg.hidden_size) or down.shape[1:] != (self.cfg.hidden_size, I):
            raise FlashMoeError(f"{self.dir}: layer {layer} experts have shapes {gu.shape}, {down.shape}; "
                                "expected [E, 2I, H] and [E, H, I] from config.json.")
        return [gu[:, :I], gu[:, I:], down]  # dense; gate is the first half of gate_up

    def dense_expert_bytes(self) -> int:
        c = self.cfg
        return 3 * c.moe_intermediate_size * c.hidden_size * 2


class SynthSource:
    """Synthetic weights drawn by synth.py's generators, as its MLX layout would hold them."""

    def __init__(self, preset: str, layers: int | None, seed: int, fast_experts: bool | None):
        from .. import synth

        if preset not in synth.PRESETS:
            raise FlashMoeError(f"unknown preset {preset!r}; choose one of {', '.join(synth.PRESETS)}.")
        self.synth = synth
        self.raw_config = synth.make_config(preset, layers, 4)
        self.cfg = parse_config(self.raw_config)
        self.maker = synth.WeightMaker(self.cfg, seed)
        self.fast = preset != "tiny" if fast_experts is None else fast_experts
        self._info = {"path": f"synthetic:{preset}:seed={seed}:fast={int(self.fast)}", "layout": "synthetic",
                      "config_sha256": ""}

    def info(self) -> dict:
        return self._info

    def target_config(self) -> dict:
        return dict(self.raw_config)

    def module_tensors(self, mod: ModuleSpec, cfg: ModelConfig):
        import mlx.core as mx

        decl = self.synth._declare(cfg, mod, "mlx")
        gen = None

        def pieces(pub):
            nonlocal gen
            if gen is None:
                gen = self.synth._generate(cfg, mod, "mlx", self.maker, self.fast, mx)
            pending = []
            for p, piece in gen:  # the generator yields tensors in declaration order
                if p != pub:
                    pending.append((p, piece))
                    break
                yield piece
            if pending:  # first piece of the next tensor: put it back in front
                rest = gen
                gen = _chain(pending, rest)

        for (pub, dtype, shape, _role), (name, want) in zip(decl, tensor_shapes(cfg, mod).items()):
            yield name, dtype, want, (lambda pub=pub: pieces(pub))

    def expert_quant(self) -> tuple[int, int, str]:
        return 4, 64, "bfloat16"

    def experts(self, layer: int, e0: int, e1: int) -> list:
        import mlx.core as mx

        out = []
        for proj in fmt.PROJECTIONS:
            mod = ModuleSpec(f"layers.{layer}.mlp.experts.{proj}", "experts",
                             _expert_shape(self.cfg, proj, self.cfg.num_experts))
            q = self.cfg.quant_for(mod.name)
            ws, ss, bs = [], [], []
            for e in range(e0, e1):
                if self.fast:
                    w, s, b = self.synth._fast_codes(self.maker, mod, e, q)
                else:
                    dense = self.synth._bf16(self.maker.dense(mod, e, mod.shape[1]))
                    w, s, b = mx.quantize(dense, group_size=q.group_size, bits=q.bits)
                ws.append(_np_raw(w))
                ss.append(_np_raw(s))
                bs.append(_np_raw(b))
            out.append(Quantized(np.stack(ws), np.stack(ss), np.stack(bs), q.bits, q.group_size, "bfloat16"))
        return out

    def dense_expert_bytes(self) -> int:
        return 0

    def copy_files(self, dest: Path) -> None:
        from ..chat.vocab import write_tokenizer_files

        write_tokenizer_files(dest)
        (dest / "generation_config.json").write_text(json.dumps(
            {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [248046, 248044]},
            indent=2))


def _chain(first: list, rest):
    yield from first
    yield from rest


def _expert_shape(cfg: ModelConfig, proj: str, E: int) -> tuple[int, int, int]:
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    return (E, H, I) if proj == "down_proj" else (E, I, H)


def open_source(src: str | Path):
    src = Path(src)
    if not src.is_dir():
        raise FlashMoeError(f"source checkpoint {src} is not a directory.")
    if fmt.is_packed_dir(src):
        raise FlashMoeError(f"{src} is already a converted (packed) model directory; use it as is.")
    source = _PublishedSource(src)
    source.__class__ = MLXSource if source.layout == "mlx" else HFSource
    return source


# -- the conversion -------------------------------------------------------------

def convert_checkpoint(src: str | Path, dest: str | Path, expert_bits: int | None = None,
                       progress: bool = True) -> Path:
    """Convert checkpoint `src` (MLX or Hugging Face layout) into packed directory `dest`.

    Resumes an unfinished conversion into `dest` of the same source and options.
    `expert_bits` (2, 3, 4 or 8) re-quantizes the experts; default: keep (MLX) or 4 (HF).
    """
    if expert_bits is not None and expert_bits not in (2, 3, 4, 8):
        raise FlashMoeError(f"--expert-bits must be 2, 3, 4 or 8, got {expert_bits}.")
    return _convert(open_source(src), Path(dest), expert_bits, progress)


def write_packed_synthetic(dest: str | Path, *, preset: str = "tiny", layers: int | None = None, seed: int = 0,
                           fast_experts: bool | None = None, progress: bool = True) -> Path:
    """A synthetic model written straight into the packed layout (no published copy on disk)."""
    return _convert(SynthSource(preset, layers, seed, fast_experts), Path(dest), None, progress)


def _convert(source, dest: Path, expert_bits: int | None, progress: bool) -> Path:
    info = {**source.info(), "expert_bits": expert_bits}
    src_bits, src_group, float_dtype = source.expert_quant()
    bits = expert_bits or src_bits
    group = src_group if bits == src_bits else 64
    raw = source.target_config()
    if bits != src_bits or group != src_group:
        q = raw.setdefault("quantization", {"group_size": 64, "bits": 4, "mode": "affine"})
        for i in range(source.cfg.num_hidden_layers):
            for proj in fmt.PROJECTIONS:
                q[f"language_model.model.layers.{i}.mlp.experts.{proj}"] = {"group_size": group, "bits": bits}
        raw["quantization_config"] = q
    cfg = parse_config(raw)
    L, E = cfg.num_hidden_layers, cfg.num_experts

    state = _open_state(dest, info, L)
    config_text = json.dumps(raw, indent=2) + "\n"
    fmt.write_atomic(dest / "config.json", config_text)
    source.copy_files(dest)

    parts = []
    for proj in fmt.PROJECTIONS:
        out, inner = _expert_shape(cfg, proj, E)[1:]
        parts += [(f"{proj}.weight", "uint32", (out, inner * bits // 32)),
                  (f"{proj}.scales", float_dtype, (out, inner // group)),
                  (f"{proj}.biases", float_dtype, (out, inner // group))]
    comps, expert_bytes, stride = fmt.layout_components(parts)
    layout = {"expert_bytes": expert_bytes, "expert_stride": stride, "bits": bits, "group_size": group}
    if state.setdefault("layout", layout) != layout:
        raise FlashMoeError(f"{dest}: the unfinished conversion used another expert layout; delete {dest} "
                            "and convert again.")

    resident_decl = [t for mod in model_modules(cfg) if mod.kind != "experts"
                     for t in source.module_tensors(mod, cfg)]
    resident_bytes = _safetensors_size(resident_decl, state["model_id"])
    layer_bytes = fmt.HEADER_BYTES + E * stride
    total = resident_bytes + L * layer_bytes
    done = (resident_bytes if state.get("resident") else 0) + len(state["layers_done"]) * layer_bytes
    free = shutil.disk_usage(dest).free
    if total - done > free:
        raise FlashMoeError(f"not enough free disk in {dest}: the conversion needs {human_bytes(total - done)} "
                            f"more, {human_bytes(free)} are free. Free some space, then run the same command "
                            "again to resume.")

    bar = Progress("convert", total, done, enabled=progress)
    if not state.get("resident"):
        bar.note = "resident weights"
        state["resident"] = _write_resident(dest, resident_decl, state["model_id"], bar)
        _save_state(dest, state)
    header = {"num_experts": E, "expert_bytes": expert_bytes, "expert_stride": stride}
    per_chunk = max(1, CHUNK_BYTES // max(expert_bytes, source.dense_expert_bytes()))
    for layer in range(L):
        if str(layer) in state["layers_done"]:
            continue
        bar.note = f"layer {layer + 1}/{L}"
        crcs = write_layer(dest, layer, source, comps, expert_bytes, stride, bits, group, per_chunk,
                           fmt.layer_header(state["model_id"], layer, header), bar)
        state["layers_done"][str(layer)] = crcs
        _save_state(dest, state)
    bar.close()

    manifest = fmt.Manifest(
        model_id=state["model_id"], config_sha256=fmt.sha256_file(dest / "config.json"), num_experts=E,
        expert_bytes=expert_bytes, expert_stride=stride, bits=bits, group_size=group, components=comps,
        layers=[fmt.LayerEntry(fmt.layer_file_name(i), state["layers_done"][str(i)]) for i in range(L)],
        resident=state["resident"], source=info)
    fmt.write_atomic(dest / fmt.MANIFEST_NAME, manifest.to_json())
    _fsync_dir(dest)
    fmt.write_atomic(dest / fmt.COMPLETE_NAME, state["model_id"] + "\n")
    (dest / fmt.STATE_NAME).unlink()
    _fsync_dir(dest)
    return dest


def _open_state(dest: Path, info: dict, num_layers: int) -> dict:
    """The resume state of `dest`, created for a new conversion; refuses foreign directories."""
    state_path = dest / fmt.STATE_NAME
    if (dest / fmt.COMPLETE_NAME).exists():
        raise FlashMoeError(f"{dest} already holds a complete converted model; choose a new directory "
                            "(or delete it to convert again).")
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except ValueError as e:
            raise FlashMoeError(f"{state_path} is damaged ({e}); delete {dest} and convert again.") from e
        if state.get("source") != info:
            raise FlashMoeError(
                f"{dest} holds an unfinished conversion of another source or with other options "
                f"({state.get('source')}); resume it with the same command, or choose a new directory.")
        return state
    if dest.exists() and any(dest.iterdir()):
        raise FlashMoeError(f"{dest} exists and is not empty; choose a new directory for the converted model.")
    dest.mkdir(parents=True, exist_ok=True)
    state = {"model_id": uuid.uuid4().hex, "source": info, "num_layers": num_layers, "resident": None,
             "layers_done": {}}
    _save_state(dest, state)
    return state


def _save_state(dest: Path, state: dict) -> None:
    fmt.write_atomic(dest / fmt.STATE_NAME, json.dumps(state))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_size(decl, model_id: str) -> int:
    """Size the resident file will have (header included), for progress and the disk check."""
    header = {"__metadata__": {"format": "mlx", "flashmoe_model_id": model_id}}
    offset = 0
    for name, dtype, shape, _ in decl:
        n = _DTYPES[dtype][1] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + blob + (-blob % 8) + offset


def _write_resident(dest: Path, decl, model_id: str, bar: Progress) -> dict:
    from ..safetensors_io import as_bytes

    path = dest / fmt.RESIDENT_NAME
    w = SafetensorsWriter(path, [(n, d, s) for n, d, s, _ in decl],
                          metadata={"format": "mlx", "flashmoe_model_id": model_id})
    crc = 0
    for name, _dtype, _shape, pieces in decl:
        for piece in pieces():
            raw = as_bytes(piece)
            crc = zlib.crc32(raw, crc)
            w.write(name, piece)
            bar.advance(len(raw))
    w.close()
    return {"file": fmt.RESIDENT_NAME, "bytes": path.stat().st_size, "crc32_data": crc}


def write_layer(dest: Path, layer: int, source, comps, expert_bytes: int, stride: int, bits: int, group: int,
                per_chunk: int, header: bytes, bar: Progress) -> list[int]:
    """Write `experts-NNN.bin` (temp name, fsync, rename); -> crc32 per expert."""
    E = source.cfg.num_experts
    path = dest / fmt.layer_file_name(layer)
    tmp = path.with_name(path.name + ".partial")
    crcs: list[int] = []
    with open(tmp, "wb") as f:
        f.write(header)
        bar.advance(len(header))
        for e0 in range(0, E, per_chunk):
            e1 = min(E, e0 + per_chunk)
            projs = source.experts(layer, e0, e1)
            buf = np.zeros((e1 - e0, stride), np.uint8)
            k = 0
            for p in projs:
                q = requantize(p, bits, group) if isinstance(p, Quantized) else quantize_dense(p, bits, group)
                for arr in (q.weight, q.scales, q.biases):
                    c = comps[k]
                    k += 1
                    flat = np.ascontiguousarray(arr).reshape(e1 - e0, -1).view(np.uint8)
                    if flat.shape[1] != c.nbytes:
                        raise FlashMoeError(f"layer {layer}: expert component {c.name} has {flat.shape[1]} "
                                            f"bytes, expected {c.nbytes}; the checkpoint does not match config.json.")
                    buf[:, c.offset : c.offset + c.nbytes] = flat
            for r in range(e1 - e0):
                crcs.append(zlib.crc32(buf[r, :expert_bytes]))
            f.write(memoryview(buf).cast("B"))
            bar.advance(buf.nbytes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return crcs
