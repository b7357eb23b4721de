"""DeepSpeed's torch checkpoint engine, made safe to resume from a shared volume.

DeepSpeed reads and writes every checkpoint file through its checkpoint engine
(deepspeed/runtime/checkpoint_engine/checkpoint_engine.py, the `CheckpointEngine` interface).
Its torch engine unpickles with `weights_only=False` (torch_checkpoint_engine.py:35-39), so a file
planted on the runs volume would run code on every node at the next resume, and saves without
fsync. This subclass, installed on the DeepSpeed engine after `deepspeed.initialize`:
- loads with torch's weights-only unpickler, allowing DeepSpeed's own checkpoint types
  (ckpt_files.DEEPSPEED_GLOBALS) and nothing else: a planted global stops with one line naming
  the file and the type (exit 2);
- syncs each file it saves and remembers it, so the checkpoint can list it with its hash.

Loads that bypass the engine (the universal checkpoint's per-parameter files,
deepspeed/checkpoint/universal_checkpoint.py:251, and `ds_to_universal`) are covered by
`force_weights_only`: torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD makes every `torch.load` of the
process weights-only whatever its caller passes (torch/serialization.py, `_default_to_weights_only`).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ffscale.engine.ckpt_files import DEEPSPEED_GLOBALS, sync
from ffscale.errors import UntrustedFile

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def allowed_types() -> list:
    out = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def force_weights_only() -> None:
    """Every torch.load of this process (and of its children) weights-only, DeepSpeed's checkpoint
    types allowed."""
    os.environ[FORCE_ENV] = "1"
    torch.serialization.add_safe_globals(allowed_types())


class SafeCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, base: TorchCheckpointEngine):
        self.__dict__.update(base.__dict__)  # DeepSpeed's settings (serialization format, name)
        self.written: list[Path] = []

    def save(self, state_dict, path: str):
        super().save(state_dict, path)
        sync(Path(path))
        self.written.append(Path(path))

    def load(self, path: str, map_location=None):
        # added for the whole process, not with the safe_globals context manager, whose exit removes
        # them again (torch/_weights_only_unpickler.py, _safe_globals.__exit__), also for the loads
        # that bypass this engine
        torch.serialization.add_safe_globals(allowed_types())
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise UntrustedFile(
                f"{path}: the pickle holds {found.group(1) if found else 'an object the weights-only loader refuses'}, "
                "which loading could run as code; a checkpoint holds only tensors, containers and DeepSpeed's "
                "own types. Move the file away if nobody trusted wrote it"
            ) from None

    def take_written(self) -> list[Path]:
        out, self.written = self.written, []
        return out


def install(ds) -> SafeCheckpointEngine:
    """Put the safe engine in place of DeepSpeed's torch engine (the one ffscale's config selects)."""
    base = ds.checkpoint_engine
    if type(base) is not TorchCheckpointEngine:
        raise RuntimeError(f"ffscale expects DeepSpeed's TorchCheckpointEngine, got {type(base).__name__}")
    ds.checkpoint_engine = SafeCheckpointEngine(base)
    return ds.checkpoint_engine
