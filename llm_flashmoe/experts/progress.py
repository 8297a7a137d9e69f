"""A byte-counting progress bar on stderr, with rate and ETA (convert, verify, bench)."""

from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`advance(nbytes)` as work is done; redraws at most 4 times a second.

    On a terminal the bar redraws in place; otherwise (logs, CI) one line is
    printed per 10% so that the output stays short.
    """

    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True, stream=None):
        self.label, self.total, self.done = label, max(total, 1), done
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._start_done, self._t0, self._last = done, time.monotonic(), 0.0
        self._decile = -1
        self.note = ""

    def advance(self, nbytes: int, note: str | None = None) -> None:
        self.done += nbytes
        if note is not None:
            self.note = note
        self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        frac = min(1.0, self.done / self.total)
        if self.tty:
            if not final and now - self._last < 0.25:
                return
        else:
            decile = int(frac * 10)
            if not final and decile == self._decile:
                return
            self._decile = decile
        self._last = now
        elapsed = now - self._t0
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = (f"{self.label} [{bar}] {human_bytes(self.done)}/{human_bytes(self.total)} "
                f"{human_bytes(rate)}/s ETA {human_seconds(eta) if rate > 0 else '?'} {self.note}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:118])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
