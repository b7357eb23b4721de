"""Other trainers' checkpoints -> an ffscale package (`ffscale import`).

Reads the paper's released `linear-{tiny,base}-checkpoint.pth` (DeiT's `main.py` checkpoint:
`{'model', 'model_ema', 'optimizer', 'lr_scheduler', 'epoch', 'args', ...}`), DeiT and timm ViT
checkpoints (`{'model': ...}`, timm's `{'state_dict', 'state_dict_ema'}`, or a bare state dict), and
`.safetensors` of any of these layouts. `.pth` files are read by ffscale/util/torchload.py (no code
runs from them).

DeiT's distilled ViTs (`deit_*_distilled_patch16_224`: facebookresearch/deit @ 2f76ec6 models.py:20-59,
`DistilledVisionTransformer`; timm's `VisionTransformerDistilled`, timm/models/deit.py) hold a
`dist_token` after the cls token, a position for it (patches + 2 entries in `pos_embed`) and a second
head `head_dist`, under the names ffscale's distilled trunk uses (ffscale/models/trunk.py): they
import as a `distilled` model, whose eval output is the average of the two heads, as DeiT predicts.

The architecture comes from the tensors: patch size, width and input channels from the patch
embedding, depth from the block count, the token count (so the image size) from the paper's token
MLP or the ViT's position embedding, classes from the head. The family comes from the layout
(`--model` or the checkpoint's `args.model` may name it); attention heads from `--model`'s
registered size, else width / 64 (ViT's and DeiT's head width).

The paper's file (lukemelas/do-you-even-need-attention @ 1f57ab0, vision_transformer_linear.py)
names the MLPs `mlp1` (features) and `mlp2` (tokens) and keeps its position embedding as a
(1, E, 14, 14) grid plus a separate (1, 1, E) cls position (lines 54-72), resized bilinearly to the
patch grid on every forward (ff_large: 14x14 -> 7x7, which is exactly 2x2 average pooling). ffscale
keeps one (1, 1 + h*w, E) tensor: the import resizes the grid once, as the paper's forward does,
and puts the cls position first, so the logits are the same.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from ffscale.errors import ConfigError

# DeiT's and the paper's model names (checkpoint['args'].model) -> ffscale's families and sizes
KNOWN = {"linear_tiny": "ff_tiny", "linear_base": "ff_base", "linear_large": "ff_large",
         "deit_tiny_patch16_224": "vit_tiny", "deit_base_patch16_224": "vit_base",
         "deit_base_patch16_384": "vit_base", "vit_base_patch16_224": "vit_base",
         "vit_large_patch32_224": "vit_large", "deit_tiny_distilled_patch16_224": "vit_tiny",
         "deit_base_distilled_patch16_224": "vit_base", "deit_base_distilled_patch16_384": "vit_base"}  # fmt: skip
IMAGENET = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 0.875,
    "interpolation": "bicubic",
}


@dataclass
class Imported:
    model: str  # ffscale registry name (the family and its registered defaults)
    kwargs: dict  # create_model arguments read from the tensors
    state: dict[str, torch.Tensor]  # in ffscale's layout
    layout: str  # "paper" | "vit" | "ffscale"
    source_model: str | None  # the checkpoint's own model name, when it records one


def read(path: Path, ema: bool = False, trust: bool = False) -> tuple[dict, dict]:
    """(state dict, the checkpoint's args as a dict) of a checkpoint file."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    from ffscale.util import torchload

    obj = torchload.load(path, trust=trust)
    args = obj.get("args") if isinstance(obj, dict) else None
    args = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    keys = ("model_ema", "state_dict_ema") if ema else ("model", "state_dict")
    if isinstance(obj, dict) and any(k in obj for k in keys):
        state = obj[next(k for k in keys if k in obj)]
    elif isinstance(obj, dict) and not ema and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        what = "no EMA weights ('model_ema' / 'state_dict_ema')" if ema else "no state dict"
        raise ConfigError(
            f"{path}: {what} in it (keys: {sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}, args


def layout_of(state: dict, path: Path) -> str:
    if "pos_encoding.pos_embed" in state or "blocks.0.mlp1.fc1.weight" in state:
        return "paper"
    if "blocks.0.mlp_features.fc1.weight" in state or "blocks.0.attn_features.qkv.weight" in state:
        return "ffscale"
    if "blocks.0.attn.qkv.weight" in state and "pos_embed" in state:
        return "vit"
    raise ConfigError(f"{path}: neither the paper's FF layout, a timm/DeiT ViT nor an ffscale model "
                      f"(first keys: {sorted(state)[:5]})")  # fmt: skip


def convert(path: Path, model: str | None = None, ema: bool = False, trust: bool = False) -> Imported:
    from ffscale.models import list_models

    state, args = read(path, ema, trust)
    layout = layout_of(state, path)
    source = args.get("model")
    name = model or KNOWN.get(source or "")
    proj = state["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    kw = {"patch_size": patch, "dim": dim, "depth": depth, "in_chans": in_chans,
          "num_classes": state["head.weight"].shape[0]}  # fmt: skip
    prefix = 2 if "dist_token" in state else 1  # cls (+ DeiT's distillation token) before the patches
    if prefix == 2:
        kw["distilled"] = True
    if layout == "paper":
        state = _paper_to_ffscale(state)
    family = "ff" if "blocks.0.mlp_features.fc1.weight" in state else (
        "attn_only" if "blocks.0.attn_features.qkv.weight" in state else "vit")  # fmt: skip
    if family == "ff":
        tokens = state["blocks.0.norm2.weight"].shape[0]
        hidden = state["blocks.0.mlp_tokens.fc1.weight"].shape[0]
        if hidden != 4 * tokens:
            kw["token_hidden"] = hidden
    else:
        tokens = state["pos_embed"].shape[1]
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        raise ConfigError(f"{path}: {tokens - prefix} patch tokens are not a square grid")
    kw["img_size"] = side * patch
    if name is None or not name.startswith(family + "_"):
        if name is not None:
            raise ConfigError(
                f"--model {name}: the checkpoint {path} holds a {family.replace('_', '-')} model"
            )
        name = next(
            (n for n in list_models(family + "_") if n.endswith(("_tiny", "_base"))), f"{family}_tiny"
        )
    if family != "ff":
        from ffscale.models.registry import defaults

        registered = defaults(name)
        kw["heads"] = registered["heads"] if registered.get("dim") == dim else max(1, dim // 64)
    return Imported(name, kw, state, layout, source)


def _paper_to_ffscale(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        k = k.replace(".mlp1.", ".mlp_features.").replace(".mlp2.", ".mlp_tokens.")
        if k not in ("pos_encoding.pos_embed", "pos_encoding.cls_pos_embed"):
            out[k] = v
    grid, cls = state["pos_encoding.pos_embed"], state["pos_encoding.cls_pos_embed"]
    tokens = state["blocks.0.norm2.weight"].shape[0]
    side = math.isqrt(tokens - 1)
    if grid.shape[-2:] != (side, side):  # vision_transformer_linear.py:67-72, every forward
        grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    out["pos_embed"] = torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
    return out


STAGE = "imported"


def write_package(imp: Imported, src: Path, out: Path, overrides: list[str], ema: bool) -> Path:
    """`out` as a finished one-stage run: config.yaml, and imported/{weights.safetensors, model.json}.
    `overrides`: config keys over the source's own (e.g. data.crop_pct=1.0, data.val=...)."""
    from ffscale import config
    from ffscale.inference.build import build_model
    from ffscale.inference.card import write_card
    from ffscale.inference.stagedir import CONFIG, StageDir
    from ffscale.util.weights import file_digest, save_weights

    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; name a new directory")
    kw = imp.kwargs
    keys = [f"model.name={imp.model}", f"model.patch_size={kw['patch_size']}", f"model.dim={kw['dim']}",
            f"model.depth={kw['depth']}", f"model.in_chans={kw['in_chans']}", f"model.num_classes={kw['num_classes']}",
            "model.drop_path=0.0", "model.drop=0.0", f"data.img_size={kw['img_size']}",
            f"data.crop_pct={IMAGENET['crop_pct']}", f"data.mean={IMAGENET['mean']}", f"data.std={IMAGENET['std']}",
            f"data.interpolation={IMAGENET['interpolation']}", f"run.dir={out.parent}", f"run.name={out.name}",
            f"stages.{STAGE}={{}}", "tracking.enabled=false"]  # fmt: skip
    keys += [f"model.{k}={kw[k]}" for k in ("heads", "token_hidden") if k in kw]
    cfg = config.load(None, keys + list(overrides))
    (stage,) = config.stages(cfg)
    distilled = kw.get("distilled", False)
    model = build_model(stage.cfg, kw["num_classes"], distilled)
    try:
        model.load_state_dict(imp.state)
    except RuntimeError as e:
        raise ConfigError(
            f"{src}: its tensors do not fit {imp.model} {kw}: {str(e).splitlines()[1].strip()}"
        ) from None
    stage.dir.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.contiguous() for k, v in model.state_dict().items()}, StageDir(stage.dir).weights)
    config.save(cfg, out / CONFIG)
    source = {"path": str(src.resolve()), "digest": file_digest(src), "layout": imp.layout,
              "model": imp.source_model, "weights": "ema" if ema else "model"}  # fmt: skip
    write_card(
        StageDir(stage.dir).card, stage.cfg, kw["num_classes"], None, None, {"imported": source}, distilled
    )
    return stage.dir
