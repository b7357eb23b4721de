"""ffscale/train.py with a model family of the user's own registered on every rank: a small convnet,
standing in for timm's RegNetY in docs/recipe.md's note on convnet teachers (timm's convnets do not
load beside this machine's CPU torch). The entry registers the family, then runs the usual entry."""

import sys

from torch import nn

from ffscale import train
from ffscale.models import registry


def convnet(num_classes: int = 1000, in_chans: int = 3, **_) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, 16, 3, stride=2, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, num_classes),
    )  # fmt: skip


registry.register("tiny_convnet", convnet)

if __name__ == "__main__":
    sys.exit(train.main())
