"""timm-style model registry: `create_model(name, **overrides)`, `list_models()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {}


def register(name: str, fn: Callable[..., nn.Module], **defaults: Any) -> None:
    _MODELS[name] = (fn, defaults)


def list_models(pattern: str = "") -> list[str]:
    return sorted(n for n in _MODELS if pattern in n)


def defaults(name: str) -> dict[str, Any]:
    """The arguments a registered size fixes (patch_size, dim, depth, heads, ...)."""
    return dict(_MODELS[name][1])


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; keyword overrides (img_size, num_classes, ...) win over defaults.

    None-valued overrides are ignored so config fields left unset keep the model's defaults.
    """
    if name not in _MODELS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(list_models())}")
    fn, defaults = _MODELS[name]
    kw = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return fn(**kw)
