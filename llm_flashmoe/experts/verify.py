"""`llm flashmoe verify DIR`: every expert's and the resident file's checksum."""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FlashMoeError
from . import format as fmt
from .progress import Progress

READ_BYTES = 64 << 20


@dataclass
class VerifyReport:
    model_dir: str
    problems: list[str] = field(default_factory=list)  # one line each, saying what to do
    experts_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (f"{self.model_dir}: {'OK' if self.ok else 'DAMAGED'}: {self.experts_checked} experts, "
                f"{self.bytes_read / 1e9:.2f} GB checked in {self.seconds:.1f} s")
        return "\n".join([head, *("  " + p for p in self.problems)])


def verify_model(model_dir: str | Path, progress: bool = True) -> VerifyReport:
    """Check sizes, headers and crc32 of every expert and of the resident weights.

    Raises FlashMoeError only when the directory cannot be checked at all
    (unfinished conversion, missing or foreign manifest); damaged files are
    listed in the report's `problems`.
    """
    d = Path(model_dir)
    m = fmt.read_manifest(d)
    report = VerifyReport(str(d))
    t0 = time.perf_counter()
    layer_bytes = m.num_experts * m.expert_stride
    bar = Progress("verify", m.resident["bytes"] + len(m.layers) * layer_bytes, enabled=progress)

    resident = d / m.resident["file"]
    try:
        crc = _crc_resident(resident, m.resident["bytes"], bar, report)
        if crc != m.resident["crc32_data"]:
            report.problems.append(f"{resident}: checksum mismatch; the file is damaged. Re-convert the model.")
    except (OSError, FlashMoeError) as e:
        report.problems.append(f"{resident}: {e}")

    for layer, entry in enumerate(m.layers):
        path = d / entry.file
        bar.note = f"layer {layer + 1}/{len(m.layers)}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            report.problems.append(f"{path}: cannot open ({e.strerror}); re-convert the model.")
            bar.advance(layer_bytes)
            continue
        try:
            fmt.check_layer_file(m, layer, fd, path)
            bad = _check_experts(fd, m, entry.crc32, bar, report)
            if bad:
                shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
                report.problems.append(f"{path}: {len(bad)} expert(s) fail their checksum ({shown}); the file is "
                                       "damaged. Re-convert the model (or restore this file).")
        except FlashMoeError as e:
            report.problems.append(str(e))
            bar.advance(layer_bytes)
        finally:
            os.close(fd)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m llm_flashmoe.experts.verify", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        report = verify_model(args.model_dir, progress=not args.no_progress)
    except FlashMoeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0 if report.ok else 1


def _check_experts(fd: int, m: fmt.Manifest, crcs: list[int], bar: Progress, report: VerifyReport) -> list[int]:
    per = max(1, READ_BYTES // m.expert_stride)
    buf = bytearray(per * m.expert_stride)
    view = memoryview(buf)
    bad = []
    for e0 in range(0, m.num_experts, per):
        n = min(per, m.num_experts - e0)
        want = n * m.expert_stride
        got = os.preadv(fd, [view[:want]], m.header_bytes + e0 * m.expert_stride)
        if got != want:
            raise FlashMoeError(f"short read in layer file at expert {e0}; the file is truncated. Re-convert.")
        for r in range(n):
            start = r * m.expert_stride
            if zlib.crc32(view[start : start + m.expert_bytes]) != crcs[e0 + r]:
                bad.append(e0 + r)
        report.experts_checked += n
        report.bytes_read += want
        bar.advance(want)
    return bad


def _crc_resident(path: Path, size: int, bar: Progress, report: VerifyReport) -> int:
    import struct

    if path.stat().st_size != size:
        raise FlashMoeError(f"has {path.stat().st_size} bytes, the manifest says {size}; re-convert the model.")
    crc = 0
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        bar.advance(8 + n)
        while chunk := f.read(READ_BYTES):
            crc = zlib.crc32(chunk, crc)
            report.bytes_read += len(chunk)
            bar.advance(len(chunk))
    return crc


if __name__ == "__main__":
    raise SystemExit(main())
