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


def ncu_compare_marked(path: str, labels: list[str]) -> None:
    """As ncu_compare, for one log of several settings cut at their markers (`ncusettings`):
    marker i is setting labels[i]."""
    segments = dict(ncu_segments(path))
    missing = [l for i, l in enumerate(labels) if i not in segments]
    if missing:
        print(f"no marker in {path} for: {', '.join(missing)} (did its steps run under ncu?)")
    present = [i for i in range(len(labels)) if i in segments]
    if present:
        compare_families([segments[i] for i in present], [labels[i] for i in present])


def compare_launches(logs: list[dict], labels: list[str]) -> None:
    """Our kernels per launch shape (family and grid: a layer's projections are one family at
    several shapes) in each ncu_rows dict: us per call, in order of the first log's time in all."""
    per = []
    for rows in logs:
        shapes: dict = {}
        for name, m in rows.items():
            grid = re.search(r" \[(\d+)\]$", name)
            fam = kernel_family(name)
            if grid and fam.startswith("fm_") and m.get("us"):
                shapes.setdefault(f"{fam} [{grid.group(1)} groups]", []).extend(m["us"])
        per.append(shapes)
    names = sorted({n for s in per for n in s}, key=lambda n: -sum(per[0].get(n, [0.0])))
    if not names:
        return
    w = max(12, *(len(l) for l in labels))
    print(f"\nour kernels per launch shape, us per call (calls), per setting: {', '.join(labels)}")
    for n in names:
        cells = [f"{sum(s[n]) / len(s[n]):{w}.1f} ({len(s[n]):4d})" if n in s else f"{'-':>{w + 7}}" for s in per]
        print(f"{n[:60]:60} " + " ".join(cells))


def compare_families(logs: list[dict], labels: list[str]) -> None:
    """ncu_compare's table from ncu_rows dicts."""
    per = []
    for rows in logs:
        fam: dict = {}
        for name, m in rows.items():
            f = fam.setdefault(kernel_family(name), [0.0, 0])
            f[0] += sum(m.get("us", []))
            f[1] += len(m.get("us", []))
        per.append(fam)
    names = sorted({n for fam in per for n in fam}, key=lambda n: -per[0].get(n, [0.0])[0])
    w = max(12, *(len(l) for l in labels))
    print(f"GPU time per kernel family, us in all (calls), per setting: {', '.join(labels)}")
    print(f"{'family':60} " + " ".join(f"{l:>{w + 7}}" for l in labels))
    for n in names:
        cells = [f"{fam[n][0]:{w}.1f} ({fam[n][1]:4d})" if n in fam else f"{'-':>{w + 7}}" for fam in per]
        print(f"{n[:60]:60} " + " ".join(cells))
    print(f"{'all':60} " + " ".join(f"{sum(v[0] for v in fam.values()):{w}.1f} ({sum(v[1] for v in fam.values()):4d})"
                                     for fam in per))
    compare_launches(logs, labels)
