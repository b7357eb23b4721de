"""`ffscale bench data|train`: throughput against a baseline measured in the same process.

data:  images/s and CPU-ms per image of the DALI and webdataset loaders on the same shards, with
       the same augmentation (random-resized-crop + flip), ratio printed.
train: ffscale's DeepSpeed step against a plain PyTorch loop per ZeRO stage (ffscale/bench_train.py).
memory: model states and activations extrapolated to GPU clusters (ffscale/engine/memory.py).
scaling: step time against image size for FF-only (both token widths) and ViT (ffscale/bench_scaling.py).
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


def main(a) -> int:
    if a.what == "train":
        from . import bench_train

        if a.child:  # one ZeRO stage, inside its own (possibly multi-rank) job
            return bench_train.child(a)
        res = bench_train.run(a)
        print(json.dumps(res, indent=1)) if a.json else bench_train.print_table(res)
        return 0
    if a.what == "memory":
        from .engine.memory import cluster_table

        rows = cluster_table(a.models.split(","), a.img_size, [int(g) for g in a.gpus.split(",")], a.hbm_gib)
        print(json.dumps(rows, indent=1)) if a.json else print_memory(rows, a.hbm_gib)
        return 0
    if a.what == "scaling":
        from .bench_scaling import print_scaling, scaling

        res = scaling(a)
        print(json.dumps(res, indent=1)) if a.json else print_scaling(res)
        return 0
    res = bench_data(a)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
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


def print_memory(rows: list[dict], hbm_gib: float) -> None:
    print(
        f"model states per GPU (bf16 + fp32 Adam) and the largest micro-batch fitting {hbm_gib:g} GiB (90% usable)"
    )
    print(
        f"{'model':9} {'params':>7} {'GPUs':>5} {'ZeRO':>4} {'states GiB':>10} {'act MiB/img':>11} {'max batch':>9} {'w/ ckpt':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:9} {r['params_m']:>6.1f}M {r['gpus']:>5} {r['zero']:>4} {r['states_gib']:>10.2f} "
            f"{r['act_mib_per_img']:>11.1f} {r['max_batch']:>9} {r['max_batch_ckpt']:>8}"
        )
