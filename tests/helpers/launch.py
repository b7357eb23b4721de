"""Real jobs for the tests: the launcher `ffscale train` starts (ffscale/run/ranks.py) running
ffscale/train.py (or a test entry from tests/entries/) with CPU ranks, and the small model and
shards most launches train."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ffscale.train
from ffscale.run.launch import launcher_cmd
from ffscale.util.ports import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout
TRAIN_PY = Path(ffscale.train.__file__)


def launch_cmd(args: list[str], nproc: int = 2, script: Path = TRAIN_PY, runner: bool = False) -> list[str]:
    """The node's launcher running ffscale/train.py (or `script`) with `nproc` CPU ranks: as `ffscale
    train` starts it (ffscale/run/launch.py), or with `runner` through the `deepspeed` command, as
    docs/training.md's `deepspeed ffscale/train.py ...` launches do."""
    if not runner:
        return launcher_cmd(script, args, nproc, master_port=free_port())
    launcher = Path(sys.executable).with_name("deepspeed")
    return [
        str(launcher),
        "-q",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


def launch_env(env: dict | None = None) -> dict:
    """What every test job runs with: one thread per CPU rank, no warnings noise."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}


def launch(
    args: list[str],
    nproc: int = 2,
    timeout: int = 300,
    env: dict | None = None,
    script: Path = TRAIN_PY,
    runner: bool = False,
) -> subprocess.CompletedProcess:
    """Run a training job to its end under the launcher (`launch_cmd`)."""
    return subprocess.run(
        launch_cmd(args, nproc, script, runner),
        cwd=ROOT,
        env=launch_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sigterm_after_rows(cmd: list[str], metrics: Path, rows: int, timeout: int = 240) -> tuple[int, str]:
    """Start `cmd`, SIGTERM it once `metrics` has `rows` rows (or it ended); (exit code, output)."""
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A job that must have succeeded; its output's tail otherwise."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@functools.cache
def _empty_store() -> Path:
    """An empty MLflow SQLite store with MLflow's migrations applied, made once per test process."""
    from ffscale.tracking.store import client

    db = Path(tempfile.mkdtemp(prefix="ffscale-mlflow-")) / "mlflow.db"
    client(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


def migrated_store(run_dir: Path) -> None:
    """Put a copy of an empty, migrated MLflow store where a job's default store goes
    (`run.dir`/mlflow.db), unless one is there. MLflow runs its schema migrations on every new
    SQLite store, seconds of CPU; the suite pays them once per test process instead of once per run
    directory."""
    db = Path(run_dir) / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), db)


# For jobs whose tests read nothing from MLflow: rank 0 then skips MLflow's import, its store and its
# model logging, seconds of CPU a launch. What tracking records under faults, resumes and outages is
# asserted by the jobs that keep it on (test_train, test_faults' `k` and chaos, test_mlflow_server, ...).
UNTRACKED = "tracking.enabled=false"


def small_overrides(shards: Path, run_dir: Path, name: str, fresh_store: bool = False) -> list[str]:
    """A small FF model on the small shards: fast enough for several multi-rank launches. Its run
    directory gets a migrated MLflow store (`migrated_store`) unless `fresh_store`: the job's rank 0
    then creates it, as a user's first job does (tests/e2e/test_train.py)."""
    if not fresh_store:
        migrated_store(run_dir)
    return [
        f"data.train={shards / 'train'}",
        f"data.val={shards / 'val'}",
        f"run.dir={run_dir}",
        f"run.name={name}",
        "run.log_every=1",
        "data.img_size=28",
        "data.crop_pct=1.0",
        "data.scale=[0.8,1.0]",
        "model.patch_size=7",
        "model.drop_path=0.1",
        "model.dim=32",
        "model.depth=2",
        "data.workers=0",
        "data.rand_augment=false",
        "data.mixup=0.0",
        "data.cutmix=0.0",
        "data.reprob=0.0",
        "optim.global_batch=64",
        "optim.micro_batch=32",
        "optim.base_lr=4e-3",
        "schedule.warmup_epochs=0.2",
        "optim.ema_decay=0",
    ]


def node_cmd(rank: int, port: int, args: list[str], nproc: int = 1) -> list[str]:
    """The pods' entry command (see job.yaml) for one of two nodes, with CPU ranks and this machine
    as node 0."""
    cli = Path(sys.executable).with_name("ffscale")
    return [str(cli), "train", "--nproc", str(nproc), "--nnodes", "2", "--node-rank", str(rank),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *args]  # fmt: skip


def start_nodes(args: list[str], env: dict | None = None) -> list[subprocess.Popen]:
    """Two "nodes" on this machine, each an `ffscale train` of its own; their output in stdout."""
    port = free_port()
    return [
        subprocess.Popen(node_cmd(r, port, args), cwd=ROOT, env=launch_env(env), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for r in (0, 1)
    ]  # fmt: skip
