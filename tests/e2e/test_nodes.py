"""Two nodes on one machine: training together, and a dead or frozen node stopping the other."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.launch import small_overrides, start_nodes

ZERO3 = ["deepspeed.zero_stage=3", "schedule.epochs=1"]


@pytest.fixture(scope="module")
def straight(fm_shards, module_dir):
    """Two nodes train ZeRO-3 for an epoch, never interrupted. The MLflow server is down (nothing
    listens on port 9) from the start to the end (tracking does not change the weights)."""
    args = small_overrides(fm_shards, module_dir, "nodes") + ZERO3
    procs = start_nodes(args + ["tracking.uri=http://127.0.0.1:9", "tracking.end_retry_s=4"])
    outs = [p.communicate(timeout=240)[0] for p in procs]
    return {"dir": module_dir, "procs": procs, "outs": outs}


@pytest.mark.e2e
def test_two_nodes_train_zero3_together_and_a_dead_node_stops_the_other(fm_shards, straight):
    # With the server down training goes on with one warning, retries for tracking.end_retry_s at the
    # end, then says how to replay it.
    tmp_path, procs, outs = straight["dir"], straight["procs"], straight["outs"]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert outs[0].count("MLflow at http://127.0.0.1:9 failed") == 1
    hint = f"ffscale track sync {tmp_path / 'nodes'} --uri http://127.0.0.1:9"
    assert outs[0].count(hint) == 1 and "unreachable at the end of stage train" in outs[0], outs[0][-3000:]
    done = json.loads((tmp_path / "nodes" / "train" / "DONE").read_text())
    assert done["ranks"] == 2 and done["last_eval"]["val_samples"] == 512  # ranks agreed on weights

    # the server "comes back" (here: a SQLite store): the replay makes every run and metric step
    uri = f"sqlite:///{tmp_path / 'back.db'}"
    r = subprocess.run([str(Path(sys.executable).with_name("ffscale")), "track", "sync", str(tmp_path / "nodes"),
                        "--uri", uri], capture_output=True, text=True, timeout=180)  # fmt: skip
    assert r.returncode == 0 and "pipeline run" in r.stdout and "train FINISHED" in r.stdout, r.stderr[-2000:]
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    (stage_run,) = c.search_runs(
        c.get_experiment_by_name("ffscale").experiment_id, "tags.`ffscale.kind` = 'stage'"
    )
    rows = [
        json.loads(line) for line in (tmp_path / "nodes" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert stage_run.info.status == "FINISHED"
    # timed as the job ran, not as the sync did: from before the first row to DONE's time
    done_ms = int((tmp_path / "nodes" / "train" / "DONE").stat().st_mtime * 1000)
    assert stage_run.info.end_time == done_ms and stage_run.info.start_time <= rows[0]["time"] * 1000
    parent = c.get_run(stage_run.data.tags["mlflow.parentRunId"]).info
    assert parent.start_time <= stage_run.info.start_time and parent.end_time == done_ms
    assert sorted(m.step for m in c.get_metric_history(stage_run.info.run_id, "loss")) == [
        r["step"] for r in rows if "loss" in r
    ]

    procs = start_nodes(
        small_overrides(fm_shards, tmp_path, "dead") + ["deepspeed.zero_stage=3", "schedule.epochs=50"]
    )
    metrics = tmp_path / "dead" / "train" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    import psutil

    node1 = psutil.Process(procs[1].pid)
    for proc in [node1, *node1.children(recursive=True)]:  # node 1 vanishes, as a lost machine does
        proc.kill()
    t0 = time.time()
    procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0 and time.time() - t0 < 90


@pytest.mark.e2e
def test_a_frozen_node_stops_the_other_within_the_step_timeout_and_the_restarted_group_resumes(
    fm_shards, straight
):
    """Node 1 stops answering (SIGSTOP: a hung host, not a closed socket) mid-training: node 0 leaves its
    collective after run.step_timeout_s (the start-up timeout stays 600 s) and exits non-zero; both
    nodes restarted, the group resumes from the last checkpoint and ends on the weights of a run that
    was never interrupted."""
    import psutil

    tmp_path = straight["dir"]

    def args(name, *extra):
        return small_overrides(fm_shards, tmp_path, name) + ZERO3 + ["checkpoint.every_steps=16", *extra]

    def last_step(path):
        rows = path.read_text().splitlines() if path.is_file() else []
        return json.loads(rows[-1]).get("step", 0) if rows and rows[-1].endswith("}") else 0

    # Freeze between steps 18 and 26 of 32: after the step-16 checkpoint and the first step that
    # follows it (which switches back to the step timeout), before the epoch's evaluation. A node frozen
    # during a checkpoint is noticed after run.collective_timeout_s (600 s) by design.
    procs = start_nodes(args("frozen", "run.step_timeout_s=20"))
    metrics = tmp_path / "frozen" / "train" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and last_step(metrics) < 18:
        time.sleep(0.02)
    node1 = psutil.Process(procs[1].pid)
    frozen = [node1, *node1.children(recursive=True)]
    for proc in frozen:
        proc.suspend()
    t0, frozen_at = time.time(), last_step(metrics)
    try:
        assert 18 <= frozen_at <= 26, f"froze at step {frozen_at}, outside the steps between checkpoints"
        out = procs[0].communicate(timeout=150)[0]
        took = time.time() - t0
    finally:
        for proc in frozen:
            proc.kill()
        procs[1].wait()
    assert procs[0].returncode != 0, out[-2000:]
    assert 15 < took < 60, took  # the step timeout, not the 600 s start-up one, not NCCL's, not a hang
    print(f"frozen node noticed after {took:.1f} s (run.step_timeout_s=20)")
    again = start_nodes(args("frozen", "run.step_timeout_s=20"))
    outs = [p.communicate(timeout=240)[0] for p in again]
    assert [p.returncode for p in again] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "resumed from" in outs[0]

    def digest(name):
        return json.loads((tmp_path / name / "train" / "DONE").read_text())["weights_digest"]

    assert digest("frozen") == digest("nodes")  # the straight run's
