"""Rank-0 progress lines: loss, lr, img/s, MFU, ETA."""

from __future__ import annotations

import sys
import time


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


class Meter:
    def __init__(self, total_steps: int, images_per_step: int, flops_per_image: float, peak_flops: float):
        self.total, self.ips = total_steps, images_per_step
        self.fpi, self.peak = flops_per_image, peak_flops
        self.t0 = self.t_last = time.perf_counter()
        self.start_step = self.last_step = None

    def update(self, step: int) -> dict:
        """Throughput since the last call; ETA from the average since this process started."""
        now = time.perf_counter()
        if self.start_step is None:
            self.start_step = self.last_step = step
            self.t0 = self.t_last = now
            return {}
        dt, ds = now - self.t_last, step - self.last_step
        self.t_last, self.last_step = now, step
        ips = ds * self.ips / dt if dt > 0 and ds else 0.0
        rate = (step - self.start_step) / max(now - self.t0, 1e-9)
        out = {"img_per_s": ips, "eta_s": (self.total - step) / rate if rate else 0.0}
        if self.peak:
            out["mfu"] = 100 * ips * self.fpi / self.peak
        return out


def train_line(
    stage: str, epoch: int, epochs: int, step: int, total: int, loss: float, lr: float, perf: dict
) -> str:
    mfu = f" | MFU {perf['mfu']:.1f}%" if "mfu" in perf else ""
    return (
        f"{stage} ep {epoch + 1}/{epochs} step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
        f"{perf.get('img_per_s', 0):,.0f} img/s{mfu} | ETA {fmt_time(perf.get('eta_s', 0))}"
    )


def eval_line(stage: str, epoch: int, ev: dict, seconds: float) -> str:
    ema = f" | EMA top-1 {ev['val_top1_ema']:.2f}%" if "val_top1_ema" in ev else ""
    return (
        f"{stage} eval ep {epoch}: top-1 {ev['val_top1']:.2f}% top-5 {ev['val_top5']:.2f}% "
        f"loss {ev['val_loss']:.4f} on {ev['val_samples']} images{ema} ({seconds:.1f}s)"
    )


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
