"""Step arithmetic of a stage: micro-steps, optimizer steps, warmup and totals. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from ffscale.config import StageCfg
from ffscale.errors import ConfigError
from ffscale.run.world import check_world


@dataclass(frozen=True)
class Steps:
    accum: int  # micro-batches per optimizer step on each rank
    micro_per_epoch: int  # micro-batches each rank trains on per epoch (a whole number of steps)
    per_epoch: int  # optimizer steps per epoch
    total: int  # optimizer steps of the stage
    warmup: int  # optimizer steps of linear warmup

    def epoch_of(self, micro: int) -> float:
        """Fraction of an epoch done after `micro` micro-steps of it (for the progress row)."""
        return micro / self.micro_per_epoch


def plan_steps(stage_cfg: StageCfg, world: int, loader_steps: int, stage: str = "train") -> Steps:
    """`loader_steps`: micro-batches a rank's train loader yields per epoch. Epochs end on an
    optimizer-step boundary."""
    accum = check_world(stage_cfg, world, f"stages.{stage}.")
    micro = loader_steps // accum * accum
    per_epoch = micro // accum
    if per_epoch == 0:
        raise ConfigError(
            f"stage {stage}: one epoch of {stage_cfg.data.train} is smaller than optim.global_batch"
        )
    total = stage_cfg.schedule.epochs * per_epoch
    return Steps(accum, micro, per_epoch, total, int(stage_cfg.schedule.warmup_epochs * per_epoch))
