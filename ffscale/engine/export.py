"""A stage's final weights as one fp32 safetensors file, whatever the ZeRO stage: every rank gathers
the fp32 masters of its partitions (a collective), the ranks' digests must agree, rank 0 writes."""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param

from ffscale.engine.dist import barrier
from ffscale.util.weights import save_weights, state_digest


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


def export_fp32(ds, path) -> str:
    """Write consolidated fp32 weights (rank 0); every rank's gathered copy must be identical."""
    state = full_fp32_state(ds)
    digest = state_digest(state)
    if torch.distributed.is_initialized():
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks disagree on the final weights: {digests}")
    return write_weights(state, path, ds.global_rank, digest)


def write_weights(state: dict[str, torch.Tensor], path, rank: int, digest: str | None = None) -> str:
    """Rank 0 writes safetensors atomically; every rank returns the digest."""
    if rank == 0:
        save_weights(state, path)
    barrier()
    return digest or state_digest(state)
