"""The lock and config changes as users meet them: real jobs on one run directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.launch import ROOT, check, free_port, launch_env, small_overrides

from ffscale.inference.stagedir import HISTORY
from ffscale.run.runlock import LOCK

CLI = Path(sys.executable).with_name("ffscale")


@pytest.fixture(scope="module")
def job(fm_shards, module_dir):
    """`ffscale train` of a small model on one rank, checkpointing every 4 steps; (run dir, command)."""

    def cmd(name: str, *extra: str) -> list[str]:
        return [str(CLI), "train", "--nproc", "1", "--master-port", str(free_port()), "--grace", "30",
                *small_overrides(fm_shards, module_dir, name), "optim.micro_batch=64", "checkpoint.every_steps=4",
                *extra]  # fmt: skip

    return module_dir, cmd


def _alive(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.e2e
def test_second_job_on_a_run_stops_naming_the_first_and_after_kill_9_a_third_takes_over(job):
    runs, _job = job
    metrics = runs / "locked" / "train" / "metrics.jsonl"
    first = subprocess.Popen(_job("locked", "schedule.epochs=40"), cwd=ROOT, env=launch_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(
            r.get("step", 0) >= 5 for r in _rows(metrics) if "loss" in r
        ):
            time.sleep(0.2)
        second = subprocess.run(_job("locked", "schedule.epochs=40"), cwd=ROOT, env=launch_env(),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert second.returncode == 2, second.stdout[-1500:] + second.stderr[-1500:]
        line = second.stderr.strip().splitlines()
        assert len(line) == 1 and f"pid {first.pid} " in line[0] and "ffscale: run in use:" in line[0], line
        assert "deepspeed" not in second.stdout  # stopped before any rank started
    finally:  # the OOM killer takes `ffscale train` alone: its launcher and ranks must not train on
        import psutil

        tree = psutil.Process(first.pid).children(recursive=True)  # launcher and ranks (own session)
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.time() + 30
        while (alive := [p for p in tree if _alive(p)]) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive, [p.cmdline()[:4] for p in alive]
    assert (runs / "locked" / LOCK).exists()
    third = check(subprocess.run(_job("locked", "schedule.epochs=40", "schedule.stop_at_step=8"),
                                 cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=240))  # fmt: skip
    assert "taking over the run lock of host" in third.stdout and "resum" in third.stdout.lower()
    assert not (runs / "locked" / LOCK).exists()  # released when it stopped


@pytest.mark.e2e
def test_a_changed_key_on_resume_stops_with_the_diff_and_when_allowed_trains_on_recorded(job):
    import mlflow

    runs, _job = job

    def run(*extra, allow=()):
        a = sum((["--allow-change", k] for k in allow), [])
        return subprocess.run(_job("changed", "schedule.epochs=1", *a, *extra), cwd=ROOT,
                              env=launch_env(), capture_output=True, text=True, timeout=240)  # fmt: skip

    check(run("schedule.stop_at_step=8"))
    refused = run("optim.base_lr=8e-3")
    assert refused.returncode == 2 and "deepspeed" not in refused.stdout
    assert "optim.base_lr: 0.004 -> 0.008; run with --allow-change optim.base_lr" in refused.stderr
    fixed = run("optim.base_lr=8e-3", "model.dim=48", allow=["optim.base_lr", "model.dim"])
    assert fixed.returncode == 2 and "model.dim: 32 -> 48: cannot change mid-stage" in fixed.stderr
    check(run("optim.base_lr=8e-3", allow=["optim.base_lr"]))
    d = runs / "changed" / "train"
    rows = _rows(d / "metrics.jsonl")
    change = [
        {k: v for k, v in r.items() if k != "time"} for r in rows if "config_change" in r
    ]  # time: wall clock
    assert change == [{"step": 8, "config_change": "optim.base_lr: 0.004 -> 0.008"}]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert 1.8 < lr[9] / lr[8] < 2.05  # past warmup, the cosine barely moves in a step: the lr doubled
    history = _rows(d / HISTORY)
    assert history[0]["config"]["optim.base_lr"] == 0.004 and history[1]["changes"] == {
        "optim.base_lr": [0.004, 0.008]
    }
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    stage_run = json.loads((runs / "changed" / "mlflow_runs.json").read_text())["stages"]["train"]
    tags = mlflow.MlflowClient(uri).get_run(stage_run).data.tags
    assert tags["ffscale.change.optim.base_lr"] == "0.004 -> 0.008 @ step 8"
