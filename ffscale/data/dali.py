"""NVIDIA DALI pipelines: nvJPEG/hardware decode on the GPU (`device="mixed"`), the same graph on
the CPU where there is no GPU. The only module that knows DALI.

One pipeline per epoch over this rank's shards of that epoch (ShardPlan: shuffled per epoch, split by
rank, as the webdataset loader reads them), seeded from (seed, epoch, rank): an epoch's batches are a
pure function of those, so a resumed run replays them by skipping the batches it already trained on.
Without the per-epoch order DALI's reader would give each rank the same contiguous range of samples
every epoch, shuffled only inside its `initial_fill` buffer.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.nn import functional as F

from ffscale.config import DataCfg
from ffscale.data.plan import Batch, ShardPlan, pad_eval
from ffscale.data.samples import decode_image, iter_samples, json_label, parse_label
from ffscale.errors import DaliFailure, DataError
from ffscale.util.seeds import derive31

LOCATE_S = 120  # searching for a bad sample reads this rank's nearby shards for at most this long


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


def _pipeline(files, idx, members, train, c: DataCfg, rand_aug: bool, decode_device: str, host_resize: bool):
    from nvidia.dali import fn, pipeline_def, types

    from ffscale.data import randaug

    width = members.label_bytes  # labels leave DALI as fixed-width bytes, parsed on the host
    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[c.interpolation]

    @pipeline_def(enable_conditionals=True)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=files,
            index_paths=idx,
            ext=[";".join(members.image_exts), members.label_member],
            missing_component_behavior="error",  # the default would label a missing .cls as 0
            random_shuffle=train,
            initial_fill=c.shuffle_buffer,
            pad_last_batch=not train,
            dont_use_mmap=True,  # a truncated shard is then an error, not a SIGSEGV
            name="reader",
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
                mirror = fn.random.coin_flip(probability=c.hflip)
                label = fn.pad(cls[:width], axes=(0,), shape=(width,), fill_value=0)
                return img, label, cls.shape(), mirror
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
        label = fn.pad(cls[:width], axes=(0,), shape=(width,), fill_value=0)
        return img, label, cls.shape()

    return pipe


def json_labels(raw: torch.Tensor, lengths: torch.Tensor, key: str) -> torch.Tensor:
    """[B, W] uint8 JSON members (zero padded) -> int64 `key` values; -2 where there is none."""
    out = []
    for row, n in zip(raw.numpy(), lengths.tolist()):
        try:
            out.append(json_label(row[:n].tobytes(), key) if n <= len(row) else -2)
        except ValueError:
            out.append(-2)
    return torch.tensor(out, dtype=torch.int64)


def parse_labels(raw: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, W] uint8 ASCII (zero padded) -> int64 labels; -2 where not a plain decimal number."""
    d = raw.long() - 48
    pos = torch.arange(raw.shape[1])
    inside = pos[None, :] < lengths.view(-1, 1)
    ws = (raw == 10) | (raw == 13) | (raw == 32)
    ndig = (inside & (d >= 0) & (d <= 9)).sum(1)
    ok = (ndig > 0) & ((inside & ~ws).sum(1) == ndig) & (lengths.view(-1) <= raw.shape[1])
    digit = inside & (d >= 0) & (d <= 9)
    first = torch.where(digit.any(1), digit.float().argmax(1), 0)
    last = raw.shape[1] - 1 - digit.flip(1).float().argmax(1)
    ok &= last - first + 1 == ndig  # one run of digits: "1 2" is not 12 (the host parser agrees)
    exp = (digit.flip(1).cumsum(1).flip(1) - 1).clamp(min=0)  # digits to the right of each digit
    val = (d.clamp(0, 9) * (10**exp) * digit).sum(1)
    return torch.where(ok, val, torch.full_like(val, -2))


class DaliLoader:
    def __init__(
        self, cfg: DataCfg, plan: ShardPlan, train: bool, batch: int, num_classes: int, device: torch.device
    ):
        if cfg.on_error == "skip":
            raise DataError(
                "data.on_error=skip needs data.loader=webdataset: DALI cannot drop a sample inside its "
                "graph (data.loader=auto picks webdataset for skip)"
            )
        self.cfg, self.plan, self.train, self.batch = cfg, plan, train, batch
        self.num_classes, self.device = num_classes, device
        for i in plan.indexes:
            if not i.is_file() or i.stat().st_size == 0:
                raise DataError(
                    f"DALI index {i} missing or empty: rewrite the shards with `ffscale shard`, or "
                    f"describe them with `ffscale shard index {plan.files[0].parent}`"
                )
        if train:  # one reader streams across the rank's shards: only its last partial batch is lost
            self.steps_per_epoch = plan.train_steps(batch, held_back=0)
            self.num_samples = self.steps_per_epoch * batch * plan.world
        else:
            self.steps_per_epoch = plan.eval_steps(batch, workers=1)
            self.num_samples = sum(plan.counts)

    def _batches(self, epoch: int, skip: int) -> Iterator[dict | None]:
        """One epoch's batches as {x, cls, len} (None for the `skip` first: not decoded to tensors)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        gpu = self.device.type == "cuda"
        order = self.plan.train_shards(epoch) if self.train else self.plan.eval_shards()
        rand_aug = self.cfg.rand_augment and self.train
        # On a CPU, DALI's resize costs ~1 ms per 224 px image, torch's uint8 SIMD resize ~0.15 ms.
        host = self.train and not gpu and not rand_aug
        pipe = _pipeline(
            [str(self.plan.files[i]) for i in order], [str(self.plan.indexes[i]) for i in order], self.plan.members,
            self.train,
            self.cfg, rand_aug, "mixed" if gpu else "cpu", host,
        )(
            batch_size=self.batch,
            num_threads=max(1, self.cfg.workers),
            device_id=self.device.index or 0 if gpu else None,
            seed=derive31(self.plan.seed, "dali", epoch, self.plan.rank),
            prefetch_queue_depth=2,
        )  # fmt: skip
        pipe.build()
        if host:  # train: exactly steps_per_epoch batches, no more than the rank's shards hold
            for n in range(self.steps_per_epoch):
                img, cls, length, mirror = pipe.run()
                if n < skip:
                    yield None
                    continue
                yield {
                    "x": self._resize(img, mirror.as_array()),
                    "cls": torch.from_numpy(cls.as_array()),
                    "len": torch.from_numpy(length.as_array()),
                }
            return
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        it = DALIGenericIterator(
            [pipe], ["x", "cls", "len"], reader_name="reader", last_batch_policy=policy, auto_reset=False
        )
        try:
            for n, out in enumerate(it):
                yield None if n < skip else out[0]
        finally:
            del it

    def _labels(self, raw: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        key = self.plan.members.label_key
        return json_labels(raw, lengths, key) if key else parse_labels(raw, lengths)

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
        n = 0
        try:
            for d in self._batches(epoch, skip):
                if n >= self.steps_per_epoch:
                    break
                n += 1
                if d is None:
                    continue
                y = self._labels(d["cls"].cpu(), d["len"].cpu().view(-1))
                bad = (y < 0) | (y >= self.num_classes)
                if bad.any():
                    what = f"label {y[bad][0].item()} invalid or out of range [0, {self.num_classes})"
                    self._locate(epoch, n - 1, what)
                yield d["x"], y
        except DataError:
            raise
        except RuntimeError as e:
            what = dali_error_line(str(e))
            if not is_data_error(str(e)):  # the driver, CUDA, nvJPEG, memory: said at once
                raise DaliFailure(
                    f"DALI failed on {self.device} (not a data error): {what}. Train without DALI with "
                    "data.loader=webdataset"
                ) from None
            self._locate(epoch, n, what)
        if not self.train:
            yield from pad_eval(n, self.steps_per_epoch, self.cfg.img_size, self.device)

    def _locate(self, epoch: int, batch: int, what: str, seconds: float = LOCATE_S):
        """DALI's data errors carry no file name: read, on the host, the shards of this rank that
        the failing batch can have come from (its reader position, plus the shuffle buffer and the
        prefetched batches), at most `seconds`, and raise naming the shard and key."""
        order = self.plan.train_shards(epoch) if self.train else self.plan.eval_shards()
        lo, hi = max(0, (batch - 1) * self.batch), (batch + 3) * self.batch + self.cfg.shuffle_buffer
        start, near = 0, []
        for i in order:  # shards whose samples [start, start + count) meet [lo, hi) of the rank's stream
            if start < hi and start + self.plan.counts[i] > lo:
                near.append(i)
            start += self.plan.counts[i]
        deadline = time.monotonic() + seconds
        try:
            for s in iter_samples([self.plan.files[i] for i in near], [self.plan.counts[i] for i in near]):
                parse_label(s, self.num_classes, self.plan.members)
                decode_image(s, self.plan.members)
                if time.monotonic() > deadline:
                    break
        except DataError as e:
            raise DataError(f"{e} (DALI: {what})") from None
        except Exception as e:  # a broken tar; iter_samples names the shard
            raise DataError(f"{e} (DALI: {what})") from None
        names = ", ".join(self.plan.files[i].name for i in near)
        raise DataError(f"DALI failed reading {names} under {self.plan.files[0].parent}: {what}")


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
