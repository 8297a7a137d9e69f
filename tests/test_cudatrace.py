"""kernels/cudatrace: the LD_PRELOAD library that counts the CUDA calls of a decode step (built here
with gcc), against stand-in CUDA libraries loaded the way Python loads MLX's (RTLD_LOCAL), and
`overhead loop`, the bare pipelined decode it is preloaded into."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "cudatrace" / "cudatrace.c"


def _gcc(*args) -> None:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build kernels/cudatrace (the CI machines have it)")
    subprocess.run(["gcc", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def trace_lib(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cudatrace")
    lib = d / "libcudatrace.so"
    _gcc("-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(lib), str(SOURCE), "-ldl")
    return lib


def test_calls_are_forwarded_into_locally_loaded_cuda_libraries_and_counted(trace_lib, tmp_path):
    # a stand-in CUDA runtime, and a library that calls it (MLX's place), loaded with RTLD_LOCAL:
    # out of RTLD_NEXT's reach, where the forwarding must still find the real functions
    (tmp_path / "fake.c").write_text(
        "long cudaGraphLaunch(long a, long b) { return a * 10 + b; }\n"
        "long cuLaunchKernel(long a, long b, long c, long d, long e, long f, long g, long h, long i, long j,"
        " long k) { return a - b + c - d + e - f + g - h + i - j + k * 100; }\n")
    (tmp_path / "user.c").write_text(
        "long cudaGraphLaunch(long, long);\n"
        "long cuLaunchKernel(long, long, long, long, long, long, long, long, long, long, long);\n"
        "long user(long n) { long s = 0; for (long i = 0; i < n; i++) s += cudaGraphLaunch(4, 2);\n"
        "  return s + cuLaunchKernel(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11); }\n")
    _gcc("-shared", "-fPIC", "-o", str(tmp_path / "libcudart.so.13"), str(tmp_path / "fake.c"))
    _gcc("-shared", "-fPIC", "-o", str(tmp_path / "libuser.so"), str(tmp_path / "user.c"),
         f"-L{tmp_path}", "-l:libcudart.so.13", f"-Wl,-rpath,{tmp_path}")
    code = (
        "import ctypes\n"
        f"u = ctypes.CDLL({str(tmp_path / 'libuser.so')!r})\n"
        "print('user', u.user(ctypes.c_long(3)))\n"
        "ctypes.CDLL(None).cudatrace_dump(ctypes.c_long(3))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": str(trace_lib)},
                         check=True, capture_output=True, text=True).stdout
    # every argument reached the real functions (11 of them, 5 on the stack), results came back
    assert "user 1221" in out, out          # 3 * 42 + (1-2+3-4+5-6+7-8+9-10 + 1100)
    table = out.split("us/call", 1)[1]      # the dump's rows: function, calls per step, ...
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+([\d.]+)\s", table, re.M)}
    assert rows == {"cudaGraphLaunch": 1.0, "cuLaunchKernel": pytest.approx(1 / 3, abs=0.05)}, out


def test_overhead_loop_runs_a_pipelined_decode_and_reports_its_cuda_calls(trace_lib, tiny_mlx):
    env = {**os.environ, "LD_PRELOAD": str(trace_lib), "FLASHMOE_KERNELS": "twin"}
    out = subprocess.run([sys.executable, "-m", "llm_flashmoe.kernels.overhead", "loop", "--dir", str(tiny_mlx),
                          "--seconds", "0.5"], env=env, check=True, capture_output=True, text=True,
                         cwd=ROOT, timeout=300).stdout
    m = re.search(r"^(\d+) steps in [\d.]+ s: (\d+) us per token", out, re.M)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) > 0, out
    # the twins run on the CPU: a dump with no CUDA call in it
    assert re.search(r"^cudatrace: 0\.0 us per step .*\(" + m.group(1) + " steps\\)", out, re.M), out
