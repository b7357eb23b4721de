"""What every loader shares: the batch format, the per-rank shard plan, and `build_loader`.

Batch format: (images uint8 [B, 3, H, W], labels int64 [B]); label -1 marks eval padding, which
keeps every rank doing the same number of forward passes (ZeRO-3 gathers parameters per forward).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config import DataCfg
from .manifest import DataError, Manifest, load_manifest

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader(Protocol):
    steps_per_epoch: int  # batches every rank yields per epoch (same on every rank)
    num_samples: int  # samples one epoch covers over all ranks (eval: exact)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]: ...


@dataclass
class ShardPlan:
    """Which shards each rank reads; computed from the manifest alone, identically on every rank."""

    files: list[Path]
    counts: list[int]
    rank: int
    world: int
    seed: int

    def __post_init__(self):
        if len(self.files) < self.world:
            raise DataError(
                f"{self.files[0].parent}: {len(self.files)} shard(s) for {self.world} ranks; "
                "write more, smaller shards (ffscale shard --shard-size)"
            )

    def train_shards(self, epoch: int) -> list[int]:
        """Shards shuffled per epoch, then split by rank: disjoint, so no sample twice."""
        order = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank :: self.world]

    def eval_shards(self) -> list[int]:
        return list(range(len(self.files)))[self.rank :: self.world]

    def train_steps(self, batch: int, workers: int) -> int:
        """Full batches every rank can yield in any epoch: a lower bound over shard assignments
        (the smallest shards), less one batch per worker for each worker's partial remainder."""
        per_rank = len(self.files) // self.world
        smallest = sum(sorted(self.counts)[:per_rank])
        return max(0, smallest // batch - max(workers, 1))

    def eval_batches(self, batch: int, workers: int, rank: int) -> int:
        idx = list(range(len(self.files)))[rank :: self.world]
        w = max(workers, 1)
        return sum(-(-sum(self.counts[i] for i in idx[k::w]) // batch) for k in range(w))


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
    """The configured loader for one split. `auto` picks DALI when it is installed.
    Labels are checked against `num_classes` (default: the manifest's class count)."""
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
