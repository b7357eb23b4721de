"""Exponential moving average of the weights (DeiT's model EMA), sharded the way ZeRO shards.

Each rank averages only what it owns, in fp32: under ZeRO-3 its partition of every parameter
(`p.ds_tensor`, the slice DeepSpeed updates), under ZeRO 0-2 every world-th whole parameter. So the
EMA costs 4/N bytes per parameter per rank, and gathering it is a collective (`full`).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist


class Ema:
    def __init__(self, ds, decay: float, rank: int, world: int):
        self.decay, self.rank, self.world = decay, rank, world
        self.z3 = ds.zero_optimization_stage() == 3
        self.module = ds.module
        self.params = list(ds.module.named_parameters())
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    def _source(self, i: int, p: torch.Tensor) -> torch.Tensor | None:
        if self.z3:
            return p.ds_tensor
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
                parts = [self.shadow[n]]
                if self.world > 1:
                    parts = [torch.empty_like(parts[0]) for _ in range(self.world)]
                    tdist.all_gather(parts, self.shadow[n])
                out[n] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
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
