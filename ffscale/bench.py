"""`ffscale bench data|train`: throughput against a baseline measured in the same process.

data:  images/s and CPU-ms per image of the DALI and webdataset loaders on the same shards, with
       the same augmentation (random-resized-crop + flip), ratio printed.
train: ffscale's DeepSpeed step against a plain PyTorch loop (same model, batch, AdamW, precision),
       ratio and MFU printed; the CPU 'peak' is a dense matmul measured in the same run.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def bench_shards(out: Path, n: int, size: int) -> Path:
    """Real Fashion-MNIST images upscaled to ImageNet-like JPEGs (cached)."""
    from PIL import Image

    from .data import shards

    if (out / "manifest.json").is_file():
        return out
    classes, items, src = shards.fashion_mnist("val")

    def big(load):
        import io

        img = Image.open(io.BytesIO(load())).convert("RGB").resize((size, size), Image.BICUBIC)
        return shards._jpeg(img, quality=90)

    items = [(lambda f=f: big(f), y) for f, y in items[:n]]
    shards.write_shards(items, classes, out, "bench", src + f"@{size}px", shard_size=250)
    return out


def bench_data(a) -> dict:
    from .config import DataCfg
    from .data.dali import available
    from .data.loader import build_loader

    root = bench_shards(Path(a.shards), a.images, a.source_size) if not a.shards_given else Path(a.shards)
    results = {}
    kinds = ["webdataset"] + (["dali"] if available() else [])
    for kind in kinds:
        cfg = DataCfg(loader=kind, img_size=a.img_size, workers=a.workers, rand_augment=a.rand_augment,
                      mixup=0, cutmix=0, reprob=0)  # fmt: skip
        dev = torch.device("cuda" if torch.cuda.is_available() and kind == "dali" else "cpu")
        loader, m = build_loader(cfg, str(root), True, 0, 1, a.batch, 0, None, dev)
        it = loader.epoch(0)
        next(it)  # start-up (workers, pipeline build) is not throughput
        n, c0, t0 = 0, _cpu_seconds(), time.perf_counter()
        for x, _ in it:
            n += len(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        results[kind] = {
            "img_per_s": n / dt,
            "cpu_ms_per_img": 1000 * cpu / max(n, 1),
            "images": n,
            "device": dev.type,
        }
    if "dali" in results:
        results["ratio_dali_over_webdataset"] = (
            results["dali"]["img_per_s"] / results["webdataset"]["img_per_s"]
        )
    return results


def bench_train(a) -> dict:
    from . import config as C
    from . import flops
    from .engine import dist as D

    D.prepare_env()
    cfg = C.load(a.config, a.overrides)
    s = C.stages(cfg)[0].cfg
    info = D.init()
    from .engine.engine import Engine, soft_cross_entropy
    from .models import create_model

    size = s.model.img_size or s.data.img_size
    kw = dict(img_size=size, patch_size=s.model.patch_size, num_classes=s.model.num_classes or 1000,
              dim=s.model.dim, depth=s.model.depth, drop_path=s.model.drop_path)  # fmt: skip
    if s.model.token_hidden:
        kw["token_hidden"] = s.model.token_hidden
    b = s.optim.micro_batch
    x = torch.randn(b, 3, size, size, device=info.device)
    y = torch.randint(0, kw["num_classes"], (b,), device=info.device)
    fpi = flops.train_flops_per_image(lambda: create_model(s.model.name, **kw), size)
    res = {"model": s.model.name, "img_size": size, "micro_batch": b, "gflops_per_img": fpi / 1e9}

    def timed(step) -> float:
        for _ in range(a.warmup):
            step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / a.steps

    from .engine.ds_config import resolve_precision
    from .engine.optim import build_optimizer

    prec = resolve_precision(s.deepspeed.precision, info.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[prec]

    def plain_step_time() -> float:
        """Plain PyTorch reference: same model, AdamW, precision (autocast), no DeepSpeed."""
        torch.manual_seed(0)
        ref = create_model(s.model.name, **kw).to(info.device)
        opt = build_optimizer(ref, s.optim, 1e-4, info.device)

        def step():
            with torch.autocast(info.device.type, dtype=dtype, enabled=prec != "fp32"):
                loss = soft_cross_entropy(ref(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return timed(step)

    res["plain_step_s"] = plain_step_time()
    torch.manual_seed(0)
    s.optim.global_batch = b * info.world
    engine = Engine(create_model(s.model.name, **kw), s, info, 1, 10_000, 1)
    xe = x.to(engine.dtype)
    res["ffscale_step_s"] = timed(lambda: engine.train_step(xe, y))
    res["zero_stage"], res["precision"], res["ranks"] = s.deepspeed.zero_stage, prec, info.world
    res["ratio_ffscale_over_plain"] = res["plain_step_s"] / res["ffscale_step_s"]
    res["img_per_s"] = b * info.world / res["ffscale_step_s"]
    peak = flops.device_peak(info.device, prec)
    res["peak_tflops"] = peak / 1e12
    res["mfu_pct"] = 100 * b * fpi / res["ffscale_step_s"] / peak if peak else None
    res["device"] = torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu"
    if info.device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main(a) -> int:
    res = bench_data(a) if a.what == "data" else bench_train(a)
    if a.what == "train" and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            if isinstance(v, dict):
                print(
                    f"{k:12s} "
                    + "  ".join(
                        f"{kk} {vv:,.2f}" if isinstance(vv, float) else f"{kk} {vv}" for kk, vv in v.items()
                    )
                )
            else:
                print(f"{k:28s} {v:,.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0
