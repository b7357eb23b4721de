"""Model zoo: the registry's face. Its sizes are declared in registry.py; a family's module (and
torch) is imported when one of its models is first created."""

from ffscale.models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
