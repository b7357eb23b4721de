"""Training from shards under URLs, against real servers on 127.0.0.1 (tests/helpers/storage.py):
staged from moto's S3 server by `ffscale train` before its ranks start; read in place from nginx by
ranged requests, the server stopped mid-run (one line, exit 1) and the rerun resuming."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.launch import ROOT, free_port, launch_env, small_overrides
from helpers.storage import MotoS3, Nginx

CLI = Path(sys.executable).with_name("ffscale")
BUCKET = "ffscale-e2e"


@pytest.fixture(scope="module")
def s3(fm_shards):
    server = MotoS3().start()
    try:
        for split in ("train", "val"):
            server.upload(BUCKET, f"fm/{split}", fm_shards / split)
        yield server
    finally:
        server.stop()


def cmd(shards_url: str, run_dir: Path, name: str, *extra: str) -> list[str]:
    args = small_overrides(Path("/unused"), run_dir, name)
    args = [a for a in args if not a.startswith(("data.train=", "data.val="))]
    return [str(CLI), "train", "--nproc", "2", "--master-port", str(free_port()), "--grace", "30", *args,
            f"data.train={shards_url}/train", f"data.val={shards_url}/val", "tracking.enabled=false",
            *extra]  # fmt: skip


def test_ffscale_train_stages_s3_shards_once_per_node_and_trains_on_the_copy(s3, tmp_path):
    stage_dir = tmp_path / "stage"
    env = launch_env(s3.env)
    job = cmd(
        f"s3://{BUCKET}/fm", tmp_path, "staged", f"data.stage_dir={stage_dir}", "schedule.stop_at_step=3"
    )
    r = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert (
        out.count("ffscale: staged s3://") == 2 and len(re.findall(r"ffscale: staging \S+ -> ", out)) == 2
    )  # once, before the ranks
    assert {p.name for p in stage_dir.iterdir()} >= {"s3_ffscale-e2e_fm_train", "s3_ffscale-e2e_fm_val"}
    assert "Traceback" not in out


def test_a_server_stopped_mid_run_stops_the_job_in_one_line_per_rank_and_the_rerun_resumes(
    fm_shards, tmp_path
):
    ng = Nginx(fm_shards).start()
    try:
        # a 1 MB cache per reader: the set (3 MB) keeps being read from the server through the run
        job = cmd(ng.url, tmp_path, "ranged", "data.remote_cache_mb=1", "checkpoint.every_steps=4",
                  "schedule.epochs=2")  # fmt: skip
        metrics = tmp_path / "ranged" / "train" / "metrics.jsonl"
        p = subprocess.Popen(
            job, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 6:
                break
            time.sleep(0.1)
        ng.stop()
        out, err = p.communicate(timeout=240)
        assert p.returncode == 1, (out + err)[-3000:]
        said = [ln for ln in err.splitlines() if ln.startswith("ffscale: storage error")]
        assert 1 <= len(said) <= 2 and all(ng.url in ln and ".tar" in ln for ln in said), err[-3000:]
        assert "Traceback" not in err
        ng.start()  # the same port: the rerun resumes from the last checkpoint
        r = subprocess.run(job, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert "resum" in r.stdout.lower(), r.stdout[-2000:]
    finally:
        ng.stop()
