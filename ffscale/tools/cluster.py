"""`ffscale cluster render`: Kubernetes manifests for multi-node DeepSpeed, from a training config.

Two shapes, one pod per node, the node rank from JOB_COMPLETION_INDEX:
- `--kind jobset` (JobSet, jobset.x-k8s.io/v1alpha2): a failure on any node restarts the whole group,
  which resumes from `latest`; a config or data error (exit 2) fails it at once; preemption restarts
  it without counting against the restarts. JobSet gives pod 0 its DNS name.
- `--kind job` (an Indexed Job and a headless Service, no operator): the Job recreates a failed pod;
  the others leave their collectives after `run.collective_timeout_s` and are recreated too, so the
  group re-forms and resumes. Slower than JobSet's restart, but needs nothing installed.
The training config goes into a ConfigMap, so node and GPU counts are derived here, never copied.
`--rdma` adds the RDMA device resource, IPC_LOCK and NCCL's InfiniBand settings; `--queue` the
Kueue queue label (the workload is created suspended; Kueue admits it).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ffscale import config
from ffscale.errors import ConfigError
from ffscale.run.world import check_launch

# ffscale's exit codes for what a rerun cannot fix, never retried: 2 (config, data, damaged or untrusted
# checkpoints), 3 (the run directory taken over by another job: retrying would fight it)
NO_RETRY_EXITS = (2, 3)
PORT = 29500


@dataclass
class ClusterOpts:
    nodes: int = 2
    gpus_per_node: int = 8
    kind: str = "job"  # job | jobset
    image: str = "ghcr.io/ffscale/ffscale:0.1.0"
    namespace: str = "ml"
    shards_pvc: str = "imagenet-shards"
    runs_pvc: str = "ffscale-runs"
    # MLFLOW_TRACKING_URI: required while the config tracks without a tracking.uri of its own, so
    # no pod falls back to a SQLite file on the shared runs volume (NFS: its locks are unsafe there)
    mlflow_configmap: str = "mlflow"
    mlflow_secret: str = "mlflow-credentials"  # MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN (optional)
    # remote shards' credentials as the storage clients read them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    # AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS...; optional)
    storage_secret: str = "storage-credentials"
    shm_gi: int = 64
    cpu: int = 32
    memory_gi: int = 400
    node_selector: str = "nvidia.com/gpu.present=true"
    retries: int = 6
    grace_s: int = 300  # checkpoint time a preempted pod gets (terminationGracePeriodSeconds - 20 s)
    rdma: str = ""  # RDMA device resource, e.g. rdma/ib or nvidia.com/hostdev (one per pod)
    host_network: bool = False  # pods on the node's network (some RoCE setups need it)
    nccl_socket_ifname: str = ""  # NCCL_SOCKET_IFNAME for its bootstrap/TCP traffic, e.g. eth0
    queue: str = ""  # Kueue LocalQueue name
    preflight: bool = True  # ffscale doctor in an init container before training
    # the node-local volume mounted at data.stage_dir (when the config sets one): an emptyDir (its size
    # limit in GiB, 0: none; in RAM with stage_medium=Memory), or a folder of the node (hostPath), which
    # outlives the pod, so a replacement pod on that node resumes the staging or finds it done
    stage_gi: int = 0
    stage_medium: str = ""  # "" (the node's disk) | Memory
    stage_host_path: str = ""
    stage_dirs: tuple[str, ...] = ()  # not an option: the config's data.stage_dir folders (render fills it)


def _name(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50] or "ffscale"


def render(cfg: config.Config, config_yaml: str, o: ClusterOpts) -> dict[str, dict]:
    """{file name: manifest} for one training config."""
    if o.kind not in ("job", "jobset"):
        raise ConfigError(f"cluster render --kind {o.kind!r}: must be job or jobset")
    check_launch(cfg, o.nodes, o.gpus_per_node)  # a Job that cannot start is not rendered
    refuse_secrets(cfg, o)
    needs_uri = cfg.tracking.enabled and not cfg.tracking.uri
    o = _with_stage_dirs(cfg, o)
    name = _name(f"ffscale-{cfg.run.name}")
    labels = {"app.kubernetes.io/name": "ffscale", "app.kubernetes.io/instance": name}
    meta = {"name": name, "namespace": o.namespace, "labels": labels}
    if o.queue:
        meta["labels"] = {**labels, "kueue.x-k8s.io/queue-name": o.queue}
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": o.namespace, "labels": labels},
        "data": {"config.yaml": config_yaml},
    }
    if o.kind == "jobset":  # JobSet's pods: <jobset>-<replicatedJob>-<job index>-<pod index>.<jobset>
        pod = pod_template(o, name, labels, f"{name}-node-0-0.{name}.{o.namespace}.svc", needs_uri)
        workload = {"jobset.yaml": jobset(o, meta, pod)}
    else:
        pod = pod_template(o, name, labels, f"{name}-0.{name}.{o.namespace}.svc", needs_uri)
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {**meta, "labels": labels},
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": [{"name": "rendezvous", "port": PORT}],
            },
        }
        spec = job_spec(o, pod) | ({"suspend": True} if o.queue else {})  # Kueue unsuspends it
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
        workload = {"service.yaml": service, "job.yaml": job}
    files = {"configmap.yaml": configmap, **workload}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    return {**files, "kustomization.yaml": kustomization}


def _with_stage_dirs(cfg: config.Config, o: ClusterOpts) -> ClusterOpts:
    """The options with the config's data.stage_dir folders (each must be absolute inside the pod)."""
    dirs = sorted({st.cfg.data.stage_dir for st in config.stages(cfg) if st.cfg.data.stage_dir})
    for d in dirs:
        if not d.startswith("/"):
            raise ConfigError(f"data.stage_dir={d!r}: an absolute path in the pod, e.g. /stage")
    if o.stage_medium not in ("", "Memory"):
        raise ConfigError(f"cluster render --stage-medium {o.stage_medium!r}: empty (disk) or Memory")
    return dataclasses.replace(o, stage_dirs=tuple(dirs))


def stage_volume(o: ClusterOpts) -> dict:
    if o.stage_host_path:
        return {"name": "stage", "hostPath": {"path": o.stage_host_path, "type": "DirectoryOrCreate"}}
    empty = {"medium": o.stage_medium} if o.stage_medium else {}
    return {"name": "stage", "emptyDir": empty | ({"sizeLimit": f"{o.stage_gi}Gi"} if o.stage_gi else {})}


def stage_mounts(o: ClusterOpts) -> list[dict]:
    """One volume at every stage_dir of the pipeline (a folder of it each, where stages name several)."""
    dirs = o.stage_dirs
    return [
        {"name": "stage", "mountPath": d, **({"subPath": str(i)} if len(dirs) > 1 else {})}
        for i, d in enumerate(dirs)
    ]


def job_spec(o: ClusterOpts, pod: dict, backoff: int | None = None) -> dict:
    """An Indexed Job of one pod per node. Exit 2 (config, data, another model's checkpoint) or 3
    (the run taken over) fails it at once; a disrupted pod (preemption, drain) does not count against its retries."""
    return {
        "completionMode": "Indexed",
        "completions": o.nodes,
        "parallelism": o.nodes,
        "backoffLimit": o.retries * o.nodes if backoff is None else backoff,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "train",
                        "operator": "In",
                        "values": list(NO_RETRY_EXITS),
                    },
                },
                {
                    "action": "Ignore" if backoff is None else "FailJob",
                    "onPodConditions": [{"type": "DisruptionTarget"}],
                },
            ]
        },
        "template": pod,
    }


def jobset(o: ClusterOpts, meta: dict, pod: dict) -> dict:
    """One replicated Job of `nodes` pods; any pod's failure fails its Job (backoffLimit 0) and the
    JobSet restarts every pod, which resume from `latest`."""
    spec = {
        "failurePolicy": {
            "maxRestarts": o.retries,
            "restartStrategy": "Recreate",
            "rules": [
                {  # the Job controller's message for the exit-code rule names the code
                    "name": "config-or-data-error",
                    "action": "FailJobSet",
                    "onJobFailureReasons": ["PodFailurePolicy"],
                    "onJobFailureMessagePatterns": [
                        f"exit code [{''.join(map(str, NO_RETRY_EXITS))}] matching FailJob rule"
                    ],
                },
                {
                    "name": "preempted",
                    "action": "RestartJobSetAndIgnoreMaxRestarts",
                    "onJobFailureReasons": ["PodFailurePolicy"],
                    "onJobFailureMessagePatterns": ["DisruptionTarget"],
                },
            ],
        },
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "replicatedJobs": [
            {"name": "node", "replicas": 1, "template": {"spec": job_spec(o, pod, backoff=0)}},
        ],
    }
    if o.queue:
        spec["suspend"] = True  # Kueue admits (unsuspends) it when the quota is there
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": meta, "spec": spec}


def pod_template(o: ClusterOpts, name: str, labels: dict, master: str, needs_uri: bool = True) -> dict:
    sel_k, _, sel_v = o.node_selector.partition("=")
    train = container(o, master, needs_uri)
    spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": o.grace_s + 20,
        "nodeSelector": {sel_k: sel_v} if sel_k else {},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        "containers": [train],
        # the preflight, on the same node with the same devices and volumes: a node that cannot run
        # the job fails its pod before training starts (`kubectl logs <pod> -c preflight`)
        "initContainers": [preflight(o, train)] if o.preflight else [],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{name}-config"}},
            {"name": "shards", "persistentVolumeClaim": {"claimName": o.shards_pvc, "readOnly": True}},
            {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{o.shm_gi}Gi"}},
        ]
        + ([stage_volume(o)] if o.stage_dirs else []),
    }
    if o.kind == "job":
        spec["subdomain"] = name  # the headless Service's name: pod 0 is <name>-0.<name>
    if o.host_network:
        spec |= {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    return {"metadata": {"labels": labels}, "spec": spec}


def preflight(o: ClusterOpts, train: dict) -> dict:
    cmd = ["ffscale", "doctor", "--config", "/etc/ffscale/config.yaml", "run.dir=/runs", "--no-burst",
           "--nproc", str(o.gpus_per_node)]  # fmt: skip
    return {**{k: v for k, v in train.items() if k != "ports"}, "name": "preflight", "command": cmd}


def container(o: ClusterOpts, master: str, needs_uri: bool = True) -> dict:
    cmd = [
        "ffscale", "train",
        "--nproc", str(o.gpus_per_node),
        "--nnodes", str(o.nodes),
        "--node-rank", "$(JOB_COMPLETION_INDEX)",
        "--master-addr", master,
        "--master-port", str(PORT),
        "--grace", str(o.grace_s),
        # a replacement pod may start while the pod it replaces still writes its checkpoint
        "--wait-lock", str(o.grace_s + 120),
        "--config", "/etc/ffscale/config.yaml",
        "run.dir=/runs",
    ]  # fmt: skip
    env = [
        {"name": "NCCL_DEBUG", "value": "INFO" if o.rdma else "WARN"},  # INFO logs the transport: NET/IB
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # compiled extensions stay in the image's own directory (Dockerfile), never on the shared runs
        # volume: a .so there would be loaded, and so run, by every pod of every job
    ]
    if o.rdma:
        env += [{"name": "NCCL_IB_DISABLE", "value": "0"}, {"name": "NCCL_NET_GDR_LEVEL", "value": "PHB"}]
    if o.nccl_socket_ifname:
        env.append({"name": "NCCL_SOCKET_IFNAME", "value": o.nccl_socket_ifname})
    devices = {"nvidia.com/gpu": str(o.gpus_per_node), **({o.rdma: "1"} if o.rdma else {})}
    capabilities: dict = {"drop": ["ALL"]}
    if o.rdma:
        capabilities["add"] = ["IPC_LOCK"]  # RDMA pins (locks) its buffers
    return {
        "name": "train",
        "image": o.image,
        "imagePullPolicy": "IfNotPresent",
        "command": cmd,
        "ports": [{"name": "rendezvous", "containerPort": PORT}],
        "env": env,
        "envFrom": [
            {"configMapRef": {"name": o.mlflow_configmap, "optional": not needs_uri}},
            {"secretRef": {"name": o.mlflow_secret, "optional": True}},
            {"secretRef": {"name": o.storage_secret, "optional": True}},
        ],
        "resources": {
            "requests": {"cpu": str(o.cpu), "memory": f"{o.memory_gi}Gi", **devices},
            "limits": {"memory": f"{o.memory_gi}Gi", **devices},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "allowPrivilegeEscalation": False,
            "capabilities": capabilities,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/ffscale", "readOnly": True},
            {"name": "shards", "mountPath": "/data", "readOnly": True},
            {"name": "runs", "mountPath": "/runs"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *stage_mounts(o),
        ],
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # plain YAML, no &id001 anchors
        return True


def _str(dumper, value: str):
    style = "|" if "\n" in value else None  # the embedded config stays readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: dict) -> str:
    return "---\n" + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def write(files: dict[str, dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, doc in files.items():
        (out / fname).write_text(dump(doc))
        paths.append(out / fname)
    return paths


def refuse_secrets(cfg: config.Config, o: ClusterOpts) -> None:
    """A ConfigMap is no place for a credential: name the key and where it belongs."""
    import dataclasses

    from ffscale.util.secrets import secret_keys

    keys = secret_keys(dataclasses.asdict(cfg))
    if keys:
        raise ConfigError(
            f"{', '.join(keys)} holds a credential, which the rendered ConfigMap would carry: give the URI "
            f"without it and the credentials in the Secret {o.mlflow_secret!r} (MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN; cluster/README.md)"
        )


def main(args) -> int:
    cfg = config.load(args.config, args.overrides)  # a ConfigError is reported by the cli
    yaml_text = config.to_yaml(cfg)
    o = ClusterOpts(
        **{
            k: getattr(args, k)
            for k in ClusterOpts.__dataclass_fields__
            if getattr(args, k, None) is not None
        }
    )
    for p in write(render(cfg, yaml_text, o), Path(args.out)):
        print(p)
    return 0
