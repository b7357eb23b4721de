"""The small engine interface the loop sees: step, evaluate, save, load, export."""

from __future__ import annotations

import os

import deepspeed
import torch
from torch import nn
from torch.nn import functional as F

from ..config import StageCfg
from . import checkpoint, ds_config
from .dist import DistInfo, all_reduce_sum
from .ema import Ema
from .masters import share_fp32_masters
from .optim import build_optimizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Engine:
    def __init__(
        self,
        model: nn.Module,
        s: StageCfg,
        dist: DistInfo,
        accum: int,
        total_steps: int,
        warmup_steps: int,
        universal: bool = False,
        ema_decay: float = 0.0,
    ):
        self.dist = dist
        self.precision = ds_config.resolve_precision(s.deepspeed.precision, dist.device)
        self.dtype = DTYPES[self.precision]
        n_params = sum(p.numel() for p in model.parameters())
        cuda = dist.device.type == "cuda"
        cfg = ds_config.build(s, dist.world, accum, total_steps, warmup_steps, self.precision, n_params, cuda)
        if universal:  # resuming another rank count's shards (checkpoint.load converts them)
            cfg = ds_config.merge(cfg, {"checkpoint": {"load_universal": True}})
        opt = build_optimizer(model, s.optim, ds_config.peak_lr(s))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, config=cfg
        )
        if dist.world == 1 and s.deepspeed.zero_stage == 0:
            # One rank has nothing to average: skip DeepSpeed's flatten + all-reduce + copy-back of
            # every gradient (~20% of a CPU step for ff_base at 112 px).
            self.ds.enable_backward_allreduce = False
        share_fp32_masters(self.ds.optimizer)  # fp32 ZeRO 1-3: no duplicate copy of the weights
        if s.model.compile:  # compiled inside the engine, so ZeRO hooks and checkpoints still see the module
            self.ds.compile()
        self.module = self.ds.module
        self.ema = Ema(self.ds, ema_decay, dist.rank, dist.world) if ema_decay > 0 else None
        if self.scheduler.last_batch_iteration < 0:  # step 1 runs at warmup_lr, not at lr 0
            self.scheduler.step(0)
        self.accum = accum
        self._bad = torch.zeros((), device=dist.device)  # non-finite micro-batch losses this step
        self.step_finite = True  # was the last optimizer step's loss finite on every rank?
        # Fault injection for the fault suite (docs/reliability.md): rank 0's loss becomes NaN at
        # these optimizer steps, e.g. FFSCALE_FAULT_NAN_STEPS=5,9.
        nan_steps = os.environ.get("FFSCALE_FAULT_NAN_STEPS", "")
        self._fault_nan = {int(v) for v in nan_steps.split(",") if v.strip()}

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (DeepSpeed counts them, and restores the count on resume)."""
        return self.ds.global_steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward, backward; DeepSpeed steps at accumulation boundaries.
        `target` is class indices or soft targets (mixup), loss in fp32."""
        self.ds.train()
        logits = self.ds(x).float()
        loss = soft_cross_entropy(logits, target)
        if self.dist.rank == 0 and self.global_step + 1 in self._fault_nan:
            loss = loss * float("nan")
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss)
        self._bad += (~torch.isfinite(loss.detach())).float()
        if boundary:  # one scalar all-reduce per optimizer step: every rank decides alike
            self.step_finite = all_reduce_sum(self._bad.clone()).item() == 0
            self._bad.zero_()
            self._guarded_step()
        else:
            self.ds.step()
        return loss.detach()

    def _guarded_step(self) -> None:
        """Step; a non-finite step must leave the weights alone. DeepSpeed's ZeRO and bf16/fp16
        optimizers skip a step whose gradient norm is not finite (and say so in `overflow`); a bare
        torch optimizer (ZeRO-0, fp32) does not, so its gradients are dropped first."""
        opt = self.ds.optimizer
        own = not hasattr(opt, "overflow")
        if not self.step_finite and own:
            for p in self.ds.module.parameters():
                p.grad = None
        norm_off = not self.step_finite and getattr(opt, "compute_grad_norm", True) is False
        if norm_off:  # ZeRO-2 without clipping skips the norm; the non-finite norm is what skips a step
            opt.compute_grad_norm = True
        self.ds.step()
        if norm_off:
            opt.compute_grad_norm = False
        if not self.step_finite and not own and not self.ds.optimizer.overflow:
            raise FloatingPointError(
                f"step {self.global_step}: loss not finite but DeepSpeed applied the step; weights are suspect"
            )
        if self.ema is not None and self.step_finite:
            self.ema.update()

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.ds, "is_compiled", False))

    def model_states(self, x: torch.Tensor, target: torch.Tensor, exclude=()) -> dict[str, int]:
        """One training step, with this rank's model-state bytes measured at their peak: after
        backward (gradients alive), before the optimizer step (see memory.py)."""
        from .memory import model_state_bytes

        loss = soft_cross_entropy(self.ds(x).float(), target)
        self.ds.backward(loss)
        mem = model_state_bytes(self, exclude=(x, target, loss, *exclude))
        self.ds.step()
        return mem

    def evaluate(self, batches) -> dict:
        """Top-1/top-5 over every real sample (label -1 = padding); sums reduced across ranks."""
        self.ds.eval()
        return evaluate_model(self.ds, batches, self.dist.device)

    def evaluate_ema(self, batches, build) -> dict:
        """The same evaluation for the EMA weights, in a plain copy of the model (`build()`)."""
        model = build()
        model.load_state_dict(self.ema.full())
        model.to(self.dist.device, self.dtype).eval()
        return {f"{k}_ema": v for k, v in evaluate_model(model, batches, self.dist.device).items()}

    def save(self, ckpt_dir, tag: str, client_state: dict, keep: int) -> None:
        own = {"ema": self.ema.state_dict()} if self.ema else {}
        checkpoint.save(self.ds, ckpt_dir, tag, client_state, keep, own)

    def load(self, ckpt_dir, reshard: bool = True) -> dict | None:
        client = checkpoint.load(self.ds, ckpt_dir, reshard)
        if client is not None and self.ema is not None:
            own = checkpoint.load_rank_state(ckpt_dir, self.dist.rank)
            if "ema" in own:
                self.ema.load_state_dict(own["ema"])
            else:  # resharded, or saved without EMA: average from the restored weights on
                self.ema.reset()
        return client

    def export(self, path) -> str:
        """Consolidated fp32 weights; returns their digest (checked equal on every rank)."""
        return checkpoint.export_fp32(self.ds, path)

    def export_ema(self, path) -> str:
        return checkpoint.write_weights(self.ema.full(), path, self.dist.rank)


@torch.no_grad()
def evaluate_model(forward, batches, device: torch.device) -> dict:
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss
    for x, y in batches:
        logits = forward(x).float()
        real = y >= 0
        if real.any():
            lg, yy = logits[real], y[real]
            k = min(5, lg.shape[1])
            top = lg.topk(k, dim=1).indices
            sums[0] += real.sum()
            sums[1] += (top[:, 0] == yy).sum()
            sums[2] += (top == yy[:, None]).any(dim=1).sum()
            sums[3] += F.cross_entropy(lg, yy, reduction="sum")
    all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    return {
        "val_samples": int(sums[0].item()),
        "val_top1": 100 * sums[1].item() / n,
        "val_top5": 100 * sums[2].item() / n,
        "val_loss": sums[3].item() / n,
    }


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
