"""`ffscale bench startup-scale`: the data set-up of N ranks started at once on this host, N = 1, 8, 32
by default, per rank: seconds, memory and file opens, and what that extrapolates to at 4,096 ranks.

Each rank is a fresh process given its rank of a world of N (no DeepSpeed, no torch.distributed:
the data set-up talks to no other rank). After its imports it waits until every rank is ready, then:

1. `plan`: the sample plan of ImageNet train's size (1,281,167 samples, DeiT's 3 repeats), its epoch-0
   list of this rank's samples (`SamplePlan.train_indices`);
2. `index`: a split of that size opened as training opens it (`load_manifest`, `TarIndex.of_split`:
   the binary index's sha256 checked and the file memory-mapped), synthetic as `ffscale bench index`
   writes it (placeholder tars, never read);
3. `first_batch`: `build_loader` (webdataset, decode in the rank process: no worker processes to hide
   opens in) on a small real split of JPEG shards (Fashion-MNIST test pictures), for this rank of N,
   and its first batch of epoch 0.

Per rank: wall seconds of each part, the process's CPU seconds for all three, the Private_Dirty the
set-up added (its imports' own apart), the process's Private_Dirty and RSS at the end
(/proc/self/smaps_rollup), the Private_Dirty added by opening the index, and the files it
opened under either split (Python's audit hook on `open`, which `open()`, `os.open` and numpy's
mapping all raise), by kind: manifest, index, shards (tars and DALI `.idx`).

On this host N ranks share its few cores, so wall seconds grow with N / cores; CPU seconds, memory and
opens per rank are what a rank with a core of its own pays. The extrapolation to 4,096 ranks (8 per
node) assumes what the table shows: none of the three grows with N (every rank plans from the same
seed, maps the same index, reads only its own first samples), and the index's pages are read once per
node into the page cache and shared by its ranks (mapped, not copied: Private_Dirty stays small). The
memory the set-up adds shrinks with N: it holds the rank's epoch list, samples x repeats / N entries.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "FFSCALE_STARTUP_SCALE "
RANKS_AT_SCALE, PER_NODE = 4096, 8
REPEATS = 3  # DeiT's repeated augmentation (data.repeats)


def _memory_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Private_Dirty"):
            out[key] = int(rest.split()[0])
    return out


def rank(big: str, small: str, rank: int, world: int, batch: int) -> dict:
    """One rank's data set-up, in this fresh process (started by `_start_ranks`)."""
    import os

    import torch

    from ffscale.data.loader import build_loader
    from ffscale.data.manifest import load_manifest
    from ffscale.data.plan import SamplePlan
    from ffscale.data.tarindex import TarIndex
    from ffscale.tools.bench.data import bench_cfg

    torch.set_num_threads(1)  # a rank's host threads; here N ranks share the host's cores
    roots = {Path(big).resolve(), Path(small).resolve()}
    opens: dict[str, int] = {"manifest": 0, "index": 0, "shards": 0}

    def audit(event: str, args: tuple) -> None:
        # "open" is raised by open(), io.open and os.open (path, mode, flags); paths may be fds or bytes
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        p = Path(os.fsdecode(args[0])).resolve()
        if p.parent in roots:
            kind = "manifest" if p.name == "manifest.json" else "index" if p.suffix == ".npy" else "shards"
            opens[kind] += 1

    sys.addaudithook(audit)
    print("ready", flush=True)
    sys.stdin.readline()  # every rank starts its set-up at once
    start = _memory_kb()["Private_Dirty"]  # the imports' own (torch's mostly) is not the data set-up's
    c0, t0 = time.process_time(), time.perf_counter()
    m, _ = load_manifest(big)
    plan = SamplePlan(m.num_samples, rank, world, 0, REPEATS, big)
    mine = plan.train_indices(0)
    t1 = time.perf_counter()
    before = _memory_kb()["Private_Dirty"]
    m, files = load_manifest(big)
    index = TarIndex.of_split(big, m, files)
    t2 = time.perf_counter()
    index_kb = _memory_kb()["Private_Dirty"] - before
    cfg = bench_cfg("webdataset", 32, 0, (0.08, 1.0), rand_augment=True)
    loader, _ = build_loader(cfg, small, True, rank, world, batch, 0, None, torch.device("cpu"))
    x, _ = next(iter(loader.epoch(0)))
    t3 = time.perf_counter()
    cpu = time.process_time() - c0
    mem = _memory_kb()
    assert len(index) == m.num_samples and len(mine) == plan.per_rank and len(x) == batch
    return {
        "plan_s": t1 - t0,
        "index_s": t2 - t1,
        "first_batch_s": t3 - t2,
        "total_s": t3 - t0,
        "cpu_s": cpu,
        "private_dirty_mb": mem["Private_Dirty"] / 1024,
        "setup_private_dirty_mb": (mem["Private_Dirty"] - start) / 1024,
        "rss_mb": mem["Rss"] / 1024,
        "index_private_dirty_mb": index_kb / 1024,
        "opens": opens,
    }


def _start_ranks(big: Path, small: Path, world: int, batch: int) -> tuple[list[dict], float]:
    """`world` rank processes; once all are ready (imports done) they start together. Their results
    and the wall seconds from the start to the last rank's end."""
    cmd = [sys.executable, "-m", __name__, str(big), str(small), "{rank}", str(world), str(batch)]
    procs = [
        subprocess.Popen(
            [c.format(rank=r) for c in cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for r in range(world)
    ]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("bench startup-scale: a rank did not start (see its stderr above)")
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    res = []
    for r, (p, text) in enumerate(zip(procs, out)):
        found = [ln[len(MARK) :] for ln in text.splitlines() if ln.startswith(MARK)]
        if p.returncode or not found:
            raise RuntimeError(
                f"bench startup-scale: rank {r} of {world} exited {p.returncode}:\n{text[-2000:]}"
            )
        res.append(json.loads(found[-1]))
    return res, wall


def small_split(out: Path, images: int, shard_size: int) -> Path:
    """Real JPEG shards (Fashion-MNIST test pictures at 28 px), written as `ffscale shard` writes them."""
    from ffscale.data.ingest import sources
    from ffscale.data.ingest.writer import write_shards

    write_shards(sources.fashion_mnist("val"), out, "val", shard_size, limit=images)
    return out


def run(args) -> dict:
    from ffscale.tools.bench.index import make_split

    ranks = [int(n) for n in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="ffscale-startup-scale-") as d:
        big, small = Path(d) / "big", Path(d) / "small"
        big.mkdir()
        make_split(big, args.samples, args.shard_size, False)
        small_split(small, args.images, args.small_shard_size)
        index_mb = (big / "sample-index.npy").stat().st_size / 1e6
        rows = {}
        for n in ranks:
            per_rank, wall = _start_ranks(big, small, n, args.batch)
            rows[str(n)] = _summary(per_rank, wall)
    one, most = rows[str(ranks[0])], ranks[-1]
    return {
        "samples": args.samples,
        "shards": -(-args.samples // args.shard_size),
        "index_mb": index_mb,
        "first_batch": {"images": args.images, "shard_size": args.small_shard_size, "batch": args.batch},
        "ranks": rows,
        "at_scale": extrapolate(
            one, rows[str(most)], most, args.samples, index_mb, -(-args.samples // args.shard_size)
        ),
    }


def _summary(per_rank: list[dict], wall: float) -> dict:
    out: dict = {"wall_s": wall}
    for k in ("plan_s", "index_s", "first_batch_s", "total_s", "cpu_s", "private_dirty_mb", "rss_mb",
              "setup_private_dirty_mb", "index_private_dirty_mb"):  # fmt: skip
        v = [r[k] for r in per_rank]
        out[k] = {"median": statistics.median(v), "max": max(v)}
    out["opens"] = {k: max(r["opens"][k] for r in per_rank) for k in per_rank[0]["opens"]}
    return out


def extrapolate(one: dict, most: dict, n_most: int, samples: int, index_mb: float, shards: int) -> dict:
    """4,096 ranks, 8 a node, each with a core: CPU seconds and opens per rank as measured with the
    fewest ranks (they do not grow with N); the set-up's memory is a fixed part plus the rank's epoch
    list, 8 bytes for each of its samples x repeats / N (`SamplePlan.train_indices`), the fixed part
    taken from the most ranks measured; node and job totals from them."""
    nodes = RANKS_AT_SCALE // PER_NODE
    opens = sum(one["opens"].values())
    epoch_list_mb = lambda n: 8 * samples * REPEATS / n / 2**20  # noqa: E731
    fixed_mb = most["setup_private_dirty_mb"]["median"] - epoch_list_mb(n_most)
    return {
        "ranks": RANKS_AT_SCALE,
        "per_node": PER_NODE,
        "formula": "per rank: t = cpu_s(N=1), opens = opens(N=1) (neither grows with N), set-up memory = "
        "fixed_mb + 8 B x samples x repeats / N (the rank's epoch list; fixed_mb from the most ranks "
        "measured); per node: index read once into the page cache (index_mb) and shared, "
        "the data set-up's private memory = per_node x setup_private_dirty_mb; job: opens = ranks x opens, "
        "index bytes from shared storage = nodes x index_mb",
        "rank_setup_s": one["cpu_s"]["median"],
        "fixed_mb": fixed_mb,
        "rank_setup_private_mb": fixed_mb + epoch_list_mb(RANKS_AT_SCALE),
        "node_setup_private_mb": PER_NODE * (fixed_mb + epoch_list_mb(RANKS_AT_SCALE)),
        "job_opens": RANKS_AT_SCALE * opens,
        "job_index_read_gb": nodes * index_mb / 1e3,
        "job_index_read_gb_without_page_cache_sharing": RANKS_AT_SCALE * index_mb / 1e3,
        "shards_in_split": shards,
    }


def table(res: dict) -> list[list]:
    """Rows per N: the median rank's seconds by part (the slowest rank's total), CPU, memory, opens."""
    rows: list[list] = [
        ["ranks", "plan s", "index s", "first batch s", "total s (slowest)", "CPU s", "set-up's Private_Dirty MB",
         "process's Private_Dirty MB", "RSS MB", "index's Private_Dirty MB", "opens: manifest, index, shards"],
    ]  # fmt: skip
    for n, r in res["ranks"].items():
        med = lambda k, r=r: f"{r[k]['median']:.2f}"  # noqa: E731
        o = r["opens"]
        rows.append([n, med("plan_s"), med("index_s"), med("first_batch_s"),
                     f"{r['total_s']['median']:.2f} ({r['total_s']['max']:.2f})", med("cpu_s"),
                     f"{r['setup_private_dirty_mb']['median']:.1f}", f"{r['private_dirty_mb']['median']:.1f}",
                     f"{r['rss_mb']['median']:.1f}",
                     f"{r['index_private_dirty_mb']['median']:.2f}",
                     f"{o['manifest']}, {o['index']}, {o['shards']}"])  # fmt: skip
    s = res["at_scale"]
    rows.append([f"{s['ranks']:,} (extrapolated, {s['per_node']} a node)", "", "", "",
                 f"{s['rank_setup_s']:.2f} (a core each)", "",
                 f"{s['rank_setup_private_mb']:.1f} ({s['node_setup_private_mb']:.0f} a node)", "", "", "",
                 f"{s['job_opens']:,} in the job; index {s['job_index_read_gb']:.1f} GB read "
                 f"({s['job_index_read_gb_without_page_cache_sharing']:.0f} GB unshared)"])  # fmt: skip
    return rows


def print_table(res: dict) -> None:
    fb = res["first_batch"]
    print(
        f"data set-up per rank: plan and index of {res['samples']:,} samples ({res['shards']:,} shards, index "
        f"{res['index_mb']:.1f} MB); first batch of {fb['batch']} from {fb['images']} real JPEGs; medians"
    )
    for row in table(res):
        print(" | ".join(str(c) for c in row))
    print(f"formula: {res['at_scale']['formula']}")


if __name__ == "__main__":  # one rank, in the process `_start_ranks` starts
    big, small, r, world, batch = sys.argv[1:6]
    print(MARK + json.dumps(rank(big, small, int(r), int(world), int(batch))), flush=True)
