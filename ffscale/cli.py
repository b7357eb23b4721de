"""`ffscale` command line: shard, train, eval, compare, bench, cluster, models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import bench, shard_cmd


def cmd_verify(a) -> int:
    from .data.manifest import verify

    for root in a.dirs:
        m = verify(root)
        print(
            f"{root}: {len(m.shards)} shards, {m.num_samples} samples, sha256 as in the manifest (digest {m.digest})"
        )
    return 0


def cmd_train(a) -> int:
    """Validate the config and the launch here, then run the DeepSpeed launcher (ffscale/launch.py):
    one rank per GPU, or the CPU's share."""
    from . import changes, config, launch, runlock, tracking
    from .data.check import check_stages
    from .hostenv import rank_env
    from .runlock import RunLock

    a.overrides += config.allow_change_overrides(a.allow_change)
    cfg = config.load(a.config, a.overrides)
    nproc = a.nproc or _default_nproc()
    config.check_launch(cfg, a.nnodes, nproc)  # before NCCL init, not after
    check_stages(cfg, a.nnodes * nproc)  # data of every stage: one line, exit 2, no rank started
    for stage in config.stages(cfg):  # a resumed stage's config changes: allowed, or one line
        changes.check(stage, cfg.run, set(cfg.run.allow_change))
    env = rank_env()  # CPU ranks: jemalloc keeping freed pages
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if a.node_rank != 0:
        return launch.run(a, nproc, env)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    with RunLock(
        run_dir, cfg.run.lock_stale_s, wait_s=a.wait_lock
    ) as lock:  # one job per run, before any rank
        tracking.ensure_store(cfg, run_dir)  # before ranks race to create it
        env[runlock.ENV] = lock.me.token  # the ranks know their launcher holds it
        return launch.run(a, nproc, env)


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 1


def cmd_eval(a) -> int:
    import json

    from .evaluate import evaluate_weights, find_stage

    stage = find_stage(Path(a.run), a.stage)
    res = evaluate_weights(stage, Path(a.weights) if a.weights else None, a.data, a.device)
    print(
        json.dumps(res)
        if a.json
        else f"{stage.name}: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% on {res['samples']} images"
    )
    return 0


def cmd_models(a) -> int:
    from .models import create_model, list_models

    for name in list_models(a.filter or ""):
        m = create_model(name)
        print(f"{name:18s} {sum(p.numel() for p in m.parameters()) / 1e6:8.2f}M params")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ffscale",
        description="Distributed training of feed-forward-only vision transformers (DeepSpeed, DALI, MLflow).",
        epilog="quick start: bash scripts/demo.sh | docs: README.md, cluster/README.md, docs/",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    shard_cmd.add_parser(sub)

    v = sub.add_parser("verify", help="check every shard's sha256 against its manifest")
    v.add_argument("dirs", nargs="+", help="shard directories (holding manifest.json)")
    v.set_defaults(fn=cmd_verify)

    t = sub.add_parser("train", help="validate a config and launch training under DeepSpeed")
    t.add_argument("--config", "-c", action="append", default=[], help="YAML file(s), merged in order")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
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
        "--allow-change", action="append", default=[], metavar="KEY",
        help="resume a stage with a new value for KEY (e.g. optim.base_lr), applied from the resumed step "
        "and recorded; without it a changed config stops the resume with the differences",
    )  # fmt: skip
    t.add_argument(
        "--entry", help="a script run on every rank instead of ffscale/train.py: import your own models "
        "(registry.register) there, then call ffscale.train.main()",
    )  # fmt: skip
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's exported weights without DeepSpeed")
    e.add_argument("--run", required=True, help="run directory (runs/<name>)")
    e.add_argument("--stage", help="stage name (default: the last finished one)")
    e.add_argument("--weights", help="a .safetensors file instead of the stage's")
    e.add_argument("--data", help="shard directory to evaluate on (default: the stage's val)")
    e.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    pr = sub.add_parser("predict", help="classify images with a trained model: top-5 with class names")
    pr.add_argument(
        "--model",
        required=True,
        help="run directory (its last stage), stage directory, or models:/NAME/VERSION",
    )
    pr.add_argument("images", nargs="+", help="image files")
    pr.add_argument("--top", type=int, default=5)
    pr.add_argument("--ema", action="store_true", help="the EMA weights instead of the final ones")
    pr.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    pr.add_argument("--json", action="store_true", help="one JSON object per image")
    pr.set_defaults(fn=lambda a: __import__("ffscale.predict", fromlist=["main"]).main(a))

    c = sub.add_parser("compare", help="compare stage runs tracked in MLflow (Table 1 layout)")
    c.add_argument("--runs", default="runs", help="run.dir whose mlflow.db to read (default: runs)")
    c.add_argument("--uri", help="tracking URI instead (default: $MLFLOW_TRACKING_URI or <runs>/mlflow.db)")
    c.add_argument("--experiment", default="ffscale")
    c.add_argument("--filter", help="MLflow search filter, e.g. \"params.\\`optim.base_lr\\` = '0.001'\"")
    c.add_argument("--model", help="only models whose name contains this")
    c.add_argument("--plot", metavar="FILE.png", help="draw loss and top-1 curves")
    c.set_defaults(fn=lambda a: __import__("ffscale.compare", fromlist=["main"]).main(a))

    k = sub.add_parser("cluster", help="Kubernetes manifests for multi-node training")
    ksub = k.add_subparsers(dest="cluster_cmd", required=True)
    r = ksub.add_parser(
        "render", help="render a JobSet or an Indexed Job + headless Service, and a ConfigMap"
    )
    r.add_argument("--config", "-c", action="append", default=[], help="training YAML file(s)")
    r.add_argument("overrides", nargs="*", help="key=value overrides")
    r.add_argument("--out", required=True, help="directory for the manifests")
    r.add_argument("--nodes", type=int, help="pods, one per node (default 2)")
    r.add_argument("--gpus-per-node", type=int, help="GPUs requested per pod (default 8)")
    r.add_argument("--image", help="container image")
    r.add_argument("--namespace")
    r.add_argument("--shards-pvc", help="PVC holding shard directories, mounted read-only at /data")
    r.add_argument("--runs-pvc", help="shared PVC for run directories, mounted at /runs")
    r.add_argument("--node-selector", help="key=value")
    r.add_argument(
        "--kind", choices=["job", "jobset"], help="Indexed Job (default) or JobSet (restarts the group)"
    )
    r.add_argument(
        "--grace-s", type=int, help="seconds a preempted pod gets for its checkpoint (default 300)"
    )
    r.add_argument(
        "--rdma", help="RDMA device resource per pod, e.g. rdma/ib: adds IPC_LOCK and NCCL's IB settings"
    )
    r.add_argument("--host-network", action="store_true", default=None, help="pods on the node's network")
    r.add_argument("--nccl-socket-ifname", help="NCCL_SOCKET_IFNAME, e.g. eth0")
    r.add_argument("--queue", help="Kueue LocalQueue: labels the workload and creates it suspended")
    r.set_defaults(fn=lambda a: __import__("ffscale.cluster", fromlist=["main"]).main(a))

    bench.add_parser(sub)

    d = sub.add_parser(
        "doctor",
        help="prove this node can run a config's job: versions, devices, data, disk, tracking, a burst",
    )
    d.add_argument("--config", "-c", action="append", default=[], help="training YAML file(s)")
    d.add_argument("overrides", nargs="*", help="key=value overrides")
    d.add_argument(
        "--nproc",
        type=int,
        default=0,
        help="ranks for the all-reduce and the burst (default: GPUs, or 2 CPU ranks)",
    )
    d.add_argument(
        "--nnodes", type=int, default=1, help="run on every node of a job: all-reduce across nodes"
    )
    d.add_argument("--node-rank", type=int, default=0)
    d.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    d.add_argument("--master-port", type=int, default=0, help="default: a free port (one node)")
    d.add_argument("--json", metavar="FILE", help="also write the checks as JSON")
    d.add_argument("--burst-steps", type=int, default=3, help="training steps of the configured model")
    d.add_argument("--no-burst", action="store_true", help="skip the training burst")
    d.add_argument("--verbose", action="store_true", help="time each section")
    d.set_defaults(fn=lambda a: __import__("ffscale.doctor", fromlist=["run"]).run(a))

    m = sub.add_parser("models", help="list registered models with parameter counts")
    m.add_argument("filter", nargs="?")
    m.set_defaults(fn=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`--allow-change k a.b=1`): argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .errors import guarded

    return guarded(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
