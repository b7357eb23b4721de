"""A run's record says what trained: one writer per run directory (a lock that works on shared
filesystems), config changes on resume only when allowed and then recorded, exit codes as documented,
the final model in the MLflow registry and `ffscale predict`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, check, free_port, launch_env, small_overrides

from ffscale import changes, config
from ffscale.errors import ConfigError, LockHeld
from ffscale.runlock import LOCK, Holder, RunLock, read

CLI = Path(sys.executable).with_name("ffscale")


# -- the lock ---------------------------------------------------------------------------------


def test_a_second_holder_is_refused_naming_the_first_and_release_frees_it(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05) as first:
        h = read(tmp_path / LOCK)
        assert (h.host, h.pid, h.token) == (socket.gethostname(), os.getpid(), first.me.token)
        time.sleep(0.3)
        assert read(tmp_path / LOCK).heartbeat > h.heartbeat  # the heartbeat moves
        with pytest.raises(LockHeld, match=rf"in use by host {socket.gethostname()} pid {os.getpid()} "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()
    RunLock(tmp_path).acquire().release()


def test_waiting_for_the_lock_gets_it_when_the_holder_ends_within_the_wait(tmp_path):
    import threading

    said = []
    first = RunLock(tmp_path).acquire()
    threading.Timer(0.5, first.release).start()  # a pod still writing its preemption checkpoint
    second = RunLock(tmp_path, say=said.append, wait_s=30).acquire()
    assert read(tmp_path / LOCK).token == second.me.token and said[0].startswith(
        "ffscale: waiting up to 30 s"
    )
    second.release()


def _plant(d: Path, host: str, pid: int, age: float) -> None:
    now = time.time()
    (d / LOCK).write_text(json.dumps(Holder("t0", host, pid, now - age, now - age).__dict__))


def test_a_stale_lock_is_taken_over_saying_so_and_a_live_one_on_another_host_is_not(tmp_path):
    said = []
    _plant(tmp_path, "node-7", 4242, age=5)  # another host, fresh heartbeat: held
    with pytest.raises(LockHeld, match="host node-7 pid 4242 .*heartbeat 5 s ago"):
        RunLock(tmp_path, stale_s=60).acquire()
    _plant(tmp_path, "node-7", 4242, age=120)  # heartbeat older than stale_s: its node is gone
    lock = RunLock(tmp_path, stale_s=60, say=said.append).acquire()
    assert (
        read(tmp_path / LOCK).token == lock.me.token and "taking over the run lock of host node-7" in said[0]
    )
    lock.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    _plant(tmp_path, socket.gethostname(), dead.pid, age=1)  # this host, pid gone: at once
    RunLock(tmp_path, stale_s=3600).acquire().release()


# -- config changes on resume ------------------------------------------------------------------


def _stage(tmp_path: Path, *overrides: str) -> tuple[config.Stage, config.RunCfg]:
    cfg = config.load(
        [str(ROOT / "configs" / "demo.yaml")], [f"run.dir={tmp_path}", "run.name=r", *overrides]
    )
    return config.stages(cfg)[0], cfg.run


def test_a_resumed_stage_refuses_changes_unless_allowed_and_never_fixed_keys(tmp_path):
    stage, run = _stage(tmp_path)
    (stage.dir / "checkpoints").mkdir(parents=True)
    changes.started(stage, run)
    assert changes.check(stage, run, set()) == {}  # not resuming yet: no checkpoint
    (stage.dir / "checkpoints" / "latest").write_text("step5")
    lr = stage.cfg.optim.base_lr
    new, run = _stage(tmp_path, f"optim.base_lr={lr * 2}", "schedule.stop_at_step=9", "checkpoint.keep=5")
    with pytest.raises(
        ConfigError, match=rf"optim.base_lr: {lr!r} -> {lr * 2!r}; run with --allow-change optim.base_lr"
    ):
        changes.check(new, run, set())
    assert changes.check(new, run, {"optim.base_lr"}) == {
        "optim.base_lr": [lr, lr * 2]
    }  # stop_at_step, workers: free
    changes.record(new, 5, {"optim.base_lr": [lr, lr * 2]})
    with open(stage.dir / changes.HISTORY, "a") as f:
        f.write('{"step": 7, "chan')  # an append cut short by a kill: never applied
    assert changes.check(new, run, set()) == {}  # the history's effective config has it now
    shape, run = _stage(tmp_path, f"optim.base_lr={lr * 2}", "model.depth=9")
    with pytest.raises(ConfigError, match="model.depth: 4 -> 9: cannot change mid-stage"):
        changes.check(shape, run, {"model.depth"})


def test_the_same_shards_at_a_new_path_resume_and_other_shards_do_not(tmp_path, fm_shards):
    import shutil

    stage, run = _stage(tmp_path, f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}")
    (stage.dir / "checkpoints").mkdir(parents=True)
    changes.started(stage, run)
    (stage.dir / "checkpoints" / "latest").write_text("step5")
    shutil.copytree(fm_shards, tmp_path / "moved")  # the volume mounted elsewhere
    moved, run = _stage(
        tmp_path, f"data.train={tmp_path / 'moved' / 'train'}", f"data.val={tmp_path / 'moved' / 'val'}"
    )
    assert changes.check(moved, run, set()) == {}
    other, run = _stage(tmp_path, f"data.train={fm_shards / 'val'}", f"data.val={fm_shards / 'val'}")
    with pytest.raises(ConfigError, match="data.train: .* cannot change mid-stage"):
        changes.check(other, run, {"data.train"})


# -- end to end: two jobs on one directory, kill -9, takeover; a changed key on resume ----------


@pytest.fixture(scope="module")
def job(fm_shards, module_dir):
    """`ffscale train` of a small model on one rank, checkpointing every 4 steps; (run dir, command)."""

    def cmd(name: str, *extra: str) -> list[str]:
        return [str(CLI), "train", "--nproc", "1", "--master-port", str(free_port()), "--grace", "30",
                *small_overrides(fm_shards, module_dir, name), "optim.micro_batch=64", "checkpoint.every_steps=4",
                *extra]  # fmt: skip

    return module_dir, cmd


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
    finally:  # the node is gone: `ffscale train`, the launcher and the ranks (own session) killed at once
        import psutil

        tree = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
        for proc in tree:
            proc.send_signal(signal.SIGKILL)
        first.wait()
        psutil.wait_procs(tree[1:], timeout=30)
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
    change = [r for r in rows if "config_change" in r]
    assert change == [{"step": 8, "config_change": "optim.base_lr: 0.004 -> 0.008"}]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert 1.8 < lr[9] / lr[8] < 2.05  # past warmup, the cosine barely moves in a step: the lr doubled
    history = _rows(d / changes.HISTORY)
    assert history[0]["config"]["optim.base_lr"] == 0.004 and history[1]["changes"] == {
        "optim.base_lr": [0.004, 0.008]
    }
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    stage_run = json.loads((runs / "changed" / "mlflow_runs.json").read_text())["stages"]["train"]
    tags = mlflow.MlflowClient(uri).get_run(stage_run).data.tags
    assert tags["ffscale.change.optim.base_lr"] == "0.004 -> 0.008 @ step 8"


def test_every_exit_code_in_the_readme_names_the_tests_that_check_it():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Exit codes") :].split("\n\n")[1]
    rows = [r for r in table.splitlines() if re.match(r"\| (0|1|2|143)", r)]
    assert [r.split("|")[1].strip().split()[0] for r in rows] == ["0", "2", "143", "1"]
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for r in rows:
        named = re.findall(r"`(test_\w+)`", r)
        assert named, r
        assert all(f"def {t}(" in tests for t in named), r


def test_predict_reads_images_as_paths_or_base64(tmp_path):
    import base64
    import io

    from PIL import Image

    from ffscale.predict import open_image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    for source in (str(tmp_path / "a.png"), base64.b64encode(buf.getvalue()).decode(), buf.getvalue()):
        assert open_image(source).size == (40, 30)
