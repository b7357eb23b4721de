"""`ffscale bench train`: ffscale's DeepSpeed step against a plain PyTorch loop, per ZeRO stage.

Each ZeRO stage runs in its own job (`--nproc` ranks; one process when 1), so no engine's leftovers
bias the next. In that job: a few steps, then the model-state bytes each rank holds (measured from the
live tensors), then plain PyTorch (DDP when there are several ranks) and ffscale timed in alternating
rounds, the fastest round of each kept. The CPU 'peak' for MFU is a dense matmul measured in the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

MARK = "FFSCALE_BENCH "


def _child_args(a, zero: int) -> list[str]:
    out = ["bench", "train", "--child", "--zero", str(zero), "--steps", str(a.steps)]
    out += ["--warmup", str(a.warmup), "--rounds", str(a.rounds)]
    for c in a.config:
        out += ["--config", c]
    return out + list(a.overrides)


def run(a) -> dict:
    """Parent: one job per ZeRO stage, results collected from rank 0's marked line."""
    rows = []
    for zero in [int(z) for z in str(a.zero).split(",")]:
        args = _child_args(a, zero)
        if a.nproc > 1:
            from .engine.dist import _free_port

            launcher = str(os.path.join(os.path.dirname(sys.executable), "deepspeed"))
            cmd = [
                launcher,
                "-q",
                "--no_local_rank",
                "--num_gpus",
                str(a.nproc),
                "--master_port",
                str(_free_port()),
            ]
            cmd += ["--module", "ffscale.cli", *args]
        else:
            cmd = [sys.executable, "-m", "ffscale.cli", *args]
        from .hostenv import rank_env

        env = {**rank_env(), "PYTHONWARNINGS": "ignore"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [ln[len(MARK) :] for ln in p.stdout.splitlines() if ln.startswith(MARK)]
        if p.returncode or not found:
            raise RuntimeError(f"bench job for ZeRO-{zero} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        rows.append(json.loads(found[-1]))
    return {"runs": rows}


def child(a) -> int:
    from . import config as C
    from . import flops
    from .engine import dist as D

    D.prepare_env()
    cfg = C.load(a.config, [*a.overrides, f"deepspeed.zero_stage={a.zero}"])
    s = C.stages(cfg)[0].cfg
    info = D.init()
    from .engine.ds_config import resolve_precision
    from .engine.engine import Engine, soft_cross_entropy
    from .engine.optim import build_optimizer
    from .loop import model_kwargs
    from .models import create_model

    kw = model_kwargs(C.Stage("bench", s, None), s.model.num_classes or 1000)
    size, b = kw["img_size"], s.optim.micro_batch
    s.optim.global_batch = b * info.world
    torch.manual_seed(info.rank)
    x = torch.randn(b, 3, size, size, device=info.device)
    y = torch.randint(0, kw["num_classes"], (b,), device=info.device)
    fpi = flops.train_flops_per_image(lambda: create_model(s.model.name, **kw), size, kw["in_chans"])
    prec = resolve_precision(s.deepspeed.precision, info.device)

    def timed(step, n: int) -> float:
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    torch.manual_seed(0)
    engine = Engine(create_model(s.model.name, **kw), s, info, 1, 10_000, 1)
    xe = x.to(engine.dtype)
    losses: list[float] = []
    ff_step = lambda: losses.append(engine.train_step(xe, y).item())  # noqa: E731
    timed(ff_step, a.warmup)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # model states measured at their peak: after backward (gradients live), before the step
    mem = engine.model_states(xe, y, exclude=(x,))
    peak_mem = torch.cuda.max_memory_allocated() if info.device.type == "cuda" else None

    torch.manual_seed(0)
    plain = create_model(s.model.name, **kw).to(info.device)
    if info.world > 1:  # the plain multi-rank loop: DDP
        plain = torch.nn.parallel.DistributedDataParallel(plain)
    opt = build_optimizer(plain, s.optim, 1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[prec]

    def plain_step():
        with torch.autocast(info.device.type, dtype=dtype, enabled=prec != "fp32"):
            loss = soft_cross_entropy(plain(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    timed(plain_step, a.warmup)
    t_plain, t_ff = [], []
    for _ in range(a.rounds):  # alternate, so drift on a shared machine hits both alike
        t_plain.append(timed(plain_step, a.steps))
        t_ff.append(timed(ff_step, a.steps))
    peak = flops.rank_peak(info, prec)
    res = {
        "model": s.model.name,
        "img_size": size,
        "micro_batch": b,
        "ranks": info.world,
        "zero": a.zero,
        "precision": prec,
        "grad_ckpt": s.model.grad_ckpt,
        "compile": s.model.compile,
        "compiled": engine.compiled,
        "offload_optimizer": s.deepspeed.offload_optimizer,
        "loss_first_last": [losses[0], losses[-1]],  # one fixed batch: it must be learned
        "gflops_per_img": fpi / 1e9,
        "plain_step_s": min(t_plain),
        "ffscale_step_s": min(t_ff),
        "ratio": min(t_plain) / min(t_ff),
        "img_per_s": b * info.world / min(t_ff),
        "mfu_pct": 100 * b * fpi / min(t_ff) / peak if peak else None,
        "peak_tflops": peak / 1e12,
        "model_states_mib": {k: v / 2**20 for k, v in mem.items()},
        "peak_mem_gib": peak_mem / 2**30 if peak_mem else None,
        "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
    }
    if info.rank == 0:
        print(MARK + json.dumps(res), flush=True)
    return 0


def print_table(res: dict) -> None:
    rows = res["runs"]
    r0 = rows[0]
    print(
        f"{r0['model']} {r0['img_size']}px, micro-batch {r0['micro_batch']}, {r0['ranks']} rank(s), "
        f"{r0['precision']} on {r0['device']}, {r0['gflops_per_img']:.2f} GFLOP/img (fwd+bwd), "
        f"peak {r0['peak_tflops']:.2f} TFLOP/s per device"
    )
    print(
        f"{'ZeRO':>4} {'plain s/step':>12} {'ffscale s/step':>14} {'ratio':>6} {'img/s':>8} {'MFU %':>6} "
        f"{'MiB/rank':>9} {'params':>7} {'grads':>7} {'optim':>7} {'buffers':>7}"
    )
    base = None
    for r in rows:
        m = r["model_states_mib"]
        base = base or (m["total"] if r["zero"] == 0 else None)
        print(
            f"{r['zero']:>4} {r['plain_step_s']:>12.3f} {r['ffscale_step_s']:>14.3f} {r['ratio']:>6.2f} "
            f"{r['img_per_s']:>8.1f} {r['mfu_pct'] or 0:>6.1f} {m['total']:>9.1f} {m['params']:>7.1f} "
            f"{m['grads']:>7.1f} {m['optimizer']:>7.1f} {m['zero_buffers']:>7.1f}"
            + (f"  ({m['total'] / base:.2f}x ZeRO-0)" if base and r["zero"] else "")
        )
