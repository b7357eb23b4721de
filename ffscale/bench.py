"""`ffscale bench data|train|memory|shard|scaling`: throughput against a baseline measured in the same process.

data:  the DALI and webdataset loaders like for like on ImageNet-like JPEGs (ffscale/bench_data.py).
train: ffscale's DeepSpeed step against a plain PyTorch loop per ZeRO stage (ffscale/bench_train.py).
memory: model states and activations extrapolated to GPU clusters (ffscale/engine/memory.py).
shard: sharding img/s with 1 and N writer processes on the same input (ffscale/bench_shard.py).
scaling: step time against image size for FF-only (both token widths) and ViT (ffscale/bench_scaling.py).
"""

from __future__ import annotations

import argparse
import json
import os


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
    if a.what == "shard":
        from .bench_shard import bench_shard, print_shard

        res = bench_shard(a)
        print(json.dumps(res, indent=1)) if a.json else print_shard(res)
        return 0
    from .bench_data import bench_data, print_data

    res = bench_data(a)
    print(json.dumps(res, indent=1)) if a.json else print_data(res)
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


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="throughput against a baseline run in the same process")
    bsub = b.add_subparsers(dest="what", required=True)
    bd = bsub.add_parser(
        "data",
        help="DALI vs webdataset loader, like for like on ImageNet-like JPEGs: img/s, CPU-ms/img, ratio",
    )
    bd.add_argument(
        "--shards",
        default="data/bench-imagenet-like",
        help="shard dir (default: ImageNet-like JPEGs, made once)",
    )
    bd.add_argument("--images", type=int, default=3000, help="images in the generated set")
    bd.add_argument("--img-size", type=int, default=224)
    bd.add_argument("--batch", type=int, default=64)
    bd.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    bd.add_argument(
        "--rounds", type=int, default=3, help="rounds per loader, alternating, each a fresh process"
    )
    bd.add_argument("--warmup", type=int, default=5, help="batches per round not timed")
    bd.add_argument(
        "--crop-scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("LO", "HI"),
        help="random-resized-crop area (DeiT: 0.08 1); 1 1: both loaders decode every pixel",
    )  # fmt: skip
    bd.add_argument("--json", action="store_true")
    bt = bsub.add_parser(
        "train", help="ffscale (DeepSpeed) step vs a plain PyTorch loop per ZeRO stage: ratio, MFU, memory"
    )
    bt.add_argument("--config", "-c", action="append", default=[])
    bt.add_argument("overrides", nargs="*")
    bt.add_argument("--nproc", type=int, default=1, help="ranks (plain reference: DDP when > 1)")
    bt.add_argument("--zero", default="0,2", help="ZeRO stages to measure, e.g. 0,1,2,3")
    bt.add_argument("--steps", type=int, default=10, help="steps per timed round")
    bt.add_argument("--warmup", type=int, default=3)
    bt.add_argument("--rounds", type=int, default=3, help="alternating plain/ffscale rounds; fastest kept")
    bt.add_argument("--json", action="store_true")
    bt.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    bt.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    bsh = bsub.add_parser("shard", help="sharding img/s with 1 and N writer processes on the same input")
    bsh.add_argument(
        "--root", help="a class-folder tree of your own (default: ImageNet-like JPEGs, made once)"
    )
    bsh.add_argument("--input", default="data/bench-shard-input", help="where the generated input is kept")
    bsh.add_argument("--images", type=int, default=2000, help="images in the generated input")
    bsh.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)), help="N (default: all cores)"
    )
    bsh.add_argument("--shard-size", type=int, default=500)
    bsh.add_argument("--max-side", type=int, default=0, help="also downscale (e.g. 512)")
    bsh.add_argument("--rounds", type=int, default=3, help="alternating 1 / N rounds; best kept")
    bsh.add_argument("--tmp", help="where outputs are written (default: the system's temp dir)")
    bsh.add_argument("--json", action="store_true")
    bm = bsub.add_parser("memory", help="model states per GPU by ZeRO stage and GPU count; batch that fits")
    bm.add_argument("--models", default="ff_tiny,ff_base,ff_large,vit_base")
    bm.add_argument("--gpus", default="8,64,512")
    bm.add_argument("--img-size", type=int, default=224)
    bm.add_argument("--hbm-gib", type=float, default=80, help="GPU memory (H100: 80)")
    bm.add_argument("--json", action="store_true")
    bs = bsub.add_parser(
        "scaling", help="step time vs image size: FF (4 x tokens and fixed token MLP) and ViT"
    )
    bs.add_argument("--sizes", default="64,96,128,160,192,224")
    bs.add_argument("--dim", type=int, default=192, help="model width (small: this is about growth)")
    bs.add_argument("--depth", type=int, default=4)
    bs.add_argument("--token-hidden", type=int, default=256, help="fixed token-MLP width of the linear FF")
    bs.add_argument("--batch", type=int, default=16)
    bs.add_argument("--steps", type=int, default=3)
    bs.add_argument("--json", action="store_true")
    b.set_defaults(fn=main)
