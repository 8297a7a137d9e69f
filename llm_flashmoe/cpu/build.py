"""Compile the C kernels in `kernels/cpu/` on first use and load them.

The library is built with the system C compiler for the machine it runs on
(`-march=native`, so AVX2/AVX-512/NEON come from the compiler, not from
runtime dispatch in our code) into a cache directory keyed by a hash of
the sources, the compiler and the CPU, then loaded with ctypes. Building
takes about a second; later processes reuse the file.

No compiler, a failed build or `FLASHMOE_KERNELS=off`: `load()` returns
None and the engine keeps the plain-MLX path (with a one-line notice in the
first two cases).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# kernels/cpu/ of the checkout, reached through the package's `kernels/sources` link (a copy
# in a built wheel, see pyproject.toml), so editable and regular installs find it alike.
SOURCE_DIR = Path(__file__).resolve().parent.parent / "kernels" / "sources" / "cpu"
_state: dict = {}


def disabled() -> bool:
    return os.environ.get("FLASHMOE_KERNELS", "").strip().lower() in ("off", "0", "false", "no", "mlx")


def cache_root() -> Path:
    """Where built kernels live: FLASHMOE_CACHE_DIR, else the user's cache folder's llm-flashmoe."""
    if os.environ.get("FLASHMOE_CACHE_DIR"):
        return Path(os.environ["FLASHMOE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-flashmoe"


def cache_dir() -> Path:
    return cache_root() / "cpu-kernels"


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def arch_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        return ["-march=native"]
    if machine in ("arm64", "aarch64"):
        return ["-mcpu=native"]
    return []


def cpu_identity() -> str:
    """What `-march=native` depends on: a cache dir shared between machines
    (home over NFS) must not hand one machine another's instructions."""
    ident = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                ident += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        ident += platform.processor()
    return ident


def compile_cached(name: str, sources: list[Path], flags: list[str], *, headers: list[Path] = (),
                   key: str = "", libs: list[str] = (), out_dir: Path | None = None) -> Path:
    """Compile `sources` into the shared library `name`_<hash> in the cache (if not there yet)
    and return its path; the hash covers the sources, headers, compiler, flags and `key`.
    Raises RuntimeError with the compiler's message on failure."""
    cc = find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for f in [*sources, *headers]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update("\0".join([cc, version, *flags, key]).encode())
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"{name}_{h.hexdigest()[:16]}{suffix}"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses (test
    # workers) each get a complete file.
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=suffix)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, *map(str, sources), *libs],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {res.stderr.strip()[:2000]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def build(extra_flags: list[str] | None = None, out_dir: Path | None = None) -> Path:
    """Compile the kernels (if not cached) and return the library's path.
    Raises RuntimeError with the compiler's message on failure."""
    sources = sorted(SOURCE_DIR.glob("*.c"))
    if not sources:
        raise RuntimeError(f"kernel sources not found in {SOURCE_DIR}")
    flags = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-D_GNU_SOURCE", "-fopenmp-simd",
             *arch_flags(), *(extra_flags or [])]
    return compile_cached("flashmoe_cpu", sources, flags, headers=sorted(SOURCE_DIR.glob("*.h")),
                          key=cpu_identity(), libs=["-lm"], out_dir=out_dir)


def _declare(lib: ctypes.CDLL) -> None:
    from .ops import QMat

    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fm_set_threads.argtypes, lib.fm_set_threads.restype = [I32, ctypes.c_long], I32
    lib.fm_threads.argtypes, lib.fm_threads.restype = [], I32
    lib.fm_qmm.argtypes = [I32, ctypes.POINTER(QMat), P, I64, P]
    lib.fm_qmm.restype = I32
    lib.fm_moe.argtypes = [I32, ctypes.POINTER(QMat), ctypes.POINTER(QMat), ctypes.POINTER(QMat),
                           P, P, P, P, I64, P, I32]
    lib.fm_moe.restype = I32
    lib.fm_moe_gate_up.argtypes = [I32, ctypes.POINTER(QMat), ctypes.POINTER(QMat), P, P, P, I64, P, I64]
    lib.fm_moe_gate_up.restype = I32
    lib.fm_moe_down.argtypes = [I32, ctypes.POINTER(QMat), P, P, P, P, I64, I64, P, I32]
    lib.fm_moe_down.restype = I32
    lib.fm_gdn_step.argtypes = [P] * 10 + [I32] * 5 + [ctypes.c_float, P, P, P]
    lib.fm_gdn_step.restype = I32
    lib.fm_huge_remap.argtypes, lib.fm_huge_remap.restype = [P, I64], I64
    lib.fm_rms_norm.argtypes, lib.fm_rms_norm.restype = [P, P, P, I64, I64, ctypes.c_float, P, P], I32
    lib.fm_route.argtypes, lib.fm_route.restype = [P, I32, I32, I32, P, P], I32


def load(quiet: bool = False) -> ctypes.CDLL | None:
    """The kernel library, built if needed; None when disabled or unbuildable."""
    if disabled():
        return None
    if "lib" in _state:
        return _state["lib"]
    lib = None
    try:
        lib = ctypes.CDLL(str(build()))
        _declare(lib)
        threads = int(os.environ.get("FLASHMOE_CPU_THREADS", "0") or 0)
        if threads <= 0 and hasattr(os, "sched_getaffinity"):
            threads = len(os.sched_getaffinity(0))
        spin_us = int(os.environ.get("FLASHMOE_CPU_SPIN_US", "-1") or -1)
        lib.fm_set_threads(threads, spin_us)
    except (RuntimeError, OSError) as e:
        lib = None
        if not quiet:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"llm-flashmoe: CPU kernels unavailable ({first}); using the slower plain-MLX path.",
                  file=sys.stderr)
    _state["lib"] = lib
    return lib
