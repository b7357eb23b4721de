"""`ffscale bench verify RUN`: what checking a checkpoint costs before a resume (docs/reliability.md):
sizes, the sha256 of every file and each pickle's globals, as `ffscale verify RUN` does it.

The whole check with the files in the page cache (as right after a save, or on a resume that just
read them), best of `--rounds`; the same with the page cache dropped first where this process may
(root: /proc/sys/vm/drop_caches); and the sha256 rate of one core, file by file, which is the cost a
resume splits over its ranks (each hashes every W-th file).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

DROP = Path("/proc/sys/vm/drop_caches")
MAKE = ("ffscale train --nproc 1 model.name=ff_base data.img_size=224 "
        "model.patch_size=16 deepspeed.precision=bf16 optim.global_batch=4 schedule.stop_at_step=1 "
        "tracking.enabled=false run.dir={run}")  # fmt: skip


def run(args) -> dict:
    from ffscale.engine.ckpt_files import sha256, verify_tree
    from ffscale.errors import DataError

    root = Path(args.run)
    files = (
        sorted(f for f in root.rglob("*") if f.is_file() and "checkpoints" in f.parts)
        if root.is_dir()
        else []
    )
    if not files:
        raise DataError(f"{root}: no checkpoint to check; one comes from `{MAKE.format(run=root)}`")

    def whole() -> float:
        t0 = time.perf_counter()
        found, failed = verify_tree(root, lambda line: None)
        if not found or failed:
            raise DataError(f"{root}: {failed} of {found} checkpoints fail `ffscale verify`")
        return time.perf_counter() - t0

    whole()  # the page cache holds the files from here on
    warm = min(whole() for _ in range(args.rounds))
    cold = None
    if os.access(DROP, os.W_OK):
        times = []
        for _ in range(args.rounds):
            os.sync()
            DROP.write_text("3\n")
            times.append(whole())
        cold = min(times)
    hashed, seconds = 0, 0.0
    for f in files:
        t0 = time.perf_counter()
        sha256(f)
        seconds += time.perf_counter() - t0
        hashed += f.stat().st_size
    return {"run": str(root), "files": len(files), "mib": round(hashed / 2**20, 1), "warm_s": round(warm, 3),
            "cold_s": None if cold is None else round(cold, 3), "sha256_gb_per_s": round(hashed / seconds / 1e9, 2),
            "rounds": args.rounds}  # fmt: skip


def table(res: dict) -> list[list]:
    cold = "-" if res["cold_s"] is None else f"{res['cold_s']:.2f} s"
    return [["checkpoint", "whole check, page cache warm", "whole check, page cache dropped", "sha256, one core"],
            [f"{res['files']} files, {res['mib']:,.0f} MiB", f"{res['warm_s']:.2f} s", cold,
             f"{res['sha256_gb_per_s']:.2f} GB/s"]]  # fmt: skip


def print_table(res: dict) -> None:
    for k, v in zip(*table(res)):
        print(f"{k:<34} {v}")
