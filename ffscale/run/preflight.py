"""The whole job checked once, before any rank trains: every stage's batch on this world size, its
data, a resumed stage's config changes, a distilled stage's teacher, and the weights each stage starts
from. One line naming the key, exit 2.

`ffscale train` runs it before it starts the launcher, all but the checks that need torch, which run
beside the ranks' start-up while the ranks wait for their verdict (ffscale/run/verdict.py); a job
started by a plain launcher
(`deepspeed ffscale/train.py`, torchrun) runs it on rank 0 once the ranks have met
(ffscale/run/pipeline.py). `ENV` tells the ranks which happened.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ffscale.config import Config, stages
from ffscale.data.check import check_stage_data
from ffscale.run import carry, changes
from ffscale.run.world import check_launch, for_world

ENV = "FFSCALE_PREFLIGHT_DONE"


def check_job(cfg: Config, nodes: int, per_node: int) -> None:
    torch_checks = check_job_without_torch(cfg, nodes, per_node)
    if torch_checks is not None:
        torch_checks()


def check_job_without_torch(cfg: Config, nodes: int, per_node: int) -> Callable[[], None] | None:
    """Every check that needs no torch, now; the ones that do (a distilled stage's teacher, the weights
    an earlier stage hands on), returned to be run (ffscale/run/verdict.py runs them beside the
    ranks' start-up), or None when the job has none."""
    check_launch(cfg, nodes, per_node)  # before NCCL init, not after
    world = nodes * per_node
    pipeline = stages(cfg)
    for stage in pipeline:
        p = f"stages.{stage.name}." if cfg.stages else ""
        check_stage_data(for_world(stage.cfg, world, p), world, p)
        changes.check(stage, cfg.run, set(cfg.run.allow_change))
    distilled = any(stage.cfg.distill.teacher for stage in pipeline)
    if not distilled and not carry.carried_pairs(pipeline):
        return None

    def torch_checks() -> None:
        if distilled:
            from ffscale.run import teacher

            teacher.check(cfg)  # a distilled stage's teacher sees its images and predicts its classes
        carry.check(pipeline)  # an earlier stage's weights fit the stage that starts from them

    return torch_checks


def done_by_launcher() -> bool:
    return os.environ.get(ENV) == "1"
