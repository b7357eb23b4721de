"""Pieces shared by every trunk: patch embedding, MLP, stochastic depth, attention, LayerNorm, init."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Every LayerNorm of the paper's models and of DeiT's: eps 1e-6 (paper vision_transformer_linear.py
# @ 1f57ab0 lines 176-196; DeiT models.py @ 2f76ec6 lines 64-66), not PyTorch's 1e-5.
LN_EPS = 1e-6


def layer_norm(n: int) -> nn.LayerNorm:
    return nn.LayerNorm(n, eps=LN_EPS)


class PatchEmbed(nn.Module):
    """Non-overlapping patches via a strided conv, as in ViT/DeiT and the paper's code."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"model.img_size={img_size} is not divisible by model.patch_size={patch_size}")
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, C


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample: drop the whole residual branch, rescale the survivors."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis (SDPA picks flash/efficient kernels).
    `proj_drop`: dropout after the output projection (timm's Block passes the model's drop rate);
    `attn_drop`: on the attention weights (0 in DeiT and the paper)."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


def init_weights(module: nn.Module) -> None:
    """trunc-normal(0.02) weights and zero biases for Linear, unit LayerNorm; the patch embedding's
    Conv2d keeps PyTorch's default init, as in the paper's file and timm 0.3.2 (their `_init_weights`
    touches only Linear and LayerNorm: vision_transformer_linear.py @ 1f57ab0 lines 121-128)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
