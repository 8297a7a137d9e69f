"""Summaries of Nsight Compute (`ncu --csv`) logs: each kernel's GPU time and, where collected,
its speed-of-light, occupancy and warp-stall figures (`python -m llm_flashmoe.kernels.overhead ncu
LOG`); with several logs (the same decode steps under different settings), each kernel family's
GPU time side by side (`ncu LOG LOG ... --labels a,b,...`), then, where the logs have the grid, our
kernels' time per call of each launch shape."""

from __future__ import annotations

import math
import re


_TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
# The Speed-of-light, occupancy, launch and warp-state figures shown per kernel (ncu's display
# names, matched as prefixes), then every raw stall-reason metric that was collected.
NCU_SHOWN = ("Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput", "Registers Per Thread",
             "Theoretical Occupancy", "Achieved Occupancy", "Warp Cycles Per Issued Instruction",
             "Issue Slots Busy", "Executed Ipc Active", "Waves Per SM")
STALL = "smsp__average_warps_issue_stalled_"


# The kernel `overhead ncusettings` launches where each setting's profiled steps begin.
MARK = "fm_mark_"


def ncu_rows(path: str) -> dict:
    """An `ncu --csv` log -> {kernel name (60 chars): {metric: [values, one per call]}}, durations
    in us under "us" (from gpu__time_duration.sum or the Speed-of-light section's Duration)."""
    segments = ncu_segments(path, marked=False)
    return segments[0][1] if segments else {}


def ncu_segments(path: str, marked: bool = True) -> list[tuple[int, dict]]:
    """An `ncu --csv` log cut where a marker kernel (MARK + its number, `overhead ncusettings`) ran
    -> [(marker number, ncu_rows of the kernels after it)], the markers themselves left out; not
    `marked`: the whole log as one segment numbered 0."""
    import csv

    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    segments: list[tuple[int, dict]] = []
    out: dict | None = None if marked else {}
    if not marked:
        segments.append((0, out))
    for r in csv.DictReader(lines):
        full, metric = r.get("Kernel Name", ""), r.get("Metric Name", "")
        mark = re.search(MARK + r"(\d+)", full) if marked else None
        if mark:
            if not segments or segments[-1][0] != int(mark.group(1)):
                out = {}
                segments.append((int(mark.group(1)), out))
            continue
        if out is None:      # kernels before the first marker belong to no setting
            continue
        try:
            v = float(r.get("Metric Value", "").replace(",", ""))
        except ValueError:
            continue
        if metric in ("gpu__time_duration.sum", "Duration"):
            v *= _TIME_UNITS.get(r.get("Metric Unit", "ns"), 1e-3)
        out.setdefault(_key(full, r.get("Grid Size")), {}).setdefault(metric, []).append(v)
    for _, seg in segments:
        for m in seg.values():      # the section's Duration stands in only where the raw metric is absent
            dur = m.pop("Duration", None)
            m["us"] = m.pop("gpu__time_duration.sum", dur)
            if m["us"] is None:
                del m["us"]
    return segments


def check_marked(path: str, log: str) -> None:
    """The ncu log of `kernels.check --ncu-marks` and that run's own log -> per timed region (the
    check's log names each, with its calls), the GPU time per call of every kernel between its two
    marker kernels; each case's fused and plain figures side by side."""
    regions: dict[int, tuple[str, int]] = {}
    with open(log) as f:
        for line in f:
            m = re.match(r"ncu mark (\d+): (.*), (\d+) calls$", line.strip())
            if m:
                regions[int(m.group(1))] = (m.group(2), int(m.group(3)))
    segments = dict(ncu_segments(path))
    per_call = {}
    for n, (label, calls) in regions.items():
        if n not in segments:
            print(f"no marker {MARK}{n} in {path} ({label})")
            continue
        per_call[label] = sum(sum(m.get("us", [])) for m in segments[n].values()) / calls
    print("GPU time per call, us (ncu, between each timed region's markers)")
    print(f"{'case':44} {'fused':>9} {'plain':>9} {'plain/fused':>11}")
    for label, us in per_call.items():
        case, _, how = label.partition(" | ")
        if how.startswith("fused"):
            plain = per_call.get(f"{case} | {how.replace('fused', 'plain', 1)}")
            ratio = f"{plain / us:10.2f}x" if plain and us else f"{'-':>11}"
            shown = f"{plain:9.1f}" if plain is not None else f"{'-':>9}"
            print(f"{case + ('' if how == 'fused' else ', ' + how.split(', ', 1)[1]):44} {us:9.1f} {shown} {ratio}")


def _key(name: str, grid: str | None) -> str:
    """A kernel's row: its name (60 characters) and, where the log has it, its grid as
    [groups]: one kernel family launched at several shapes (a layer's projections) keeps a row
    per shape."""
    dims = re.findall(r"\d+", grid or "")
    return f"{name[:60]} [{math.prod(int(d) for d in dims)}]" if dims else name[:60]


def ncu_summary(path: str) -> None:
    """Per kernel of an ncu CSV log: calls, GPU time in all and per call; where the log has more
    than durations (`--section ...`, stall-reason metrics), each collected figure's mean too."""
    per = ncu_rows(path)
    times = {k: m["us"] for k, m in per.items() if "us" in m}
    if not times:
        print(f"no kernel durations in {path}")
        return
    n_all = sum(len(v) for v in times.values())
    print(f"{n_all} kernels, {sum(sum(v) for v in times.values()):.1f} us on the GPU in all")
    print(f"{'kernel':60} {'calls':>6} {'us total':>9} {'us/call':>8}")
    order = sorted(times, key=lambda k: -sum(times[k]))
    for name in order:
        t = times[name]
        print(f"{name:60} {len(t):6d} {sum(t):9.1f} {sum(t) / len(t):8.1f}")
    for name in order:
        m = per[name]
        shown = [(k, v) for k, v in m.items() if k.startswith(NCU_SHOWN)]
        stalls = sorted(((k[len(STALL):].split("_per_")[0], sum(v) / len(v)) for k, v in m.items()
                         if k.startswith(STALL)), key=lambda kv: -kv[1])
        if not shown and not stalls:
            continue
        print(f"\n{name} ({len(times[name])} calls, {sum(times[name]) / len(times[name]):.1f} us/call)")
        for k, v in sorted(shown):
            print(f"    {k:40} {sum(v) / len(v):10.2f}")
        if stalls:
            print("    stalls (warps per issue): " + ", ".join(f"{k} {v:.2f}" for k, v in stalls if v >= 0.05))


def kernel_family(name: str) -> str:
    """A kernel's family across settings: our kernels' names carry a tag of their defines
    (fm_qmv_1a2b3c4d...), which a setting changes: fm_qmv; MLX's own kernels keep their names."""
    m = re.search(r"(fm_[a-z0-9_]+?)_[0-9a-f]{8}(?![0-9a-f])", name)
    return m.group(1) if m else name


def ncu_compare(paths: list[str], labels: list[str]) -> None:
    """GPU time per kernel family in each log (the same profiled steps under each setting):
    us in all and calls, the families in order of the first log's time, then the sums."""
    compare_families([ncu_rows(path) for path in paths], labels)


HEAD_US = 100.0   # a decode step's launches of at least this many us: the output head's (397B shapes)


def ncu_compare_marked(path: str, labels: list[str], layers: int = 0, steps: int = 0) -> None:
    """As ncu_compare, for one log of several settings cut at their markers (`ncusettings`):
    marker i is setting labels[i]. With the profiled decode steps' `layers` and `steps`: each
    setting's GPU time split into the head a token and the rest per layer (per_layer)."""
    segments = dict(ncu_segments(path))
    missing = [l for i, l in enumerate(labels) if i not in segments]
    if missing:
        print(f"no marker in {path} for: {', '.join(missing)} (did its steps run under ncu?)")
    present = [i for i in range(len(labels)) if i in segments]
    if present:
        compare_families([segments[i] for i in present], [labels[i] for i in present])
    if present and layers and steps:
        print(f"\nper setting, {steps} decode steps of {layers} layers: the head (a kernel's launches of {HEAD_US:.0f} "
              f"us or more, where it has one a step) us a token; the rest us per layer (the embedding and final norm included)")
        for i in present:
            head, rest = per_layer(segments[i], layers, steps)
            print(f"  {labels[i]:30} head {head:8.1f}   per layer {rest:8.1f}")


def per_layer(rows: dict, layers: int, steps: int) -> tuple[float, float]:
    """(the head's us a token, the rest's us per layer) of ncu_rows of `steps` decode steps of
    `layers` layers: the head's launches are a kernel's of HEAD_US or more where it has one such a
    step, whichever kernel it is (ours, or MLX's on the plain path, where some launches of every
    layer take as long: its routing's gather, 209 us a call on the H200)."""
    head = total = 0.0
    for m in rows.values():
        us = m.get("us", [])
        total += sum(us)
        long = [t for t in us if t >= HEAD_US]
        if len(long) == steps:
            head += sum(long)
    return head / steps, (total - head) / (steps * layers)


def _grouped(logs: list[dict], key) -> list[dict]:
    """Each ncu_rows dict's call times gathered under key(kernel name) (None: left out)."""
    per = []
    for rows in logs:
        g: dict = {}
        for name, m in rows.items():
            k = key(name)
            if k is not None:
                g.setdefault(k, []).extend(m.get("us", []))
        per.append(g)
    return per


def _rows(per: list[dict], w: int, value) -> None:
    """A line per key of _grouped's dicts, in order of the first log's time in all: value(times) and
    the calls in each log, in cells of width w + 7."""
    for n in sorted({n for g in per for n in g}, key=lambda n: -sum(per[0].get(n, []))):
        cells = [f"{value(g[n]):{w}.1f} ({len(g[n]):4d})" if n in g else f"{'-':>{w + 7}}" for g in per]
        print(f"{n[:60]:60} " + " ".join(cells))


def _launch(name: str) -> str | None:
    """Our kernels' launch shape (family and grid: a layer's projections are one family at several
    shapes), where the log has the grid."""
    grid, fam = re.search(r" \[(\d+)\]$", name), kernel_family(name)
    return f"{fam} [{grid.group(1)} groups]" if grid and fam.startswith("fm_") else None


def compare_families(logs: list[dict], labels: list[str]) -> None:
    """ncu_compare's table from ncu_rows dicts, then our kernels' us per call of each launch shape."""
    per = _grouped(logs, kernel_family)
    print(f"GPU time per kernel family, us in all (calls), per setting: {', '.join(labels)}")
    w = max(12, *(len(l) for l in labels))
    print(f"{'family':60} " + " ".join(f"{l:>{w + 7}}" for l in labels))
    _rows(per, w, sum)
    print(f"{'all':60} " + " ".join(f"{sum(map(sum, g.values())):{w}.1f} ({sum(map(len, g.values())):4d})"
                                     for g in per))
    launches = _grouped(logs, _launch)
    if any(launches):
        print(f"\nour kernels per launch shape, us per call (calls), per setting: {', '.join(labels)}")
        _rows(launches, w, lambda t: sum(t) / len(t) if t else 0.0)
