"""AdamW with timm's weight-decay rule (0.3.2 optim_factory.py:25-37): none on 1-D parameters and on the
names the model's `no_weight_decay()` gives, matched exactly (each family says which: ffscale/models/)."""

from __future__ import annotations

import torch
from torch import nn

from ffscale.config import OptimCfg


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = getattr(model, "no_weight_decay", lambda: set())()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, o: OptimCfg, lr: float):
    # A client torch AdamW (no FusedAdam JIT build), fused on every device: on a CPU the fused
    # kernel makes one pass over p/g/m/v where foreach makes ~6 (measured 6x faster on 58M params).
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=lr, betas=tuple(o.betas), eps=o.eps, fused=True
    )
