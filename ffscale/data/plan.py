"""What every loader shares: the batch format, the per-rank shard plan with its step counts, and
eval padding. Computed from the manifest alone, identically on every rank.

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

from ffscale.data.manifest import Members
from ffscale.errors import DataError
from ffscale.util.seeds import derive

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader(Protocol):
    steps_per_epoch: int  # batches every rank yields per epoch (same on every rank)
    num_samples: int  # samples one epoch covers over all ranks (eval: exact)
    choice: str  # which loader and why (for the stage log)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]: ...


@dataclass
class ShardPlan:
    files: list[Path]
    counts: list[int]
    rank: int
    world: int
    seed: int
    members: Members = Members()
    indexes: list[Path] | None = None  # DALI's .idx per shard (default: beside it)

    def __post_init__(self):
        if self.indexes is None:
            self.indexes = [f.with_suffix(".idx") for f in self.files]
        if len(self.files) < self.world:
            raise DataError(
                f"{self.files[0].parent}: {len(self.files)} shard(s) for {self.world} ranks; "
                "write more, smaller shards (ffscale shard --shard-size)"
            )

    def train_shards(self, epoch: int) -> list[int]:
        """Shards shuffled per epoch, then split by rank: disjoint, so no sample twice."""
        order = list(range(len(self.files)))
        random.Random(derive(self.seed, "shards", epoch)).shuffle(order)
        return order[self.rank :: self.world]

    def eval_shards(self) -> list[int]:
        return list(range(len(self.files)))[self.rank :: self.world]

    def train_steps(self, batch: int, held_back: int) -> int:
        """Full batches every rank can yield in any epoch: a lower bound over shard assignments
        (the smallest shards), less `held_back` batches for streams that end on partial batches."""
        per_rank = len(self.files) // self.world
        smallest = sum(sorted(self.counts)[:per_rank])
        return self._some(max(0, smallest // batch - held_back))

    def eval_steps(self, batch: int, workers: int) -> int:
        """Batches of the rank with the most (every rank pads to it)."""
        w = max(workers, 1)

        def batches(rank: int) -> int:
            idx = list(range(len(self.files)))[rank :: self.world]
            return sum(-(-sum(self.counts[i] for i in idx[k::w]) // batch) for k in range(w))

        return max(batches(r) for r in range(self.world))

    def _some(self, steps: int) -> int:
        if steps == 0:
            raise DataError(f"{self.files[0].parent}: too few samples for one batch per rank")
        return steps


def pad_eval(done: int, steps: int, img_size: int, device: torch.device) -> Iterator[Batch]:
    """Padding batches (label -1) from `done` up to `steps`: every rank runs as many eval forwards."""
    for _ in range(done, steps):
        yield (
            torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8, device=device),
            torch.full((1,), -1),
        )
