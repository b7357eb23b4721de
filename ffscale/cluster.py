"""`ffscale cluster render`: Kubernetes manifests for multi-node DeepSpeed, from a training config.

No operator needed: an Indexed Job (one pod per node; JOB_COMPLETION_INDEX is the node rank) and a
headless Service that gives pod 0 a stable DNS name for the rendezvous. The training config goes
into a ConfigMap, so node and GPU counts are derived here, never copied by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import config

CONFIG_EXIT = 2  # ffscale's exit code for a config error: fail the Job at once, don't retry


@dataclass
class ClusterOpts:
    nodes: int = 2
    gpus_per_node: int = 8
    image: str = "ghcr.io/ffscale/ffscale:0.1.0"
    namespace: str = "ml"
    shards_pvc: str = "imagenet-shards"
    runs_pvc: str = "ffscale-runs"
    mlflow_configmap: str = "mlflow"  # MLFLOW_TRACKING_URI
    mlflow_secret: str = "mlflow-credentials"  # MLFLOW_TRACKING_USERNAME / _PASSWORD (optional)
    shm_gi: int = 64
    cpu: int = 32
    memory_gi: int = 400
    node_selector: str = "nvidia.com/gpu.present=true"
    retries: int = 6


def _name(s: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")[:50] or "ffscale"


def render(cfg: config.Config, config_yaml: str, o: ClusterOpts) -> dict[str, dict]:
    """{file name: manifest} for one training config."""
    config.check_launch(cfg, o.nodes, o.gpus_per_node)  # a Job that cannot start is not rendered
    name = _name(f"ffscale-{cfg.run.name}")
    labels = {"app.kubernetes.io/name": "ffscale", "app.kubernetes.io/instance": name}
    meta = {"name": name, "namespace": o.namespace, "labels": labels}
    master = f"{name}-0.{name}.{o.namespace}.svc"
    port = 29500
    cmd = [
        "ffscale", "train",
        "--nproc", str(o.gpus_per_node),
        "--nnodes", str(o.nodes),
        "--node-rank", "$(JOB_COMPLETION_INDEX)",
        "--master-addr", master,
        "--master-port", str(port),
        "--grace", "100",
        "--config", "/etc/ffscale/config.yaml",
        "run.dir=/runs",
    ]  # fmt: skip
    sel_k, _, sel_v = o.node_selector.partition("=")
    container = {
        "name": "train",
        "image": o.image,
        "imagePullPolicy": "IfNotPresent",
        "command": cmd,
        "ports": [{"name": "rendezvous", "containerPort": port}],
        "env": [
            {"name": "NCCL_DEBUG", "value": "WARN"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "TORCH_EXTENSIONS_DIR", "value": "/runs/.torch_extensions"},
        ],
        "envFrom": [
            {"configMapRef": {"name": o.mlflow_configmap, "optional": True}},
            {"secretRef": {"name": o.mlflow_secret, "optional": True}},
        ],
        "resources": {
            "requests": {
                "cpu": str(o.cpu),
                "memory": f"{o.memory_gi}Gi",
                "nvidia.com/gpu": str(o.gpus_per_node),
            },
            "limits": {"memory": f"{o.memory_gi}Gi", "nvidia.com/gpu": str(o.gpus_per_node)},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/ffscale", "readOnly": True},
            {"name": "shards", "mountPath": "/data", "readOnly": True},
            {"name": "runs", "mountPath": "/runs"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": o.nodes,
            "parallelism": o.nodes,
            "backoffLimit": o.retries * o.nodes,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "train", "operator": "In", "values": [CONFIG_EXIT]},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": name,
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 120,
                    "nodeSelector": {sel_k: sel_v} if sel_k else {},
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": f"{name}-config"}},
                        {
                            "name": "shards",
                            "persistentVolumeClaim": {"claimName": o.shards_pvc, "readOnly": True},
                        },
                        {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_pvc}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{o.shm_gi}Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"clusterIP": "None", "selector": labels, "ports": [{"name": "rendezvous", "port": port}]},
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{name}-config"},
        "data": {"config.yaml": config_yaml},
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["configmap.yaml", "service.yaml", "job.yaml"],
    }
    return {
        "configmap.yaml": configmap,
        "service.yaml": service,
        "job.yaml": job,
        "kustomization.yaml": kustomization,
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


def main(a) -> int:
    cfg = config.load(a.config, a.overrides)  # a ConfigError is reported by the cli
    yaml_text = config.to_yaml(cfg)
    o = ClusterOpts(
        **{k: getattr(a, k) for k in ClusterOpts.__dataclass_fields__ if getattr(a, k, None) is not None}
    )
    for p in write(render(cfg, yaml_text, o), Path(a.out)):
        print(p)
    return 0
