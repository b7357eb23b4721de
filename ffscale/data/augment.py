"""Batch ops on the device, shared by every loader: normalise, label-smoothed targets."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..config import DataCfg


class DeviceOps:
    """uint8 NCHW on the host or device -> normalised images in the compute dtype, soft targets."""

    def __init__(self, cfg: DataCfg, num_classes: int, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.num_classes = device, dtype, num_classes
        self.mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1) * 255

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        return ((x - self.mean) / self.std).to(self.dtype)

    def targets(self, y: torch.Tensor, smoothing: float) -> torch.Tensor:
        y = y.to(self.device, non_blocking=True)
        off = smoothing / self.num_classes
        return F.one_hot(y, self.num_classes).float() * (1.0 - smoothing) + off

    def train_batch(self, x, y, smoothing: float):
        return self.images(x), self.targets(y, smoothing)

    def eval_batch(self, x, y):
        return self.images(x), y.to(self.device, non_blocking=True)
