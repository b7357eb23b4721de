"""A count towards a total with its rate and ETA, for long offline work (sharding, indexing)."""

from __future__ import annotations

import sys
import time


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, m = divmod(seconds // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{seconds % 60:02d}s"


class Bar:
    """A count towards a total on stderr with img/s and ETA: redrawn in place on a terminal, one
    line every `every` seconds in a log. `done` counts work finished before this process started
    (a resumed job): the rate is this process's own."""

    def __init__(
        self,
        what: str,
        total: int,
        done: int = 0,
        enabled: bool = True,
        every: float = 10.0,
        unit: str = "img",
    ):
        self.what, self.total, self.done, self.start, self.unit = what, total, done, done, unit
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.every = 0.5 if self.tty else every
        self.t0 = self.t_last = time.perf_counter()
        if enabled and done:
            print(f"{what}: {done:,} of {total:,} images already written, resuming", file=sys.stderr)

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = (self.done - self.start) / dt
        eta = fmt_time((self.total - self.done) / rate) if rate else "?"
        pct = 100 * self.done / max(self.total, 1)
        u = self.unit
        return f"{self.what}: {self.done:,}/{self.total:,} {u} ({pct:.0f}%) {rate:,.{0 if rate >= 10 else 1}f} {u}/s ETA {eta}"

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.t_last >= self.every:
            self.t_last = now
            print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n", file=sys.stderr,
                  flush=True)  # fmt: skip

    def close(self) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)
