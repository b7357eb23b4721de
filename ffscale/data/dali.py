"""NVIDIA DALI pipelines: nvJPEG/hardware decode on the GPU (`device="mixed"`), the same graph on
the CPU where there is no GPU. The only module that knows DALI.

One pipeline per epoch, fed the rank's samples of that epoch in the SamplePlan's order (read by
index on the host, as the webdataset loader reads them) and seeded from (seed, epoch, rank): an
epoch's batches are a pure function of those. DALI's random operators draw from one stream per
operator, whose use depends on the images (a crop window is drawn again until it fits), so a
resumed epoch runs the batches it skips through the pipeline and drops them, as the uninterrupted
run drew them. DALI's own webdataset reader cannot take the plan's order: it shards by contiguous
ranges of samples and shuffles only inside an `initial_fill` buffer.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ffscale.config import DataCfg
from ffscale.data.plan import Batch, SamplePlan, pad_eval
from ffscale.data.samples import decode_image, image_bytes, parse_label
from ffscale.data.tarindex import TarIndex
from ffscale.errors import DaliFailure, DataError
from ffscale.util.seeds import derive31


def version() -> str:
    import nvidia.dali

    return nvidia.dali.__version__


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _pipeline(feed, train, c: DataCfg, rand_aug: bool, decode_device: str, host_resize: bool):
    from nvidia.dali import fn, pipeline_def, types

    from ffscale.data import randaug

    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[c.interpolation]

    @pipeline_def(enable_conditionals=True)
    def pipe():
        # the rank's samples in the plan's order, read on the host (TarIndex); decoded from here on
        jpg, label = fn.external_source(
            source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64]
        )
        if train:
            img = fn.decoders.image_random_crop(
                jpg, device=decode_device, output_type=types.RGB, random_area=list(c.scale),
                random_aspect_ratio=list(c.ratio),
            )  # fmt: skip
            if c.color_jitter > 0 and not rand_aug:  # timm drops colour jitter under RandAugment
                j = [max(0.0, 1 - c.color_jitter), 1 + c.color_jitter]
                img = fn.color_twist(
                    img, brightness=fn.random.uniform(range=j), contrast=fn.random.uniform(range=j),
                    saturation=fn.random.uniform(range=j),
                )  # fmt: skip
            if host_resize:  # the crops, their flips and labels; resized in torch (DaliLoader._resize)
                return img, label, fn.random.coin_flip(probability=c.hflip)
            img = fn.resize(img, resize_x=c.img_size, resize_y=c.img_size, interp_type=interp)
            if rand_aug:  # DeiT's rand-m9-mstd0.5-inc1 at timm's magnitudes; filled with the mean grey
                img = randaug.rand_augment(img, c.img_size, fill=round(255 * sum(c.mean) / len(c.mean)))
            mirror = fn.random.coin_flip(probability=c.hflip)
        else:
            img = fn.decoders.image(jpg, device=decode_device, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=int(c.img_size / c.crop_pct), interp_type=interp)
            mirror = 0
        img = fn.crop_mirror_normalize(
            img, dtype=types.UINT8, output_layout="CHW", crop=(c.img_size, c.img_size), mirror=mirror
        )
        return img, label

    return pipe


class _Feed:
    """DALI's source: batch i of the rank's epoch list as (encoded images, labels). Reads run on a
    thread pool `ahead` batches in front of DALI (pread releases the GIL), so storage latency
    overlaps the step. A bad sample ends the feed; the loader raises its DataError in order."""

    def __init__(self, loader: DaliLoader, ids: np.ndarray, ahead: int = 3):
        self.l, self.ids, self.ahead = loader, ids, ahead
        self.batches = -(-len(ids) // loader.batch)
        self.pool = ThreadPoolExecutor(max(2, loader.cfg.workers))
        self.pending: dict[int, list] = {}
        self.failed: DataError | None = None

    def ids_of(self, i: int) -> np.ndarray:
        return self.ids[i * self.l.batch : (i + 1) * self.l.batch]

    def _submit(self, i: int) -> None:
        if i < self.batches and i not in self.pending:
            self.pending[i] = [self.pool.submit(self.l.read, int(j)) for j in self.ids_of(i)]

    def __call__(self, i: int):
        for k in range(i, i + self.ahead + 1):
            self._submit(k)
        if i >= self.batches or self.failed:
            raise StopIteration
        try:
            got = [f.result() for f in self.pending.pop(i)]
        except DataError as e:
            self.failed = e
            raise StopIteration from None
        return [g[0] for g in got], [g[1] for g in got]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaliLoader:
    def __init__(
        self,
        cfg: DataCfg,
        plan: SamplePlan,
        index: TarIndex,
        train: bool,
        batch: int,
        num_classes: int,
        device: torch.device,
    ):
        if cfg.on_error == "skip":
            raise DataError(
                "data.on_error=skip needs data.loader=webdataset: DALI cannot drop a sample inside its "
                "graph (data.loader=auto picks webdataset for skip)"
            )
        self.cfg, self.plan, self.index, self.train, self.batch = cfg, plan, index, train, batch
        self.num_classes, self.device = num_classes, device
        self.steps_per_epoch, self.num_samples = plan.epoch_size(train, batch)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i as DALI takes it: its encoded image and its label (checked here, on the host)."""
        s = self.index.read(i)
        y = parse_label(s, self.num_classes, self.index.members)
        return np.frombuffer(image_bytes(s, self.index.members), dtype=np.uint8), np.array(y, dtype=np.int64)

    def _batches(self, feed: _Feed, epoch: int, skip: int) -> Iterator[tuple | None]:
        """The epoch's batches as (images, labels) tensors; None for the `skip` first (run, dropped)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        gpu = self.device.type == "cuda"
        rand_aug = self.cfg.rand_augment and self.train
        # On a CPU, DALI's resize costs ~1 ms per 224 px image, torch's uint8 SIMD resize ~0.15 ms.
        host = self.train and not gpu and not rand_aug
        pipe = _pipeline(feed, self.train, self.cfg, rand_aug, "mixed" if gpu else "cpu", host)(
            batch_size=self.batch,
            num_threads=max(1, self.cfg.workers),
            device_id=self.device.index or 0 if gpu else None,
            seed=derive31(self.plan.seed, "dali", epoch, self.plan.rank),
            prefetch_queue_depth=2,
        )
        pipe.build()
        if host:
            for n in range(feed.batches):
                try:
                    img, label, mirror = pipe.run()
                except StopIteration:
                    return
                yield (
                    None
                    if n < skip
                    else (self._resize(img, mirror.as_array()), torch.from_numpy(label.as_array()))
                )
            return
        it = DALIGenericIterator(
            [pipe], ["x", "y"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False
        )
        try:
            for n, out in enumerate(it):
                yield None if n < skip else (out[0]["x"], out[0]["y"].view(-1).cpu())
        finally:
            del it

    def _resize(self, crops, mirror) -> torch.Tensor:
        """Each decoded crop (HWC uint8) to img_size (data.interpolation, antialiased), flipped as drawn."""
        size, mode = self.cfg.img_size, self.cfg.interpolation
        out = torch.empty(len(crops), 3, size, size, dtype=torch.uint8)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one small image each: DALI's threads are decoding the next batch
        try:
            for i in range(len(crops)):
                t = torch.from_numpy(np.asarray(crops[i])).permute(2, 0, 1).unsqueeze(0)  # channels-last view
                r = F.interpolate(t, size=(size, size), mode=mode, antialias=True, align_corners=False)
                out[i] = r[0].flip(-1) if mirror[i] else r[0]
        finally:
            torch.set_num_threads(threads)
        return out

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        feed = _Feed(self, self.plan.epoch_ids(epoch, self.train, self.batch))
        n = 0
        try:
            if len(feed.ids):
                for got in self._batches(feed, epoch, skip):
                    n += 1
                    if got is not None:
                        yield got
        except RuntimeError as e:
            if feed.failed:  # the feed ended at a bad sample before DALI had a batch
                raise feed.failed from None
            what = dali_error_line(str(e))
            if not is_data_error(str(e)):  # the driver, CUDA, nvJPEG, memory: said at once
                raise DaliFailure(
                    f"DALI failed on {self.device} (not a data error): {what}. Train without DALI with "
                    "data.loader=webdataset"
                ) from None
            self._locate(feed, n, what)
        finally:
            feed.close()
        if feed.failed:
            raise feed.failed
        if not self.train:
            yield from pad_eval(n, self.steps_per_epoch, self.cfg.img_size, self.device)

    def _locate(self, feed: _Feed, batch: int, what: str):
        """DALI's decode errors carry no file name: decode, on the host, the samples of the failing
        batch and those DALI may have been working ahead on, and raise naming the one that fails."""
        for i in range(batch, min(batch + 3, feed.batches)):
            for j in feed.ids_of(i):
                decode_image(self.index.read(int(j)), self.index.members)  # raises DataError naming it
        raise DataError(f"DALI failed near batch {batch} under {Path(self.index.files[0]).parent}: {what}")


def dali_error_line(message: str) -> str:
    """The line of DALI's error that says what happened (after its 'encountered:' preamble)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln != "Current pipeline object is no longer valid."] or lines
    if "encountered:" in lines:
        return (
            lines[lines.index("encountered:") + 1]
            if lines.index("encountered:") + 1 < len(lines)
            else lines[-1]
        )
    return lines[-1] if lines else "unknown DALI error"


def is_data_error(message: str) -> bool:
    """A failure of DALI's reader or decoder on the bytes it was given, as opposed to DALI or the
    device failing (driver, CUDA, nvJPEG resources, memory): only the former is worth a search."""
    device = re.search(r"out of memory|cuda|driver|nvml|cuInit|NVJPEG_STATUS_(?!BAD_JPEG)", message, re.I)
    in_data_op = re.search(r"operator `nvidia\.dali\.fn\.(readers\.webdataset|decoders\.\w+)`", message)
    return bool(in_data_op) and not device


def probe(device: torch.device) -> str | None:
    """None when DALI builds and runs a decoding pipeline on `device` (mixed decode on a GPU);
    otherwise DALI's reason, in one line."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, format="JPEG")
    encoded = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    gpu = device.type == "cuda"

    @pipeline_def(batch_size=1, num_threads=1, device_id=(device.index or 0) if gpu else None)
    def pipe():
        jpg = fn.external_source(source=lambda: [encoded], batch=True, device="cpu")
        return fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)

    try:
        p = pipe()
        p.build()
        p.run()
    except Exception as e:
        return dali_error_line(str(e))
    return None
