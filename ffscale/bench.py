"""`ffscale bench data|train|memory|shard|scaling`: throughput against a baseline measured in the same process.

data:  the DALI and webdataset loaders like for like on ImageNet-like JPEGs (ffscale/bench_data.py).
train: ffscale's DeepSpeed step against a plain PyTorch loop per ZeRO stage (ffscale/bench_train.py).
memory: model states and activations extrapolated to GPU clusters (ffscale/engine/memory.py).
shard: sharding img/s with 1 and N writer processes on the same input (ffscale/bench_shard.py).
scaling: step time against image size for FF-only (both token widths) and ViT (ffscale/bench_scaling.py).
"""

from __future__ import annotations

import json


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
