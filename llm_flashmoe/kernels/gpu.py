"""Launchers for the fused kernels on MLX's Metal and CUDA backends.

Each op builds (once per shape/bit-width combination) the kernel from the
dialect sources (source.py) and launches it; anything a kernel does not
cover (dense weights, odd widths, prefill) goes to the plain-MLX twin.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import zlib
from pathlib import Path

import mlx.core as mx

from ..engine.linear import Linear
from ..errors import FlashMoeError
from . import plain
from .source import render

QBITS = (2, 3, 4, 8)
QGROUPS = (32, 64, 128)
# The launch knobs, set from the environment by `configure` (below, at import):
# Rows per warp in qmv: each staged input serves this many rows. FLASHMOE_QMV_ROWS=N fixes it;
# auto (None) takes 8 for launches of 65536 rows or more, 4 from 16384, else 2 (H200, 397B decode
# shapes, `python -m llm_flashmoe.kernels.overhead rows`, us per dependent call at 1/2/4/8 rows:
# 4096->248320 400/386/337/293, 4096->20608 82/79/57/56, 4096->17408 64/70/55/60,
# 8192->4096 46/39/41/57, 4096->513 25/24/27/38); launches that take QINT (below) 8 from 16384.
QMV_ROWS: int | None = None
# Rows per warp of moe_gate_up and moe_down (FLASHMOE_MOE_ROWS=GU,DOWN or GU:DOWN). The same sweep found
# no gain from more (gate/up 33.3/31.9/36.4 us at 1/2/4 rows, down 24.3/24.1/26.0/30.6 at 1/2/4/8).
MOE_GU_ROWS, MOE_DOWN_ROWS = 1, 1
# Words of 4-byte codes a lane loads before computing on them (the QWORDS define of the matrix-vector
# and MoE kernels; FLASHMOE_QMV_WORDS, default 16): bytes in flight against registers per thread.
# The same sums either way. H200, ncu over 6 decode steps of 8 resident 397B layers (GPU time
# alone, one process each): 16 against 32 words took GatedDeltaNet in_proj from 44.1 to 31.7 us
# per call, attention q|k|v 37.9 -> 30.4, moe_route_gate_up 35.1 -> 30.1; all kernels 9631 -> 8828 us.
QWORDS = 16
# Groups of warps a matvec launch may have (FLASHMOE_GRID, a multiple of the GPU's
# multiprocessors, e.g. 2; off: one warp per row group; auto, None here: 2 for the MoE's gate/up
# launches that take QINT on CUDA, off for the rest). A smaller grid makes each warp take several
# row groups in turn: the input is staged once per group of warps for all of them, and a launch
# is no longer a few waves of short-lived groups each paying the staging's latency.
GRID_PER_SM: float | None = None
# FLASHMOE_GRID_BLOCKS=N: at most N groups per launch, on any backend (emulation, tuning)
GRID_BLOCKS: int | None = None
# Threads per group of the matrix-vector launches (qmv, the MoE's gate/up and down;
# FLASHMOE_MV_THREADS, 64-1024, a multiple of 32): each group stages the input once for its warps;
# fewer threads per group fit more groups per multiprocessor when registers are the limit.
# auto (None here): 256, but 512 for the launches that take QINT other than qmv's of 16384 to
# 65535 rows (`_qint_shape`).
MV_THREADS: int | None = None
# FLASHMOE_MIN_GROUPS=N (default 0: off): the matrix-vector kernels are compiled so that N thread groups
# of the launch's threads fit on a multiprocessor at once (CUDA's __launch_bounds__: the compiler holds each
# thread to 65536 / (N * MV_THREADS) registers, spilling if it must), for more warps resident and so
# more of the weights' reads in flight. Metal ignores it. H200 (`overhead ncusettings`, GPU time of 3
# decode steps of 8 resident 397B layers, one process): 4 (64 registers, small spills in the MoE
# kernels) took 3952 against 3933 us; with QPIPE, 3 took 4897. Off. (With FLASHMOE_QASYNC the bounds
# are those of the launch's smaller groups: e.g. 4 groups of 192 threads, 85 registers.)
MIN_GROUPS = 0
# FLASHMOE_QASYNC=S (default 0: off; 2-4): the matrix-vector launches and the MoE's gate/up (FMA
# form; inputs a multiple of 1024, 4- or 8-bit, 2-byte scales; not experts by address) bring their
# codes into fast memory through a ring of S stages of asynchronous copies (common.kern's
# qrows_async_*; cp.async on CUDA, plain copies on Metal), so that a warp keeps S - 1 chunks per
# row in flight while it computes one, in fast memory rather than registers; the first stages start
# before the group stages its input. The same sums in the same order. Thread groups then have
# as many warps as fit their rings in fast memory (at most FLASHMOE_MV_THREADS / 32). The H200
# showed the launches at 2.3-2.7x what reading their bytes costs (`overhead bwfloor`), with more
# warps (FLASHMOE_MIN_GROUPS) no help: this puts more bytes in flight per warp instead. On the card
# (fifteenth session, ncu, all kernels of 3 decode steps of 8 layers): correct but slower, 5140 /
# 5818 / 8699 us at 2 / 3 / 4 stages against 3827 (in_proj 76.4 against 34.4 us: too few warps).
QASYNC = 0
# FLASHMOE_QINT (default auto: on for CUDA, off for Metal; 1, 0): the matrix-vector launches (qmv,
# the MoE's gate/up, and its down in the FMA form, FLASHMOE_MOE_MMA without "down") whose rows are
# all 4-bit or all 8-bit stage their input as integers and take each chunk's dot products four
# bytes at a time (common.kern's QINT: dp4a on CUDA, the sum written out on Metal): two (bf16) or
# three (float32) balanced base-256 digits per input against the chunk's largest, so each input is
# off by at most 1.5e-5 (6e-8) of the chunk's largest, exact sums after. About a third of the FMA
# form's instructions per code: on the H200 (fifteenth session, `overhead ncusol`)
# GatedDeltaNet's in_proj issued an instruction on most cycles (compute throughput 54% against DRAM
# 23%, warps waiting on issue and the ALU pipe: the FMA form's shift and mask per code run at half
# rate). H200, ncu over 3 decode steps of 8 resident 397B layers, the card's own clocks, every
# kernel's GPU time: 3931 us without, 3828 with QINT alone, 3195 with QINT, 512 threads and a grid
# of 2 groups a multiprocessor for every matrix-vector launch; `_qint_shape` takes each launch's
# fastest shape measured (the whole of it not yet timed together). QINT passes `kernels.check` there,
# and a 4-layer decode's logits error is 1.24x the plain path's, as without.
# FLASHMOE_QINT_DIGITS (default auto: 3 for float32 activations, else 2): base-256 digits per input.
QINT: int | None = None
QINT_DIGITS: int | None = None
# FLASHMOE_XV_INNER (default 1): the matrix-vector kernels read each staged input from fast memory
# once for all of a warp's rows instead of holding a chunk's 32 inputs in registers (the XV_INNER
# define; the same sums in the same order, fewer registers: `compile_check --nvcc`). H200, ncu (as
# QWORDS): moe_route_gate_up 1683 -> 1368 and 1689 -> 1371 us over 48 calls in two processes, the
# other kernels within their run-to-run spread.
XV_INNER = 1
# FLASHMOE_QPIPE=1 (default 0): the FMA form's matrix-vector loop (common.kern's qrows_dot, in qmv
# and the MoE's gate/up) issues the next batch of codes, scales and biases before computing the
# current one (two batches of registers): the same sums in the same order, a warp's reads kept in
# flight while it computes. H200 (`overhead settings`, 8 resident 397B layers, 2 rounds): slower,
# pipelined 151 against 113 us per layer, the MoE block 87.5 against 66.7 us; ncu (GPU time of 3
# decode steps): the matrix-vector launches 3435 against 2411 us, all kernels 4967 against 3933.
QPIPE = 0
# FLASHMOE_L2_PREFETCH=1: the matrix-vector and MoE kernels ask for their rows' bytes ahead (the L2PF
# define; prefetch.global.L2 on CUDA, nothing on Metal) before staging their input. Off by default:
# on the H200 (fourteenth session, `overhead ncusettings`, 3 decode steps of 8 resident 397B layers, GPU
# time of every kernel, one process) off took 3760 against 3933 us with the card's own clocks and 5170
# against 5438 us at ncu's base clocks on another machine (moe_down 392 against 475, 611 against 712);
# the kernels pass the check without it and the 4-layer tolerance ratio is 1.24 either way.
# FLASHMOE_L2_PREFETCH=down: moe_down alone (its tensor-core form: a warp per expert asks for the
# group's 16 rows before the input is staged), the rest without (the figures above predate that form).
L2PF = 0
L2PF_DOWN = False
# FLASHMOE_DOWN_PF=1 (default 0; CUDA only): the MoE's gate/up launch, once it knows the experts,
# asks for moe_down's bytes (those experts' down rows and the shared expert's) into L2 while it
# streams its own (moe.kern's DOWN_PF), each thread group a slice. Off: on the H200 (eighteenth
# session, ncu over 3 decode steps of 8 resident 397B layers) the gate/up took 27.7 us a call with it
# against 19.0, and moe_down 26.3 against 24.4: moe_down was not waiting on its weights but on the
# shared gate's logit in MLX's small managed buffers (SMALL_BYTES below); it now takes 11 us.
DOWN_PF = 0
# FLASHMOE_NEXT_PF=1 (default 0; CUDA only): gdn_step and decode_attention, launches that wait on round
# trips with the memory bus mostly idle, ask for the matrices of the launches after them into L2
# (common.kern's ASK_NEXT): the output projection's (16.8 MB at 397B shapes) and the router's and
# shared expert gate's (1.1 MB). Off: on the H200 (same run) gdn_step took 14.0 us a call with it
# against 9.5 and decode_attention 13.0 against 9.1, for 13.5 against 14.3 in the output projection
# and nothing in the router: every kernel 3159 us against 3049.
NEXT_PF = 0
# FLASHMOE_FUSE_ROUTE=0: the MoE's routing in a launch of its own (moe_route, then moe_gate_up)
# rather than inside the gate/up launch, where warp 0 of every thread group routes while the
# others wait (ncu: the barrier is that kernel's top stall). On the H200 the separate launch timed
# 229.3 against 262.8 us per layer in one run (other norms separate too); not yet A/B'd against
# the current default, so the fused launch stays.
FUSE_ROUTE = True
# Rows of the GatedDeltaNet state a warp loads at once in gdn_step (FLASHMOE_GDN_ROWS, the GROWS
# define; 1: a memory round trip per row, as before). 64 heads are 64 thread groups, under half
# the H200's multiprocessors, so the step is latency-bound: 8 rows per load batch.
GDN_ROWS = 8
# Threads per value head in gdn_step (FLASHMOE_GDN_THREADS; auto, None here: 512 on CUDA, 256 on
# Metal, whose heavier kernels may be held to fewer threads per group): one thread group per head
# (64 at 397B shapes, under half the H200's multiprocessors), whose warps share the head's DV rows
# of state; more warps put more of the state's reads in flight at once (512: each warp's rows in
# one batch). The same sums either way. H200, ncu (as QWORDS): 341.1 us over 36 calls at 512
# against 378.7-382.6 at 256 in six other processes.
GDN_THREADS: int | None = None

# FLASHMOE_KV_INPLACE (default auto: on for CUDA, off for Metal; 1, 0): compiled attention steps write
# the token's key and value into the KV buffers in place, inside qk_norm_rope's launch (kernel
# qk_norm_rope_kv), instead of MLX's dynamic slice update per buffer: two MLX operations and two
# copies fewer per attention layer (ncu on the H200: each update's copy took 21-29 us of GPU time,
# with compute_dynamic_offset ~55 us per attention layer). The written buffers are handed back through
# mx.depends on the launch, so that whatever reads them later (the attention, the next step's write, a
# growth) comes after the write MLX does not see: without it a check decoding several steps as one
# graph saw its tolerance ratio move between rounds (1.34-1.39 against 1.24). With it, on the H200
# (fourteenth session, `overhead settings --tolerance 4`, 3 rounds in one process): 1.24 every round,
# as the slice updates; ncu over 3 decode steps of 8 layers: 5058 against 5438 us of GPU time. Metal
# stays on the slice updates until a Mac runs the check (the kernel writes through a cast pointer).
# None: auto.
KV_INPLACE: int | None = None
# FLASHMOE_QMV_MMA=1 (default 0): qmv launches whose slots are all 4-bit with groups of 64 or 128, on
# bf16 activations, take 16 rows per thread group through tensor-core products (mma.sync m16n8k16 on
# CUDA; common.kern's mma_rows16), the group's warps splitting the inputs: the codes become exact bf16
# values by a mask, so a lane spends about 1.5 instructions per weight where the FMA form spends
# about 3. Metal has no such product here: there the same fragments are summed with FMAs and
# shuffles. Off: on the H200 (ncu over 6 decode steps of 8 resident 397B layers, us per call against
# the FMA form) the first form, a warp per 16 rows over all the inputs, was slower in every launch
# (too few warps): in_proj 44.9 against 35.6, out_proj 53.0 against 18.9, lm_head 350.9 against
# 274.1. The split form (8x the warps) wins some and loses others: out_proj 16.8 against 19.0, q|k|v
# 33.1 against 35.1, but in_proj 38.4 against 35.5 and lm_head 313.2 against 273.5.
QMV_MMA = 0
# FLASHMOE_MOE_MMA (default auto: down on CUDA, 0 on Metal, which has no tensor-core product here):
# the MoE launches through tensor-core products as qmv's above:
# "gateup": the gate/up launch takes 16 rows of one expert per thread group (4-bit experts and shared
# expert, groups of 64 or 128, bf16, intermediate sizes multiples of 16); "down": moe_down takes 16
# output rows per thread group, its warps splitting the experts' inputs; 1 both, 0 neither. H200,
# ncu over 6 decode steps of 8 resident 397B layers, us per call against the FMA form (one process
# each): moe_down 20.9 against 28.5; moe_route_gate_up 32.1 against 30.2 (and 66.5 in the first form,
# a warp per 16 rows), so only moe_down takes them by default. None: auto.
MOE_MMA: frozenset | None = None

# MLX 0.32's CUDA backend hashes a custom kernel's whole source at every launch (CustomKernel::
# eval_gpu names the kernel's JIT module by std::hash of it), and ours are 42-50 KB, nearly all of it
# the dialect and the family's helpers: on the H200's host that hashing was 26% of a pipelined
# decode's host time (py-spy, tiny preset, 8 layers: std::_Hash_bytes under CustomKernel::eval_gpu,
# nineteenth session). So the CUDA launches take their header and body from files named by their
# content's hash (`_source_files`): their source is two #include lines. FLASHMOE_CUDA_SOURCE_FILES=0
# puts the text inline. (Metal's launches name their library once, when the kernel is made.)
SOURCE_FILES = True


def configure(env=os.environ) -> None:
    """Set the launch knobs above from `env` (FLASHMOE_QMV_ROWS, FLASHMOE_MOE_ROWS,
    FLASHMOE_QMV_WORDS, FLASHMOE_GRID, FLASHMOE_GRID_BLOCKS, FLASHMOE_GDN_ROWS, FLASHMOE_GDN_THREADS,
    FLASHMOE_MV_THREADS, FLASHMOE_MIN_GROUPS, FLASHMOE_QASYNC, FLASHMOE_QINT, FLASHMOE_QINT_DIGITS,
    FLASHMOE_XV_INNER, FLASHMOE_L2_PREFETCH, FLASHMOE_FUSE_ROUTE, FLASHMOE_KV_INPLACE, FLASHMOE_QMV_MMA,
    FLASHMOE_MOE_MMA, FLASHMOE_QPIPE, FLASHMOE_CUDA_SOURCE_FILES; absent: the defaults). Kernels
    built before keep their settings: make a new GpuKernels after changing them."""
    global QMV_ROWS, MOE_GU_ROWS, MOE_DOWN_ROWS, QWORDS, GRID_PER_SM, GRID_BLOCKS, GDN_ROWS, GDN_THREADS, MV_THREADS
    global XV_INNER, L2PF, L2PF_DOWN, DOWN_PF, NEXT_PF, FUSE_ROUTE, KV_INPLACE, QMV_MMA, MOE_MMA, QPIPE, MIN_GROUPS, QASYNC, QINT
    global QINT_DIGITS, SOURCE_FILES
    SOURCE_FILES = env.get("FLASHMOE_CUDA_SOURCE_FILES", "1").strip().lower() not in ("0", "off", "no", "false")
    rows = env.get("FLASHMOE_QMV_ROWS", "auto").strip().lower()
    QMV_ROWS = None if rows in ("", "auto") else int(rows)
    # GU,DOWN or GU:DOWN (gpu_session.sh's sweeps keep ',' for separating variables)
    moe_rows = env.get("FLASHMOE_MOE_ROWS", "1,1").replace(":", ",").split(",")
    if len(moe_rows) != 2 or not all(v.strip().isdigit() and int(v) >= 1 for v in moe_rows):
        raise FlashMoeError(f"FLASHMOE_MOE_ROWS={env.get('FLASHMOE_MOE_ROWS')}: use GATE_UP,DOWN rows per warp, "
                            "e.g. 1,4 (or 1:4).")
    MOE_GU_ROWS, MOE_DOWN_ROWS = (int(v) for v in moe_rows)
    QWORDS = int(env.get("FLASHMOE_QMV_WORDS", "16"))
    grid = env.get("FLASHMOE_GRID", "auto").strip().lower()
    GRID_PER_SM = None if grid in ("", "auto") else 0.0 if grid in ("off", "0", "none") else float(grid)
    GRID_BLOCKS = int(env.get("FLASHMOE_GRID_BLOCKS", "0") or 0) or None
    GDN_ROWS = int(env.get("FLASHMOE_GDN_ROWS", "8"))
    threads = env.get("FLASHMOE_GDN_THREADS", "auto").strip().lower()
    GDN_THREADS = None if threads in ("", "auto") else int(threads)
    mv = env.get("FLASHMOE_MV_THREADS", "auto").strip().lower()
    MV_THREADS = None if mv in ("", "auto") else int(mv)
    MIN_GROUPS = int(env.get("FLASHMOE_MIN_GROUPS", "0") or 0)
    QASYNC = int(env.get("FLASHMOE_QASYNC", "0") or 0)
    XV_INNER = int(env.get("FLASHMOE_XV_INNER", "1"))
    l2pf = env.get("FLASHMOE_L2_PREFETCH", "0").strip().lower() or "0"
    if l2pf not in ("0", "1", "down"):
        raise FlashMoeError(f"FLASHMOE_L2_PREFETCH={l2pf}: use 0, 1 (every matrix-vector and MoE kernel) "
                            "or down (moe_down alone).")
    L2PF, L2PF_DOWN = int(l2pf == "1"), l2pf == "down"
    DOWN_PF = int(env.get("FLASHMOE_DOWN_PF", "0").strip().lower() in ("1", "on", "yes", "true"))
    NEXT_PF = int(env.get("FLASHMOE_NEXT_PF", "0").strip().lower() in ("1", "on", "yes", "true"))
    FUSE_ROUTE = env.get("FLASHMOE_FUSE_ROUTE", "1").strip().lower() not in ("0", "off", "no", "false")
    kv = env.get("FLASHMOE_KV_INPLACE", "auto").strip().lower()
    KV_INPLACE = None if kv in ("", "auto") else int(kv in ("1", "on", "yes", "true"))
    qint = env.get("FLASHMOE_QINT", "auto").strip().lower()
    if qint not in ("", "auto", "0", "1", "on", "off"):
        raise FlashMoeError(f"FLASHMOE_QINT={qint}: use auto (CUDA on, Metal off), 1 or 0.")
    QINT = None if qint in ("", "auto") else int(qint in ("1", "on"))
    digits = env.get("FLASHMOE_QINT_DIGITS", "auto").strip().lower()
    if digits not in ("", "auto", "2", "3"):
        raise FlashMoeError(f"FLASHMOE_QINT_DIGITS={digits}: use auto, 2 or 3.")
    QINT_DIGITS = None if digits in ("", "auto") else int(digits)
    QMV_MMA, QPIPE = (_switch(env, name) for name in ("FLASHMOE_QMV_MMA", "FLASHMOE_QPIPE"))
    moe = env.get("FLASHMOE_MOE_MMA", "auto").strip().lower()
    forms = {"1": {"gateup", "down"}, "on": {"gateup", "down"}, "0": set(), "off": set(), "down": {"down"},
             "gateup": {"gateup"}}
    if moe not in forms and moe not in ("", "auto"):
        raise FlashMoeError(f"FLASHMOE_MOE_MMA={moe}: use auto, 1 (gate/up and down), down, gateup or 0.")
    MOE_MMA = frozenset(forms[moe]) if moe in forms else None
    if MV_THREADS is not None and not (64 <= MV_THREADS <= 1024 and MV_THREADS % 32 == 0):
        raise FlashMoeError(f"FLASHMOE_MV_THREADS={MV_THREADS}: use a multiple of 32 from 64 to 1024.")
    if QASYNC and not 2 <= QASYNC <= 4:
        raise FlashMoeError(f"FLASHMOE_QASYNC={QASYNC}: use 0 (off) or the stages of the ring, 2-4.")
    if not 0 <= MIN_GROUPS <= 32:
        raise FlashMoeError(f"FLASHMOE_MIN_GROUPS={MIN_GROUPS}: use 0 (off) or thread groups per multiprocessor, 1-32.")
    if GDN_THREADS is not None and not (64 <= GDN_THREADS <= 1024 and GDN_THREADS % 32 == 0):
        raise FlashMoeError(f"FLASHMOE_GDN_THREADS={GDN_THREADS}: use a multiple of 32 from 64 to 1024.")


def _switch(env, name: str) -> int:
    """A 1/0 (on/off) setting, default 0."""
    v = env.get(name, "0").strip().lower()
    if v not in ("", "0", "1", "on", "off"):
        raise FlashMoeError(f"{name}={v}: use 1 or 0.")
    return int(v in ("1", "on"))


configure()


def _mv_defines(threads: int | None = None) -> dict:
    """The knobs every matrix-vector kernel (qmv, the MoE's gate/up and down) is built with, for
    thread groups of `threads` (default mv_threads(): FLASHMOE_MIN_GROUPS's launch bounds)."""
    d = {"QWORDS": QWORDS, "XV_INNER": XV_INNER, "L2PF": L2PF, "QPIPE": QPIPE}
    if MIN_GROUPS:
        d.update(MIN_GROUPS=MIN_GROUPS, MAX_THREADS=threads or mv_threads())
    return d


# MLX's CUDA allocator (0.32) puts every buffer of SMALL_BYTES bytes or fewer in one small pool of
# managed memory (cudaMallocManaged, shared with the host), and the GPU's reads from it are slow: on
# the H200, 55% of moe_down's stall samples (ncu) were its warps waiting on one such read, the shared
# expert gate's logit, a [1] bf16 output of the router's launch, and positions and lengths ([1] int32)
# cost decode_attention and qk_norm_rope_kv as much. So on CUDA our launches make no buffer that
# small: small outputs are made ROOMY_BYTES long and viewed back down (_Roomy), and positions and
# lengths are made on the device four times over (_index; GpuKernels.index, once a step). (An input
# made by MLX's own operations may still be that small: the routing of K <= 2 experts where the
# plain routing runs.) Measured (ncu, 3 decode steps of 8 resident 397B layers, us a call):
# moe_down 24-28 (or 14 at times) -> 10.8-11.7, decode_attention 8.9 -> 4.6, qk_norm_rope_kv
# 8.0 -> 2.7; a fill of a position takes 2.9 (two a step now, two per full-attention layer then).
SMALL_BYTES, ROOMY_BYTES = 8, 16


def _index(v, cuda: bool = False) -> mx.array:
    """A position or a length for a kernel, from a Python int or from an array computed on the
    device (compiled attention steps): an int32 [1] array (plain.index), or on CUDA [4]
    (ROOMY_BYTES), the kernel reading element 0; one already in that form (GpuKernels.index, once
    a step) as it is."""
    if not cuda:
        return plain.index(v)
    if isinstance(v, mx.array) and v.dtype == mx.int32 and v.shape == (ROOMY_BYTES // 4,):
        return v
    # made on the device (an array made on the host is in managed memory too)
    return mx.full((ROOMY_BYTES // 4,), v.reshape(1).astype(mx.int32) if isinstance(v, mx.array) else v, mx.int32)


def source_dir() -> Path:
    """Where the CUDA launches' header and body files are written (`_source_files`)."""
    from ..cpu.build import cache_root

    return cache_root() / "cuda-sources"


def _shape_reads(body: str) -> frozenset:
    """The words `NAME_shape`, `NAME_strides`, `NAME_ndim` a kernel's body names: MLX passes an
    input's shape, strides or ndim where its source names them."""
    return frozenset(re.findall(r"\b\w+_(?:shape|strides|ndim)\b", body))


def _source_files(header: str, body: str, reads: frozenset) -> tuple[str, str]:
    """(header, body) as #include lines of files holding them, each named by its text's hash and
    written once (to a temporary name, then renamed: a file of that name is always whole), so that
    MLX hashes a short source at each launch (SOURCE_FILES); the body's `reads` (_shape_reads)
    named in a comment, for MLX to find. As they were where the folder cannot be written or its
    path cannot be written in an #include line."""
    folder = source_dir().resolve()
    if any(c in str(folder) for c in '"\\\n'):
        return header, body
    lines = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for part in (header, body):
            path = folder / f"fm_{hashlib.sha256(part.encode()).hexdigest()[:24]}.cuh"
            if not path.exists():
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(part)
                os.replace(tmp, path)
            lines.append(f'#include "{path}"\n')
    except OSError:
        return header, body
    return lines[0], (f"// reads {' '.join(sorted(reads))}\n" if reads else "") + lines[1]


def inline_sources(text: str) -> str:
    """`text` with each #include of a file of `_source_files` replaced by the file's text: what
    the compiler reads (the host emulator's and compile_check's translation units are whole)."""
    folder = str(source_dir().resolve())

    def read(m):
        return Path(m.group(1)).read_text() if m.group(1).startswith(folder + "/") else m.group(0)
    return re.sub(r'^#include "([^"]+)"\n?', read, text, flags=re.M)


class _Roomy:
    """A CUDA kernel whose outputs of SMALL_BYTES or fewer are made ROOMY_BYTES long and come back
    as views of their first elements, in the shapes asked for. A view it gave back, given to a
    launch of the same GpuKernels as an input whose shape, strides or ndim the kernel does not
    read (`shaped`: those it reads), goes in as the buffer it is a view of (`made`, shared by the
    GpuKernels' launches): its values are that buffer's first, so the kernel reads the same, and
    the slice that made the view goes unused (a compiled step leaves it out: the router's
    shared-gate logit on its way to moe_down, one operation fewer per layer for the host)."""

    KEEP = 64   # views remembered (the newest): a decode step's, many times over

    def __init__(self, kernel, names: list, shaped: frozenset, made: dict):
        self.kernel, self.names, self.shaped, self.made = kernel, names, shaped, made

    def __call__(self, *, output_shapes, output_dtypes, inputs, **kw):
        if self.made:
            inputs = [a if n in self.shaped else self._buffer(a) for n, a in zip(self.names, inputs)]
        shapes = [tuple(s) for s in output_shapes]
        # a small output is made longer in its first dimension (a scalar's: made [n]), so that its
        # values, the buffer's first, come back through one slice (each operation costs the host
        # time: no reshape)
        made = [s if math.prod(s) * d.size > SMALL_BYTES else
                (-(-ROOMY_BYTES // (d.size * math.prod(s[1:]))), *s[1:]) if s else (ROOMY_BYTES // d.size,)
                for s, d in zip(shapes, output_dtypes)]
        outs = list(self.kernel(output_shapes=made, output_dtypes=output_dtypes, inputs=inputs, **kw))
        for i, (s, m) in enumerate(zip(shapes, made)):
            if m != s:
                whole = outs[i]
                outs[i] = whole[:s[0]] if s else whole[0]
                self.made[id(outs[i])] = (outs[i], whole)
                if len(self.made) > self.KEEP:
                    del self.made[next(iter(self.made))]
        return outs

    def _buffer(self, a):
        """The buffer `a` is a view of, where this kernel's GpuKernels made it (else `a`)."""
        seen = self.made.get(id(a))
        return seen[1] if seen is not None and seen[0] is a else a


def mv_threads(wide: bool = False) -> int:
    """Threads per group of a matrix-vector launch: FLASHMOE_MV_THREADS, else 512 for `wide` ones, else 256."""
    return MV_THREADS or (512 if wide else 256)


def qmv_rows(total_rows: int, qint: bool = False) -> int:
    if QMV_ROWS is not None:
        return QMV_ROWS
    return 8 if total_rows >= (16384 if qint else 65536) else 4 if total_rows >= 16384 else 2


# The shapes of the launches that take QINT, by default: each launch's fastest measured. H200,
# fifteenth session (ncu over 3 decode steps of 8 resident 397B layers, the card's own clocks, us per
# call; QINT alone / with 512 threads / with 8 rows a warp / with 512 threads and 8 rows / with 512
# threads and a grid of 2 groups per multiprocessor): in_proj (20608 rows) 37.0 / 36.4 / 24.8 / 30.7;
# q|k|v (17408) 33.5 / 32.2 / 24.1 / 30.0; out_proj (4096) 18.8 / 14.1 / 38.7 / 35.0 / 14.3; the
# router (513) 13.3 / 10.3 / 20.2 / 17.2 / 10.5; lm_head (248320, 8 rows) 198.7 / 181.6; gate/up 29.2 /
# 25.8 / - / 25.9 / 18.8 (22.3 with the grid at 256 threads). Without QINT: 34.7, 38.0, 17.6, 12.9,
# 243.4 and 29.3.
def _qint_shape(rows: int | None, qdig: int = 2) -> tuple[int, float]:
    """(threads per group, groups per multiprocessor or 0) of a qmv launch of `rows` rows that
    takes QINT at `qdig` digits, or (rows None) of the MoE's gate/up. Launches of 3 digits
    (float32 activations: the checks) keep 256 threads: a norm_qmv with the residual add needs
    more than 128 registers a thread there, which 512 threads cannot have (H200, sixteenth session:
    "too many resources requested for launch")."""
    narrow = qdig > 2
    if rows is None:
        return mv_threads(not narrow), 0.0 if narrow else 2.0
    # the head (65536 rows or more) in a grid of 2 groups a multiprocessor: 160.4 against 184.3 us a
    # token (sixteenth session, the same run); in_proj and q|k|v were slower so (29.3 against 24.7)
    return mv_threads(not (narrow or 16384 <= rows < 65536)), 2.0 if rows >= 65536 and not narrow else 0.0


def _addressed(rows, x, *stacks) -> bool:
    """Whether `rows` holds [K, 9] addresses of the experts' parts (uint64: the GPU expert
    cache with pinned page cache behind it) rather than rows of the stacks."""
    if rows.dtype != mx.uint64:
        return False
    if rows.ndim != 2 or rows.shape[1] != 9 or any(s.scales.dtype != x.dtype for s in stacks):
        raise FlashMoeError("expert addresses need [K, 9] uint64 rows and scales in the activations' dtype")
    return True


def _no_addresses(addressed: bool) -> None:
    if addressed:
        raise FlashMoeError("experts given by address need the fused CUDA MoE kernels, which do not "
                            "cover these shapes; set FLASHMOE_HOST_TIER=off.")


class GpuKernels:
    """The fused ops of one backend ('metal' or 'cuda'). The kernels read their inputs as flat
    row-contiguous buffers, so inputs go in as they come, never reshaped: in a decode step each
    reshape is one more MLX operation for the host to run (14 per layer before)."""

    def __init__(self, backend: str, poison: bool = False):
        self.backend = backend
        # poison: fill every output with NaN before the launch (the check script), so
        # that an element a kernel fails to write shows up.
        self._fill = {"init_value": float("nan")} if poison else {}
        self._make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
        self._kernels: dict = {}
        self._small: dict = {}   # the small outputs' views and their buffers (_Roomy)
        # static threadgroup memory a kernel may declare (the staged input vector)
        self.max_shared = 32768 if backend == "metal" else 49152
        self._sms = None

    def kernel(self, name: str, inputs: tuple, outputs: tuple, defines: dict):
        key = (name, inputs, tuple(defines.items()))
        k = self._kernels.get(key)
        if k is None:
            header, body = render(name, self.backend, defines)
            reads = _shape_reads(body)
            shaped = frozenset(n for n in inputs if any(f"{n}_{w}" in reads for w in ("shape", "strides", "ndim")))
            if self.backend == "cuda" and SOURCE_FILES:
                header, body = _source_files(header, body, reads)
            # the name covers the text too: MLX's CUDA backend keeps compiled modules on disk
            # (the temp folder's mlx/<version>/ptx), and newer MLX names them by the kernel's name
            # alone, so a name that outlived its text (another llm-flashmoe, an edited .kern file)
            # would load the old code
            tag = zlib.crc32(f"{key!r}\0{header}\0{body}".encode()) & 0xFFFFFFFF
            k = self._make(name=f"fm_{name}_{tag:08x}", input_names=list(inputs),
                           output_names=list(outputs), source=body, header=header)
            if self.backend == "cuda":
                k = _Roomy(k, list(inputs), shaped, self._small)
            self._kernels[key] = k
        return k

    def table(self) -> dict:
        """{op name: launcher} (qk_norm_rope_kv only where the KV is written in place,
        FLASHMOE_KV_INPLACE; the engine composes it of qk_norm_rope and slice updates otherwise)."""
        skip = () if self.kv_inplace else ("qk_norm_rope_kv",)
        return {n: getattr(self, n) for n in plain.OPS if hasattr(self, n) and n not in skip}

    def index(self, v) -> mx.array:
        """A position or a length in the form this backend's launches read (`_index`): the decode
        step makes each once (`state_in`), not each launch."""
        return _index(v, self.backend == "cuda")

    # -- family 1 ---------------------------------------------------------
    def qmv(self, x: mx.array, linears: list[Linear]) -> list[mx.array]:
        if not self._qmv_covers(x, linears):
            return plain.qmv(x, linears)
        return self._qmv(x, linears)

    def norm_qmv(self, x: mx.array, xadd, w: mx.array, eps: float, linears: list[Linear]):
        """The linears of n = rmsnorm(h) * w, h = x (+ xadd), with the norm computed in the
        matvec's launch -> (outputs, h, n)."""
        if not (self._qmv_covers(x, linears) and w.size == x.shape[-1] and (xadd is None or xadd.shape == x.shape)):
            return plain.compose_norm_qmv(self.qmv, plain.rms_norm, self.add_rms_norm)(x, xadd, w, eps, linears)
        outs = self._qmv(x, linears, (xadd, w, eps))
        if xadd is None:   # the kernel keeps the normed input to itself: n only if asked for (lazy)
            return outs, x, plain.rms_norm(x, w, eps)
        return outs[:-2], outs[-2], outs[-1]

    def _qmv_covers(self, x, linears) -> bool:
        K = x.shape[-1]
        return (1 <= len(linears) <= 4 and K % 32 == 0 and _xs_bytes(K) <= self.max_shared
                and all(_q2d(l, K) for l in linears))

    @property
    def kv_inplace(self) -> bool:
        """Whether compiled attention steps write the KV in place here (FLASHMOE_KV_INPLACE, auto per backend)."""
        return bool(KV_INPLACE) if KV_INPLACE is not None else self.backend == "cuda"

    @property
    def qint(self) -> bool:
        """Whether matrix-vector launches stage their input as integers here where they can (FLASHMOE_QINT,
        auto per backend)."""
        return bool(QINT) if QINT is not None else self.backend == "cuda"

    def _qint(self, K: int, parts, besides: int = 0) -> int:
        """The QINT define of a matrix-vector launch of K inputs on `parts` (FMA form): their common
        code width where it is 4 or 8 and the integer record fits in fast memory with `besides`
        bytes more, else 0."""
        bits = {l.bits for l in parts}
        if not self.qint or len(bits) != 1 or not bits <= {4, 8} or _xs_bytes(K, True) + besides > self.max_shared:
            return 0
        return bits.pop()

    @property
    def moe_mma(self) -> frozenset:
        """The MoE launches that take tensor-core products here (FLASHMOE_MOE_MMA, auto per backend)."""
        if MOE_MMA is not None:
            return MOE_MMA
        return frozenset({"down"}) if self.backend == "cuda" else frozenset()

    def _mma(self, knob: int, x, linears) -> bool:
        """Whether a matrix-vector launch of `linears` on `x` goes through tensor-core products
        (common.kern's mma_rows16) under `knob` (QMV_MMA, or a form in moe_mma)."""
        return bool(knob and x.dtype == mx.bfloat16 and x.shape[-1] % 64 == 0
                    and all(l.bits == 4 and l.group_size in (64, 128) and l.scales.dtype == mx.bfloat16
                            for l in linears))

    def grid_blocks(self, needed: int, auto: float = 0.0) -> int:
        """Thread groups to launch for `needed` groups' worth of warps (FLASHMOE_GRID; `auto`: the
        launch's own groups per multiprocessor where that is auto, 0 for one warp per row group)."""
        if GRID_BLOCKS is not None:
            return max(1, min(needed, GRID_BLOCKS))
        per_sm = GRID_PER_SM if GRID_PER_SM is not None else auto
        if not per_sm or self.backend != "cuda":
            return needed
        return max(1, min(needed, round(per_sm * self.sm_count)))

    @property
    def sm_count(self) -> int:
        """The GPU's multiprocessors (FLASHMOE_GRID's unit). Where no CUDA runtime loads (the host
        emulator, tests that record launches): 4, so that a smaller grid still makes warps stride."""
        if self._sms is None:
            from ..experts.cuda import runtime

            try:
                self._sms = runtime().sm_count()
            except FlashMoeError:
                self._sms = 4
        return self._sms

    @staticmethod
    def _shape(qint: int, qdig: int, rows: int | None, ring: dict) -> tuple[int, float]:
        """(threads per group, grid_blocks's auto) of a matrix-vector launch: the ring's warps where it
        takes one (FLASHMOE_QASYNC), else _qint_shape's where it takes QINT, else mv_threads()."""
        threads, grid = _qint_shape(rows, qdig) if qint else (mv_threads(), 0.0)
        return (32 * ring["QA_WARPS"] if ring else threads), grid

    def _mv_grid(self, tasks: int, mma: bool, threads: int, grid: float = 0.0) -> tuple[int, int]:
        """(thread groups to launch, the kernel's grid-stride count) for `tasks` row groups: a warp
        each (groups of `threads`), or (mma) a whole thread group each, its warps splitting the
        inputs; `grid`: grid_blocks's auto."""
        if mma:
            blocks = self.grid_blocks(tasks, grid)
            return blocks, blocks
        warps = threads // 32
        blocks = self.grid_blocks(_ceil(tasks, warps), grid)
        return blocks, blocks * warps

    def _ring(self, K: int, parts, rows: int, staged: int) -> dict:
        """The defines of the ring of asynchronous copies (FLASHMOE_QASYNC) for a matrix-vector launch
        whose warps take `rows` rows of K inputs at once from the linears `parts`, with `staged` bytes of
        fast memory taken besides ({} where it cannot take it: see QASYNC), with QA_WARPS, the warps
        per group whose rings fit in fast memory (at most FLASHMOE_MV_THREADS / 32)."""
        if not QASYNC or K % 1024 or any(l.bits not in (4, 8) or l.scales.dtype.size != 2
                                         or (K // l.group_size * 2) % 16 for l in parts):
            return {}
        c16 = max(l.bits for l in parts) // 4
        sb16 = max(K // l.group_size * 2 // 16 for l in parts)
        per_warp = 16 * (QASYNC * rows * c16 * 32 + 2 * rows * sb16)
        warps = min(mv_threads() // 32, (self.max_shared - staged) // per_warp)
        if warps < 1:
            return {}
        return {"QASYNC": QASYNC, "QA_ROWS": rows, "QA_C16": c16, "QA_SB16": sb16, "QA_WARPS": warps}

    def _qmv(self, x, linears, norm=None) -> list[mx.array]:
        """The qmv kernel; norm = (xadd or None, weight, eps) puts an RMSNorm in front; with xadd,
        its input x + xadd and its output come back after the linears' outputs."""
        K = x.shape[-1]
        M = math.prod(x.shape[:-1])
        n = len(linears)
        mma = self._mma(QMV_MMA, x, linears)
        total = sum(l.out_features for l in linears)
        qint = 0 if mma else self._qint(K, linears, 4 * 32)
        R = 16 if mma else qmv_rows(total, bool(qint))
        mode = 0 if norm is None else 1 if norm[0] is None else 2
        defines = {"KDIM": K, "NSLOT": n, "QMV_R": R, "QMV_MMA": int(mma), "NORM": mode,
                   "EPS": float(norm[2]) if norm else 0.0}
        inputs, args = ["x"], [x]
        if mode == 2:
            inputs, args = inputs + ["xadd"], args + [norm[0]]
        if mode:
            inputs, args = inputs + ["nw"], args + [norm[1]]
        for i, lin in enumerate(linears):
            defines.update({f"N{i}": lin.out_features, f"B{i}": lin.bits, f"G{i}": lin.group_size})
            inputs += [f"w{i}", f"s{i}", f"b{i}"]
            args += [lin.weight, lin.scales, lin.biases]
        outputs = [f"y{i}" for i in range(n)] + (["hout", "nout"] if mode == 2 else [])
        shapes = [(*x.shape[:-1], l.out_features) for l in linears] + [x.shape] * (len(outputs) - n)
        defines.update(QINT=qint, QDIG=_qdig(x))
        # fast memory besides the rings: the staged input and its sums, the norm's partials
        ring = {} if mma else self._ring(K, linears, R, _xs_bytes(K, qint) + 4 * 32)
        threads, grid = self._shape(qint, defines["QDIG"], total, ring)
        defines.update(ring, **_mv_defines(threads))
        blocks, defines["QMV_GW"] = self._mv_grid(sum(_ceil(l.out_features, R) for l in linears), mma, threads, grid)
        k = self.kernel("qmv", tuple(inputs), tuple(outputs), defines)
        outs = k(inputs=args, template=[("T", x.dtype)], grid=(blocks * threads, M, 1),
                 threadgroup=(threads, 1, 1), output_shapes=shapes, output_dtypes=[x.dtype] * len(outputs), **self._fill)
        return list(outs)

    # -- family 2 ---------------------------------------------------------
    def moe_route(self, logits: mx.array, k: int, norm_topk: bool):
        E = logits.size
        if E > 4096 or k > 32:
            return plain.moe_route(logits, k, norm_topk)
        kern = self.kernel("moe_route", ("logits",), ("ids", "weights"), {"NE": E, "KE": k, "NORM": bool(norm_topk)})
        ids, w = kern(inputs=[logits], template=[("T", logits.dtype)], grid=(256, 1, 1),
                      threadgroup=(256, 1, 1), output_shapes=[(k,), (k,)], output_dtypes=[mx.int32, mx.float32], **self._fill)
        return ids, w

    def moe_gate_up(self, x, rows, gate: Linear, up: Linear, shared_gate: Linear, shared_up: Linear, then=None):
        """`then`: (down, shared_down), the stacks moe_down reads next (for FLASHMOE_DOWN_PF)."""
        addressed = _addressed(rows, x, gate, up)
        K = rows.shape[0] if addressed else rows.size
        launch = self._gate_up_launch(x, K, addressed, gate, up, shared_gate, shared_up, then=then)
        if launch is None:
            _no_addresses(addressed)
            return plain.moe_gate_up(x, rows, gate, up, shared_gate, shared_up)
        defines, names, stacks, kw = launch
        kern = self.kernel("moe_gate_up", ("x", "ids", *names), ("h", "hs"), defines)
        ids = rows if addressed else rows.astype(mx.int32)
        h, hs = kern(inputs=[x, ids, *stacks], output_dtypes=[x.dtype, x.dtype], **kw)
        return h, hs

    def moe_route_gate_up(self, logits, k: int, norm_topk: bool, lookup, x, gate: Linear, up: Linear,
                          shared_gate: Linear, shared_up: Linear, then=None):
        """moe_route, the rows (ids, or lookup[ids]: int32 [E] rows of the stacks or uint64 [E, 9]
        addresses) and moe_gate_up in one launch -> h, hs, rows, weights. Up to 1024 experts (a
        lane holds E/32 probabilities in registers), else the two ops in turn. `then`: (down,
        shared_down), the stacks moe_down reads next (for FLASHMOE_DOWN_PF)."""
        E = logits.size
        addressed = lookup is not None and _addressed(lookup, x, gate, up)
        launch = (self._gate_up_launch(x, k, addressed, gate, up, shared_gate, shared_up, reserve=4 * E + 256,
                                       then=then)
                  if FUSE_ROUTE and E <= 1024 and k <= 32 and (lookup is None or lookup.shape[0] == E) else None)
        if launch is None:   # the two ops (each falls back where its kernel does not cover the shapes)
            return plain.route_gate_up(self.moe_route, self.moe_gate_up)(
                logits, k, norm_topk, lookup, x, gate, up, shared_gate, shared_up)
        defines, stack_names, stacks, kw = launch
        defines.update({"NE": E, "NORM": bool(norm_topk), "LOOKUP": int(lookup is not None)})
        names, args = ["logits"], [logits]
        if lookup is not None:
            names.append("lookup")
            args.append(lookup if addressed else lookup.astype(mx.int32))
        kern = self.kernel("moe_route_gate_up", (*names, "x", *stack_names), ("h", "hs", "rows", "weights"), defines)
        kw["output_shapes"] += [(k, 9) if addressed else (k,), (k,)]
        return tuple(kern(inputs=[*args, x, *stacks],
                          output_dtypes=[x.dtype, x.dtype, mx.uint64 if addressed else mx.int32, mx.float32], **kw))

    def _gate_up_launch(self, x, K: int, addressed: bool, gate: Linear, up: Linear, shared_gate: Linear,
                        shared_up: Linear, reserve: int = 0, then=None):
        """(defines, the stacks' input names and arrays, launch keywords) of the gate/up kernels for K
        experts, or None where they do not cover the shapes; `reserve`: bytes of fast memory the
        launch's kernel takes besides (the routing's); `then`: (down, shared_down), moe_down's stacks,
        whose chosen rows the launch asks for into L2 (FLASHMOE_DOWN_PF, CUDA, experts by row)."""
        H = x.size
        if not (H % 32 == 0 and _xs_bytes(H) <= self.max_shared and _q3d(gate, H) and _q3d(up, H) and _same_q(gate, up)
                and _q2d(shared_gate, H) and _q2d(shared_up, H) and _same_q(shared_gate, shared_up)):
            return None
        I, Is = gate.weight.shape[1], shared_gate.out_features
        mma = self._mma("gateup" in self.moe_mma, x, (gate, shared_gate)) and I % 16 == 0 and Is % 16 == 0
        R = 16 if mma else MOE_GU_ROWS
        defines = {"HD": H, "KE": K, "IE": I, "BE": gate.bits, "GE": gate.group_size, "SHI": Is,
                   "SHB": shared_gate.bits, "SHG": shared_gate.group_size, "ADDRESSED": int(addressed), "GU_R": R,
                   "GU_MMA": int(mma)}
        stacks = [*_parts(gate), *_parts(up), *_parts(shared_gate), *_parts(shared_up)]
        qint = 0 if mma else self._qint(H, (gate, shared_gate), 8 * K + reserve)
        defines.update(QINT=qint, QDIG=_qdig(x))
        # the ring beside the staged input and its sums, and the experts' rows
        ring = {} if mma or addressed else self._ring(H, (gate, shared_gate), 2 * R, _xs_bytes(H, qint) + 8 * K + reserve)
        threads, grid = self._shape(qint, defines["QDIG"], None, ring)
        defines.update(ring, **_mv_defines(threads))
        blocks, defines["GU_GW"] = self._mv_grid(_ceil(K * I, R) + _ceil(Is, R), mma, threads, grid)
        kw = dict(template=[("T", x.dtype)], grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1),
                  output_shapes=[(K, I), (Is,)], **self._fill)
        names = list(_GATE_UP_STACKS)
        if DOWN_PF and then is not None and not addressed and self.backend == "cuda":
            down, shared_down = then
            if (down.quantized and shared_down.quantized and down.weight.ndim == 3
                    and down.weight.shape[0] == gate.weight.shape[0] and down.weight.shape[1] == H
                    and shared_down.weight.ndim == 2 and shared_down.weight.shape[0] == H):
                E = down.weight.shape[0]   # bytes of one expert's down parts, and of the shared expert's
                defines.update(DOWN_PF=1, DPF_WARPS=blocks * threads // 32, DPF_CB=down.weight.nbytes // E,
                               DPF_SB=down.scales.nbytes // E, DPF_SCB=shared_down.weight.nbytes,
                               DPF_SSB=shared_down.scales.nbytes)
                names += ["pdw", "pds", "pdb", "psdw", "psds", "psdb"]
                stacks += [*_parts(down), *_parts(shared_down)]
        return defines, names, stacks, kw

    def moe_down(self, h, rows, weights, down: Linear, hs, shared_down: Linear, shared_gate_logit, residual):
        K, I = h.shape
        Is, H = hs.size, residual.size
        addressed = _addressed(rows, residual, down)
        if not (I % 32 == 0 and Is % 32 == 0 and _xs_bytes(K * I) + _xs_bytes(Is) <= self.max_shared and _q3d(down, I) and down.weight.shape[1] == H
                and _q2d(shared_down, Is) and shared_down.out_features == H):
            _no_addresses(addressed)
            return plain.moe_down(h, rows, weights, down, hs, shared_down, shared_gate_logit, residual)
        mma = self._mma("down" in self.moe_mma, h, (down, shared_down)) and Is % 64 == 0 and H % 16 == 0
        # (the FMA form: the experts' inputs and the shared expert's staged one after the other)
        qint = 0 if mma else self._qint(K * I, (down, shared_down), _xs_bytes(Is, True) + 24 * K)
        defines = {"HD": H, "KE": K, "IE": I, "BE": down.bits, "GE": down.group_size, "SHI": Is,
                   "SHB": shared_down.bits, "SHG": shared_down.group_size, "ADDRESSED": int(addressed), "DOWN_R": MOE_DOWN_ROWS,
                   "DOWN_MMA": int(mma), "QINT": qint, "QDIG": _qdig(h), **_mv_defines()}
        if L2PF_DOWN:
            defines["L2PF"] = 1
        threads = mv_threads()
        # mma: a group per 16 rows; else a warp per DOWN_R rows, or a grid of fewer (FLASHMOE_GRID)
        blocks = _ceil(H, 16) if mma else self.grid_blocks(_ceil(_ceil(H, MOE_DOWN_ROWS), threads // 32))
        defines["DOWN_GW"] = blocks * (threads // 32)
        names = ("h", "ids", "weights", "dw", "ds", "db", "hs", "sdw", "sds", "sdb", "sg", "res")
        kern = self.kernel("moe_down", names, ("out",), defines)
        ids = rows if addressed else rows.astype(mx.int32)
        args = [h, ids, weights.astype(mx.float32), *_parts(down), hs, *_parts(shared_down), shared_gate_logit, residual]
        return kern(inputs=args, template=[("T", residual.dtype)], grid=(blocks * threads, 1, 1),
                    threadgroup=(threads, 1, 1), output_shapes=[residual.shape], output_dtypes=[residual.dtype],
                    **self._fill)[0]

    def _next_pf(self, then: list[Linear] | None, warps: int) -> tuple[list, list, dict]:
        """(input names, arrays, defines) with which a launch of `warps` warps asks for `then`'s
        quantized matrices, those the next launches read, into L2 (FLASHMOE_NEXT_PF, CUDA); nothing
        otherwise."""
        if not (NEXT_PF and then and self.backend == "cuda"):   # (every op-by-op decode step asks)
            return [], [], {}
        parts = [a for lin in then if lin.quantized for a in _parts(lin)]
        if not parts:
            return [], [], {}
        names = [f"npf{i}" for i in range(len(parts))]
        return (names, parts, {"NPF": len(parts), "NPF_WARPS": warps,
                               "NPF_PTRS": ", ".join(f"(const GLOBAL char*){n}" for n in names),
                               "NPF_BYTES": ", ".join(str(a.nbytes) for a in parts)})

    # -- family 3 ---------------------------------------------------------
    def decode_attention(self, q, keys, values, n: int, qg, then: list[Linear] | None = None):
        """`then`: the matrices the next launches read (FLASHMOE_NEXT_PF)."""
        Hq, Dh = q.shape
        Hkv = keys.shape[1]
        if not (Dh % 32 == 0 and Dh <= 512 and Hq % Hkv == 0 and keys.dtype == q.dtype == values.dtype):
            return plain.decode_attention(q, keys, values, n, qg)
        names, parts, npf = self._next_pf(then, Hq * 8)
        kern = self.kernel("decode_attention", ("q", "keys", "values", "n_ctx", "qg", *names), ("out",),
                           {"HQ": Hq, "HKV": Hkv, "DH": Dh, "NWARPS": 8, **npf})
        return kern(inputs=[q, keys, values, self.index(n), qg, *parts], template=[("T", q.dtype)],
                    grid=(Hq * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(*qg.shape[:-1], Hq * Dh)],
                    output_dtypes=[q.dtype], **self._fill)[0]

    # -- family 4 ---------------------------------------------------------
    def qk_norm_rope(self, qg, k, q_w, k_w, pos: int, rope_dims: int, theta: float, eps: float, n_kv_heads: int):
        out = self._norm_rope("qk_norm_rope", {}, qg, k, q_w, k_w, pos, rope_dims, theta, eps, n_kv_heads)
        return out or plain.qk_norm_rope(qg, k, q_w, k_w, pos, rope_dims, theta, eps, n_kv_heads)

    def qk_norm_rope_kv(self, qg, k, v, keys, values, q_w, k_w, pos, rope_dims: int, theta: float, eps: float,
                        n_kv_heads: int):
        """qk_norm_rope, and the token's key and value written at `pos` of keys and values IN PLACE
        (kernels/qk_norm_rope.kern) -> (q, k, keys, values), keys and values the same buffers as
        arrays that depend on the launch (mx.depends): MLX does not see the write, so without it
        whatever reads the buffers later (the next step's attention, a growth's copy) could run
        before it wherever nothing else orders them, as in several steps evaluated as one graph
        with their tokens given (the tolerance check's decode). The buffers must be whole
        row-contiguous arrays of their own (as the KV cache's zeros, concatenations and slice
        updates are), in q's dtype: a copy MLX made for the launch would take the write instead."""
        out = None
        if (keys.dtype == values.dtype == qg.dtype == v.dtype and keys.shape == values.shape
                and keys.shape[:2] == (1, n_kv_heads) and keys.shape[3] == q_w.size):
            out = self._norm_rope("qk_norm_rope_kv", {"vn": v, "keys": keys, "values": values},
                                  qg, k, q_w, k_w, pos, rope_dims, theta, eps, n_kv_heads)
        if out is None:
            return plain.compose_qk_norm_rope_kv(self.qk_norm_rope)(qg, k, v, keys, values, q_w, k_w, pos,
                                                                   rope_dims, theta, eps, n_kv_heads)
        return (*out, *mx.depends([keys, values], list(out)))

    def _norm_rope(self, name: str, extra: dict, qg, k, q_w, k_w, pos, rope_dims, theta, eps, n_kv_heads):
        """The launch of kernel `name` (qk_norm_rope or its _kv variant, whose further inputs are
        `extra`) -> (q, k), or None where the shapes are not covered."""
        Dh = q_w.size
        Hq = qg.size // (2 * Dh)
        if not (Dh % 32 == 0 and Dh <= 1024 and rope_dims % 2 == 0 and rope_dims <= Dh):
            return None
        defines = {"HQ": Hq, "HKV": n_kv_heads, "DH": Dh, "ROPE": rope_dims,
                   "LOG_THETA": float(math.log(theta)), "EPS": float(eps)}
        kern = self.kernel(name, ("qg", "k", "qw", "kw", "pos", *extra), ("qo", "ko"), defines)
        qo, ko = kern(inputs=[qg, k, q_w, k_w, self.index(pos), *extra.values()],
                      template=[("T", qg.dtype)], grid=((Hq + n_kv_heads) * Dh, 1, 1), threadgroup=(Dh, 1, 1),
                      output_shapes=[(Hq, Dh), (1, n_kv_heads, 1, Dh)], output_dtypes=[qg.dtype, qg.dtype], **self._fill)
        return qo, ko

    # -- family 5 ---------------------------------------------------------
    def gdn_step(self, qkv, z, b, a, conv_state, conv_w, A, dt_bias, norm_w, state, n_key_heads, key_dim, eps,
                 then: list[Linear] | None = None):
        """`then`: the matrices the next launches read (FLASHMOE_NEXT_PF)."""
        Hk, Dk = n_key_heads, key_dim
        Hv = b.size
        Dv = z.size // Hv
        C, Kc = conv_w.shape
        threads = GDN_THREADS or (512 if self.backend == "cuda" else 256)
        if not (Dk % 32 == 0 and Dv % 32 == 0 and 2 * Dk <= threads and Dv <= threads and Kc >= 2 and Hv % Hk == 0
                and C == qkv.size == 2 * Hk * Dk + Hv * Dv):
            return plain.gdn_step(qkv, z, b, a, conv_state, conv_w, A, dt_bias, norm_w, state, Hk, Dk, eps)
        if conv_state is None:
            conv_state = mx.zeros((1, Kc - 1, C), qkv.dtype)
        if state is None:
            state = mx.zeros((1, Hv, Dv, Dk), mx.float32)
        pf_names, parts, npf = self._next_pf(then, Hv * threads // 32)
        defines = {"HK": Hk, "HV": Hv, "DK": Dk, "DV": Dv, "KC": Kc, "EPS": float(eps), "GROWS": GDN_ROWS, **npf}
        names = ("qkv", "z", "b", "a", "conv_state", "conv_w", "A", "dt_bias", "norm_w", "state", *pf_names)
        kern = self.kernel("gdn_step", names, ("out", "conv_out", "state_out"), defines)
        args = [qkv, z, b, a, conv_state, conv_w,
                A.astype(mx.float32), dt_bias.astype(mx.float32), norm_w, state, *parts]
        out, conv_out, state_out = kern(
            inputs=args, template=[("T", qkv.dtype)], grid=(Hv * threads, 1, 1), threadgroup=(threads, 1, 1),
            output_shapes=[(*qkv.shape[:-1], Hv * Dv), (1, Kc - 1, C), (1, Hv, Dv, Dk)],
            output_dtypes=[qkv.dtype, qkv.dtype, mx.float32], **self._fill)
        return out, conv_out, state_out

    # -- family 6 ---------------------------------------------------------
    def add_rms_norm(self, x, y, w, eps: float):
        H = x.shape[-1]
        M = x.size // H
        threads = 1024 if H >= 4096 else 256
        kern = self.kernel("add_rms_norm", ("x", "y", "w"), ("h", "n"), {"HD": H, "EPS": float(eps)})
        h, n = kern(inputs=[x, y, w], template=[("T", x.dtype)], grid=(M * threads, 1, 1),
                    threadgroup=(threads, 1, 1), output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype], **self._fill)
        return h, n


_GATE_UP_STACKS = ("gw", "gs", "gb", "uw", "us", "ub", "sgw", "sgs", "sgb", "suw", "sus", "sub")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _qdig(x: mx.array) -> int:
    """Base-256 digits per input of QINT's integer staging: 3 (float32's own accuracy) for float32
    activations, else 2 (1.5e-5 of a chunk's largest, far under bf16's rounding); FLASHMOE_QINT_DIGITS."""
    return QINT_DIGITS or (3 if x.dtype == mx.float32 else 2)


def _xs_bytes(n: int, qint: bool = False) -> int:
    """Threadgroup memory of an input vector of n staged as padded float chunks (qint: integer
    records, common.kern's QINT) and their sums (stage_x)."""
    return n // 32 * (37 if qint else 34) * 4


def _parts(lin: Linear):
    return lin.weight, lin.scales, lin.biases


def _q2d(lin: Linear, in_features: int) -> bool:
    """A 2-D affine-quantized matrix with `in_features` inputs that the kernels cover."""
    return (lin.quantized and lin.weight.ndim == 2 and lin.bits in QBITS and lin.group_size in QGROUPS
            and lin.weight.shape[1] * 32 // lin.bits == in_features)


def _q3d(lin: Linear, in_features: int) -> bool:
    return (lin.quantized and lin.weight.ndim == 3 and lin.bits in QBITS and lin.group_size in QGROUPS
            and lin.weight.shape[2] * 32 // lin.bits == in_features)


def _same_q(a: Linear, b: Linear) -> bool:
    return a.bits == b.bits and a.group_size == b.group_size and a.weight.shape == b.weight.shape
