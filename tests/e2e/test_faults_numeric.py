"""The fault suite's numeric and data faults, beside tests/e2e/test_faults.py (a module of their own so
the suite's two workers share the fault launches):
- `nan`: NaN losses injected on rank 0 (tests/entries/nan_train.py, FFSCALE_FAULT_NAN_STEPS), skipped
  under ZeRO-0 and ZeRO-2 until the limit, then the stopped stage resumed by 1 rank (universal
  checkpoint); `nan_stop`: ZeRO-3, default nonfinite=stop;
- a corrupt JPEG met inside a rank;
- `world`: one epoch resumed on another world size and back, every sample trained as often as a
  straight run trains it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from entries import chaos_train, nan_train
from helpers.faults import STAGE, args
from helpers.launch import UNTRACKED, check, launch, small_overrides
from helpers.loaders import bad_shards

pytestmark = pytest.mark.e2e
NAN_TRAIN = Path(nan_train.__file__)
CHAOS_TRAIN = Path(chaos_train.__file__)
IDS_SEED, IDS_N = 0, 2048  # the run's seed and the shards' train samples (fm_shards)


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
        UNTRACKED,
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


@pytest.fixture(scope="module")
def world_resume(fm_shards, module_dir):
    """One epoch with repeated augmentation trained by 2 ranks to step 10, then 1 rank (a SIGTERM first
    stops its conversion of the shards) to step 21, then 2 ranks to the end; every rank logs the
    samples of each batch it trained (tests/entries/chaos_train.py)."""
    d = module_dir
    log = d / "ids"
    log.mkdir()
    base = args(
        fm_shards, d, "world", "schedule.epochs=1", "data.loader=webdataset", "data.repeats=3", UNTRACKED
    )
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
        f"data.train={bad}", f"data.val={bad}", "optim.global_batch=16", "optim.micro_batch=8", UNTRACKED,
    ]  # fmt: skip
    r = launch(job)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ffscale: data error")]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(errors) == 1 and "shard" in errors[0] and "sample 0005: cannot decode image" in errors[0]
    assert "Traceback" not in r.stderr  # the other rank, left in a collective, says so in one line too


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
