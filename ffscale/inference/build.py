"""A stage's config -> its model: the one place that maps config keys to model arguments.

Training builds its model here, the model card (ffscale/inference/card.py) records these arguments,
and evaluation and the benchmarks rebuild from them: a finished model is what this mapping made."""

from __future__ import annotations

from torch import nn

from ffscale.config import StageCfg, image_size
from ffscale.models import create_model


def model_kwargs(stage_cfg: StageCfg, num_classes: int, distilled: bool | None = None) -> dict:
    """`distilled`: the model has DeiT's distillation token and head; None: a distilled stage's
    (distill.teacher set). Weights decide it for a model the stage did not train (an imported
    distilled DeiT, ffscale/inference/convert.py)."""
    m = stage_cfg.model
    if distilled is None:
        distilled = bool(stage_cfg.distill.teacher)
    return dict(
        img_size=image_size(stage_cfg),
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        num_classes=num_classes,
        drop_path=m.drop_path,
        drop=m.drop,
        grad_ckpt=m.grad_ckpt,
        dim=m.dim,
        depth=m.depth,
        **({"token_hidden": m.token_hidden} if m.token_hidden else {}),
        **({"heads": m.heads} if m.heads else {}),
        **({"distilled": True} if distilled else {}),  # DeiT's distillation token and head
    )


def build_model(stage_cfg: StageCfg, num_classes: int, distilled: bool | None = None) -> nn.Module:
    return create_model(stage_cfg.model.name, **model_kwargs(stage_cfg, num_classes, distilled))
