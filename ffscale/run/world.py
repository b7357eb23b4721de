"""A stage's batch on a given number of ranks: the micro-batch and gradient accumulation that make up
`optim.global_batch`, or an error naming the keys and a fix. Checked for every stage before any
rank starts (ffscale/run/preflight.py)."""

from __future__ import annotations

import dataclasses

from ffscale.config import Config, StageCfg, stages
from ffscale.errors import ConfigError


def check_world(stage_cfg: StageCfg, world: int, prefix: str = "") -> int:
    """Gradient accumulation steps for this world size, or an error naming the keys and a fix."""
    g, m = stage_cfg.optim.global_batch, stage_cfg.optim.micro_batch
    if m is None:
        if g % world:
            raise ConfigError(
                f"{prefix}optim.global_batch={g} is not divisible by {world} ranks; pick a multiple of {world}"
            )
        return 1
    if g % (m * world):
        fits = [d for d in range(min(m, g // world), 0, -1) if g % (d * world) == 0]
        fix = (
            f"set {prefix}optim.micro_batch={fits[0]} (accumulating {g // (fits[0] * world)}), or leave it unset"
            if fits and g % world == 0
            else f"pick a global_batch that is a multiple of {m * world}"
        )
        raise ConfigError(
            f"{prefix}optim.global_batch={g} is not divisible by ranks x micro_batch = {world} x {m}; {fix}"
        )
    return g // (m * world)


def for_world(stage_cfg: StageCfg, world: int, prefix: str = "") -> StageCfg:
    """The stage's config with optim.micro_batch resolved for `world` ranks (checked)."""
    accum = check_world(stage_cfg, world, prefix)
    optim = dataclasses.replace(stage_cfg.optim, micro_batch=stage_cfg.optim.global_batch // (world * accum))
    return dataclasses.replace(stage_cfg, optim=optim)


def check_launch(cfg: Config, nodes: int, per_node: int) -> None:
    """Every stage of the pipeline can start on nodes x per_node ranks: checked before any starts."""
    world = nodes * per_node
    for stage in stages(cfg):
        try:
            check_world(stage.cfg, world, f"stages.{stage.name}." if cfg.stages else "")
        except ConfigError as e:
            raise ConfigError(f"{e} ({nodes} node(s) x {per_node} = {world} ranks)") from None
