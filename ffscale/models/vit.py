"""ViT/DeiT baseline: the same trunk with self-attention over tokens instead of the token MLP."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ffscale.models.layers import Attention, DropPath, Mlp, layer_norm
from ffscale.models.trunk import VisionTrunk


class AttnBlock(nn.Module):
    def __init__(self, dim: int, num_tokens: int, drop_path: float, drop: float, heads: int, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, heads, proj_drop=drop)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def vit(heads: int = 3, **kw) -> VisionTrunk:
    return VisionTrunk(partial(AttnBlock, heads=heads), **kw)
