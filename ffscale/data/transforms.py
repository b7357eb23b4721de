"""Host-side image ops for the webdataset loader (PIL + numpy; torchvision's CPU wheel won't import
beside CPU torch), and the eval resize of `ffscale predict`. Output is uint8 CHW; normalisation
happens on the device for every loader."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from ffscale.data.randaug_pil import rand_augment

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}  # data.interpolation


def rrc_box(w: int, h: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """Random-resized-crop box, Inception/DeiT style: area in `scale`, log-uniform aspect ratio."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    # Fallback: centre crop clamped to the ratio range.
    r = w / h
    cw, ch = (w, int(round(w / ratio[0]))) if r < ratio[0] else (w, h)
    if r > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def train_transform(
    img: Image.Image,
    size: int,
    scale,
    ratio,
    hflip: float,
    rng,
    interpolation: str = "bicubic",
    rand_augment_fill: tuple | None = None,
) -> torch.Tensor:
    """DeiT's order (timm 0.3.2 transforms_factory.py:69-92): random-resized crop, flip, then
    RandAugment when `rand_augment_fill` (the mean colour it fills with) is given."""
    img = img.convert("RGB")
    box = rrc_box(img.width, img.height, scale, ratio, rng)
    img = img.resize((size, size), FILTERS[interpolation], box=box)  # crop + resize in one pass
    if rng.random() < hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if rand_augment_fill is not None:
        img = rand_augment(img, rng, rand_augment_fill, resample=FILTERS[interpolation])
    return to_chw(img)


def eval_transform(
    img: Image.Image, size: int, crop_pct: float, interpolation: str = "bicubic"
) -> torch.Tensor:
    img = img.convert("RGB")
    short = int(math.floor(size / crop_pct))
    w, h = img.size
    if (w, h) != (short, short) or w != h:
        s = short / min(w, h)
        img = img.resize((max(short, round(w * s)), max(short, round(h * s))), FILTERS[interpolation])
    w, h = img.size
    x, y = (w - size) // 2, (h - size) // 2
    return to_chw(img.crop((x, y, x + size, y + size)))


def to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
