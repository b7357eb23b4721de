"""The ViT trunk shared by FF-only, ViT and attention-only models; only the block differs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ffscale.models.layers import PatchEmbed, init_weights, layer_norm

# A block factory gets (dim, num_tokens, drop_path, drop) and returns a module mapping (B, T, C) -> same.
BlockFn = Callable[[int, int, float, float], nn.Module]


class VisionTrunk(nn.Module):
    """Patch embedding + cls token + learned position embedding -> dropout -> blocks -> LayerNorm -> head(cls).

    `distilled`: DeiT's distillation token beside the cls token (DeiT models.py @ 2f76ec6 lines 20-59,
    `DistilledVisionTransformer`), for every family: its own position embedding, its own head
    (`head_dist`), and one more token in every token-sized layer (FF's token MLPs, attention-only's
    feature attention). Training returns (cls logits, dist logits) for the distillation loss
    (ffscale/engine/distill.py); eval returns their average, as DeiT predicts (lines 51-59).

    Args:
        block_fn: the family's block (FF, attention, attention-only).
        drop_path: stochastic depth of the last block (linear from 0 over depth).
        drop: dropout after the position embedding and inside the blocks (DeiT/timm `drop_rate`).
        no_decay: parameter names kept out of weight decay besides 1-D ones (`no_weight_decay`).
    """

    def __init__(
        self,
        block_fn: BlockFn,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 192,
        depth: int = 12,
        drop_path: float = 0.0,
        drop: float = 0.0,
        grad_ckpt: bool = False,
        no_decay: tuple[str, ...] = ("cls_token", "pos_embed"),
        distilled: bool = False,
    ):
        super().__init__()
        self.grad_ckpt = grad_ckpt  # recompute blocks in backward instead of keeping activations
        self.img_size, self.patch_size, self.num_classes = img_size, patch_size, num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1  # cls (+ dist), before the patches
        self.num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # DeiT's dist token is weight-decayed: its model keeps timm's no_weight_decay() (pos_embed,
        # cls_token) and timm 0.3.2 matches names exactly (docs/recipe.md row 8a), so it is here too
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.pos_drop = nn.Dropout(drop)
        self.no_decay = set(no_decay)
        # Stochastic depth rises linearly from 0 at the first block to drop_path at the last.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[block_fn(dim, self.num_tokens, r, drop) for r in rates])
        self.norm = layer_norm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if distilled:  # after the others: a model without the token draws the same initial weights
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return self.no_decay

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            for blk in self.blocks:  # the RNG state is replayed, so drop path recomputes alike
                x = checkpoint(blk, x, use_reentrant=False)
            return self.norm(x)
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.forward_features(x)
        if not self.distilled:
            return self.head(x[:, 0])
        cls, dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        return (cls, dist) if self.training else (cls + dist) / 2
