"""The plain webdataset + PIL loader, for machines without DALI."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
import webdataset as wds

from ffscale.config import DataCfg
from ffscale.data.manifest import broken_tar
from ffscale.data.plan import Batch, ShardPlan, pad_eval
from ffscale.data.samples import decode_image, parse_label, whole_shards
from ffscale.data.transforms import eval_transform, train_transform
from ffscale.errors import DataError
from ffscale.util.seeds import derive


class WdsLoader:
    def __init__(
        self, cfg: DataCfg, plan: ShardPlan, train: bool, batch: int, num_classes: int, device: torch.device
    ):
        self.cfg, self.plan, self.train, self.batch, self.device = cfg, plan, train, batch, device
        self.num_classes = num_classes
        self.workers = cfg.workers
        # timm fills RandAugment's empty pixels with the mean colour (transforms_factory.py:85-88)
        self.fill = tuple(min(255, round(255 * v)) for v in cfg.mean) if train and cfg.rand_augment else None
        if train and cfg.color_jitter > 0 and not cfg.rand_augment and plan.rank == 0:
            print(
                "ffscale: data.color_jitter is DALI-only; the webdataset loader trains without it", flush=True
            )
        if train:
            self.steps_per_epoch = plan.train_steps(
                batch, held_back=max(self.workers, 1)
            )  # one per worker stream
            self.num_samples = self.steps_per_epoch * batch * plan.world
        else:
            self.steps_per_epoch = plan.eval_steps(batch, self.workers)
            self.num_samples = sum(plan.counts)

    def _samples(self, src: Iterator[dict], epoch: int, skip: int) -> Iterator[tuple]:
        """Skip already-consumed samples before decoding; decode, check, transform the rest."""
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        to_skip = len(range(wid, skip, nw)) * self.batch  # DataLoader takes batches round-robin
        c, members = self.cfg, self.plan.members
        for n, s in enumerate(src):
            if n < to_skip:
                continue
            # per sample: a resumed epoch replays the same crops
            rng = random.Random(derive(self.plan.seed, "crop", epoch, self.plan.rank, wid, n))
            try:
                y = parse_label(s, self.num_classes, members)
                img = decode_image(s, members)
            except DataError as e:
                if c.on_error == "raise":
                    raise
                print(f"ffscale: skipped ({e})", flush=True)  # names shard and key
                continue
            if self.train:
                x = train_transform(
                    img, c.img_size, c.scale, c.ratio, c.hflip, rng, c.interpolation, self.fill
                )
            else:
                x = eval_transform(img, c.img_size, c.crop_pct, c.interpolation)
            yield x, y

    def _dataset(self, epoch: int, skip: int) -> wds.DataPipeline:
        idx = self.plan.train_shards(epoch) if self.train else self.plan.eval_shards()
        urls = [str(self.plan.files[i]) for i in idx]
        expect = {str(f): n for f, n in zip(self.plan.files, self.plan.counts)}
        stages = [
            wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(handler=broken_tar),
            lambda src: whole_shards(src, expect),
        ]  # fmt: skip
        if self.train:
            rng = random.Random(derive(self.plan.seed, "shuffle", epoch, self.plan.rank))
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng))
        stages += [
            lambda src: self._samples(src, epoch, skip),
            wds.batched(self.batch, collation_fn=_collate, partial=not self.train),
        ]
        return wds.DataPipeline(*stages)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        dl = torch.utils.data.DataLoader(
            self._dataset(epoch, skip),
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
            # pinned host batches: the copy to the GPU (non_blocking, in DeviceOps) does not stall
            pin_memory=self.device.type == "cuda",
        )
        n = skip
        for x, y in dl:
            if n >= self.steps_per_epoch:
                break
            n += 1
            yield x, y
        if not self.train:
            yield from pad_eval(n, self.steps_per_epoch, self.cfg.img_size, torch.device("cpu"))
        elif n < self.steps_per_epoch:  # samples were skipped as bad: top up from the next pass
            yield from self.epoch(epoch + 10_000, n)


def _collate(samples: list[tuple]) -> Batch:
    xs, ys = zip(*samples)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
