"""The paper's FF-only model as its published code lays it out, rebuilt for the import tests from
the description in docs/recipe.md (lukemelas/do-you-even-need-attention @ 1f57ab0,
vision_transformer_linear.py): the same parameter names and shapes, the same forward.

- patch_embed.proj: Conv2d(C, E, p, stride p); the position embedding is `pos_encoding.pos_embed`
  (1, E, gh, gw) plus `pos_encoding.cls_pos_embed` (1, 1, E), the grid resized bilinearly to the
  patch grid on every forward (so ff_large's 14x14 grid meets a 7x7 patch grid);
- each block: x += mlp1(norm1(x)) over features, then over the transposed tokens
  x^T += mlp2(norm2(x^T)), with norm2 = LayerNorm(tokens); every LayerNorm eps 1e-6;
- norm, then head on the cls token.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

LN = partial(nn.LayerNorm, eps=1e-6)


class Mlp(nn.Module):
    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(n, hidden), nn.GELU(), nn.Linear(hidden, n)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.mlp1, self.norm1 = Mlp(dim, 4 * dim), LN(dim)
        self.mlp2, self.norm2 = Mlp(tokens, 4 * tokens), LN(tokens)

    def forward(self, x):
        x = x + self.mlp1(self.norm1(x))
        x = x.transpose(-2, -1)
        x = x + self.mlp2(self.norm2(x))
        return x.transpose(-2, -1)


class PatchEmbed(nn.Module):
    def __init__(self, chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x)


class PosEncoding(nn.Module):
    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)
        self.cls_pos_embed = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, x):
        pe = self.pos_embed
        if pe.shape[-2:] != x.shape[-2:]:
            pe = F.interpolate(pe, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.cls_pos_embed, pe


class PaperFF(nn.Module):
    def __init__(self, img_size=32, patch=8, dim=48, depth=2, classes=10, grid=None, chans=3):
        super().__init__()
        tokens = 1 + (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.patch_embed = PatchEmbed(chans, dim, patch)
        self.pos_encoding = PosEncoding(dim, grid or img_size // patch)
        self.blocks = nn.ModuleList(Block(dim, tokens) for _ in range(depth))
        self.norm = LN(dim)
        self.head = nn.Linear(dim, classes)
        for p in self.parameters():  # away from the zero/one init, so a wrong mapping shows
            p.data.add_(torch.randn_like(p) * 0.05)

    def forward(self, x):
        x = self.patch_embed(x)
        cls_pos, pos = self.pos_encoding(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + torch.cat([cls_pos, pos.flatten(2).transpose(1, 2)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def timm_vit(**kw):
    """timm's own VisionTransformer (the installed wheel)."""
    from helpers.timm_stub import timm_module

    return timm_module("timm.models.vision_transformer").VisionTransformer(**kw)


def timm_distilled_vit(**kw):
    """timm's own VisionTransformerDistilled (timm/models/deit.py: DeiT's distilled ViT)."""
    from helpers.timm_stub import timm_module

    return timm_module("timm.models.deit").VisionTransformerDistilled(**kw)


class Note:
    """A harmless class of this test suite, pickled to stand for 'a type the loader does not know'."""

    def __init__(self, text: str):
        self.text = text
