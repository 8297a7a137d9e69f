"""Launch settings of the fused kernels swept on a GPU: rows per warp and words of codes in flight
(`rows`), and whole decode steps under each setting in one process (`settings`). Run through
`python -m llm_flashmoe.kernels.overhead rows|settings ...`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .overhead import _env, timed, touch


def rows_sweep(reps: int) -> None:
    """Rows per warp of qmv (the decode's matrix shapes) and of the MoE kernels, then the words
    of codes a lane keeps in flight (QWORDS) at the default rows: each setting checked against
    the plain twin (bf16 bound) and timed as a chain of `reps` dependent calls (the decode's
    situation: one token, each launch waiting for the last)."""
    from . import gpu, plain
    from .check import BOUND, qlinear, rnd, moe_inputs

    dt = mx.bfloat16
    gk = gpu.GpuKernels("cuda")

    def err(a, b):
        a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    def chain(step, x0):
        def run():
            x = x0
            for _ in range(reps):
                x = step(x)
            return x
        _, e = timed(run)
        return e / reps * 1e6

    def cell(label, got, ref, step, x0) -> str:
        e = max(err(a, b) for a, b in zip(got, ref))
        return f"{label}: {chain(step, x0):6.1f} us{'' if e <= BOUND[dt] else f' FAIL {e:.1e}'}"

    qshapes = {"GDN in_proj 4096->12288|8192|64|64": (4096, [12288, 8192, 64, 64]),
               "attn q|k|v 4096->16384|512|512": (4096, [16384, 512, 512]),
               "out_proj/o_proj 8192->4096": (8192, [4096]),
               "router|shared gate 4096->512|1": (4096, [512, 1]),
               "lm_head 4096->248320": (4096, [248320])}
    qcases = []
    for name, (K, Ns) in qshapes.items():
        lins = [qlinear(n, K, 4, 64, dt) for n in Ns]
        x0 = rnd((1, K), dt)
        qcases.append((name, lins, x0, plain.qmv(x0, lins)))
    d = moe_inputs("397b", dt)
    K, I, Is = d["K"], d["gate"].weight.shape[1], d["sg"].out_features
    h0, hs0 = rnd((K, I), dt), rnd((Is,), dt)
    gu_args = lambda x: (x, d["rows"], d["gate"], d["up"], d["sg"], d["su"])
    dn_args = lambda r: (h0, d["rows"], d["w"], d["down"], hs0, d["sd"], mx.zeros((1,), dt), r)
    ref_gu, ref_dn = plain.moe_gate_up(*gu_args(d["x"])), plain.moe_down(*dn_args(d["res"]))

    def qmv_cell(label, lins, x0, ref):
        # the next call's input depends on this one's output (a scalar mix keeps the shape)
        return cell(label, gk.qmv(x0, lins), ref, lambda x: x + gk.qmv(x, lins)[0][..., :1] * 0, x0)

    def gu_cell(label):
        return cell(label, gk.moe_gate_up(*gu_args(d["x"])), ref_gu,
                    lambda x: x + gk.moe_gate_up(*gu_args(x))[1][:1] * 0, d["x"])

    def dn_cell(label):
        return cell(label, [gk.moe_down(*dn_args(d["res"]))], [ref_dn], lambda r: gk.moe_down(*dn_args(r)), d["res"])

    saved = gpu.QMV_ROWS, gpu.MOE_GU_ROWS, gpu.MOE_DOWN_ROWS, gpu.QWORDS
    print(f"qmv rows per warp (FLASHMOE_QMV_ROWS; now {gpu.QMV_ROWS or 'auto'}), us per dependent call "
          "(and a small add), max rel err vs twin:")
    for name, lins, x0, ref in qcases:
        cells = []
        for R in (1, 2, 4, 8):
            gpu.QMV_ROWS = R
            cells.append(qmv_cell(f"R={R}", lins, x0, ref))
        cells.append(f"MLX: {chain(lambda x: x + plain.qmv(x, lins)[0][..., :1] * 0, x0):6.1f} us")   # MLX's own
        print(f"  {name:38} " + "   ".join(cells), flush=True)
    gpu.QMV_ROWS = saved[0]
    print(f"MoE rows per warp (FLASHMOE_MOE_ROWS; now {gpu.MOE_GU_ROWS},{gpu.MOE_DOWN_ROWS}):")
    cells = []
    for R in (1, 2, 4):
        gpu.MOE_GU_ROWS = R
        cells.append(gu_cell(f"R={R}"))
    print("  moe_gate_up (4 experts + shared)      " + "   ".join(cells), flush=True)
    gpu.MOE_GU_ROWS = saved[1]
    cells = []
    for R in (1, 2, 4, 8):
        gpu.MOE_DOWN_ROWS = R
        cells.append(dn_cell(f"R={R}"))
    print("  moe_down (4 experts + shared)         " + "   ".join(cells), flush=True)
    gpu.MOE_DOWN_ROWS = saved[2]
    print(f"words of codes in flight per lane (FLASHMOE_QMV_WORDS; now {gpu.QWORDS}), default rows:")
    for name, lins, x0, ref in qcases:
        cells = []
        for W in (8, 16, 32, 64):
            gpu.QWORDS = W
            cells.append(qmv_cell(f"W={W}", lins, x0, ref))
        print(f"  {name:38} " + "   ".join(cells), flush=True)
    for name, one in (("moe_gate_up (4 experts + shared)", gu_cell), ("moe_down (4 experts + shared)", dn_cell)):
        cells = []
        for W in (8, 16, 32, 64):
            gpu.QWORDS = W
            cells.append(one(f"W={W}"))
        print(f"  {name:38} " + "   ".join(cells), flush=True)
    gpu.QMV_ROWS, gpu.MOE_GU_ROWS, gpu.MOE_DOWN_ROWS, gpu.QWORDS = saved


SETTING_KEYS = {"grid": "FLASHMOE_GRID", "blocks": "FLASHMOE_GRID_BLOCKS", "words": "FLASHMOE_QMV_WORDS",
                "qrows": "FLASHMOE_QMV_ROWS", "moerows": "FLASHMOE_MOE_ROWS", "gdnrows": "FLASHMOE_GDN_ROWS",
                "gdnthreads": "FLASHMOE_GDN_THREADS",
                "threads": "FLASHMOE_MV_THREADS", "xvinner": "FLASHMOE_XV_INNER", "l2pf": "FLASHMOE_L2_PREFETCH",
                "fuseroute": "FLASHMOE_FUSE_ROUTE", "fusenorm": "FLASHMOE_FUSE_INPUT_NORM",
                "cattn": "FLASHMOE_COMPILE_ATTENTION", "cstep": "FLASHMOE_COMPILE_STEP",
                "qmma": "FLASHMOE_QMV_MMA", "moemma": "FLASHMOE_MOE_MMA", "kvinplace": "FLASHMOE_KV_INPLACE",
                "qpipe": "FLASHMOE_QPIPE", "mingroups": "FLASHMOE_MIN_GROUPS", "kernels": "FLASHMOE_KERNELS",
                "qasync": "FLASHMOE_QASYNC", "qint": "FLASHMOE_QINT", "qdig": "FLASHMOE_QINT_DIGITS",
                "downpf": "FLASHMOE_DOWN_PF", "nextpf": "FLASHMOE_NEXT_PF"}
# read by the engine at each call rather than by the kernel module: set in the environment itself
_ENGINE_KEYS = ("FLASHMOE_FUSE_INPUT_NORM", "FLASHMOE_COMPILE_ATTENTION", "FLASHMOE_COMPILE_STEP")


def parse_setting(text: str) -> dict:
    """'grid=2 words=16' -> {'FLASHMOE_GRID': '2', 'FLASHMOE_QMV_WORDS': '16'} ('-': the defaults)."""
    out = {}
    for part in text.split():
        if part == "-":
            continue
        k, _, v = part.partition("=")
        if k not in SETTING_KEYS or not v:
            raise SystemExit(f"bad setting {part!r}: use {', '.join(f'{k}=...' for k in SETTING_KEYS)}")
        out[SETTING_KEYS[k]] = v
    return out


def set_knobs(env: dict) -> None:
    """The kernel module's knobs as under environment `env` (unset ones at their defaults); the
    engine-read ones put in the process environment itself."""
    from . import gpu

    for k in _ENGINE_KEYS:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)
    gpu.configure(env)


def plain_setting(env: dict, plain_ok: bool = True) -> bool:
    """Whether setting `env` is the plain path (kernels=off); one that names the kernels otherwise,
    or at all where not `plain_ok` (a run other than ncusettings), is refused."""
    if "FLASHMOE_KERNELS" not in env:
        return False
    if not plain_ok or env["FLASHMOE_KERNELS"].strip().lower() not in ("off", "plain", "0", "none"):
        raise SystemExit("kernels=off is a setting of ncusettings alone (its plain path beside the kernels)")
    return True


def apply_setting(env: dict, backend: str = "cuda", plain_ok: bool = False):
    """`set_knobs(env)`, then fresh kernels -> the backend's ops with them; None for the plain path
    (kernels=off), where `plain_ok` says a run takes it."""
    from . import _built, ops

    plain = plain_setting(env, plain_ok)
    set_knobs(env)
    if plain:
        return None
    _built.pop(backend, None)
    return ops(backend)


def _settings_and_model(args, plain_ok: bool = False) -> tuple[list[str], list[dict], object]:
    """--settings parsed (a bad one refused before the load: kernels=off unless `plain_ok`), then the
    model of --dir loaded and moved to the device -> (the settings' texts, their environments, the
    model)."""
    from ..engine.load import load_model

    texts = args.settings.split(";")
    settings = [parse_setting(text) for text in texts]
    for setting in settings:
        plain_setting(setting, plain_ok)
    t0 = time.perf_counter()
    model = load_model(args.dir, experts_per_token=args.k)
    touch(model)
    print(f"loaded {args.dir} in {time.perf_counter() - t0:.1f} s, {len(model.layers)} layers, K={args.k}, "
          f"{model.dtype} ({_env()})", flush=True)
    return texts, settings, model


def settings_sweep(args) -> None:
    """Decode (resident, compiled, fresh tokens) under each setting in one process, with the plain
    path and embed+head timed once: us per layer, step by step (build, then evaluate) and
    pipelined (as generate runs it), each the median over --rounds rounds that visit the settings
    in turn (the card's speed drifts between minutes); each setting's logits for the same tokens
    against the plain path's; the 397B MoE block (check case) compiled, fused against plain. The
    fastest setting (pipelined) goes to --best. With --tolerance N, each round also runs each
    setting's bf16-tolerance check on the first N layers (decode_bench.tolerance_check: against a
    float32 copy, as a ratio to the plain path's error): the fused path is not bit-deterministic
    on the GPU, so the rounds show how far the ratio moves by itself."""
    from ..engine.load import load_model
    from . import check
    from .decode_bench import (decode_times, heat, logits_error, logits_run, pipelined_time, tolerance_check,
                               with_ops)

    texts, settings, model = _settings_and_model(args)
    parsed = dict(zip(texts, settings))
    L = len(model.layers)
    prompt = list(range(1, 9))
    ref = logits_run(model, None, prompt, 4)
    with_ops(model, None)
    plain_tok = float(np.median(decode_times(model, prompt, args.steps, fresh_tokens=True))) * 1e3
    eh = float(np.median(decode_times(model, prompt, args.steps, embed_head_only=True))) * 1e3
    print(f"plain: {plain_tok:.2f} ms/token, {(plain_tok - eh) / L * 1e3:.1f} us/layer; embed+head {eh:.2f} ms", flush=True)
    mx.random.seed(0)
    f, t, _ = check.case_moe_block(args.moe_shape, mx.bfloat16)
    mx.eval(check._flat(t()))    # the case's random inputs, made once (not inside each timed graph)
    heat()
    moe_plain = check.time_call(mx.compile(lambda: check._flat(t())), args.runs)
    built, seen = {}, {text: {"step": [], "pipe": [], "eh": [], "tol": []} for text in texts}
    tol_ref = (load_model(args.dir, experts_per_token=args.k, dtype=mx.float32)
               if args.tolerance and model.dtype != mx.float32 else None)
    tol_cache: dict = {}   # the float32 logits and the plain path's error, worked out once
    for r in range(args.rounds):
        for text in texts:
            setting = parsed[text]
            if text not in built:
                o = built[text] = apply_setting(setting, args.backend)
                seen[text]["err"] = logits_error(logits_run(model, o, prompt, 4), ref)
                with_ops(model, o)
                heat()
                seen[text]["moe"] = check.time_call(mx.compile(lambda: check._flat(f(o))), args.runs)
            set_knobs(setting)
            with_ops(model, built[text])
            heat()
            seen[text]["step"].append(float(np.median(decode_times(model, prompt, args.steps, fresh_tokens=True))) * 1e3)
            seen[text]["pipe"].append(pipelined_time(model, prompt, args.pipe_steps)[0] * 1e3)
            seen[text]["eh"].append(pipelined_time(model, prompt, args.pipe_steps, embed_head_only=True)[0] * 1e3)
            with_ops(model, None)
            if tol_ref is not None:
                row, = tolerance_check(tol_ref, model, built[text], prompt, 8, [args.tolerance], tol_cache)
                seen[text]["tol"].append(row["fused"]["rel"] / max(row["plain"]["rel"], 1e-30))
        print(f"round {r + 1}: " + ", ".join(f"{t} {(seen[t]['pipe'][-1] - seen[t]['eh'][-1]) / L * 1e3:.1f}"
                                             for t in texts) + " us/layer pipelined"
              + ("; tolerance ratio " + ", ".join(f"{t} {seen[t]['tol'][-1]:.2f}" for t in texts) if tol_ref else ""),
              flush=True)
    print(f"medians of {args.rounds} rounds; step: build then evaluate, as the benchmarks time it; pipelined: "
          f"as generate runs it, less embed+head pipelined alone (which the host bounds: where the device "
          f"bounds the whole step, pipe us/l understates the layers' share; ncu's GPU time is the figure then)")
    print(f"{'setting':36} {'ms/token':>8} {'us/layer':>8} {'vs plain':>8} {'pipe ms':>8} {'pipe us/l':>9} "
          f"{'rel diff':>9} {'top1':>5} {'MoE us':>7} {'MoE x':>6}"
          + (f" {'tol ratio (min-max)':>20}" if tol_ref else ""), flush=True)
    best = None
    for text in texts:
        v = seen[text]
        tok, pipe, peh = (float(np.median(v[k])) for k in ("step", "pipe", "eh"))
        per_layer, pipe_layer = (tok - eh) / L * 1e3, (pipe - peh) / L * 1e3
        print(f"{text:36} {tok:8.2f} {per_layer:8.1f} {(plain_tok - eh) / (tok - eh):7.2f}x {pipe:8.2f} {pipe_layer:9.1f} "
              f"{v['err']['max']:9.2e} {v['err']['top1']:5.2f} {v['moe']:7.1f} {moe_plain / v['moe']:5.2f}x"
              + (f" {np.median(v['tol']):8.2f} ({min(v['tol']):.2f}-{max(v['tol']):.2f})" if tol_ref else ""),
              flush=True)
        if best is None or pipe_layer < best[0]:
            best = (pipe_layer, parsed[text])
    set_knobs({})
    env = " ".join(f"{k}={v}" for k, v in best[1].items())
    print(f"fastest: {env or 'the defaults'} ({best[0]:.1f} us/layer pipelined)")
    if args.best:
        Path(args.best).write_text(env + "\n")


def ncu_mark(i: int) -> None:
    """Launch (and wait for) the marker kernel ncu.MARK + i, where `overhead ncu` cuts a log."""
    from .ncu import MARK

    mark = mx.fast.cuda_kernel(name=f"{MARK}{i}", input_names=["x"], output_names=["y"], source="y[0] = x[0];")
    mx.eval(mark(inputs=[mx.zeros((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                 output_dtypes=[mx.float32])[0])


def ncu_settings(args) -> None:
    """Each setting's GPU time per kernel in one process, for `ncu --profile-from-start off`: the
    model loaded once; per setting (in turn), fresh kernels, compiled decode steps (fresh tokens),
    and the last --profiled of them between cudaProfilerStart/Stop, after a marker kernel
    (ncu.MARK + the setting's number) that `overhead ncu LOG --marked SETTINGS` cuts the log at.
    A process per setting (`ncusweep`) paid the model's load and the first step's compilation of
    every kernel each time; here a setting compiles only the kernels it changes."""
    from .decode_bench import decode_steps, with_ops

    texts, settings, model = _settings_and_model(args, plain_ok=True)
    prompt = list(range(1, 9))
    rt = None
    if args.backend == "cuda":
        from ..experts import cuda

        rt = cuda.runtime()
    try:
        for i, (text, setting) in enumerate(zip(texts, settings)):
            ops = apply_setting(setting, args.backend, plain_ok=True)
            with_ops(model, ops, True if ops is not None else None)   # the plain path as the engine runs it

            def start(step, i=i):
                if step == args.steps - args.profiled:
                    mx.synchronize()
                    if rt is not None:
                        rt.lib.cudaProfilerStart()
                        ncu_mark(i)

            rows = decode_steps(model, prompt, args.steps, fresh_tokens=True, before_step=start)
            if rt is not None:
                mx.synchronize()
                rt.lib.cudaProfilerStop()
            first = sum(rows[0]) * 1e3
            b, e = np.median(np.array(rows[1:]), axis=0) if len(rows) > 1 else rows[0]
            print(f"setting {i + 1} ({text}){' (the plain path)' if ops is None else ''}: first step {first:.0f} ms, "
                  f"then {(b + e) * 1e3:.2f} ms/token (under the profiler: not a speed)", flush=True)
    finally:
        with_ops(model, None)
        set_knobs({})


def down_id_sets(E: int, K: int) -> list[tuple[str, list[int]]]:
    """The experts sets `downids` times moe_down on: laid out in patterns (neighbours, strides),
    then random ones (seeded: the run and its summary make the same)."""
    rng = np.random.default_rng(0)
    sets = [("neighbours 0", list(range(K))), ("neighbours mid", list(range(E // 2 - K // 2, E // 2 - K // 2 + K))),
            ("neighbours end", list(range(E - K, E)))]
    for stride in (2, 8, 64, 128, 129):
        if stride * (K - 1) < E:
            sets.append((f"stride {stride}", [i * stride for i in range(K)]))
    sets += [(f"random {i}", sorted(int(e) for e in rng.choice(E, K, replace=False))) for i in range(24)]
    return sets


def down_ids(args) -> None:
    """moe_down of the 397B shapes (512 experts resident, K=4) on a fixed list of expert sets
    (`down_id_sets`), twice over, under each setting of --settings (';'-separated, as for
    `settings`), each setting after a marker kernel: run under ncu, whose log `--summary` reads.
    In decode steps moe_down took either ~13 us or ~25-30 us a call (sixteenth session): if the
    time follows the set (both rounds alike), where the experts lie decides it (the run prints the
    stacks' device addresses and an expert's stride, to read the sets against); if not, something
    else (what ran before, the clocks). --gate-up: each moe_down after the gate/up launch of the
    same experts, whose output it takes, as in a decode step."""
    from . import check

    texts = args.settings.split(";")
    settings = [parse_setting(text) for text in texts]
    mx.random.seed(0)
    dt = mx.bfloat16
    d = check.moe_inputs("397b", dt)
    K, I, Is = d["K"], d["gate"].weight.shape[1], d["sg"].out_features
    h, hs, sgl = check.rnd((K, I), dt), check.rnd((Is,), dt), check.rnd_gate_logit(dt)
    mx.eval(h, hs, sgl, d["w"], d["res"], d["down"].weight, d["down"].scales, d["down"].biases)
    sets = down_id_sets(d["E"], K)
    rows = [mx.array(np.array(ids, np.int32)) for _, ids in sets]
    mx.eval(rows)
    if args.backend == "cuda":
        from ..experts.cuda import device_address

        down = d["down"]
        print("down stack: codes at " + ", scales at ".join(
            f"{device_address(a):#x}" for a in (down.weight, down.scales)) + f", biases at {device_address(down.biases):#x};"
              f" an expert's codes {down.weight[0].nbytes} bytes, its scales {down.scales[0].nbytes}", flush=True)
    try:
        for i, setting in enumerate(settings):
            o = apply_setting(setting, args.backend)
            if args.backend == "cuda":
                ncu_mark(i)
            for _ in range(args.rounds):
                for r in rows:
                    hr, hsr = h, hs
                    if args.gate_up:
                        hr, hsr = o.moe_gate_up(d["x"], r, d["gate"], d["up"], d["sg"], d["su"])
                        mx.eval(hr, hsr)
                    for _ in range(args.repeat):
                        mx.eval(o.moe_down(hr, r, d["w"], d["down"], hsr, d["sd"], sgl, d["res"]))
            print(f"setting {i + 1} ({texts[i]}): {args.rounds} rounds of {len(rows)} sets"
                  + (", each after its gate/up" if args.gate_up else "")
                  + (f", moe_down {args.repeat} times a set" if args.repeat > 1 else ""), flush=True)
    finally:
        set_knobs({})


def down_ids_summary(path: str, texts: list[str], rounds: int, repeat: int = 1) -> None:
    """`downids`'s ncu log -> per setting and expert set, moe_down's us per call in each round, and
    how far the rounds agree (with --repeat, the first call of each set; the later ones' median
    after it)."""
    from .check import MOE_SHAPES
    from .ncu import ncu_segments

    sets = down_id_sets(*MOE_SHAPES["397b"][:2])   # down_ids's shapes
    for number, kernels in ncu_segments(path):
        name = next((k for k in kernels if "moe_down" in k), None)
        if name is None:
            continue
        us = kernels[name]["us"]
        if len(us) != rounds * len(sets) * repeat:
            print(f"setting {number + 1}: {len(us)} moe_down calls, expected {rounds * len(sets) * repeat}")
            continue
        t = np.array(us).reshape(rounds, len(sets), repeat)
        later = np.median(t[:, :, 1:]) if repeat > 1 else None
        t = t[:, :, 0]
        label = texts[number] if number < len(texts) else str(number)
        print(f"setting {number + 1} ({label}): moe_down us per call, {rounds} rounds")
        for j, (what, ids) in enumerate(sets):
            print(f"  {what:16} {str(ids):22} " + " ".join(f"{v:6.1f}" for v in t[:, j]))
        fast = t.min()
        slow = t > 1.5 * fast
        same = (slow[0] == slow[1:]).mean() if rounds > 1 else float("nan")
        corr = np.corrcoef(t[0], t[1])[0, 1] if rounds > 1 else float("nan")
        print(f"  fastest {fast:.1f} us, median {np.median(t):.1f}; calls over 1.5x the fastest: {slow.mean():.0%}; "
              f"sets slow or fast alike in every round: {same:.0%}; correlation of rounds 1 and 2: {corr:.2f}"
              + (f"; the calls after the first on a set: median {later:.1f}" if later is not None else ""))
