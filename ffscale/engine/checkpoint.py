"""DeepSpeed checkpoints that are never half-written, and consolidated fp32 weights.

DeepSpeed writes every rank's shards into `<dir>/<tag>/`. We pass save_latest=False and move our
own `latest` pointer (atomic rename, after a barrier) only once every shard is on disk, so a kill
mid-save leaves `latest` naming the previous complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file, save_file

from .dist import barrier

LATEST = "latest"
META = "ffscale.json"  # world size and ZeRO stage of a checkpoint, read before DeepSpeed loads it


class CheckpointMismatch(RuntimeError):
    """A checkpoint this run cannot load as is; the message says what to do."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def latest_tag(ckpt_dir: Path) -> str | None:
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def save(ds, ckpt_dir, tag: str, client_state: dict, keep: int) -> None:
    ckpt_dir = Path(ckpt_dir)
    ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shards are written
    if ds.global_rank == 0:
        meta = {"world_size": _world(), "zero_stage": ds.zero_optimization_stage()}
        _write_atomic(ckpt_dir / tag / META, json.dumps(meta))
        _write_atomic(ckpt_dir / LATEST, tag)
        tags = sorted(
            (d for d in ckpt_dir.iterdir() if d.is_dir() and d.name.startswith("step")),
            key=lambda d: int(d.name[4:]) if d.name[4:].isdigit() else -1,
        )
        for old in tags[: max(0, len(tags) - keep)]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def load(ds, ckpt_dir) -> dict | None:
    """Load the checkpoint `latest` names; None when there is none (a fresh start)."""
    tag = latest_tag(Path(ckpt_dir))
    if tag is None:
        return None
    meta_file = Path(ckpt_dir) / tag / META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    saved = meta.get("world_size", _world())
    if saved != _world() and meta.get("zero_stage", 0) > 0:
        raise CheckpointMismatch(
            f"checkpoint {ckpt_dir}/{tag} holds ZeRO-{meta['zero_stage']} shards of {saved} ranks, this run has "
            f"{_world()}. Resume with {saved} ranks, or convert it first: python -m "
            f"deepspeed.checkpoint.ds_to_universal --input_folder {ckpt_dir}/{tag} "
            f"--output_folder {ckpt_dir}/{tag}_universal and load that with "
            "deepspeed.extra.checkpoint.load_universal=true"
        )
    path, client = ds.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir}/{tag} could not be loaded")
    return client


@torch.no_grad()
def full_fp32_state(ds) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master value, gathered from ZeRO 1-3 partitions (collective: call
    on every rank), as CPU tensors keyed like the bare model's state_dict."""
    out = {}
    for name, p in ds.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None without ZeRO/bf16 optimizer: p is the master
        t = (full if full is not None else p.detach()).float()
        out[name] = t.reshape(getattr(p, "ds_shape", t.shape)).cpu().clone()
    for name, b in ds.module.named_buffers():
        out[name] = b.detach().float().cpu().clone()
    return out


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_fp32(ds, path) -> str:
    """Write consolidated fp32 weights (rank 0); every rank's gathered copy must be identical."""
    state = full_fp32_state(ds)
    digest = state_digest(state)
    if torch.distributed.is_initialized():
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks disagree on the final weights: {digests}")
    if ds.global_rank == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    barrier()
    return digest


def load_weights(path) -> dict[str, torch.Tensor]:
    """Consolidated weights from safetensors: no pickle, so loading cannot run code."""
    return load_file(str(path))
