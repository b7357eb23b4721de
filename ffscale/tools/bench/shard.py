"""`ffscale bench shard`: sharding img/s with 1 and N writer processes on the same input.

Input: a class-folder tree of ImageNet-like JPEGs (Fashion-MNIST mosaics at ImageNet's sizes, made
once), or `--root` of your own. Rounds alternate 1 and N workers, each writing a fresh output; the
best round per setting is reported with the spread, and the digests of all rounds must agree.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def bench_input(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    from ffscale.data.ingest.sources import fashion_mnist_arrays
    from ffscale.tools.bench.data import imagenet_like_size, mosaic_jpeg

    done = root / f".complete-{n}-{classes}-{seed}"
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    pictures, _ = fashion_mnist_arrays("val")
    rng = random.Random(seed)
    for i in range(n):
        d = root / f"class{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.JPEG").write_bytes(mosaic_jpeg(pictures, random.Random(seed * 1_000_003 + i),
                                                      imagenet_like_size(rng)))  # fmt: skip
    done.touch()
    return root


def bench_shard(args) -> dict:
    from ffscale.data.ingest.sources import image_folder
    from ffscale.data.ingest.writer import write_shards

    root = Path(args.root) if args.root else bench_input(Path(args.input), args.images)
    src = image_folder(root)
    settings = sorted({1, args.workers})
    times: dict[int, list[float]] = {w: [] for w in settings}
    digests = set()
    for _ in range(args.rounds):
        for w in settings:
            out = Path(tempfile.mkdtemp(prefix="ffscale-bench-shard-", dir=args.tmp))
            try:
                t = time.perf_counter()
                m = write_shards(src, out, "bench", args.shard_size, workers=w, max_side=args.max_side)
                times[w].append(time.perf_counter() - t)
                digests.add(m.digest)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    n = len(src.items)
    rows = [{"workers": w, "img_per_s": n / min(ts), "spread_pct": 100 * (max(ts) - min(ts)) / min(ts),
             "seconds": statistics.median(ts)} for w, ts in times.items()]  # fmt: skip
    base = rows[0]["img_per_s"]
    for r in rows:
        r["ratio"] = r["img_per_s"] / base
    return {"images": n, "input": str(root), "max_side": args.max_side, "same_digest": len(digests) == 1,
            "digest": sorted(digests)[0], "rows": rows}  # fmt: skip


def group(res: dict) -> str:
    """Records of one kind of run (bytes kept, or every image re-encoded), each shown with its newest."""
    return f"max_side={res['max_side']}"


def table(res: dict) -> list[list]:
    what = f"resized to at most {res['max_side']} px" if res["max_side"] else "bytes kept"
    rows: list[list] = [["images", "writers", "img/s", "spread of rounds", "vs 1 writer", "same shards"]]
    for r in res["rows"]:
        rows.append([f"{res['images']:,}, {what}", r["workers"], f"{r['img_per_s']:,.0f}", f"{r['spread_pct']:.1f}%",
                     f"{r['ratio']:.2f}x", "yes" if res["same_digest"] else "NO"])  # fmt: skip
    return rows


def print_shard(res: dict) -> None:
    print(f"sharding {res['images']} images from {res['input']} (max side {res['max_side'] or 'kept'})")
    for row in table(res):
        print(" | ".join(str(c) for c in row))
    print(f"digest {res['digest']}")
