"""The small engine interface the loop sees: step, validate, resume, export, and its checkpointer."""

from __future__ import annotations

from collections.abc import Callable

import deepspeed
import torch
from torch import nn
from torch.nn import functional as F

from ffscale.config import RunCfg, StageCfg
from ffscale.engine import ckpt_engine, ds_config, export, preempt
from ffscale.engine.checkpointer import Checkpointer
from ffscale.engine.dist import DistInfo, all_reduce_sum, on_rank0, set_timeout
from ffscale.engine.ema import Ema
from ffscale.engine.masters import share_fp32_masters
from ffscale.engine.optim import build_optimizer
from ffscale.errors import NonFiniteLoss, Preempted
from ffscale.util.topk import summarize, topk_counts


class Engine:
    def __init__(
        self,
        model: nn.Module,
        stage_cfg: StageCfg,
        dist: DistInfo,
        *,
        accum: int,
        lr_at: Callable[[int], float],
        ckpt_dir,
        run: RunCfg | None = None,
        fence: Callable[[], None] = lambda: None,
        criterion: Callable | None = None,
    ):
        """`lr_at(step)`: the lr of the optimizer step after `step` finished ones (ffscale/engine/lr.py).
        `fence()`: called on rank 0 before every checkpoint and export; raising stops every rank
        before it writes.
        `run`: the collectives' timeouts (run.collective_timeout_s around checkpoints, evaluations and
        an epoch's first step, run.step_timeout_s during training steps from the first on); None: no
        change.
        `criterion(x, outputs, target)`: the loss when not the model's logits against `target`
        (a distilled stage: ffscale/engine/distill.py)."""
        self.fence = fence
        self.long_timeout_s, self.step_timeout_s = (
            (run.collective_timeout_s, run.step_timeout_s) if run else (0, 0)
        )
        self._short = False  # are collectives under the training steps' timeout?
        self.dist, self.stage_cfg, self.accum = dist, stage_cfg, accum
        self.criterion = criterion
        self.precision = ds_config.resolve_precision(stage_cfg.deepspeed.precision, dist.device)
        self.dtype = ds_config.DTYPES[self.precision]
        n_params = sum(p.numel() for p in model.parameters())
        cuda = dist.device.type == "cuda"
        cfg = ds_config.build(stage_cfg, dist.world, accum, self.precision, n_params, cuda)
        # Every torch.load of this rank weights-only (DeepSpeed's universal loading bypasses its
        # checkpoint engine), and the checkpoint to resume checked before anything reads it.
        ckpt_engine.force_weights_only()
        self.checkpointer = Checkpointer(
            ckpt_dir,
            stage_cfg.checkpoint,
            stage_cfg.schedule.epochs,
            dist.rank,
            dist.world,
            fence,
            prepare=self.long_waits,
        )
        # Shards of another rank count: checkpoint.load converts them to a universal checkpoint.
        self.reshard = stage_cfg.checkpoint.reshard and self.checkpointer.needs_reshard
        if self.reshard:
            cfg = ds_config.merge(cfg, {"checkpoint": {"load_universal": True}})
        opt = build_optimizer(model, stage_cfg.optim, ds_config.peak_lr(stage_cfg))
        # the lr of each step comes from the step count, set before every step: no scheduler state to
        # checkpoint, and a resume or an allowed optim.base_lr change recomputes it from the config
        self.lr_at = lr_at
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        ckpt_engine.install(self.ds)  # weights-only loads; every saved file synced and hashed
        self.checkpointer.attach(self.ds)
        if self.long_timeout_s:  # also on the groups DeepSpeed made (they would wait torch's 30 min)
            set_timeout(self.long_timeout_s)
        self._set_lr()
        if dist.world == 1 and self.zero_stage == 0:
            # One rank has nothing to average: skip DeepSpeed's flatten + all-reduce + copy-back of
            # every gradient (~20% of a CPU step for ff_base at 112 px).
            self.ds.enable_backward_allreduce = False
        share_fp32_masters(self.ds.optimizer)  # fp32 ZeRO 1-3: no duplicate copy of the weights
        if (
            stage_cfg.model.compile
        ):  # compiled inside the engine, so ZeRO hooks and checkpoints still see the module
            self.ds.compile()
        self.module = self.ds.module
        ema_decay = stage_cfg.optim.ema_decay
        self.ema = Ema(self.ds, ema_decay, dist.rank, dist.world) if ema_decay > 0 else None
        if self.ema is not None:
            self.checkpointer.register_rank("ema", self.ema)
        self._bad = torch.zeros((), device=dist.device)  # non-finite micro-batch losses this step
        if dist.device.type == "cuda":
            self._host_flags = torch.zeros(2, pin_memory=True)
            self._flags_ready = torch.cuda.Event()
        self.step_finite = True  # was the last optimizer step's loss finite on every rank?
        self.stop_requested = False  # has any rank been sent SIGTERM?

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (DeepSpeed counts them, and restores the count on resume)."""
        return self.ds.global_steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _set_lr(self) -> None:
        """The lr of the next optimizer step."""
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.global_step)

    @property
    def num_params(self) -> int:
        """Every parameter's full size, also under ZeRO-3 (where each rank holds a partition)."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())

    @property
    def zero_stage(self) -> int:
        """The stage DeepSpeed runs (ZeRO-0 in bf16 runs as ZeRO-1: ds_config.zero_stage)."""
        return self.ds.zero_optimization_stage()

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.ds, "is_compiled", False))

    def train_step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward, backward; DeepSpeed steps at accumulation boundaries.
        `target` is class indices or soft targets (mixup), loss in fp32."""
        self.ds.train()
        out = self.ds(x)
        loss = self.criterion(x, out, target) if self.criterion else soft_cross_entropy(out.float(), target)
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss)
        self._bad += (~torch.isfinite(loss.detach())).float()
        if boundary:
            self._optimizer_step()
        else:
            self.ds.step()
        return loss.detach()

    def _optimizer_step(self) -> None:
        """The step, with the one collective of the step: [non-finite micro-batch losses, SIGTERM]
        summed over ranks. A non-finite step leaves the weights alone on the device (DeepSpeed's ZeRO
        and bf16 optimizers skip a step whose gradient norm is not finite; a bare torch AdamW (ZeRO-0,
        fp32) gets the flag as `found_inf` and its fused kernel skips), so the host reads the flags
        only once the step is queued: every rank then decides alike, and the GPU is not drained."""
        flags = torch.stack([self._bad, torch.full_like(self._bad, float(preempt.requested()))])
        self._bad.zero_()
        all_reduce_sum(flags)  # NCCL: queued on the stream, the host does not wait
        opt = self.ds.optimizer
        bare_torch = not hasattr(opt, "overflow")
        if bare_torch:
            opt.found_inf = (flags[0] > 0).float()  # 0-dim, as torch.amp gives it
        on_host = self._to_host(flags)
        self.ds.step()
        self._set_lr()
        if bare_torch:
            del opt.found_inf
        bad, stop = on_host()
        if not self._short and self.step_timeout_s:  # a lost node is noticed within this from now on
            set_timeout(self.step_timeout_s, sync=True)
            self._short = True
        self.step_finite, self.stop_requested = bad == 0, stop > 0
        if not self.step_finite and not bare_torch and not opt.overflow:
            raise NonFiniteLoss(
                f"step {self.global_step}: loss not finite but DeepSpeed applied the step; weights are suspect"
            )
        if self.ema is not None and self.step_finite:
            self.ema.update()

    def _to_host(self, flags: torch.Tensor):
        """Start copying `flags` to the host; returns the reader. On a GPU the copy goes to pinned
        memory behind an event, so reading waits for the collective, not for the queued step."""
        if flags.device.type != "cuda":
            return lambda: flags.tolist()
        self._host_flags.copy_(flags, non_blocking=True)
        self._flags_ready.record()

        def read():
            self._flags_ready.synchronize()
            return self._host_flags.tolist()

        return read

    def model_states(self, x: torch.Tensor, target: torch.Tensor, exclude=()) -> dict[str, int]:
        """One training step, with this rank's model-state bytes measured at their peak: after
        backward (gradients alive), before the optimizer step (see memory.py)."""
        from ffscale.engine.memory import model_state_bytes

        loss = soft_cross_entropy(self.ds(x).float(), target)
        self.ds.backward(loss)
        mem = model_state_bytes(self, exclude=(x, target, loss, *exclude))
        self.ds.step()
        return mem

    # -- evaluation ------------------------------------------------------------------------
    def validate(self, batches) -> dict:
        """Top-1/top-5 over every real sample (label -1 = padding); sums reduced across ranks.
        Raises EvalInterrupted when any rank was sent SIGTERM (checked every STOP_EVERY batches)."""
        self.long_waits()
        self.ds.eval()
        return validate_model(self.ds, batches, self.dist.device, self.agree_stop)

    def validate_ema(self, batches, build) -> dict:
        """The same for the EMA weights, in a plain copy of the model (`build()`)."""
        model = build()
        model.load_state_dict(self.ema.full())
        model.to(self.dist.device, self.dtype).eval()
        out = validate_model(model, batches, self.dist.device, self.agree_stop)
        return {f"{k}_ema": v for k, v in out.items()}

    def long_waits(self) -> None:
        """Collectives may wait the long timeout until the next optimizer step: a checkpoint, an
        evaluation, or the start of an epoch (its loader and first batch) follows."""
        if self._short and self.long_timeout_s:
            set_timeout(self.long_timeout_s)
            self._short = False

    def agree_stop(self) -> bool:
        """Has any rank been sent SIGTERM? A collective: every rank calls it at the same point."""
        flag = torch.tensor(float(preempt.requested()), device=self.dist.device)
        self.stop_requested = self.stop_requested or all_reduce_sum(flag).item() > 0
        return self.stop_requested

    # -- checkpoints -----------------------------------------------------------------------
    def resume(self) -> str | None:
        """Load the checkpoint the checkpointer holds into the engine and the states registered with
        it; None on a fresh start, else what a resume log line adds (resharded, EMA restarted)."""
        missed = self.checkpointer.load(self.stage_cfg.checkpoint.reshard)
        if missed is None:
            return None
        note = ""
        if self.reshard:
            note += f"; resharded to {self.dist.world} ranks: the epoch goes on from the same sample"
        if "ema" in missed:  # resharded: the shards it was saved in are not this run's
            self.ema.reset()
            note += "; the EMA of the weights restarts from the restored weights"
        self._set_lr()
        return note

    def stop_if_requested(self, agree: bool = False) -> None:
        """SIGTERM on any rank: checkpoint this step together, unless it already is, and stop (exit
        143). `agree`: ask the ranks now (a collective); else the flag the last step's collective
        carried."""
        if agree:
            self.agree_stop()
        if not self.stop_requested:
            return
        self.checkpointer.maybe_save(self.global_step, "stop")
        raise Preempted(
            f"SIGTERM: checkpoint {self.checkpointer.last} holds step {self.global_step}; rerun to continue"
        )

    def export(self, path) -> str:
        """Consolidated fp32 weights; returns their digest (checked equal on every rank). Only while
        the run is still this job's (the fence)."""
        on_rank0(self.dist.rank, self.fence)
        return export.export_fp32(self.ds, path)

    def export_ema(self, path) -> str:
        return export.write_weights(self.ema.full(), path, self.dist.rank)


STOP_EVERY = 8  # eval batches between SIGTERM checks: a collective each, every rank runs as many


class EvalInterrupted(Exception):
    """SIGTERM reached a rank during evaluation; every rank stopped it at the same batch."""


@torch.no_grad()
def validate_model(forward, batches, device: torch.device, stop=None) -> dict:
    """`stop()`: a collective asked every STOP_EVERY batches; True abandons the evaluation."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(batches):
        sums += topk_counts(forward(x), y.to(device))
        if stop is not None and i % STOP_EVERY == STOP_EVERY - 1 and stop():
            raise EvalInterrupted
    return summarize(all_reduce_sum(sums))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.ndim == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
