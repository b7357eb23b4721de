"""`ffscale bench index`: what opening a split's binary sample index costs a rank at start: seconds, and
the Private_Dirty memory it adds (/proc/self/smaps_rollup), each run in a fresh process.

The split is synthetic, ImageNet train's shape by default (1,281,167 samples in shards of 1,250): the
index is written as `ffscale shard` writes it, beside a manifest naming empty placeholder shards (the
tars are never read when an index is opened). The file was just written, so its pages are in the page
cache, as they are for every rank of a node but the first. `--compare` also times building the same
table in memory from DALI-style `.idx` text files, what a split without the index costs every rank.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEMBER = 110_000  # bytes of an image member (ImageNet's mean JPEG is about 110 kB)


def _private_dirty_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup")


def _table(counts: list[int]) -> np.ndarray:
    from ffscale.data.sampleindex import DTYPE

    t = np.zeros(sum(counts), dtype=DTYPE)
    t["shard"] = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    j = np.concatenate([np.arange(c) for c in counts])  # position in its shard
    step = 512 + MEMBER + 512 + 512  # header, image, header, label padded to a block
    t["img"][:, 0], t["img"][:, 1] = j * step + 512, MEMBER
    t["lab"][:, 0], t["lab"][:, 1] = j * step + 512 + MEMBER + 512, 3
    return t


def make_split(root: Path, samples: int, shard_size: int, idx: bool) -> None:
    """A manifest, empty placeholder shards and the index (and, with `idx`, DALI-style `.idx` files)."""
    from ffscale.data.manifest import Manifest, ShardInfo, sha256_file
    from ffscale.data.sampleindex import INDEX
    from ffscale.util.atomic import atomic_path

    counts = [min(shard_size, samples - s) for s in range(0, samples, shard_size)]
    shards = [ShardInfo(f"train-{k:06d}.tar", c, "0" * 64) for k, c in enumerate(counts)]
    for s in shards:
        (root / s.file).touch()
    table = _table(counts)
    # written and flushed as `ffscale shard` writes it: pages of a file not yet written back are dirty
    # page cache, which smaps counts as Private_Dirty of the one process mapping them
    with atomic_path(root / INDEX) as tmp, open(tmp, "wb") as f:
        np.save(f, table, allow_pickle=False)
    m = Manifest(
        "train", [str(k) for k in range(1000)], shards, "synthetic", index_sha256=sha256_file(root / INDEX)
    )
    m.save(root)
    if idx:
        start = 0
        for k, c in enumerate(counts):
            rows = table[start : start + c]
            lines = [f"v1.2 {c}"] + [
                f"jpg {i[0]} {i[1]} n01440764_{start + n:08d}.jpg cls {y[0]} {y[1]} n01440764_{start + n:08d}.cls"
                for n, (i, y) in enumerate(zip(rows["img"].tolist(), rows["lab"].tolist()))
            ]
            (root / f"train-{k:06d}.idx").write_text("\n".join(lines) + "\n")
            start += c


def probe(root: str, parse: bool) -> dict:
    """One rank's start, in this fresh process: the manifest checked, then the index opened."""
    from ffscale.data import sampleindex
    from ffscale.data.manifest import load_manifest
    from ffscale.data.tarindex import TarIndex

    t0 = time.perf_counter()
    m, files = load_manifest(root)
    t1 = time.perf_counter()
    before = _private_dirty_kb()
    t2 = time.perf_counter()
    if parse:  # the fallback: what a split without the index costs
        counts = [s.count for s in m.shards]
        idx = [m.index_file(Path(root), s) for s in m.shards]
        index = TarIndex(files, counts, m.members, sampleindex.parse(files, idx, counts, m.members))
    else:  # TarIndex.of_split's way, without its fallback
        table, why = sampleindex.open_table(Path(root), m)
        if table is None:
            sys.exit(f"not opened: {why}")
        index = TarIndex(files, [s.count for s in m.shards], m.members, table)
    t3 = time.perf_counter()
    after = _private_dirty_kb()
    assert len(index) == m.num_samples
    return {"manifest_s": t1 - t0, "open_s": t3 - t2, "private_dirty_mb": (after - before) / 1024}


def _fresh(root: Path, parse: bool) -> dict:
    cmd = [sys.executable, "-m", "ffscale.tools.bench.index", str(root)] + (["--parse"] if parse else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"bench index probe failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def bench_index(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        root = Path(d)
        make_split(root, args.samples, args.shard_size, args.compare)
        size = (root / "sample-index.npy").stat().st_size
        runs = [_fresh(root, False) for _ in range(args.runs)]
        parsed = _fresh(root, True) if args.compare else None
    res = {
        "samples": args.samples,
        "shards": -(-args.samples // args.shard_size),
        "index_mb": size / 1e6,
        "runs": args.runs,
    }
    for k in ("open_s", "private_dirty_mb", "manifest_s"):
        v = [r[k] for r in runs]
        res[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    if parsed:
        res["parsed_in_memory"] = parsed
    return res


def print_index(res: dict) -> None:
    print(
        f"binary sample index of {res['samples']:,} samples in {res['shards']:,} shards ({res['index_mb']:.1f} MB), "
        f"opened in {res['runs']} fresh processes (page cache warm): median, min, max"
    )
    print("| what | seconds | Private_Dirty added |")
    print("|---|---:|---:|")
    o, p, mf = res["open_s"], res["private_dirty_mb"], res["manifest_s"]
    print(
        f"| index opened (sha256 checked, mapped) | {o['median']:.3f} ({o['min']:.3f}-{o['max']:.3f}) | "
        f"{p['median']:.2f} MB ({p['min']:.2f}-{p['max']:.2f}) |"
    )
    print(f"| manifest loaded (shards' sizes checked), before it | {mf['median']:.3f} | |")
    if "parsed_in_memory" in res:
        q = res["parsed_in_memory"]
        print(
            f"| without it: built from `.idx` text files | {q['open_s']:.3f} | {q['private_dirty_mb']:.2f} MB |"
        )


if __name__ == "__main__":  # one rank's start, in the process `_fresh` starts
    print(json.dumps(probe(sys.argv[1], "--parse" in sys.argv[2:])))
