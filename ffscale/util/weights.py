"""Consolidated weights on disk: safetensors (no pickle, so loading cannot run code), written
atomically, identified by a content digest. No DeepSpeed: evaluation and export read these."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ffscale.util.atomic import atomic_path


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def file_digest(path: str | Path) -> str:
    """sha256 of a weights file (16 hex digits), for lineage records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
