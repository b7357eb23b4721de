"""`ffscale cluster render | doctor`: what operators run before and around a job."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ffscale import config

    k = sub.add_parser("cluster", help="Kubernetes manifests for multi-node training")
    ksub = k.add_subparsers(dest="cluster_cmd", required=True)
    r = ksub.add_parser(
        "render", help="render a JobSet or an Indexed Job + headless Service, and a ConfigMap"
    )
    config.add_args(r)
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
    r.add_argument("--mlflow-configmap", help="ConfigMap holding MLFLOW_TRACKING_URI (default mlflow; required "
                   "while the config tracks without a tracking.uri)")  # fmt: skip
    r.add_argument("--mlflow-secret", help="Secret with MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN "
                   "(default mlflow-credentials; optional)")  # fmt: skip
    r.add_argument("--storage-secret", help="Secret with the remote shards' credentials as their clients read "
                   "them, e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default storage-credentials; optional)")  # fmt: skip
    r.add_argument("--stage-gi", type=int, help="size limit (GiB) of the emptyDir mounted at data.stage_dir "
                   "when the config stages its shards (default: none)")  # fmt: skip
    r.add_argument("--stage-medium", choices=["Memory"], help="stage into RAM (an emptyDir of medium Memory)")
    r.add_argument("--stage-host-path", help="a node folder (hostPath, writable by uid 1000) at data.stage_dir "
                   "instead of an emptyDir: it outlives the pod, so a replacement pod resumes the staging")  # fmt: skip
    r.set_defaults(fn=cluster)

    d = sub.add_parser(
        "doctor",
        help="prove this node can run a config's job: devices, data, disk, MLflow, a timed burst",
    )
    config.add_args(d)
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
    d.set_defaults(fn=doctor)


def cluster(args) -> int:
    from ffscale.tools.cluster import main

    return main(args)


def doctor(args) -> int:
    from ffscale.tools.doctor import run

    return run(args)
