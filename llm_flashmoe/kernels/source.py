"""Kernel sources: the shared dialect in `kernels/` -> Metal or CUDA source text.

A kernel's generated source is `(header, body)` for `mx.fast.metal_kernel` /
`mx.fast.cuda_kernel`:

    header = dialect header (backend) + #defines + common.kern + family helpers
    body   = dialect prologue (backend) + kernel body

A `//@@ part NAME` section is code two kernels of a family share: a line `//@part NAME` in a
kernel body stands for it.

so the Metal and CUDA texts of a kernel differ only in the dialect layer.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# The sources live once, in the checkout's top-level kernels/; the package reaches them
# through its `sources` link, which a built wheel turns into a copy (package data in
# pyproject.toml), so editable and regular installs find them at the same place.
KERNEL_DIR = Path(__file__).parent / "sources"
BACKENDS = ("metal", "cuda")
# kernel name -> family file
KERNELS = {
    "qmv": "qmv",
    "moe_route": "moe", "moe_gate_up": "moe", "moe_route_gate_up": "moe", "moe_down": "moe",
    "decode_attention": "attention",
    "qk_norm_rope": "qk_norm_rope", "qk_norm_rope_kv": "qk_norm_rope",
    "gdn_step": "gated_delta",
    "add_rms_norm": "rms_norm",
    "stream_read": "bench",   # benchmarks only (overhead bwfloor)
}


def _sections(path: Path) -> dict[str, str]:
    """`//@@ NAME` markers split a file into named sections (text before the first is dropped)."""
    if not path.is_file():
        from ..errors import FlashMoeError

        raise FlashMoeError(f"kernel source {path} is missing: reinstall llm-flashmoe, or run with "
                            "FLASHMOE_KERNELS=off to use the plain-MLX path.")
    out, name, lines = {}, None, []
    for line in path.read_text().splitlines():
        if line.startswith("//@@ "):
            if name is not None:
                out[name] = "\n".join(lines) + "\n"
            name, lines = line[5:].strip(), []
        else:
            lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines) + "\n"
    return out


@lru_cache(maxsize=None)
def dialect(backend: str) -> dict[str, str]:
    """{'header': ..., 'prologue': ...} for `backend` (CUDA's also 'bounds', which follows the
    kernel's #defines)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}")
    return _sections(KERNEL_DIR / "dialect" / f"{backend}.h")


@lru_cache(maxsize=None)
def family(name: str) -> dict[str, str]:
    return _sections(KERNEL_DIR / f"{name}.kern")


def defines_text(defines: dict) -> str:
    return "".join(f"#define {k} {_literal(v)}\n" for k, v in defines.items())


def _literal(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(v) + "f"
    return str(v)


def render(kernel: str, backend: str, defines: dict | None = None) -> tuple[str, str]:
    """The (header, body) of `kernel` for `backend`, with `defines` as #defines."""
    fam = family(KERNELS[kernel])
    d = dialect(backend)
    header = (d["header"] + defines_text(defines or {}) + d.get("bounds", "") + family("common")["helpers"]
              + fam.get("helpers", ""))
    body = d["prologue"] + _expand(fam["kernel " + kernel], fam)
    return header, body


def _expand(text: str, fam: dict[str, str]) -> str:
    """`text` with each `//@part NAME` line replaced by the family's `part NAME` section."""
    return "".join(fam["part " + line[len("//@part "):].strip()] if line.startswith("//@part ") else line
                   for line in text.splitlines(keepends=True))
