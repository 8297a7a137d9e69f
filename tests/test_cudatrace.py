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


def test_overhead_loop_can_run_with_pythons_collector_frozen_or_off(tiny_mlx, monkeypatch, capsys):
    """`overhead loop --gc freeze|off`: the objects made before the loop are frozen out of the
    collector's way (or the collector is off) while it runs, and the report says which."""
    import gc

    from llm_flashmoe.kernels import overhead

    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    try:
        assert overhead.main(["loop", "--dir", str(tiny_mlx), "--seconds", "0.2", "--gc", "freeze"]) == 0
        assert gc.get_freeze_count() > 0 and gc.isenabled()
        assert "(Python's collector: freeze)" in capsys.readouterr().out
        gc.unfreeze()
        assert overhead.main(["loop", "--dir", str(tiny_mlx), "--seconds", "0.2", "--gc", "off"]) == 0
        assert not gc.isenabled() and gc.get_freeze_count() == 0
        assert "(Python's collector: off)" in capsys.readouterr().out
    finally:
        gc.unfreeze()
        gc.enable()


def test_stacks_summary_sums_py_spys_raw_samples_per_function(tmp_path, capsys):
    """`overhead stacks RAW` (py-spy's `record --native -f raw`): samples summed per thread; for the
    busiest thread, each function's share on top of the stack (self) and anywhere in it (inclusive,
    once per stack, however often it recurs), lines and symbol-less addresses folded into one row
    per function or library; --keep takes only the stacks through a frame."""
    from llm_flashmoe.kernels import overhead
    from llm_flashmoe.kernels.host import stacks_summary

    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (1): MainThread;main (run.py:3);step (engine.py:10);std::_Hash_bytes (libstdc++.so.6) 6\n"
        "thread (1): MainThread;main (run.py:3);step (engine.py:12);0x7f00aa (libc.so.6) 2\n"
        "thread (1): MainThread;main (run.py:4);f (x.py:1);f (x.py:2);0x7f00bb (libc.so.6) 2\n"
        "thread (2): worker;poll (libcuda.so) 3\n"
        "not a sample line\n")
    s = stacks_summary(str(raw), top=10)
    assert s["threads"] == {"thread (1): MainThread": 10, "thread (2): worker": 3}
    assert s["self"] == {"std::_Hash_bytes (libstdc++.so.6)": 6, "? (libc.so.6)": 4}
    assert s["inclusive"]["main (run.py)"] == 10 and s["inclusive"]["step (engine.py)"] == 8
    assert s["inclusive"]["f (x.py)"] == 2                      # recursion counted once per stack
    assert "poll (libcuda.so)" not in s["inclusive"]             # another thread's
    out = capsys.readouterr().out
    assert "   60.00  std::_Hash_bytes (libstdc++.so.6)" in out and "   80.00  step (engine.py)" in out
    assert overhead.main(["stacks", str(raw), "--keep", "f (x.py"]) == 0
    kept = capsys.readouterr().out
    assert "  100.00  ? (libc.so.6)" in kept and "Hash_bytes" not in kept
    with pytest.raises(SystemExit, match="no samples through a frame containing 'nothing'"):
        stacks_summary(str(raw), keep="nothing")


def test_overhead_loop_pad_inputs_gives_each_launch_more_unread_arrays(tmp_path, monkeypatch):
    """`overhead loop --pad-inputs N` (what an input costs the host): every fused launch after it
    takes N more distinct arrays, named apart, that it does not read (a kernel of its own); its
    outputs are the same (the CUDA source run by the emulator)."""
    import mlx.core as mx

    from llm_flashmoe.kernels import check, emulate, gpu
    from llm_flashmoe.kernels.host import pad_inputs

    monkeypatch.setattr(gpu.GpuKernels, "kernel", gpu.GpuKernels.kernel)   # restored after the test
    mx.random.seed(3)
    x, lin = check.rnd((1, 64), mx.float32), check.qlinear(32, 64, dtype=mx.float32)
    kern = emulate.emulated_kernels(tmp_path)
    given, make = [], kern._make

    def recording(**spec):
        launch = make(**spec)

        def call(**kw):
            given.append((spec["input_names"], kw["inputs"]))
            return launch(**kw)
        return call

    kern._make = recording
    before = kern.qmv(x, [lin])[0]
    pad_inputs(3)
    padded = kern.qmv(x, [lin])[0]
    (plain_names, plain_inputs), (names, inputs) = given
    assert names == [*plain_names, "fm_pad0", "fm_pad1", "fm_pad2"] and len(inputs) == len(plain_inputs) + 3
    assert all(a is b for a, b in zip(inputs, plain_inputs))
    assert len({id(a) for a in inputs[-3:]}) == 3 and all(a.shape == (4,) for a in inputs[-3:])
    assert mx.array_equal(padded, before)
    pad_inputs(0)                                       # adds nothing more
    assert mx.array_equal(kern.qmv(x, [lin])[0], before) and len(given) == 3 and len(given[-1][1]) == len(inputs)
