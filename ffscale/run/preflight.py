"""The whole job checked once, before any rank trains: every stage's batch on this world size, its
data, a resumed stage's config changes, a distilled stage's teacher, and the weights each stage starts
from. One line naming the key, exit 2.

`ffscale train` runs it before it starts the launcher; a job started by a plain launcher
(`deepspeed ffscale/train.py`, torchrun) runs it on rank 0 once the ranks have met
(ffscale/run/pipeline.py). `ENV` tells the ranks which happened.
"""

from __future__ import annotations

import os

from ffscale.config import Config, stages
from ffscale.data.check import check_stage_data
from ffscale.run import carry, changes
from ffscale.run.world import check_launch, for_world

ENV = "FFSCALE_PREFLIGHT_DONE"


def check_job(cfg: Config, nodes: int, per_node: int) -> None:
    check_launch(cfg, nodes, per_node)  # before NCCL init, not after
    world = nodes * per_node
    pipeline = stages(cfg)
    for stage in pipeline:
        p = f"stages.{stage.name}." if cfg.stages else ""
        check_stage_data(for_world(stage.cfg, world, p), world, p)
        changes.check(stage, cfg.run, set(cfg.run.allow_change))
    if any(stage.cfg.distill.teacher for stage in pipeline):
        # torch, DeepSpeed's config code and the distiller: only for a distilled stage, after the data
        # checks, so a job without a teacher is checked without importing torch
        from ffscale.run import teacher

        teacher.check(cfg)  # a distilled stage's teacher sees its images and predicts its classes
    carry.check(pipeline)  # an earlier stage's weights fit the stage that starts from them (torch only then)


def done_by_launcher() -> bool:
    return os.environ.get(ENV) == "1"
