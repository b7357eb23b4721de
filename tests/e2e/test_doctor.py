"""`ffscale doctor` on this CPU host: the CPU subset passes on a good setup and fails, naming what,
where the job would break."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.launch import ROOT, launch_env

pytestmark = pytest.mark.e2e
CLI = Path(sys.executable).with_name("ffscale")


def doctor(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(CLI), "doctor", "--config", str(ROOT / "configs" / "demo.yaml"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)


def test_doctor_passes_on_a_node_that_can_run_the_job_and_measures_it(fm_shards, tmp_path):
    out = tmp_path / "doctor.json"
    r = doctor(f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}", f"run.dir={tmp_path}",
               "--json", str(out), "--burst-steps", "2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "doctor: this node can run the job" in r.stdout
    checks = {c["name"]: c for c in json.loads(out.read_text())}
    for name in ("python", "torch", "deepspeed", "dali", "all-reduce", "data.train", "data.val", "data.read",
                 "data.decode", "run.dir", "run.disk", "mlflow", "mlflow.artifacts", "train burst"):  # fmt: skip
        assert checks[name]["ok"], checks[name]
    # the default SQLite store keeps its artifacts beside it, wherever the working directory is
    assert checks["mlflow.artifacts"]["figure"].startswith(
        f"{(tmp_path / 'mlartifacts').resolve().as_uri()} writable"
    )
    assert "GB/s bus bandwidth, 2 ranks, gloo" in checks["all-reduce"]["figure"]
    assert "2048 samples, 10 classes, 8 shards" in checks["data.train"]["figure"]
    assert "img/s" in checks["data.decode"]["figure"] and "img/s" in checks["train burst"]["figure"]
    # what DALI's feed holds in /dev/shm: its arithmetic in tests/unit/test_doctor_shm.py
    assert "DALI's feed about" in checks["/dev/shm"]["figure"]


def test_doctor_fails_naming_what_would_break_the_job(fm_shards, tmp_path):
    r = doctor(f"data.train={tmp_path / 'nowhere'}", f"data.val={fm_shards / 'val'}", f"run.dir={tmp_path}",
               "tracking.enabled=false", "--no-burst")  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    missing = tmp_path / "nowhere" / "manifest.json"
    assert re.search(rf"^FAIL +data\.train +no shard manifest at {re.escape(str(missing))}$", r.stdout, re.M)
    assert "doctor: FAILED: data.train" in r.stdout and "tracking off" in r.stdout


def test_doctor_on_two_nodes_measures_the_all_reduce_across_them(fm_shards, tmp_path):
    from helpers.launch import free_port

    port = str(free_port())
    common = [f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}", f"run.dir={tmp_path}",
              "tracking.enabled=false", "--no-burst", "--nproc", "1", "--nnodes", "2", "--master-port", port]  # fmt: skip
    cmd = [str(CLI), "doctor", "--config", str(ROOT / "configs" / "demo.yaml"), *common]
    procs = [
        subprocess.Popen(
            [*cmd, "--node-rank", str(r)], cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "GB/s bus bandwidth, 2 nodes x 1 ranks, gloo" in outs[0]
    assert "joined the all-reduce of 2 nodes" in outs[1]
