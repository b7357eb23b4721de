"""One stage's training loop: epochs of micro-steps, progress, periodic eval and checkpoints.

Sees plain tensors and the small Engine interface; knows nothing of DeepSpeed, DALI or MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import flops, preempt
from .config import ConfigError, Stage, check_world
from .data.augment import DeviceOps
from .data.loader import build_loader
from .engine.checkpoint import latest_tag, needs_reshard
from .engine.dist import DistInfo
from .engine.engine import Engine
from .hostenv import allocator
from .models import create_model
from .models.resize import adapt_state_dict
from .progress import Meter, fmt_time


def log(dist: DistInfo, msg: str) -> None:
    if dist.rank == 0:
        print(msg, flush=True)


def model_kwargs(stage: Stage, num_classes: int) -> dict:
    m = stage.cfg.model
    return dict(
        img_size=m.img_size or stage.cfg.data.img_size,
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        num_classes=num_classes,
        drop_path=m.drop_path,
        grad_ckpt=m.grad_ckpt,
        dim=m.dim,
        depth=m.depth,
        **({"token_hidden": m.token_hidden} if m.token_hidden else {}),
    )


def run_stage(
    stage: Stage,
    dist: DistInfo,
    tracker,
    seed: int,
    log_every: int,
    eval_every: int,
    init_weights: Path | None,
) -> dict:
    s = stage.cfg
    p = f"stage {stage.name}"
    accum = check_world(s, dist.world, f"stages.{stage.name}.")
    train, train_m = build_loader(
        s.data,
        s.data.train,
        True,
        dist.rank,
        dist.world,
        s.optim.micro_batch,
        seed,
        s.model.num_classes,
        dist.device,
    )
    num_classes = s.model.num_classes or train_m.num_classes
    val, val_m = build_loader(
        s.data, s.data.val, False, dist.rank, dist.world, s.optim.micro_batch, seed, num_classes, dist.device
    )
    if val_m.classes != train_m.classes:
        raise ConfigError(f"{p}: {s.data.val} has other classes than {s.data.train}")

    kw = model_kwargs(stage, num_classes)
    torch.manual_seed(seed)  # same initial weights on every rank
    model = create_model(s.model.name, **kw)
    if init_weights is not None:
        from .engine.checkpoint import load_weights

        state = adapt_state_dict(
            load_weights(init_weights), model, lambda m: log(dist, m), s.model.carry_token_mlp
        )
        model.load_state_dict(state)

    micro_per_epoch = train.steps_per_epoch // accum * accum  # epochs end on a step boundary
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{p}: one epoch of {s.data.train} is smaller than optim.global_batch")
    total = s.schedule.epochs * steps_per_epoch
    warmup = int(s.schedule.warmup_epochs * steps_per_epoch)
    ckpt_dir = stage.dir / "checkpoints"
    reshard = s.checkpoint.reshard and needs_reshard(ckpt_dir)  # another rank count's ZeRO shards
    engine = Engine(model, s, dist, accum, total, warmup, universal=reshard, ema_decay=s.optim.ema_decay)
    ops = DeviceOps(s.data, num_classes, dist.device, engine.dtype)

    stage.dir.mkdir(parents=True, exist_ok=True)
    client = engine.load(ckpt_dir, s.checkpoint.reshard)  # None: fresh start
    epoch, skip = 0, 0
    if client:
        # micro-steps done in this epoch, counted in this run's accumulation (the rank count may differ)
        epoch, skip = client["epoch"], client["micro_in_epoch"] // client.get("accum", accum) * accum
        log(
            dist,
            f"{p}: resumed from {ckpt_dir}/{latest_tag(ckpt_dir)} (epoch {epoch}, step {engine.global_step})"
            + (
                f"; resharded to {dist.world} ranks: the rest of this epoch sees another sample order"
                if reshard
                else ""
            ),
        )
    best = client.get("best", {}) if client else {}
    skipped = client.get("skipped", 0) if client else 0  # non-finite steps skipped (optim.nonfinite=skip)

    fpi = flops.train_flops_per_image(
        lambda: create_model(s.model.name, **kw), kw["img_size"], kw["in_chans"]
    )
    peak = flops.rank_peak(dist, engine.precision)
    meter = Meter(total, s.optim.global_batch, fpi, peak * dist.world)  # MFU over all devices
    cpu_alloc = f" ({allocator()})" if dist.device.type == "cpu" else ""
    n_params = sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters())  # ZeRO-3 partitions
    log(
        dist,
        f"{p}: {s.model.name} {n_params / 1e6:.2f}M params, {fpi / 3e9:.3f} GFLOPs/img fwd, "
        f"{train_m.num_samples} train / {val_m.num_samples} val images, {num_classes} classes, "
        f"{dist.world} rank(s) on {dist.device.type}{cpu_alloc}, {engine.precision}, ZeRO-{s.deepspeed.zero_stage}, "
        f"{steps_per_epoch} steps/epoch x {s.schedule.epochs} epochs, accum {accum}, lr {engine.lr:.2e}",
    )
    tracker.stage_started(stage, train_m, val_m, n_params)
    metrics_file = stage.dir / "metrics.jsonl"

    def record(row: dict) -> None:
        if dist.rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])

    def save(epoch: int, micro_in_epoch: int) -> None:
        state = {
            "epoch": epoch,
            "micro_in_epoch": micro_in_epoch,
            "accum": accum,
            "best": best,
            "skipped": skipped,
        }
        engine.save(ckpt_dir, f"step{engine.global_step}", state, s.checkpoint.keep)

    if init_weights is not None and client is None:  # what the carried weights are worth as-is
        ev = evaluate(engine, val, ops)
        record({"step": 0, "init_val_top1": ev["val_top1"], "init_val_top5": ev["val_top5"]})
        log(dist, f"{p}: weights from {init_weights}: top-1 {ev['val_top1']:.2f}% before training")

    loss_sum = torch.zeros((), device=dist.device)
    step_loss = torch.zeros((), device=dist.device)
    n_loss = 0
    stopped = False
    last_eval: dict = {}
    meter.update(engine.global_step)
    while epoch < s.schedule.epochs and not stopped:
        for i, (x, y) in enumerate(train.epoch(epoch, skip), start=skip):
            if i >= micro_per_epoch:
                break
            # Seeded per micro-step: drop path and augmentation replay exactly after a resume.
            torch.manual_seed(seed + 1_000_003 * dist.rank + epoch * micro_per_epoch + i)
            x, target = ops.train_batch(x, y, s.optim.label_smoothing)
            step_loss += engine.train_step(x, target)
            if (i + 1) % accum:
                continue
            step = engine.global_step
            if engine.step_finite:
                loss_sum += step_loss
                n_loss += accum
            else:  # nothing was applied; no checkpoint can hold NaN weights
                skipped += 1
                record({"step": step, "skipped_steps": skipped})
                nonfinite(s.optim, step, skipped, ckpt_dir, p)
                log(
                    dist,
                    f"{p}: loss not finite at step {step}: step skipped ({skipped}/{s.optim.max_skipped})",
                )
            step_loss.zero_()
            if n_loss and (step % log_every == 0 or i + 1 == micro_per_epoch):
                loss = loss_sum.item() / n_loss
                loss_sum.zero_()
                n_loss = 0
                perf = meter.update(step)
                row = {
                    "step": step,
                    "epoch": epoch + (i + 1) / micro_per_epoch,
                    "loss": loss,
                    "lr": engine.lr,
                    **perf,
                }
                record(row)
                mfu = f" | MFU {perf['mfu']:.1f}%" if "mfu" in perf else ""
                log(
                    dist,
                    f"{stage.name} ep {epoch + 1}/{s.schedule.epochs} step {step}/{total} | loss {loss:.4f} | "
                    f"lr {engine.lr:.2e} | {perf.get('img_per_s', 0):,.0f} img/s{mfu} | ETA {fmt_time(perf.get('eta_s', 0))}",
                )
            if preempt.requested_anywhere(dist.device):
                save(epoch, i + 1)
                log(dist, f"{p}: SIGTERM: checkpoint written at step {step}; rerun to continue")
                raise preempt.Preempted(step)
            if s.checkpoint.every_steps and step % s.checkpoint.every_steps == 0:
                save(epoch, i + 1)
            if s.schedule.stop_at_step and step >= s.schedule.stop_at_step:
                stopped = True
                save(epoch, i + 1)
                log(dist, f"{p}: stopped at schedule.stop_at_step={step}; rerun to continue")
                break
        if stopped:
            break
        epoch, skip = epoch + 1, 0
        if epoch % eval_every == 0 or epoch == s.schedule.epochs:
            t0 = time.perf_counter()
            ev = evaluate(engine, val, ops)
            if engine.ema is not None:  # DeiT reports the EMA model beside the trained one
                ev |= engine.evaluate_ema(
                    (ops.eval_batch(x, y) for x, y in val.epoch(0)), lambda: create_model(s.model.name, **kw)
                )
            ev["epoch"] = epoch
            last_eval = ev
            if ev["val_top1"] >= best.get("val_top1", -1):
                best = {"val_top1": ev["val_top1"], "val_top5": ev["val_top5"], "epoch": epoch}
            record({"step": engine.global_step, **ev})
            log(
                dist,
                f"{stage.name} eval ep {epoch}: top-1 {ev['val_top1']:.2f}% top-5 {ev['val_top5']:.2f}% "
                f"loss {ev['val_loss']:.4f} on {ev['val_samples']} images"
                + (f" | EMA top-1 {ev['val_top1_ema']:.2f}%" if "val_top1_ema" in ev else "")
                + f" ({time.perf_counter() - t0:.1f}s)",
            )
        if s.checkpoint.every_epochs and epoch % s.checkpoint.every_epochs == 0 or epoch == s.schedule.epochs:
            save(epoch, 0)
    if stopped:
        return {"finished": False}
    digest = engine.export(stage.dir / "weights.safetensors")
    ema = {"ema_digest": engine.export_ema(stage.dir / "weights_ema.safetensors")} if engine.ema else {}
    return {
        **ema,
        "finished": True,
        "best": best,
        "last_eval": last_eval,
        "steps": engine.global_step,
        "weights_digest": digest,
        "ranks": dist.world,
    }


def nonfinite(optim, step: int, skipped: int, ckpt_dir: Path, p: str) -> None:
    """Stop, naming the step, unless optim.nonfinite=skip and the limit is not yet passed."""
    if optim.nonfinite == "skip" and skipped <= optim.max_skipped:
        return
    why = (
        f"{skipped} steps skipped, more than optim.max_skipped={optim.max_skipped}"
        if optim.nonfinite == "skip"
        else "optim.nonfinite=stop"
    )
    raise FloatingPointError(
        f"{p}: loss is NaN or inf at step {step} ({why}). The step was not applied; the last "
        f"checkpoint is {ckpt_dir / latest_tag(ckpt_dir) if latest_tag(ckpt_dir) else 'none yet'}. Lower optim.base_lr or set optim.clip_grad"
        + ("" if optim.nonfinite == "skip" else ", or skip such steps with optim.nonfinite=skip")
    )


def evaluate(engine: Engine, val, ops: DeviceOps) -> dict:
    return engine.evaluate(ops.eval_batch(x, y) for x, y in val.epoch(0))
