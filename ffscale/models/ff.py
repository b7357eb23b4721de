"""The paper's feed-forward-only ViT (Melas-Kyriazi 2021): attention replaced by an MLP over tokens."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ffscale.models.layers import DropPath, Mlp
from ffscale.models.registry import register
from ffscale.models.trunk import VisionTrunk


class FFBlock(nn.Module):
    """Pre-LN: x += MLP_features(LN(x)); then over the token axis x^T += MLP_tokens(LN(x^T)).

    The token MLP is sized from the sequence length (cls included), so the model is tied to one
    image size; `token_hidden` fixes its width instead (linear cost in patches, paper section 4).
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        drop_path: float,
        mlp_ratio: float = 4.0,
        token_hidden: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_features = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(num_tokens)
        self.mlp_tokens = Mlp(num_tokens, token_hidden or int(num_tokens * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_features(self.norm1(x)))
        x = x.transpose(1, 2)
        x = x + self.drop_path(self.mlp_tokens(self.norm2(x)))
        return x.transpose(1, 2)


def ff_vit(token_hidden: int | None = None, **kw) -> VisionTrunk:
    return VisionTrunk(partial(FFBlock, token_hidden=token_hidden), **kw)


register("ff_tiny", ff_vit, patch_size=16, dim=192, depth=12)  # 7.68M params
register("ff_base", ff_vit, patch_size=16, dim=768, depth=12)  # 61.9M
register("ff_large", ff_vit, patch_size=32, dim=1024, depth=24)  # 206M
