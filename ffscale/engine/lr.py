"""The learning rate of every optimizer step (the engine sets it before each step from the step
count): timm's cosine schedule (DeiT's `--sched cosine`),
read per epoch as DeiT's `main.py` steps it, or per optimizer step.

timm 0.3.2's CosineLRScheduler (scheduler/cosine_lr.py:62-95, `warmup_prefix=False`): at time t
(in epochs) the lr rises linearly from `warmup_lr` over the warmup epochs, then follows
min_lr + (lr - min_lr) (1 + cos(pi t / epochs)) / 2, t counted from 0 (the warmup is not a prefix).
DeiT's main.py calls `lr_scheduler.step(epoch)` after each epoch (main.py:375-382), so epoch e
trains at the value for t = e - 1, and epochs 0 and 1 both at `warmup_lr` (the scheduler's
constructor sets it, cosine_lr.py:62-64). `per_epoch=False` samples the same curve at every
optimizer step (t = step / steps_per_epoch): the same schedule without its staircase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ffscale.engine.ds_config import peak_lr


@dataclass(frozen=True)
class Cosine:
    peak: float  # lr after warmup (base_lr x global_batch / lr_batch_base)
    epochs: int
    warmup_epochs: float
    warmup_lr: float
    min_lr: float
    steps_per_epoch: int
    per_epoch: bool = True

    def at_time(self, t: float) -> float:
        """timm's value at t epochs."""
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (self.peak - self.warmup_lr) / self.warmup_epochs
        t = min(t, self.epochs)
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * t / self.epochs))

    def __call__(self, step: int) -> float:
        """The lr of the optimizer step that follows `step` finished steps."""
        if not self.per_epoch:
            return self.at_time(step / self.steps_per_epoch)
        epoch = step // self.steps_per_epoch
        return self.warmup_lr if epoch == 0 else self.at_time(epoch - 1)


def for_stage(stage_cfg, steps_per_epoch: int) -> Cosine:
    """The schedule of a stage's config (`schedule.*`, the peak from optim.base_lr x batch / lr_batch_base)."""
    sc = stage_cfg.schedule
    return Cosine(
        peak_lr(stage_cfg),
        sc.epochs,
        sc.warmup_epochs,
        sc.warmup_lr,
        sc.min_lr,
        steps_per_epoch,
        sc.lr_per == "epoch",
    )
