"""What every loader shares: the batch format and the sample plan (which samples each rank reads
in which order, per epoch), computed from the manifest's counts alone, identically on every rank.

Ranks are assigned samples, not shard files, as DeiT's samplers assign them (facebookresearch/deit
@ 2f76ec6, samplers.py:8-59 and main.py:195-211): one permutation of all N samples per epoch,
each index repeated `repeats` times in a row, and rank r takes positions r, r + W, r + 2W, ...
of that list. So any world size works with any number of shards (4,096 ranks read the 40
ImageNet val files docs/data.md writes), the copies of an image go to different ranks in the same
or the next step, and an epoch's samples are a pure function of (seed, epoch, world): a resumed
epoch starts at its position without reading what it skips.

- `repeats` 1: `torch.utils.data.DistributedSampler` (shuffle, padded by wrapping): ceil(N / W)
  samples per rank, each sample once per epoch (the up to W - 1 padding samples twice).
- `repeats` > 1: DeiT's `RASampler` (= timm's `RepeatAugSampler` with its defaults): each rank
  takes floor(N // 256 * 256 / W) positions, so an epoch keeps the usual number of steps and
  covers about N / repeats distinct images, each seen `repeats` times.
- eval: rank r takes samples r, r + W, ...: every sample exactly once over the ranks.

The counts (samples and batches per rank) are ffscale/data/counts.py's, which needs no torch.

The permutation is torch's `randperm` under a generator seeded as timm seeds it (the epoch), offset
by the run's seed: `tests/unit/test_plan.py` holds the lists to timm's and torch's samplers.

Batch format: (images uint8 [B, 3, H, W], labels int64 [B]); label -1 marks eval padding, which
keeps every rank doing the same number of forward passes (ZeRO-3 gathers parameters per forward)
and every eval batch `B` = micro-batch rows (a compiled model sees one shape).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ffscale.data import counts
from ffscale.util.seeds import derive31

if TYPE_CHECKING:
    from ffscale.config import DataCfg
    from ffscale.data.tarindex import TarIndex

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader:
    """What every loader is: a rank's share of a split (`plan`) read through its index in batches of
    `batch`, for training or evaluation, labels checked against `num_classes`. A loader adds
    `epoch` and `close`."""

    choice: str = ""  # which loader and why (for the stage log)

    def __init__(self, cfg: DataCfg, plan: SamplePlan, index: TarIndex, train: bool, batch: int,
                 num_classes: int, device: torch.device):  # fmt: skip
        self.cfg, self.plan, self.index, self.train, self.batch = cfg, plan, index, train, batch
        self.num_classes, self.device = num_classes, device
        # batches every rank yields per epoch (the same on every rank); samples one epoch covers
        # over all ranks (eval: exact)
        self.steps_per_epoch, self.num_samples = plan.epoch_size(train, batch)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the loader holds between epochs (worker processes)."""


@dataclass(frozen=True)
class SamplePlan:
    n: int  # samples in the split
    rank: int
    world: int
    seed: int
    repeats: int = 1
    where: str = "data"  # names the split in errors

    def order_seed(self, epoch: int) -> int:
        """The generator seed of an epoch's permutation: timm's (the epoch) plus the run's offset."""
        return derive31(self.seed, "order") + epoch

    @property
    def per_rank(self) -> int:
        """Train samples each rank takes per epoch (before whole batches are cut)."""
        return counts.train_per_rank(self.n, self.world, self.repeats)

    def positions(self, epoch: int) -> np.ndarray:
        """The epoch's list of sample indices that ranks take from (repeats in a row)."""
        g = torch.Generator()
        g.manual_seed(self.order_seed(epoch))
        perm = torch.randperm(self.n, generator=g)
        if self.repeats > 1:
            perm = torch.repeat_interleave(perm, self.repeats)
        return perm.numpy()

    def train_indices(self, epoch: int, order: np.ndarray | None = None) -> np.ndarray:
        """This rank's samples for `epoch`, in order (int64 global indices); `order`: the epoch's
        `positions`, when computed once for many ranks."""
        order = self.positions(epoch) if order is None else order
        at = self.rank + self.world * np.arange(self.per_rank, dtype=np.int64)
        return order[at % len(order)]

    def eval_indices(self) -> np.ndarray:
        return np.arange(self.rank, self.n, self.world, dtype=np.int64)

    def train_steps(self, batch: int) -> int:
        """Full batches every rank yields per epoch (the last partial one dropped, as DeiT's loader)."""
        return counts.train_steps(self.n, self.world, self.repeats, batch, self.where)

    def epoch_size(self, train: bool, batch: int) -> tuple[int, int]:
        """(batches every rank yields per epoch, samples the epoch covers over all ranks): the two
        numbers a Loader states."""
        if train:
            steps = self.train_steps(batch)
            return steps, steps * batch * self.world
        return self.eval_steps(batch), self.n

    def epoch_ids(self, epoch: int, train: bool, batch: int) -> np.ndarray:
        """The rank's samples a loader reads in `epoch`: whole train batches, or every eval sample."""
        return self.train_indices(epoch)[: self.train_steps(batch) * batch] if train else self.eval_indices()

    def eval_steps(self, batch: int) -> int:
        """Batches of the rank with the most (rank 0; every rank pads to it)."""
        return counts.eval_steps(self.n, self.world, batch)


def pad_batch(x: torch.Tensor, y: torch.Tensor, batch: int) -> Batch:
    """An eval batch filled up to `batch` rows with black images labelled -1."""
    short = batch - len(y)
    if short <= 0:
        return x, y
    return (
        torch.cat([x, x.new_zeros((short, *x.shape[1:]))]),
        torch.cat([y, torch.full((short,), -1, dtype=y.dtype, device=y.device)]),
    )


def pad_eval(done: int, steps: int, batch: int, img_size: int, device: torch.device) -> Iterator[Batch]:
    """Padding batches (label -1) from `done` up to `steps`: every rank runs as many eval forwards, of
    `batch` rows like every other, so a compiled model sees no new shape."""
    for _ in range(done, steps):
        yield (
            torch.zeros(batch, 3, img_size, img_size, dtype=torch.uint8, device=device),
            torch.full((batch,), -1),
        )
