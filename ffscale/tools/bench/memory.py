"""`ffscale bench memory`: model states and activations per GPU by ZeRO stage and GPU count, and the
micro-batch that fits (figures from ffscale/engine/memory.py)."""

from __future__ import annotations


def memory(args) -> dict:
    from ffscale.engine.memory import cluster_table

    gpus = [int(g) for g in args.gpus.split(",")]
    rows = cluster_table(args.models.split(","), args.img_size, gpus, args.hbm_gib)
    return {"img_size": args.img_size, "hbm_gib": args.hbm_gib, "gpus": gpus, "rows": rows}


def table(res: dict) -> list[list]:
    """Per model: ZeRO-0's states, ZeRO-2's on the fewest GPUs, ZeRO-3's on each GPU count, the
    activations per image, and ZeRO-0's largest micro-batch (with activation checkpointing)."""
    gpus, hbm = res["gpus"], res["hbm_gib"]
    at = {(r["model"], r["gpus"], r["zero"]): r for r in res["rows"]}
    rows: list[list] = [["model", "params", "ZeRO-0 GiB", f"ZeRO-2 GiB, {gpus[0]} GPUs",
                         f"ZeRO-3 GiB, {' / '.join(map(str, gpus))} GPUs", "activations MiB/img",
                         f"largest micro-batch in {hbm:g} GiB (checkpointed)"]]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in res["rows"]):
        z0 = at[(model, gpus[0], 0)]
        rows.append([model, f"{z0['params_m']:.1f}M", f"{z0['states_gib']:.2f}",
                     f"{at[(model, gpus[0], 2)]['states_gib']:.2f}",
                     " / ".join(f"{at[(model, g, 3)]['states_gib']:.2f}" for g in gpus),
                     f"{z0['act_mib_per_img']:.1f}", f"{z0['max_batch']:,} ({z0['max_batch_ckpt']:,})"])  # fmt: skip
    return rows


def print_memory(res: dict) -> None:
    print(
        f"model states per GPU (bf16 + fp32 Adam) at {res['img_size']} px and the largest micro-batch fitting "
        f"{res['hbm_gib']:g} GiB (90% usable)"
    )
    print(
        f"{'model':9} {'params':>7} {'GPUs':>5} {'ZeRO':>4} {'states GiB':>10} {'act MiB/img':>11} {'max batch':>9} {'w/ ckpt':>8}"
    )
    for r in res["rows"]:
        print(
            f"{r['model']:9} {r['params_m']:>6.1f}M {r['gpus']:>5} {r['zero']:>4} {r['states_gib']:>10.2f} "
            f"{r['act_mib_per_img']:>11.1f} {r['max_batch']:>9} {r['max_batch_ckpt']:>8}"
        )
