"""The PIL loader over WebDataset shards, for machines without DALI: the rank's samples of the
SamplePlan read by index (TarIndex), decoded and augmented in DataLoader workers.

Each sample's augmentation is seeded by (seed, epoch, rank, its position in the rank's list), so a
resumed epoch replays the same crops whatever the worker count, and the copies of a repeated
image are augmented independently.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch

from ffscale.config import DataCfg
from ffscale.data.plan import Batch, Loader, SamplePlan, pad_batch, pad_eval
from ffscale.data.samples import decode_image, parse_label
from ffscale.data.tarindex import TarIndex
from ffscale.data.transforms import eval_transform, train_transform
from ffscale.errors import DataError, StorageError
from ffscale.util.seeds import derive


class _Samples(torch.utils.data.Dataset):
    """Position k of the rank's epoch list -> (image tensor, label), or None for a skipped sample."""

    def __init__(self, loader: WdsLoader, ids: np.ndarray, epoch: int, first: int):
        self.loader, self.ids, self.epoch, self.first = loader, ids, epoch, first

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        lo, c = self.loader, self.loader.cfg
        got = lo.sample(int(self.ids[k]))
        if got is None:
            return None
        img, y = got
        if lo.train:
            rng = random.Random(derive(lo.plan.seed, "crop", self.epoch, lo.plan.rank, self.first + k))
            x = train_transform(img, c.img_size, c.scale, c.ratio, c.hflip, rng, c.interpolation, lo.fill)
        else:
            x = eval_transform(img, c.img_size, c.crop_pct, c.interpolation)
        return x, y


class WdsLoader(Loader):
    def __init__(self, cfg: DataCfg, plan: SamplePlan, index: TarIndex, train: bool, batch: int,
                 num_classes: int, device: torch.device):  # fmt: skip
        super().__init__(cfg, plan, index, train, batch, num_classes, device)
        # timm fills RandAugment's empty pixels with the mean colour (transforms_factory.py:85-88)
        self.fill = tuple(min(255, round(255 * v)) for v in cfg.mean) if train and cfg.rand_augment else None
        if train and cfg.color_jitter > 0 and not cfg.rand_augment and plan.rank == 0:
            print(
                "ffscale: data.color_jitter is DALI-only; the webdataset loader trains without it", flush=True
            )

    def sample(self, i: int):
        """Sample i decoded, with its label; None when it is bad and data.on_error=skip."""
        try:
            s = self.index.read(i)
            return decode_image(s, self.index.members), parse_label(s, self.num_classes, self.index.members)
        except DataError as e:
            if self.cfg.on_error == "raise" or isinstance(e, StorageError):  # storage down: stop, not skip
                raise
            print(f"ffscale: skipped ({e})", flush=True)  # names shard and key
            return None

    def close(self) -> None:
        """Nothing is held between epochs: each epoch's DataLoader workers end with it."""

    def read_only(self, epoch: int) -> Iterator[int]:
        """The feed alone (`ffscale bench data`'s ceiling): the epoch's samples read by the same
        DataLoader workers, nothing decoded; yields each batch's size."""
        ids = self.plan.epoch_ids(epoch, self.train, self.batch)
        dl = torch.utils.data.DataLoader(
            _Reads(self, ids), batch_size=self.batch, num_workers=self.cfg.workers, drop_last=True
        )
        for y in dl:
            yield len(y)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        b = self.batch
        ids = self.plan.epoch_ids(epoch, self.train, b)[skip * b :]
        dl = torch.utils.data.DataLoader(
            _Samples(self, ids, epoch, skip * b),
            batch_size=b,
            num_workers=self.cfg.workers,
            collate_fn=_collate,
            # pinned host batches: the copy to the GPU (non_blocking, in DeviceOps) does not stall
            pin_memory=self.device.type == "cuda",
        )
        n = skip
        try:
            for got in dl:
                n += 1
                if self.train:
                    if got is not None:  # a batch whose every sample was skipped as bad
                        yield got
                elif got is not None:  # eval: every batch `b` rows, the last (or a short one) padded
                    yield pad_batch(*got, b)
                else:
                    yield from pad_eval(0, 1, b, self.cfg.img_size, torch.device("cpu"))
        except DataError as e:  # raised in a worker: torch puts its traceback in the text (ExceptionWrapper)
            raise type(e)(own_line(e)) from None
        if not self.train:
            yield from pad_eval(n, self.steps_per_epoch, b, self.cfg.img_size, torch.device("cpu"))


class _Reads(torch.utils.data.Dataset):
    """Position k of the rank's epoch list -> its label, the sample read and checked, not decoded."""

    def __init__(self, loader: WdsLoader, ids: np.ndarray):
        self.loader, self.ids = loader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> int:
        s = self.loader.index.read(int(self.ids[k]))
        return parse_label(s, self.loader.num_classes, self.loader.index.members)


def own_line(error: Exception) -> str:
    """An error's own message, without the worker's traceback torch's DataLoader puts before it
    ("Caught DataError in DataLoader worker process 0. Original Traceback ...": torch/_utils.py,
    ExceptionWrapper.reraise)."""
    text = str(error).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith("ffscale.errors.") and ": " in last else last


def _collate(samples: list) -> Batch | None:
    samples = [s for s in samples if s is not None]  # data.on_error=skip: the batch is that much smaller
    if not samples:
        return None
    xs, ys = zip(*samples)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
