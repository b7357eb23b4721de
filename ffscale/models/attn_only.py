"""The paper's attention-only variant (section 3.4): both MLPs replaced by attention.

Token mixing is ordinary self-attention over tokens; the feature MLP becomes self-attention
over the feature axis (the transposed sequence, one head since the token count is often prime).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ffscale.models.layers import Attention, DropPath, layer_norm
from ffscale.models.trunk import VisionTrunk


class AttnOnlyBlock(nn.Module):
    def __init__(self, dim: int, num_tokens: int, drop_path: float, drop: float, heads: int):
        super().__init__()
        self.norm1 = layer_norm(num_tokens)
        self.attn_features = Attention(num_tokens, 1, proj_drop=drop)
        self.norm2 = layer_norm(dim)
        self.attn_tokens = Attention(dim, heads, proj_drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        x = x + self.drop_path(self.attn_features(self.norm1(x)))
        x = x.transpose(1, 2)
        return x + self.drop_path(self.attn_tokens(self.norm2(x)))


def attn_only(heads: int = 3, **kw) -> VisionTrunk:
    return VisionTrunk(partial(AttnOnlyBlock, heads=heads), **kw)
