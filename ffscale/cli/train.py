"""`ffscale train`: the whole job checked here, then the node's launcher started and seen through
(ffscale/run/launch.py, ffscale/run/ranks.py): one rank per GPU, or the CPU's share."""

from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub) -> None:
    from ffscale import config

    t = sub.add_parser("train", help="check a config and its data, then launch training under DeepSpeed")
    config.add_args(t, allow_change=True)
    t.add_argument("--nproc", type=int, default=0, help="ranks on this machine (default: GPUs, or 1)")
    t.add_argument("--master-port", type=int, default=29500)
    t.add_argument("--nnodes", type=int, default=1, help="nodes in the job (multi-node without ssh)")
    t.add_argument("--node-rank", type=int, default=0, help="this node's index (0 hosts the master)")
    t.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    t.add_argument(
        "--grace", type=float, default=60,
        help="seconds the ranks get after SIGTERM to write their checkpoint before they are killed",
    )  # fmt: skip
    t.add_argument(
        "--wait-lock", type=float, default=0, metavar="SECONDS",
        help="when another job holds the run directory, wait this long for it to end before exiting 2 "
        "(rendered pods: the grace of the pod they replace)",
    )  # fmt: skip
    t.add_argument(
        "--entry", help="a script run on every rank instead of ffscale/train.py: import your own models "
        "(registry.register) there, then call ffscale.train.main()",
    )  # fmt: skip
    t.set_defaults(fn=run)


def _stop_before_launch(signum, frame):
    from ffscale.errors import Preempted

    raise Preempted(f"signal {signum} before any rank started: nothing to checkpoint")


def run(args) -> int:
    import signal

    # Until the launcher runs (ffscale/run/launch.py then forwards signals to the ranks), a SIGTERM
    # stops the checks or the wait for the run lock at once: exit 143, the lock released.
    signal.signal(signal.SIGTERM, _stop_before_launch)
    signal.signal(signal.SIGINT, _stop_before_launch)
    from ffscale import config

    cfg = config.from_args(args)  # a bad config: its one line before anything else is imported
    from ffscale import train
    from ffscale.run import preflight, runlock
    from ffscale.run.runlock import RunLock
    from ffscale.util.hostenv import rank_env

    nproc = args.nproc or _default_nproc()
    env = rank_env()  # CPU ranks: jemalloc keeping freed pages
    _uri_to_env(args, env)
    # world, data, config changes: one line, exit 2, no rank; what needs torch runs beside the launch
    torch_checks = preflight.check_job_without_torch(cfg, args.nnodes, nproc)
    if any(st.cfg.data.stage_dir for st in config.stages(cfg)):
        from ffscale.data.stage import stage_job
        from ffscale.inference.stagedir import StageDir

        pending = {st.name for st in config.stages(cfg) if not StageDir(st.dir).finished()}
        stage_job(cfg, lambda m: print(m, flush=True), pending)  # this node's copy, before its ranks
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env[preflight.ENV] = "1"
    entry = Path(args.entry).resolve() if args.entry else Path(train.__file__)
    if args.node_rank != 0:
        return _launch_checked(args, entry, nproc, env, torch_checks)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    # one job per run, before any rank; rank 0 creates the MLflow store (ffscale/run/pipeline.py), once
    # the checks passed and before any rank tracks
    with RunLock(run_dir, cfg.run.lock_stale_s, wait_s=args.wait_lock) as lock:
        env[runlock.ENV] = lock.me.token  # the ranks know their launcher holds it
        return _launch_checked(args, entry, nproc, env, torch_checks)


def _launch_checked(args, entry: Path, nproc: int, env: dict, torch_checks) -> int:
    """The launcher, with the preflight's torch checks (if any) running beside it: the ranks wait for
    their verdict before they touch the run; a failed check is its line and exit code, and the
    launcher and its ranks are killed then (nothing of theirs to keep)."""
    from ffscale.run import launch
    from ffscale.run.verdict import ENV, Verdict

    if torch_checks is None:
        return launch.run(args, entry, nproc, env)
    verdict = Verdict(torch_checks)
    env[ENV] = str(verdict.path)
    code = launch.run(args, entry, nproc, env, stop=lambda: verdict.exit_code is not None)
    return verdict.failed() or code


def _uri_to_env(args, env: dict) -> None:
    """A `tracking.uri=` override that carries a credential reaches the ranks as MLFLOW_TRACKING_URI,
    not on their command lines (which the launcher prints and `ps` shows to every user of the node)."""
    from ffscale.util.secrets import has_secret

    for i, o in enumerate(args.overrides):
        key, _, value = o.partition("=")
        if key.strip() == "tracking.uri" and has_secret(value):
            env["MLFLOW_TRACKING_URI"] = value
            args.overrides[i] = "tracking.uri=null"


def _default_nproc() -> int:
    """One rank per visible GPU, else 1. torch counts them, but only where one may be visible: a CPU
    host's job (and its bad config or data) is checked without importing torch."""
    from ffscale.util.hostenv import gpus_may_be_visible

    if not gpus_may_be_visible():
        return 1
    import torch

    return torch.cuda.device_count() or 1
