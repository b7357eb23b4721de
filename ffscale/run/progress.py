"""Rank-0 progress lines of a stage: loss, lr, img/s, MFU, ETA."""

from __future__ import annotations

import time

from ffscale.util.bar import fmt_time


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

    def new_window(self, before_training: bool = False) -> None:
        """The next img/s window starts now: an epoch's evaluation and checkpoint are not training (in
        `bash scripts/demo.sh` the first window after each evaluation read 570-820 img/s against
        ~1,200). The ETA keeps counting those (they recur), not what came `before_training` (the
        carried weights' evaluation)."""
        self.t_last = time.perf_counter()
        if before_training:
            self.t0 = self.t_last


def train_line(
    stage: str, epoch: int, epochs: int, step: int, total: int, loss: float, lr: float, perf: dict
) -> str:
    mfu = f" | MFU {perf['mfu']:.1f}%" if "mfu" in perf else ""
    ips = perf.get("img_per_s", 0)
    teacher = ""
    if "teacher_share" in perf:  # a distilled stage: what its teacher's forward costs
        share = perf["teacher_share"]
        teacher = (
            f" | teacher {share:.0f}% of the time (~{ips / max(1 - share / 100, 1e-3):,.0f} img/s without)"
        )
    return (
        f"{stage} ep {epoch + 1}/{epochs} step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
        f"{ips:,.0f} img/s{mfu}{teacher} | ETA {fmt_time(perf.get('eta_s', 0))}"
    )


def eval_line(stage: str, epoch: int, ev: dict, seconds: float) -> str:
    ema = f" | EMA top-1 {ev['val_top1_ema']:.2f}%" if "val_top1_ema" in ev else ""
    return (
        f"{stage} eval ep {epoch}: top-1 {ev['val_top1']:.2f}% top-5 {ev['val_top5']:.2f}% "
        f"loss {ev['val_loss']:.4f} on {ev['val_samples']} images{ema} ({seconds:.1f}s)"
    )
