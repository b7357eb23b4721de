"""The fault suite: real 2-rank DeepSpeed jobs (ZeRO-2, checkpoint every 8 steps) hit by the faults
of docs/reliability.md, then rerun. One fixture per scenario, each a few launches:
- `ref` straight through;
- `k`: rank 0 SIGKILLed while it writes a checkpoint (it blocks on a FIFO planted where its file
  goes), rerun and rank 1 SIGKILLed mid-step, a file of the newest checkpoint removed, rerun to the
  end from the one before; must equal `ref`, with one metric value per step and name;
- `full`: checkpoints on a 700 KiB tmpfs, the second checkpoint hits ENOSPC; more space, rerun;
- `chaos`: seeded SIGTERMs and SIGKILLs at random phases and ranks, then a rerun to the end.
Non-finite losses, a corrupt JPEG and resumes on another world size: tests/e2e/test_faults_numeric.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import psutil
import pytest
from entries import chaos_train
from helpers.faults import STAGE, args
from helpers.launch import ROOT, UNTRACKED, check, launch, launch_cmd, launch_env

pytestmark = pytest.mark.e2e
CHAOS_TRAIN = Path(chaos_train.__file__)
CLI = Path(sys.executable).with_name("ffscale")
KILL_BOUND_S = 60  # a dead rank must end the job within this (no hang on a collective)


class Job:
    """A training job run in the background, its output read as it comes."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.p = subprocess.Popen(
            launch_cmd(args),
            cwd=ROOT,
            env=launch_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, what, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not what():
            assert self.p.poll() is None, "job ended early:\n" + "".join(self.lines)[-3000:]
            assert time.time() < deadline, "timed out:\n" + "".join(self.lines)[-3000:]
            time.sleep(0.01)

    def rank_pid(self, rank: int) -> int:
        for c in psutil.Process(self.p.pid).children(recursive=True):
            if f"--local_rank={rank}" in c.cmdline():
                return c.pid
        raise AssertionError(f"rank {rank} not found")

    def kill_rank(self, rank: int) -> tuple[int, float, str]:
        """SIGKILL one rank; (job exit code, seconds until the job ended, output)."""
        t0 = time.time()
        os.kill(self.rank_pid(rank), signal.SIGKILL)
        rc = self.p.wait(timeout=KILL_BOUND_S * 3)
        took = time.time() - t0
        self.reader.join(10)
        return rc, took, "".join(self.lines)


def logged_steps(stage_dir: Path) -> int:
    f = stage_dir / "metrics.jsonl"
    if not f.is_file():
        return 0
    return max((json.loads(ln).get("step", 0) for ln in f.read_text().splitlines() if ln), default=0)


def started(job: Job) -> bool:
    """Rank 0 has loaded any checkpoint and cleaned interrupted ones: it logs the model line."""
    return any(" params, " in ln for ln in job.lines)


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


@pytest.fixture(scope="module")
def ref_run(fm_shards, module_dir):
    return {"dir": module_dir, "ref": check(launch(args(fm_shards, module_dir, "ref", UNTRACKED)))}


@pytest.fixture(scope="module")
def disk_full(fm_shards, module_dir):
    """The second checkpoint hits a full disk (a 700 KiB tmpfs); more space, rerun."""
    d = module_dir
    out: dict = {"dir": d}
    full = d / "full" / STAGE / "checkpoints"
    out["tmpfs"] = mount_tmpfs(full, "700k")
    try:
        if out["tmpfs"]:
            out["full"] = launch(args(fm_shards, d, "full", UNTRACKED))
            out["full_latest"] = (full / "latest").read_text()
            subprocess.run(["mount", "-o", "remount,size=64m", str(full)], check=True)
            out["full_rerun"] = check(launch(args(fm_shards, d, "full", UNTRACKED)))
    finally:
        if out["tmpfs"]:
            subprocess.run(["umount", "-l", str(full)])
    return out


@pytest.fixture(scope="module")
def kills(fm_shards, module_dir):
    d = module_dir
    out: dict = {"dir": d}
    # 1. rank 0 killed while writing the step-16 checkpoint, after rank 1 wrote its shard of it
    ck = d / "k" / STAGE / "checkpoints"
    job = Job(args(fm_shards, d, "k"))
    job.wait_for(lambda: started(job))
    (ck / "step16").mkdir(parents=True)
    os.mkfifo(ck / "step16" / "mp_rank_00_model_states.pt")  # rank 0's open() blocks here
    job.wait_for(lambda: zipfile.is_zipfile(ck / "step16" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    out["write_kill"] = job.kill_rank(0)
    out["write_kill_latest"] = (ck / "latest").read_text()
    (ck / "step16" / "mp_rank_00_model_states.pt").unlink()  # the FIFO; rank 1's shard stays

    # 2. rerun; rank 1 killed mid-step
    job = Job(args(fm_shards, d, "k"))
    job.wait_for(lambda: logged_steps(d / "k" / STAGE) >= 20)
    out["step_kill"] = job.kill_rank(1)
    out["step_kill_latest"] = (ck / "latest").read_text()
    # 3. the newest checkpoint loses a file: the rerun resumes from the one before it, retraining steps
    # that metrics.jsonl and MLflow already hold
    (ck / out["step_kill_latest"] / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out["k_final"] = check(launch(args(fm_shards, d, "k")))
    return out


def _rows(stage_dir: Path) -> list[dict]:
    f = stage_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x] if f.is_file() else []


def newest_checkpoint(stage_dir: Path) -> int:
    from ffscale.engine import checkpoint

    tag = checkpoint.latest_tag(stage_dir / "checkpoints")
    return int(tag[4:]) if tag else -1


def chaos_events(seed: int, n: int = 4) -> list[str]:
    """SIG:PHASE:RANK:N faults for tests/entries/chaos_train.py, drawn from `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sig = rng.choice(["TERM", "KILL"])
        phases = ["startup", "step", "eval", "save"] if sig == "TERM" else ["step", "eval", "save"]
        out.append(f"{sig}:{rng.choice(phases)}:{rng.randrange(2)}:{rng.randint(1, 12)}")
    return out


@pytest.fixture(scope="module")
def chaos(fm_shards, module_dir):
    """Signals at random phases and ranks, each launch followed by the next, then a clean rerun."""
    seed = int(os.environ.get("FFSCALE_CHAOS_SEED", time.time_ns() % 2**31))
    print(f"chaos seed {seed} (FFSCALE_CHAOS_SEED={seed} replays it)", flush=True)
    d, events = module_dir, []
    stage = d / "chaos" / STAGE
    for ev in chaos_events(seed):
        done_before = (stage / "DONE").is_file()
        rows_before = len(_rows(stage))
        r = launch(args(fm_shards, d, "chaos"), env={"FFSCALE_FAULT": ev}, script=CHAOS_TRAIN)
        verify = subprocess.run([str(CLI), "verify", str(d / "chaos")], capture_output=True, text=True)
        # the steps this launch trained (rows of a killed launch before it may go past any checkpoint)
        trained = [row["step"] for row in _rows(stage)[rows_before:] if "loss" in row]
        events.append({"ev": ev, "rc": r.returncode, "done_before": done_before, "verify": verify,
                       "newest": newest_checkpoint(stage), "trained": max(trained, default=None),
                       "out": r.stdout[-2000:] + r.stderr[-2000:]})  # fmt: skip
    final = launch(args(fm_shards, d, "chaos"), script=CHAOS_TRAIN)
    return {"dir": d, "seed": seed, "events": events, "final": final}


def rows_by_step(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in map(json.loads, (run / STAGE / "metrics.jsonl").read_text().splitlines()):
        out.setdefault(row["step"], {}).update(row)  # a rerun's rows replace the earlier ones
    return out


def final_digest(run: Path) -> str:
    return json.loads((run / STAGE / "DONE").read_text())["weights_digest"]


def test_killed_rank_ends_the_job_and_rerun_reaches_the_same_result(ref_run, kills):
    faults = {**ref_run, **kills}
    d = faults["dir"]
    for key in ("write_kill", "step_kill"):
        rc, took, text = faults[key]
        assert rc != 0, text[-2000:]
        assert took < KILL_BOUND_S, (key, took)
    ref, k = rows_by_step(d / "ref"), rows_by_step(d / "k")
    assert "resumed from" in faults["k_final"].stdout
    for step in (33, 40, 64):  # after the last resume (from step 8 or later)
        assert k[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
    assert k[64]["val_top1"] == ref[64]["val_top1"]
    assert final_digest(d / "k") == final_digest(d / "ref")  # bit-identical weights


def test_a_resume_from_an_older_checkpoint_leaves_one_value_per_step_and_name(kills):
    """The last rerun of `k` resumed from the checkpoint before the newest (damaged): the steps it
    retrained are in metrics.jsonl and in the MLflow stage run once each (ffscale/run/record.py)."""
    from ffscale.run.record import POSITION
    from ffscale.tracking.store import client

    run = kills["dir"] / "k"
    assert "the newest intact checkpoint" in kills["k_final"].stdout
    rows = _rows(run / STAGE)
    keys = Counter((row["step"], name) for row in rows for name in row if name not in POSITION)
    assert [key for key, n in keys.items() if n > 1] == []
    total = json.loads((run / STAGE / "DONE").read_text())["steps"]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, total + 1))
    evaluated = [row["step"] for row in rows if "val_top1" in row]
    assert [row["epoch"] for row in rows if "val_top1" in row] == [1, 2]
    ids = json.loads((run / "mlflow_runs.json").read_text())
    mlflow = client(f"sqlite:///{kills['dir'].resolve() / 'mlflow.db'}")
    for name, want in (
        ("loss", range(1, total + 1)),
        ("epoch", range(1, total + 1)),
        ("val_top1", evaluated),
    ):
        steps = sorted(m.step for m in mlflow.get_metric_history(ids["stages"][STAGE], name))
        assert steps == list(want), name


def test_kill_during_checkpoint_write_leaves_latest_on_the_previous_checkpoint(kills):
    faults = kills
    assert faults["write_kill_latest"] == "step8"  # step16 was half-written when rank 0 died
    assert faults["step_kill_latest"] in ("step16", "step24", "step32", "step40", "step48", "step56")
    # the rerun removed the half-written step16 and resumed from step8 (then wrote a full step16)
    rerun_out = faults["step_kill"][2]
    assert "step16: an interrupted checkpoint write" in rerun_out
    assert "resumed from" in rerun_out and "step8 (epoch 0, step 8)" in rerun_out


def test_disk_full_during_checkpoint_names_it_and_keeps_the_previous_one(ref_run, disk_full):
    faults = {**ref_run, **disk_full}
    if not faults["tmpfs"]:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    r = faults["full"]
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "writing checkpoint" in text and "step16 failed on rank" in text
    assert "no space left on the device" in text and "`latest` still names step8" in text
    assert faults["full_latest"] == "step8"
    assert "resumed from" in faults["full_rerun"].stdout  # step8 loads
    assert final_digest(faults["dir"] / "full") == final_digest(faults["dir"] / "ref")


def test_signals_at_random_phases_and_ranks_end_where_a_straight_run_ends(ref_run, chaos):
    """The seeded chaos test: each SIGTERM exits 143 with every step it trained in an intact
    checkpoint; each SIGKILL fails the job; the rerun after the last one ends on the straight run's
    weights, bit for bit. The seed is printed (FFSCALE_CHAOS_SEED replays it)."""
    seed, d = chaos["seed"], chaos["dir"]
    for e in chaos["events"]:
        what = f"seed {seed}, {e['ev']}: {e['out']}"
        if e["done_before"]:
            assert e["rc"] == 0, what
            continue
        if e["ev"].startswith("TERM"):
            assert e["rc"] == 143, what
            # every step this launch trained is in the checkpoint it ended with (none trained: the one
            # it resumed, newer than anything an earlier killed launch left half-written)
            assert e["trained"] is None or e["newest"] == e["trained"], what
        else:
            assert e["rc"] not in (0, 143), what
        assert e["verify"].returncode == 0, f"seed {seed}, {e['ev']}: {e['verify'].stdout}"
    check(chaos["final"])
    assert final_digest(d / "chaos") == final_digest(d / "ref"), (
        f"seed {seed}: {[e['ev'] for e in chaos['events']]}"
    )
