"""Batch ops on the device, shared by every loader: normalise, label-smoothed soft targets,
random erasing (timm's per-pixel mode) per image, drawn for the batch at once, then mixup / cutmix (timm's batch mode): DeiT
erases inside each image's transform, after Normalize, and mixes the batch later (timm 0.3.2
transforms_factory.py:120-122; DeiT engine.py @ 2f76ec6 lines 31-35).

Randomness comes from torch's global RNG, which the loop reseeds per micro-step, so a resumed run
replays the same mixes and erasures.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ffscale.config import DataCfg


class DeviceOps:
    """uint8 NCHW on the host or device -> normalised images in the compute dtype, soft targets."""

    def __init__(self, cfg: DataCfg, num_classes: int, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype, self.num_classes = cfg, device, dtype, num_classes
        self.mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1) * 255

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        return (x - self.mean) / self.std

    def targets(self, y: torch.Tensor, smoothing: float) -> torch.Tensor:
        y = y.to(self.device, non_blocking=True)
        off = smoothing / self.num_classes
        return F.one_hot(y, self.num_classes).float() * (1.0 - smoothing) + off

    def train_batch(self, x, y, smoothing: float):
        x, t = self.images(x), self.targets(y, smoothing)
        if self.cfg.reprob > 0:
            x = random_erase(x, self.cfg.reprob)
        x, t = mix(x, t, self.cfg.mixup, self.cfg.cutmix, self.cfg.mix_prob, self.cfg.mix_switch)
        return x.to(self.dtype), t

    def eval_batch(self, x, y):
        return self.images(x).to(self.dtype), y.to(self.device, non_blocking=True)


def _beta(alpha: float) -> float:
    return float(torch.distributions.Beta(alpha, alpha).sample())


def mix(x, t, mixup: float, cutmix: float, prob: float, switch: float):
    """One lambda per batch; pairs each sample with the batch reversed (timm 'batch' mode)."""
    if (mixup <= 0 and cutmix <= 0) or float(torch.rand(())) >= prob:
        return x, t
    use_cut = cutmix > 0 and (mixup <= 0 or float(torch.rand(())) < switch)
    lam = _beta(cutmix if use_cut else mixup)
    flipped = x.flip(0)
    if use_cut:
        h, w = x.shape[-2:]
        r = math.sqrt(1.0 - lam)
        ch, cw = int(h * r), int(w * r)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        x = x * lam + flipped * (1.0 - lam)
    return x, t * lam + t.flip(0) * (1.0 - lam)


def random_erase(
    x, prob: float, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3)), attempts=10
):
    """Per sample with probability `prob`: one rectangle replaced by normal noise (timm 'pixel' mode,
    timm/data/random_erasing.py `RandomErasing._erase`: up to 10 draws of area and aspect ratio, the
    first that fits, its corner uniform). Drawn for the whole batch at once on the batch's device, so
    no host loop runs per sample; its random draws differ from a per-sample loop's."""
    b, c, h, w = x.shape
    on = {"device": x.device}
    target = h * w * torch.empty(b, attempts, **on).uniform_(*area)
    ratio = torch.exp(torch.empty(b, attempts, **on).uniform_(*log_ratio))
    tall, wide = (
        torch.round(torch.sqrt(target * ratio)).long(),
        torch.round(torch.sqrt(target / ratio)).long(),
    )
    fits = (tall < h) & (wide < w)
    first = fits.long().argmax(1, keepdim=True)  # the first draw that fits (timm's loop breaks there)
    tall, wide = tall.gather(1, first).squeeze(1), wide.gather(1, first).squeeze(1)
    erase = (torch.rand(b, **on) < prob) & fits.any(1)
    top = (torch.rand(b, **on) * (h - tall + 1)).long()  # uniform in [0, h - tall], as randint
    left = (torch.rand(b, **on) * (w - wide + 1)).long()
    rows, cols = torch.arange(h, **on), torch.arange(w, **on)
    in_rows = (rows >= top[:, None]) & (rows < (top + tall)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + wide)[:, None])
    inside = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]
    return torch.where(inside[:, None], torch.randn_like(x), x)
