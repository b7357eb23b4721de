"""`ffscale doctor`: prove a node can run a job, and measure it, before the job runs.

One table of checks (name, figure, pass/fail), the same as JSON with `--json`, and a non-zero exit
when a check fails that would break the job. On a CPU host it runs the CPU subset (gloo instead of
NCCL, DALI's CPU pipeline). Run it on its own, or as the first step of a Job or Slurm script.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ffscale import config


@dataclass
class Check:
    name: str
    figure: str
    ok: bool = True
    fatal: bool = True  # a failure that would break the job (else a warning)


def run(args) -> int:
    from ffscale.engine.dist import prepare_env

    cfg = config.load(args.config, args.overrides)
    prepare_env()  # this process alone; on a CPU host DeepSpeed skips its accelerator probe
    stage = config.stages(cfg)[0]
    checks: list[Check] = []
    for section in (versions, devices, data, run_dir, tracking, burst):
        t0 = time.perf_counter()
        try:
            checks += section(cfg, stage, args)
        except Exception as e:  # a check that crashes is a failed check, named
            checks.append(Check(section.__name__, f"{type(e).__name__}: {str(e)[:200]}", ok=False))
        if args.verbose:
            print(f"  ({section.__name__}: {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    print_table(checks)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in checks], indent=1))
    return 1 if any(not c.ok and c.fatal for c in checks) else 0


def versions(cfg, stage, args) -> list[Check]:
    from ffscale.engine.dist import deepspeed_version

    out = [
        Check("python", platform.python_version()),
        Check("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        Check("deepspeed", deepspeed_version()),
    ]
    if torch.cuda.is_available():
        out.append(Check("nccl", ".".join(map(str, torch.cuda.nccl.version()))))
        out.append(Check("driver", _driver_version()))
    from ffscale.data.dali import available, probe, version

    if not available():
        out.append(Check("dali", "not installed (the webdataset loader serves)", ok=False, fatal=False))
    else:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        reason = probe(dev)
        where = "mixed decode on cuda:0" if dev.type == "cuda" else "CPU pipeline"
        figure = f"{version()}, {where}: " + ("runs" if reason is None else f"fails: {reason}")
        out.append(Check("dali", figure, ok=reason is None, fatal=stage.cfg.data.loader == "dali"))
    return out


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "unknown (no nvidia-smi)"
    r = subprocess.run(
        [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"


def devices(cfg, stage, args) -> list[Check]:
    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        out = [Check("devices", f"no GPU: CPU ranks over gloo, {cores} cores")]
    else:
        n = torch.cuda.device_count()
        p = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.is_bf16_supported()
        out = [
            Check("gpus", f"{n} x {p.name}, {p.total_memory / 2**30:.0f} GiB"),
            Check(
                "bf16",
                "supported" if bf16 else "not supported: fp32",
                ok=bf16 or stage.cfg.deepspeed.precision != "bf16",
            ),
        ]
    nproc = local_ranks(args)
    out.append(allreduce(nproc, args))
    return out


def local_ranks(args) -> int:
    """The ranks a node of this job runs: --nproc, else one per GPU (two on a CPU host)."""
    return args.nproc or max(torch.cuda.device_count(), 2 if not torch.cuda.is_available() else 1)


def allreduce(nproc: int, args) -> Check:
    """All-reduce bus bandwidth over this node's ranks (NCCL on GPUs, gloo on CPUs), or over every
    node's when doctor runs on each node with --nnodes/--node-rank/--master-addr (as ffscale train)."""
    if nproc * args.nnodes < 2:
        return Check("all-reduce", "one rank: nothing to reduce", fatal=False)
    from ffscale.tools import allreduce as allreduce_job
    from ffscale.util.hostenv import rank_env
    from ffscale.util.ports import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={args.nnodes}",
           f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}",
           f"--master-port={args.master_port or free_port()}", "-m", allreduce_job.__name__]  # fmt: skip
    env = {**rank_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("busbw_gbps ")]
    if r.returncode == 0 and not lines:  # another node's rank 0 measured it
        return Check(
            "all-reduce", f"joined the all-reduce of {args.nnodes} nodes; node 0 reports its bandwidth"
        )
    if r.returncode or not lines:
        return Check("all-reduce", f"failed over {nproc} ranks: {(r.stderr or r.stdout)[-300:]}", ok=False)
    gbps = float(lines[-1].split()[1])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    where = f"{args.nnodes} nodes x {nproc}" if args.nnodes > 1 else f"{nproc}"
    return Check("all-reduce", f"{gbps:.2f} GB/s bus bandwidth, {where} ranks, {backend}, 64 MiB fp32")


def data(cfg, stage, args) -> list[Check]:
    from ffscale.data.manifest import load_manifest
    from ffscale.data.remote import is_remote
    from ffscale.util.secrets import redact

    s, out = stage.cfg, []
    roots = {"train": s.data.train, "val": s.data.val}
    manifests = {}
    for split, root in roots.items():
        try:
            m, files = load_manifest(root)
        except Exception as e:
            out.append(Check(f"data.{split}", str(e), ok=False))
            continue
        manifests[split] = (m, files)
        remote = is_remote(root)  # shards under a URL: their sizes as the manifest (and the listing) say
        size = sum(sh.size for sh in m.shards) if remote else sum(f.stat().st_size for f in files)
        root = redact(root)
        out.append(Check(f"data.{split}", f"{root}: {m.num_samples} samples, {m.num_classes} classes, "
                                          f"{len(files)} shards, {size / 2**30:.2f} GiB"))  # fmt: skip
    if len(manifests) == 2 and manifests["train"][0].classes != manifests["val"][0].classes:
        out.append(Check("data.classes", "train and val have other classes", ok=False))
    out.append(shm_check(s, manifests, local_ranks(args)))
    if "train" in manifests:
        m, files = manifests["train"]
        out.append(read_speed(files, sizes=[sh.size for sh in m.shards]))
        out.append(decode_speed(s.data.train, s.data.img_size))
    return out


def read_speed(files: list, seconds: float = 3.0, sizes: list[int] | None = None) -> Check:
    """Sequential read of the training shards (what a loader streams, or a staging copies), MB/s."""
    from ffscale.data import remote
    from ffscale.errors import DataError

    n, t0 = 0, time.perf_counter()
    if remote.is_remote(files[0]):  # 16 MiB ranges, as staging copies (ffscale/data/stage.py)
        chunk_size = 16 << 20
        try:
            for f, size in zip(files, sizes or [0] * len(files)):
                off = 0
                while time.perf_counter() - t0 < seconds:
                    got = len(remote.read_range(f, off, off + chunk_size))
                    n, off = n + got, off + got
                    if got < chunk_size or off == size:  # the object's end
                        break
                if time.perf_counter() - t0 >= seconds:
                    break
        except DataError as e:
            return Check("data.read", str(e), ok=False)
        dt = time.perf_counter() - t0
        where = remote.masked(files[0].rsplit("/", 1)[0])
        return Check(
            "data.read", f"{n / dt / 1e6:,.0f} MB/s from {where} ({n / 1e6:,.0f} MB read, one stream)"
        )
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                n += len(chunk)
                if time.perf_counter() - t0 > seconds:
                    break
        if time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return Check(
        "data.read",
        f"{n / dt / 1e6:,.0f} MB/s from {files[0].parent} ({n / 1e6:,.0f} MB read; cached pages read fast)",
    )


def decode_speed(root: str, img_size: int) -> Check:
    from ffscale.data.dali import available
    from ffscale.tools.bench.data import measure

    kind = "dali" if available() else "webdataset"
    # one batch per DALI iteration: a quick figure that small shard sets can give too
    r = measure(
        kind, root, img_size, 64, 2, 2, (0.08, 1.0), max_batches=30, rand_augment=False, dali_batch=64
    )
    return Check(
        "data.decode", f"{r['img_per_s']:,.0f} img/s, {kind} on {r['device']}, {img_size} px, 2 workers"
    )


def run_dir(cfg, stage, args) -> list[Check]:
    root = Path(cfg.run.dir)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        out.append(Check("run.dir", f"{root.resolve()} writable"))
    except OSError as e:
        out.append(Check("run.dir", f"{root.resolve()} not writable: {e}", ok=False))
        return out
    need = checkpoint_bytes(stage.cfg) * (stage.cfg.checkpoint.keep + 1)
    free = shutil.disk_usage(root).free
    out.append(Check("run.disk", f"{free / 2**30:,.1f} GiB free, {need / 2**30:,.2f} GiB for {stage.cfg.checkpoint.keep + 1} "
                                 "checkpoints", ok=free > need))  # fmt: skip
    return out


def shm_check(stage_cfg, manifests: dict, local_ranks: int, shm: int | None = None) -> Check:
    """/dev/shm against what NCCL wants (1 GiB) and what DALI's feed holds there: per rank and loader
    (training's, evaluation's), `slots` iterations of encoded images at the split's mean size
    (ffscale/data/feed.py; docs/data.md, "DALI iterations"). `shm`: its size (None: the host's)."""
    from ffscale.data.dali import DaliLoader

    slots = DaliLoader.SLOTS
    images = max(stage_cfg.data.dali_batch, stage_cfg.optim.micro_batch or 0)
    feed = sum(
        slots * images * sum(sh.size for sh in m.shards) / max(m.num_samples, 1)
        for m, _ in manifests.values()
    )
    need = 2**30 + local_ranks * feed
    if shm is None:
        shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else 0
    return Check(
        "/dev/shm",
        f"{shm / 2**30:,.1f} GiB; NCCL wants 1 GiB and DALI's feed about {local_ranks * feed / 2**30:,.1f} GiB "
        f"for {local_ranks} ranks at {images} images per iteration",
        ok=shm > need,
        fatal=False,
    )


def checkpoint_bytes(stage_cfg) -> int:
    """What one checkpoint holds over all ranks: the module's weights (4 bytes fp32, 2 bf16/fp16),
    fp32 masters beside bf16/fp16 weights (4), Adam's two moments (8)."""
    from ffscale.engine.ds_config import resolve_precision
    from ffscale.inference.build import build_model

    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(stage_cfg, stage_cfg.model.num_classes or 1000).parameters())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return n * (12 if resolve_precision(stage_cfg.deepspeed.precision, device) == "fp32" else 14)


def tracking(cfg, stage, args) -> list[Check]:
    """The tracking URI as the job will use it: reachable, authenticated, its artifact store
    writable; SQLite on a network filesystem refused (several jobs stall on its locks)."""
    if not cfg.tracking.enabled:
        return [Check("mlflow", "tracking off (tracking.enabled=false)")]
    from ffscale.tracking.probe import probe
    from ffscale.tracking.store import tracking_uri

    uri = tracking_uri(cfg, Path(cfg.run.dir) / cfg.run.name)
    return [Check(f.name, f.figure, f.ok, f.fatal) for f in probe(uri, cfg.tracking.experiment)]


def burst(cfg, stage, args) -> list[Check]:
    """A few steps of the configured model on the real engine (ffscale bench train)."""
    if args.no_burst:
        return []
    from argparse import Namespace

    from ffscale.tools.bench import train as bench_train

    nproc = args.nproc or max(torch.cuda.device_count(), 1)
    overrides = list(args.overrides)
    ns = Namespace(config=args.config, overrides=overrides, nproc=nproc, zero=str(stage.cfg.deepspeed.zero_stage),
                   steps=args.burst_steps, warmup=1, rounds=1)  # fmt: skip
    r = bench_train.run(ns)["runs"][0]
    mfu = f", MFU {r['mfu_pct']:.1f}%" if r.get("mfu_pct") else ""
    return [Check("train burst", f"{r['model']} {r['img_size']} px, ZeRO-{r['zero']} {r['precision']}, {r['ranks']} rank(s): "
                                 f"{r['img_per_s']:,.1f} img/s{mfu}; loss {r['loss_first_last'][0]:.3f} -> "
                                 f"{r['loss_first_last'][1]:.3f}")]  # fmt: skip


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
        print(f"{mark}  {c.name:<{width}}  {c.figure}")
    bad = [c.name for c in checks if not c.ok and c.fatal]
    print(f"doctor: {'FAILED: ' + ', '.join(bad) if bad else 'this node can run the job'}")
