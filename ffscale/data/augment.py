"""Batch ops on the device, shared by every loader: normalise, label-smoothed soft targets,
random erasing (timm's per-pixel mode) per image, then mixup / cutmix (timm's batch mode): DeiT
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


def random_erase(x, prob: float, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))):
    """Per sample with probability `prob`: one rectangle replaced by normal noise (timm 'pixel')."""
    b, c, h, w = x.shape
    x = x.clone()
    for i in torch.nonzero(torch.rand(b) < prob).flatten().tolist():
        for _ in range(10):
            a = h * w * float(torch.empty(()).uniform_(*area))
            r = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
            eh, ew = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if eh < h and ew < w:
                top, left = int(torch.randint(h - eh + 1, ())), int(torch.randint(w - ew + 1, ()))
                x[i, :, top : top + eh, left : left + ew] = torch.randn(c, eh, ew, device=x.device)
                break
    return x
