"""Model zoo. Importing the modules registers their sizes."""

from . import attn_only, ff, vit  # noqa: F401  (registration side effects)
from .registry import create_model, list_models

__all__ = ["create_model", "list_models"]
