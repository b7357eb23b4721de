"""`ffscale bench memory`: model states and activations per GPU by ZeRO stage and GPU count, and the
micro-batch that fits (figures from ffscale/engine/memory.py)."""

from __future__ import annotations


def memory(args) -> list[dict]:
    from ffscale.engine.memory import cluster_table

    return cluster_table(
        args.models.split(","), args.img_size, [int(g) for g in args.gpus.split(",")], args.hbm_gib
    )


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
