"""The fault suite: real 2-rank DeepSpeed jobs (ZeRO-2, checkpoint every 8 steps) hit by the faults
of docs/reliability.md, then rerun. One fixture per scenario, each a few launches:
- `ref` straight through;
- `k`: rank 0 SIGKILLed while it writes a checkpoint (it blocks on a FIFO planted where its file
  goes), rerun and rank 1 SIGKILLed mid-step, a file of the newest checkpoint removed, rerun to the
  end from the one before; must equal `ref`, with one metric value per step and name;
- `full`: checkpoints on a 700 KiB tmpfs, the second checkpoint hits ENOSPC; more space, rerun;
- `nan`: NaN losses injected on rank 0 (tests/entries/nan_train.py, FFSCALE_FAULT_NAN_STEPS), skipped under ZeRO-0 and ZeRO-2
  until the limit, then the stopped stage resumed by 1 rank (universal checkpoint); `nan_stop`:
  ZeRO-3, default nonfinite=stop."""

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
import torch
from entries import chaos_train, nan_train
from helpers.launch import ROOT, check, launch, launch_cmd, launch_env, small_overrides
from helpers.loaders import bad_shards

pytestmark = pytest.mark.e2e
NAN_TRAIN = Path(nan_train.__file__)
CHAOS_TRAIN = Path(chaos_train.__file__)
CLI = Path(sys.executable).with_name("ffscale")
STAGE = "train"  # a config without `stages` has one stage of this name
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


def args(shards, runs, name, *extra):
    return small_overrides(shards, runs, name) + [
        "schedule.epochs=2",
        "checkpoint.every_steps=8",
        "deepspeed.zero_stage=2",
        *extra,
    ]


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
    return {"dir": module_dir, "ref": check(launch(args(fm_shards, module_dir, "ref")))}


@pytest.fixture(scope="module")
def disk_full(fm_shards, module_dir):
    """The second checkpoint hits a full disk (a 700 KiB tmpfs); more space, rerun."""
    d = module_dir
    out: dict = {"dir": d}
    full = d / "full" / STAGE / "checkpoints"
    out["tmpfs"] = mount_tmpfs(full, "700k")
    try:
        if out["tmpfs"]:
            out["full"] = launch(args(fm_shards, d, "full"))
            out["full_latest"] = (full / "latest").read_text()
            subprocess.run(["mount", "-o", "remount,size=64m", str(full)], check=True)
            out["full_rerun"] = check(launch(args(fm_shards, d, "full")))
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


NAN = {"FFSCALE_FAULT_NAN_STEPS": "5,9,10,11"}  # rank 0's loss is NaN at these steps of each stage


@pytest.fixture(scope="module")
def nan_skips(fm_shards, module_dir):
    d = module_dir
    out: dict = {"dir": d}
    stages = [
        "stages.z0.deepspeed.zero_stage=0",
        "stages.z0.optim.nonfinite=skip",
        "stages.z0.optim.max_skipped=4",
        "stages.z2.optim.nonfinite=skip",
        "stages.z2.optim.max_skipped=3",
        "stages.z2.init_from=scratch",
    ]
    out["nan"] = launch(args(fm_shards, d, "nan", "schedule.epochs=1", *stages), env=NAN, script=NAN_TRAIN)
    ck = d / "nan" / "z2" / "checkpoints"
    out["nan_ckpts"] = {
        "latest": (ck / "latest").read_text(),
        "dirs": sorted(p.name for p in ck.glob("step*")),
    }
    out["nan_step8"] = torch.load(ck / "step8" / "mp_rank_00_model_states.pt", weights_only=False)  # ours
    out["nan_rows"] = {st: (d / "nan" / st / "metrics.jsonl").read_text() for st in ("z0", "z2")}
    # the stopped ZeRO-2 stage resumed by one rank: converted to a universal checkpoint
    out["nan_1rank"] = launch(args(fm_shards, d, "nan", "schedule.epochs=1", *stages), nproc=1)
    return out


@pytest.fixture(scope="module")
def nan_stop(fm_shards, module_dir):
    job = args(fm_shards, module_dir, "nan_stop", "deepspeed.zero_stage=3")
    return {"dir": module_dir, "nan_stop": launch(job, env=NAN, script=NAN_TRAIN)}


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


IDS_SEED, IDS_N = 0, 2048  # the run's seed and the shards' train samples (fm_shards)


@pytest.fixture(scope="module")
def world_resume(fm_shards, module_dir):
    """One epoch with repeated augmentation trained by 2 ranks to step 10, then 1 rank (a SIGTERM first
    stops its conversion of the shards) to step 21, then 2 ranks to the end; every rank logs the
    samples of each batch it trained (tests/entries/chaos_train.py)."""
    d = module_dir
    log = d / "ids"
    log.mkdir()
    base = args(fm_shards, d, "world", "schedule.epochs=1", "data.loader=webdataset", "data.repeats=3")
    env = {"FFSCALE_LOG_IDS": str(log)}
    out: dict = {"dir": d, "log": log}
    out["a"] = launch(base + ["schedule.stop_at_step=10"], env=env, script=CHAOS_TRAIN)
    term = {**env, "FFSCALE_FAULT": "TERM:convert:0"}
    out["term"] = launch(base + ["schedule.stop_at_step=21"], nproc=1, env=term, script=CHAOS_TRAIN)
    ck = d / "world" / STAGE / "checkpoints"
    out["after_term"] = sorted(p.name for p in ck.iterdir() if p.is_dir())
    out["b"] = launch(base + ["schedule.stop_at_step=21"], nproc=1, env=env, script=CHAOS_TRAIN)
    out["c"] = launch(base, env=env, script=CHAOS_TRAIN)
    return out


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


def test_nonfinite_loss_is_skipped_up_to_the_limit_and_never_checkpointed(nan_skips):
    faults = nan_skips
    d = faults["dir"] / "nan"
    r = faults["nan"]
    text = r.stdout + r.stderr
    for stage in ("z0", "z2"):
        rows = [json.loads(ln) for ln in faults["nan_rows"][stage].splitlines()]
        skipped = [row["step"] for row in rows if "skipped_steps" in row]
        assert all(row["loss"] == row["loss"] for row in rows if "loss" in row)  # no NaN logged
        # steps between the NaNs trained on finite weights: a NaN applied would poison every later step
        assert skipped == [5, 9, 10, 11], (stage, skipped)
    z0 = json.loads((d / "z0" / "DONE").read_text())
    assert z0["last_eval"]["val_top1"] > 30  # 10 classes; it trained through the skips
    assert r.returncode != 0
    assert "stage z2: loss is NaN or inf at step 11 (4 steps skipped, more than optim.max_skipped=3)" in text
    assert faults["nan_ckpts"] == {"latest": "step8", "dirs": ["step8"]}
    # the non-finite check and the SIGTERM flag share one collective per optimizer step
    assert "ffscale all-reduces per optimizer step: 1.00" in r.stdout
    states = faults["nan_step8"]
    assert all(torch.isfinite(t).all() for t in states["module"].values()) and states["skipped"] == 1


def test_nonfinite_loss_stops_at_the_step_by_default(nan_stop):
    faults = nan_stop
    d = faults["dir"] / "nan_stop"
    r = faults["nan_stop"]
    assert r.returncode != 0
    assert "loss is NaN or inf at step 5 (optim.nonfinite=stop)" in r.stderr
    assert "optim.nonfinite=skip" in r.stderr  # says how to go on
    assert not (d / STAGE / "checkpoints" / "latest").exists()  # no checkpoint after (or of) NaN
    from mlflow import MlflowClient

    ids = json.loads((d / "mlflow_runs.json").read_text())
    c = MlflowClient(f"sqlite:///{faults['dir'] / 'mlflow.db'}")
    assert c.get_run(ids["stages"][STAGE]).info.status == "FAILED"


def test_resume_with_another_rank_count_goes_through_a_universal_checkpoint(nan_skips):
    faults = nan_skips
    r = check(faults["nan_1rank"])
    assert "stage z0: already finished" in r.stdout
    assert "holds ZeRO-2 shards of 2 ranks, this run has 1: converting to a universal checkpoint" in r.stdout
    assert "resumed from" in r.stdout and "step8 (epoch 0, step 8); resharded to 1 ranks" in r.stdout
    done = json.loads((faults["dir"] / "nan" / "z2" / "DONE").read_text())
    assert done["ranks"] == 1 and done["steps"] == 32
    assert done["last_eval"]["val_samples"] == 512 and done["last_eval"]["val_top1"] > 30


def test_a_data_error_inside_a_rank_is_one_line_and_exit_2(fm_shards, tmp_path):
    """A corrupt JPEG met mid-training: the rank that meets it names shard and key in one line and
    the job exits 2 (a rerun cannot fix it: a Kubernetes Job must not retry), no traceback."""
    bad = bad_shards(tmp_path, "corrupt_jpeg")
    job = small_overrides(fm_shards, tmp_path, "bad") + [
        f"data.train={bad}", f"data.val={bad}", "optim.global_batch=16", "optim.micro_batch=8",
    ]  # fmt: skip
    r = launch(job)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ffscale: data error")]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(errors) == 1 and "shard" in errors[0] and "sample 0005: cannot decode image" in errors[0]
    assert "Traceback" not in r.stderr  # the other rank, left in a collective, says so in one line too


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


def test_a_resume_on_another_world_size_trains_every_sample_of_the_epoch_as_often_as_a_straight_run(
    world_resume,
):
    from collections import Counter

    from ffscale.data.plan import SamplePlan

    r = world_resume
    for key in ("a", "b", "c"):
        check(r[key])
    assert r["term"].returncode == 143, r["term"].stdout[-2000:] + r["term"].stderr[-2000:]
    assert "SIGTERM during the conversion" in r["term"].stderr
    assert r["after_term"] == ["step10", "step8"]  # the source still the checkpoint; no universal left
    rows = [json.loads(x) for x in (r["log"] / "ids.jsonl").read_text().splitlines()]
    assert {(x["world"], x["rank"]) for x in rows} == {(2, 0), (2, 1), (1, 0)}
    trained = Counter(i for x in rows for i in x["ids"])
    straight = Counter()
    for rank in (0, 1):  # what 2 ranks train in this epoch straight through
        straight.update(SamplePlan(IDS_N, rank, 2, IDS_SEED, repeats=3).epoch_ids(0, True, 32).tolist())
    assert trained == straight  # no sample lost or repeated by the 2 -> 1 and 1 -> 2 resumes
    assert max(trained.values()) == 3 and sum(trained.values()) == 32 * 64
    assert "resharded to 2 ranks: the epoch goes on from the same sample" in r["c"].stdout
