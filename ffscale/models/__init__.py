"""Model zoo. Importing the modules registers their sizes."""

from ffscale.models import attn_only, ff, vit  # noqa: F401  (registration side effects)
from ffscale.models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
