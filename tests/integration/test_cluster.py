"""Cluster assets checked offline: rendered manifests, the Dockerfile, the examples, the preflight."""

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.launch import ROOT

from ffscale import config as C
from ffscale.run import world as W
from ffscale.tools import cluster

EXAMPLES = ROOT / "cluster" / "examples"


BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or str(BIN / name)
    assert Path(path).exists(), f"{name} not installed (pip install -e .[dev])"
    return path


@functools.cache
def shipped(cfg_file: Path) -> C.Config:
    """A shipped config, loaded once for the module (loading costs a few tenths of a second, and the
    1-to-8-nodes test reads each config four times); the tests read it and never change it."""
    return C.load([str(cfg_file)])


EXAMPLE_RENDERS = {  # checked-in example -> the options that render it
    "ff_base-2x8": dict(nodes=2, gpus_per_node=8),
    "ff_base-4x8-jobset-rdma": dict(nodes=4, gpus_per_node=8, kind="jobset", rdma="rdma/ib", queue="team-a"),
}


@pytest.mark.parametrize("example", sorted(EXAMPLE_RENDERS))
def test_checked_in_examples_equal_a_fresh_render(tmp_path, example):
    cfg = shipped(ROOT / "configs" / "ff_base.yaml")
    files = cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(**EXAMPLE_RENDERS[example]))
    fresh = cluster.write(files, tmp_path / example)
    assert sorted(p.name for p in (EXAMPLES / example).iterdir()) == sorted(p.name for p in fresh)
    for f in fresh:
        assert (EXAMPLES / example / f.name).read_text() == f.read_text(), (
            f"{example}/{f.name} is stale: re-render it with ffscale cluster render --config configs/ff_base.yaml "
            "and the options in EXAMPLE_RENDERS"
        )


@pytest.mark.parametrize("cfg_file", ["ff_tiny.yaml", "ff_base.yaml", "demo.yaml"])
def test_rendered_manifests_validate_strictly(tmp_path, cfg_file):
    cfg = C.load([str(ROOT / "configs" / cfg_file)], ["stages.ft.optim.base_lr=1e-5"])
    files = cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(nodes=4, gpus_per_node=4))
    paths = cluster.write(files, tmp_path)
    k8s = [str(p) for p in paths if p.name != "kustomization.yaml"]
    r = subprocess.run([tool("kubernetes-validate"), "--strict", *k8s], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [tool("yamllint"), "-s", "-c", str(ROOT / ".yamllint.yaml"), *map(str, paths)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout
    job = files["job.yaml"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == 4
    pod = job["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "$(JOB_COMPLETION_INDEX)" in c["command"] and "--nnodes" in c["command"]
    assert (
        c["securityContext"]["allowPrivilegeEscalation"] is False and pod["securityContext"]["runAsNonRoot"]
    )
    assert {"medium": "Memory", "sizeLimit": "64Gi"} in [v.get("emptyDir") for v in pod["volumes"]]
    text = "".join(p.read_text() for p in paths)
    assert "MLFLOW_TRACKING_URI" not in text and "password" not in text.lower()  # from ConfigMap/Secret only
    # the embedded config is the validated one: it loads back to the same pipeline
    back = tmp_path / "back.yaml"
    back.write_text(files["configmap.yaml"]["data"]["config.yaml"])
    assert [s.name for s in C.stages(C.load([str(back)]))] == [s.name for s in C.stages(cfg)]


def test_dockerfile_passes_hadolint():
    r = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 1000" in text and 'CMD ["ffscale", "--help"]' in text


@pytest.mark.parametrize("cfg_file", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("nodes", [1, 2, 4, 8])
def test_every_shipped_config_starts_on_1_to_8_nodes_of_8_gpus(cfg_file, nodes, tmp_path):
    cfg = shipped(cfg_file)
    W.check_launch(cfg, nodes, 8)  # raises naming the keys if a stage could not start
    cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(nodes=nodes, gpus_per_node=8))
    for stage in C.stages(cfg):  # DeiT's recipe: global = ranks x per-rank batch, no accumulation
        s = W.for_world(stage.cfg, nodes * 8)
        assert W.check_world(s, nodes * 8) == 1, (cfg_file.name, stage.name)
        assert s.optim.micro_batch * nodes * 8 == s.optim.global_batch


def test_a_batch_that_cannot_split_stops_render_and_train_naming_the_keys_and_a_fix(tmp_path):
    cfg = C.load([str(ROOT / "configs" / "ff_base.yaml")], ["optim.micro_batch=128"])
    with pytest.raises(C.ConfigError, match=r"optim.global_batch=1024 is not divisible by ranks x micro_batch = "
                       r"16 x 128; set optim.micro_batch=64 .*\(2 node\(s\) x 8 = 16 ranks\)"):  # fmt: skip
        cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(nodes=2, gpus_per_node=8))
    cli = BIN / "ffscale"
    r = subprocess.run(
        [str(cli), "train", "--nproc", "8", "--nnodes", "2", "--config", str(ROOT / "configs" / "ff_base.yaml"),
         "optim.micro_batch=128"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "set optim.micro_batch=64" in r.stderr and "deepspeed" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_the_cluster_readme_writes_shards_where_the_configs_read_them():
    import re

    text = (ROOT / "cluster" / "README.md").read_text()
    # `ffscale shard imagenet --out D` writes D/train and D/val; the volume is mounted at /data in pods
    written = {f"{d}/{split}" for d in re.findall(r"shard imagenet .*--out /mnt/shards(/\S+)", text)
               for split in ("train", "val")}  # fmt: skip
    cfg = C.load([str(ROOT / "configs" / "imagenet_deit.yaml")])
    assert {cfg.data.train.removeprefix("/data"), cfg.data.val.removeprefix("/data")} == written


def test_a_jobset_restarts_the_whole_group_and_validates_against_jobsets_schema(tmp_path):
    from helpers.jobset_schema import JOBSET, errors

    cfg = shipped(ROOT / "configs" / "ff_base.yaml")
    opts = cluster.ClusterOpts(nodes=4, gpus_per_node=8, kind="jobset", rdma="rdma/ib", queue="team-a")
    files = cluster.render(cfg, C.to_yaml(cfg), opts)
    assert set(files) == {"configmap.yaml", "jobset.yaml", "kustomization.yaml"}  # JobSet makes the Service
    js = files["jobset.yaml"]
    assert errors(JOBSET, js) == []
    bad = json.loads(json.dumps(js))
    bad["spec"]["failurePolicy"]["restartStrategy"] = "RestartAll"
    bad["spec"]["network"]["enableDNSHostname"] = True
    assert len(errors(JOBSET, bad)) == 2  # the check can fail: a wrong enum, a misspelt field
    # the Job inside is a batch/v1 JobSpec: validated strictly with the Kubernetes schemas
    (job,) = js["spec"]["replicatedJobs"]
    as_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "x"},
        "spec": job["template"]["spec"],
    }
    cluster.write({"job.yaml": as_job}, tmp_path)
    r = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(tmp_path / "job.yaml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # any pod's failure fails its Job at once and the JobSet restarts every pod; exit 2 is final
    spec, pol = job["template"]["spec"], js["spec"]["failurePolicy"]
    assert spec["backoffLimit"] == 0 and spec["completions"] == 4 and job["replicas"] == 1
    assert pol["maxRestarts"] == 6 and pol["rules"][0]["action"] == "FailJobSet"
    assert "exit code [23] matching" in pol["rules"][0]["onJobFailureMessagePatterns"][0]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert "ffscale-ff-base-node-0-0.ffscale-ff-base" in " ".join(c["command"])  # JobSet's pod 0 DNS name
    # RDMA and Kueue
    assert c["resources"]["limits"]["rdma/ib"] == "1" and c["securityContext"]["capabilities"]["add"] == [
        "IPC_LOCK"
    ]
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in c["env"]  # so the log shows NET/IB
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and js["spec"]["suspend"] is True
    assert pod["terminationGracePeriodSeconds"] > int(c["command"][c["command"].index("--grace") + 1])


def test_every_pod_runs_the_preflight_first_on_its_node():
    cfg = shipped(ROOT / "configs" / "ff_base.yaml")
    for kind in ("job", "jobset"):
        files = cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(kind=kind))
        job = (
            files["job.yaml"]["spec"]
            if kind == "job"
            else files["jobset.yaml"]["spec"]["replicatedJobs"][0]["template"]["spec"]
        )
        pod = job["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"][:2] == ["ffscale", "doctor"] and "--no-burst" in init["command"]
        assert init["resources"] == pod["containers"][0]["resources"]  # the same devices, the same node
        assert init["volumeMounts"] == pod["containers"][0]["volumeMounts"]
    off = cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(preflight=False))
    assert off["job.yaml"]["spec"]["template"]["spec"]["initContainers"] == []


def test_a_config_that_stages_its_shards_gets_a_node_local_volume_at_stage_dir(tmp_path):
    cfg = C.load(
        [str(ROOT / "configs" / "ff_tiny.yaml")], ["data.stage_dir=/stage", "data.train=s3://b/in/train"]
    )
    for opts, volume in (
        (dict(stage_gi=200), {"name": "stage", "emptyDir": {"sizeLimit": "200Gi"}}),
        (dict(stage_medium="Memory"), {"name": "stage", "emptyDir": {"medium": "Memory"}}),
        (dict(stage_host_path="/mnt/nvme/ffscale"),
         {"name": "stage", "hostPath": {"path": "/mnt/nvme/ffscale", "type": "DirectoryOrCreate"}}),
    ):  # fmt: skip
        files = cluster.render(cfg, C.to_yaml(cfg), cluster.ClusterOpts(nodes=2, gpus_per_node=8, **opts))
        pod = files["job.yaml"]["spec"]["template"]["spec"]
        assert volume in pod["volumes"]
        for c in pod["containers"] + pod["initContainers"]:  # the preflight sees the same folders
            assert {"name": "stage", "mountPath": "/stage"} in c["volumeMounts"]
        paths = cluster.write(files, tmp_path / str(len(opts)) / next(iter(opts)))
        k8s = [str(p) for p in paths if p.name != "kustomization.yaml"]
        r = subprocess.run([tool("kubernetes-validate"), "--strict", *k8s], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    plain = cluster.render(shipped(ROOT / "configs" / "ff_tiny.yaml"), "", cluster.ClusterOpts())
    assert "stage" not in json.dumps(plain["job.yaml"])  # no staging, no volume
    relative = C.load([str(ROOT / "configs" / "ff_tiny.yaml")], ["data.stage_dir=stage"])
    with pytest.raises(C.ConfigError, match="data.stage_dir='stage': an absolute path"):
        cluster.render(relative, "", cluster.ClusterOpts())
