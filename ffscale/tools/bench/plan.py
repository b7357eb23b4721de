"""`ffscale bench plan`: what each rank reads per epoch at several world sizes (samples, steps,
distinct images, bytes), from the SamplePlan itself: of a shard directory (its member sizes
measured from its index), or of ImageNet's shapes at a stated mean sample size."""

from __future__ import annotations

import numpy as np

from ffscale.data.plan import SamplePlan


def measure(args) -> dict:
    if args.shards:
        from ffscale.data.loader import open_index

        index, manifest = open_index(args.shards)
        sizes = np.array([index.sample_bytes(i) for i in range(len(index))], dtype=np.int64)
        n, mean, source = len(index), float(sizes.mean()), f"{args.shards} (member sizes from its index)"
    else:
        n, mean = args.samples, float(args.bytes_per_sample)
        source = f"{n:,} samples at {mean:,.0f} bytes each (--bytes-per-sample, with the 2 tar headers)"
    rows = []
    for world in [int(w) for w in args.world.split(",")]:
        plans = [SamplePlan(n, r, world, 0, args.repeats) for r in range(world)]
        order = plans[0].positions(0)
        taken = np.concatenate([p.train_indices(0, order) for p in plans])
        per_rank = plans[0].per_rank
        rows.append(
            {
                "world": world,
                "samples_per_rank": per_rank,
                "steps": per_rank // args.batch,
                "distinct_images": int(len(np.unique(taken))),
                "bytes_per_rank": int(sizes[taken[:per_rank]].sum()) if args.shards else int(per_rank * mean),
                "val_per_rank_max": -(-args.val // world),
            }
        )
    return {"source": source, "samples": n, "repeats": args.repeats, "batch": args.batch, "rows": rows}


def print_plan(res: dict) -> None:
    print(f"sample plan of {res['source']}; repeats {res['repeats']}, micro-batch {res['batch']}")
    print(
        "| ranks | samples / rank / epoch | steps | distinct images / epoch | read / rank / epoch | val / rank |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        gb = r["bytes_per_rank"] / 1e9
        print(
            f"| {r['world']:,} | {r['samples_per_rank']:,} | {r['steps']:,} | {r['distinct_images']:,} | "
            f"{gb:,.2f} GB | {r['val_per_rank_max']:,} |"
        )
