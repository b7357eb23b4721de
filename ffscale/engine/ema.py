"""Exponential moving average of the weights (DeiT's model EMA), of the fp32 master weights, sharded
the way ZeRO shards them.

Each rank averages only the fp32 masters it owns: under ZeRO-3 its partition of every parameter,
under ZeRO-1/2 and DeepSpeed's bf16 optimizer its fragment of each parameter's flat fp32 master
(`_hp_mapping`), and with a bare torch optimizer (ZeRO-0, fp32, where the parameters are the masters)
every world-th whole parameter. So the EMA costs 4/N bytes per parameter per rank, and it averages
fp32 values even when the model computes in bf16: an update smaller than one bf16 step of a weight
still reaches the average. Gathering it is a collective (`full`).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from deepspeed.utils import safe_get_local_fp32_param


class Ema:
    def __init__(self, ds, decay: float, rank: int, world: int):
        self.decay, self.rank, self.world = decay, rank, world
        self.z3 = ds.zero_optimization_stage() == 3
        self.module = ds.module
        self.params = list(ds.module.named_parameters())
        self.fragments = not self.z3 and any(
            getattr(p, "_hp_mapping", None) is not None for _, p in self.params
        )
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    def _source(self, i: int, p: torch.Tensor) -> torch.Tensor | None:
        """This rank's fp32 master values of parameter i (fetched anew: DeepSpeed re-links its
        views after a checkpoint load), or None when it owns none of them."""
        if self.z3:
            return safe_get_local_fp32_param(p)
        if self.fragments:
            mapping = getattr(p, "_hp_mapping", None)
            return mapping.get_hp_fragment() if mapping is not None else None
        return p if i % self.world == self.rank else None

    @torch.no_grad()
    def reset(self) -> None:
        """Start from the current weights (a fresh stage, or a checkpoint without this rank's EMA)."""
        self.shadow = {}
        for i, (n, p) in enumerate(self.params):
            src = self._source(i, p)
            if src is not None:
                self.shadow[n] = src.detach().float().clone()

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.shadow)
        src = {n: self._source(i, p) for i, (n, p) in enumerate(self.params) if n in self.shadow}
        torch._foreach_lerp_([self.shadow[n] for n in names], [src[n].float() for n in names], 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow) or any(state[k].shape != v.shape for k, v in self.shadow.items()):
            raise ValueError("EMA state of another partitioning")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """The whole averaged model on every rank, as CPU fp32 tensors (collective)."""
        out = {}
        for i, (n, p) in enumerate(self.params):
            if self.z3:
                out[n] = self._gather_partitions(n, p)
            elif self.fragments:
                out[n] = self._sum_fragments(n, p)
            else:
                t = self.shadow.get(n)
                if t is None:
                    t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                if self.world > 1:
                    tdist.broadcast(t, src=i % self.world)
                out[n] = t.cpu().clone()
        for n, b in self.module.named_buffers():
            out[n] = b.detach().float().cpu().clone()
        return out

    def _gather_partitions(self, n: str, p) -> torch.Tensor:
        parts = [self.shadow[n]]
        if self.world > 1:
            parts = [torch.empty_like(parts[0]) for _ in range(self.world)]
            tdist.all_gather(parts, self.shadow[n])
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()

    def _sum_fragments(self, n: str, p) -> torch.Tensor:
        """Each rank writes its fragment at its place in a zeroed flat tensor; a sum fills it."""
        flat = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            where = mapping.lp_fragment_address
            flat.narrow(0, where.start, where.numel).copy_(self.shadow[n])
        if self.world > 1:
            tdist.all_reduce(flat)
        return flat.view(p.shape).cpu()
