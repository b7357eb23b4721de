"""timm-style model registry: `create_model(name, **overrides)`, `list_models()`, `defaults(name)`.

The built-in sizes are data: each name's builder as "module:function" and the arguments the size
fixes. So the names and sizes a config is validated against are known without importing torch
(`ffscale train` reports a bad config or bad data before it imports it); a builder's module is
imported when a model of it is first created. `register()` adds a user's own size, with a callable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

Builder = Callable[..., "nn.Module"]

FF = "ffscale.models.ff:ff_vit"
VIT = "ffscale.models.vit:vit"
ATTN_ONLY = "ffscale.models.attn_only:attn_only"

# name -> (builder: a callable, or "module:function" imported on first use; the size's arguments)
_MODELS: dict[str, tuple[Builder | str, dict[str, Any]]] = {
    "ff_tiny": (FF, dict(patch_size=16, dim=192, depth=12)),  # 7.68M params
    "ff_base": (FF, dict(patch_size=16, dim=768, depth=12)),  # 61.9M
    "ff_large": (FF, dict(patch_size=32, dim=1024, depth=24)),  # 206M
    "vit_tiny": (VIT, dict(patch_size=16, dim=192, depth=12, heads=3)),  # DeiT-Ti, 5.7M
    "vit_base": (VIT, dict(patch_size=16, dim=768, depth=12, heads=12)),  # ViT-B/16, 86.6M
    "vit_large": (VIT, dict(patch_size=32, dim=1024, depth=24, heads=16)),  # ViT-L/32, 306M
    "attn_only_tiny": (ATTN_ONLY, dict(patch_size=16, dim=192, depth=12, heads=3)),  # 4.0M
    "attn_only_base": (ATTN_ONLY, dict(patch_size=16, dim=768, depth=12, heads=12)),
}


def register(name: str, fn: Builder | str, **defaults: Any) -> None:
    """Add (or replace) a size: `fn` builds the model from `defaults` and the overrides, or names it
    as "module:function"."""
    _MODELS[name] = (fn, defaults)


def list_models(pattern: str = "") -> list[str]:
    return sorted(n for n in _MODELS if pattern in n)


def defaults(name: str) -> dict[str, Any]:
    """The arguments a registered size fixes (patch_size, dim, depth, heads, ...)."""
    return dict(_MODELS[name][1])


def _builder(fn: Builder | str) -> Builder:
    if callable(fn):
        return fn
    module, _, function = fn.partition(":")
    return getattr(importlib.import_module(module), function)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; keyword overrides (img_size, num_classes, ...) win over defaults.

    None-valued overrides are ignored so config fields left unset keep the model's defaults.
    """
    if name not in _MODELS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(list_models())}")
    fn, defaults = _MODELS[name]
    kw = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return _builder(fn)(**kw)
