"""`build_loader`: the configured loader for one split of a shard directory."""

from __future__ import annotations

import torch

from ..config import DataCfg
from .manifest import Manifest, load_manifest
from .plan import Loader, ShardPlan


def build_loader(
    cfg: DataCfg,
    root: str,
    train: bool,
    rank: int,
    world: int,
    micro_batch: int,
    seed: int,
    num_classes: int | None,
    device: torch.device,
) -> tuple[Loader, Manifest]:
    """`auto` picks DALI when it is installed. Labels are checked against `num_classes`
    (default: the manifest's class count)."""
    manifest, files = load_manifest(root)
    num_classes = num_classes or manifest.num_classes
    plan = ShardPlan(files, [s.count for s in manifest.shards], rank, world, seed)
    kind = cfg.loader
    if kind == "auto":
        from .dali import available

        kind = "dali" if available() and cfg.on_error == "raise" else "webdataset"
    if kind == "dali":
        from .dali import DaliLoader

        loader = DaliLoader(cfg, plan, train, micro_batch, num_classes, device)
    else:
        from .wds import WdsLoader

        loader = WdsLoader(cfg, plan, train, micro_batch, num_classes, device)
    return loader, manifest
