"""One ZeRO stage's job of `ffscale bench train` (started by ffscale/tools/bench/train.py): a few
steps, then the model-state bytes each rank holds (measured from the live tensors), then plain PyTorch
(DDP when there are several ranks) and ffscale timed in alternating rounds, the fastest round of each
kept. The CPU 'peak' for MFU is a dense matmul measured in the job. Rank 0 prints the result as one
line marked train.MARK."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from ffscale.config import image_size
from ffscale.tools.bench.train import MARK


def child_parser() -> argparse.ArgumentParser:
    from ffscale import config

    p = argparse.ArgumentParser(
        prog="ffscale/tools/bench/train_job.py", description="one ZeRO stage of `ffscale bench train`"
    )
    config.add_args(p)
    for flag in ("--zero", "--steps", "--warmup", "--rounds"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument(
        "--local_rank", type=int, help=argparse.SUPPRESS
    )  # the launcher's (LOCAL_RANK holds it too)
    return p


def child(args) -> int:
    """One ZeRO stage inside its job: ffscale's engine and the plain loop on one fixed batch."""
    from ffscale import config, tracking

    tracking.block_mlflow()  # the job tracks nothing; DeepSpeed would import MLflow
    from ffscale.engine import dist as distributed
    from ffscale.util import flops

    distributed.prepare_env()
    cfg = config.load(args.config, [*args.overrides, f"deepspeed.zero_stage={args.zero}"])
    s = config.stages(cfg)[0].cfg
    info = distributed.init()
    from ffscale.engine.ds_config import resolve_precision
    from ffscale.inference.build import build_model

    s.optim.micro_batch = s.optim.micro_batch or 64
    s.optim.global_batch = s.optim.micro_batch * info.world
    s.optim.ema_decay = 0.0  # the plain loop keeps no EMA either
    s.distill.teacher = None  # nor a teacher: the student's own step is compared
    num_classes = s.model.num_classes or 1000
    size = image_size(s)
    torch.manual_seed(info.rank)
    x = torch.randn(s.optim.micro_batch, 3, size, size, device=info.device)
    y = torch.randint(0, num_classes, (s.optim.micro_batch,), device=info.device)
    prec = resolve_precision(s.deepspeed.precision, info.device)
    ff = _ffscale_step(s, info, num_classes, x, y, args.warmup)
    plain_step = _plain_step(s, info, num_classes, x, y, prec)
    timed(info.device, plain_step, args.warmup)
    t_plain, t_ff = [], []
    for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
        t_plain.append(timed(info.device, plain_step, args.steps))
        t_ff.append(timed(info.device, ff["step"], args.steps))
    fpi = flops.train_flops_per_image(lambda: build_model(s, num_classes), size, s.model.in_chans)
    res = _result(s, info, args.zero, prec, ff, min(t_plain), min(t_ff), fpi, flops.rank_peak(info, prec))
    if info.rank == 0:
        print(MARK + json.dumps(res), flush=True)
    return 0


def timed(device: torch.device, step, n: int) -> float:
    """Seconds per call of `step`, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def _ffscale_step(stage_cfg, info, num_classes: int, x, y, warmup: int) -> dict:
    """The engine warmed up, its model states measured at their peak (after backward, gradients
    live, before the step); `step` trains on the fixed batch and records the loss."""
    from ffscale.engine import ds_config
    from ffscale.engine.engine import Engine
    from ffscale.inference.build import build_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as ckpt_dir:  # never written: the bench saves no checkpoint
        peak = ds_config.peak_lr(stage_cfg)  # the plain loop's lr: both step at it from the first step
        engine = Engine(
            build_model(stage_cfg, num_classes),
            stage_cfg,
            info,
            accum=1,
            lr_at=lambda step: peak,
            ckpt_dir=ckpt_dir,
        )
    xe, losses = x.to(engine.dtype), []
    step = lambda: losses.append(engine.train_step(xe, y).item())  # noqa: E731
    timed(info.device, step, warmup)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mem = engine.model_states(xe, y, exclude=(x,))
    peak_mem = torch.cuda.max_memory_allocated() if info.device.type == "cuda" else None
    syncs = host_syncs(lambda: engine.train_step(xe, y), info.device)
    return {
        "engine": engine,
        "step": step,
        "losses": losses,
        "mem": mem,
        "peak_mem": peak_mem,
        "syncs": syncs,
    }


def host_syncs(step, device: torch.device) -> int | None:
    """Operations in one step that make the host wait for the GPU (torch's sync debug mode counts
    them: DeepSpeed's own, e.g. its gradient-norm check, and ours). None on a CPU, which has no queue."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _plain_step(stage_cfg, info, num_classes: int, x, y, prec: str):
    """The same model in a plain PyTorch loop (DDP over several ranks), autocast for bf16/fp16."""
    from ffscale.engine.ds_config import DTYPES
    from ffscale.engine.engine import soft_cross_entropy
    from ffscale.engine.optim import build_optimizer
    from ffscale.inference.build import build_model

    torch.manual_seed(0)
    plain = build_model(stage_cfg, num_classes).to(info.device)
    if info.world > 1:
        plain = torch.nn.parallel.DistributedDataParallel(plain)
    opt = build_optimizer(plain, stage_cfg.optim, 1e-4)

    def step():
        with torch.autocast(info.device.type, dtype=DTYPES[prec], enabled=prec != "fp32"):
            loss = soft_cross_entropy(plain(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _result(
    stage_cfg, info, zero: int, prec: str, ff: dict, t_plain: float, t_ff: float, fpi: float, peak: float
):
    b, mem, peak_mem = stage_cfg.optim.micro_batch, ff["mem"], ff["peak_mem"]
    return {
        "model": stage_cfg.model.name,
        "img_size": image_size(stage_cfg),
        "micro_batch": b,
        "ranks": info.world,
        "zero": zero,
        "precision": prec,
        "grad_ckpt": stage_cfg.model.grad_ckpt,
        "compile": stage_cfg.model.compile,
        "compiled": ff["engine"].compiled,
        "offload_optimizer": stage_cfg.deepspeed.offload_optimizer,
        "loss_first_last": [ff["losses"][0], ff["losses"][-1]],  # one fixed batch: it must be learned
        "gflops_per_img": fpi / 1e9,
        "plain_step_s": t_plain,
        "ffscale_step_s": t_ff,
        "ratio": t_plain / t_ff,
        "img_per_s": b * info.world / t_ff,
        "mfu_pct": 100 * b * fpi / t_ff / peak if peak else None,
        "peak_tflops": peak / 1e12,
        "model_states_mib": {k: v / 2**20 for k, v in mem.items()},
        "peak_mem_gib": peak_mem / 2**30 if peak_mem else None,
        "host_syncs_per_step": ff["syncs"],
        "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
    }


if __name__ == "__main__":  # one ZeRO stage's job, started by `run`
    from ffscale.errors import guarded

    args = child_parser().parse_args()
    code = guarded(lambda: child(args))
    sys.stdout.flush()
    # the result is printed: skip interpreter teardown, where gloo's threads have aborted the
    # process ("terminate called without an active exception", seen once in a fresh-clone CI run)
    os._exit(code)
