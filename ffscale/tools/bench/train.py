"""`ffscale bench train`: ffscale's DeepSpeed step against a plain PyTorch loop, per ZeRO stage.

Each ZeRO stage runs in its own job (`--nproc` ranks; one process when 1; ffscale/tools/bench/train_job.py),
so no engine's leftovers bias the next. This module starts the jobs and shows their results, without torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

JOB_PY = Path(__file__).with_name("train_job.py")  # what each ZeRO stage's job runs
MARK = "FFSCALE_BENCH "  # the line of its rank 0 that holds the result


def _child_args(args, zero: int) -> list[str]:
    """The arguments of one ZeRO stage's job (train_job.child_parser)."""
    out = [
        "--zero",
        str(zero),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--rounds",
        str(args.rounds),
    ]
    for c in args.config:
        out += ["--config", c]
    return out + list(args.overrides)


def run(opts) -> dict:
    """Parent: one job per ZeRO stage, results collected from rank 0's marked line."""
    rows = []
    for zero in [int(z) for z in str(opts.zero).split(",")]:
        args = _child_args(opts, zero)
        if opts.nproc > 1:  # the launcher `ffscale train` uses
            from ffscale.run.launch import launcher_cmd
            from ffscale.util.ports import free_port

            cmd = launcher_cmd(JOB_PY, args, opts.nproc, master_port=free_port())
        else:
            cmd = [sys.executable, str(JOB_PY), *args]
        from ffscale.util.hostenv import rank_env

        env = {**rank_env(), "PYTHONWARNINGS": "ignore"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [ln[len(MARK) :] for ln in p.stdout.splitlines() if ln.startswith(MARK)]
        if p.returncode or not found:
            raise RuntimeError(f"bench job for ZeRO-{zero} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        rows.append(json.loads(found[-1]))
    return {"runs": rows}


def table(res: dict) -> list[list]:
    """Header and a row per ZeRO stage: plain and ffscale seconds per step, their ratio, img/s, MFU,
    model-state MiB per rank by kind (and against ZeRO-0's), host syncs per step (GPU only)."""
    rows: list[list] = [["ZeRO", "plain s/step", "ffscale s/step", "ratio", "img/s", "MFU %",
                         "MiB/rank (params / grads / optim / ZeRO buffers)", "syncs"]]  # fmt: skip
    base = None
    for r in res["runs"]:
        m = r["model_states_mib"]
        base = base or (m["total"] if r["zero"] == 0 else None)
        parts = " / ".join(f"{m[k]:.0f}" for k in ("params", "grads", "optimizer", "zero_buffers"))
        against = f", {m['total'] / base:.2f}x ZeRO-0" if base and r["zero"] else ""
        mfu = "-" if r["mfu_pct"] is None else f"{r['mfu_pct']:.1f}"
        syncs = "-" if r["host_syncs_per_step"] is None else r["host_syncs_per_step"]
        rows.append([r["zero"], f"{r['plain_step_s']:.3f}", f"{r['ffscale_step_s']:.3f}", f"{r['ratio']:.2f}x",
                     f"{r['img_per_s']:.1f}", mfu, f"{m['total']:.0f} ({parts}){against}", syncs])  # fmt: skip
    return rows


def caption(res: dict) -> str:
    r0 = res["runs"][0]
    return (
        f"{r0['model']} {r0['img_size']}px, micro-batch {r0['micro_batch']}, {r0['ranks']} rank(s), "
        f"{r0['precision']} on {r0['device']}, {r0['gflops_per_img']:.2f} GFLOP/img (fwd+bwd), "
        f"peak {r0['peak_tflops']:.2f} TFLOP/s per device"
    )


def print_table(res: dict) -> None:
    print(caption(res))
    head, *rows = table(res)
    widths = [max(len(str(row[i])) for row in (head, *rows)) for i in range(len(head))]
    for row in (head, *rows):
        print("  ".join(f"{str(c):>{w}}" for c, w in zip(row, widths, strict=True)))
