"""The paper's feed-forward-only ViT (Melas-Kyriazi 2021): attention replaced by an MLP over tokens."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ffscale.models.layers import DropPath, Mlp, layer_norm
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
        drop: float = 0.0,
        mlp_ratio: float = 4.0,
        token_hidden: int | None = None,
    ):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.mlp_features = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = layer_norm(num_tokens)
        self.mlp_tokens = Mlp(num_tokens, token_hidden or int(num_tokens * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_features(self.norm1(x)))
        x = x.transpose(1, 2)
        x = x + self.drop_path(self.mlp_tokens(self.norm2(x)))
        return x.transpose(1, 2)


def ff_vit(token_hidden: int | None = None, **kw) -> VisionTrunk:
    # Weight decay on the position embedding, as the paper trained: its no_weight_decay() names
    # 'pos_embed', but its parameters are pos_encoding.pos_embed / .cls_pos_embed, and timm 0.3.2
    # matches names exactly (optim_factory.py:25-37), so only cls_token was spared (docs/recipe.md 8a).
    return VisionTrunk(partial(FFBlock, token_hidden=token_hidden), no_decay=("cls_token",), **kw)
