"""bf16 on DeepSpeed's CPU accelerator, 2 ranks, for ZeRO 0-3: gradients accumulated in fp32 over 2
micro-batches, a NaN step skipped, exact resume, and the EMA of the fp32 master weights."""

import json
from pathlib import Path

import pytest
import torch
from entries import nan_train
from helpers.launch import UNTRACKED, check, launch, small_overrides
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e
NAN_TRAIN = Path(nan_train.__file__)
STAGES = ("z0", "z1", "z2", "z3")


def stage_overrides(stage: str) -> list[str]:
    # tiny: updates below one bf16 step of the weights, which only an EMA of the fp32 masters sees
    zero = 2 if stage == "tiny" else int(stage[1])
    out = [f"stages.{stage}.deepspeed.zero_stage={zero}", f"stages.{stage}.init_from=scratch"]
    return out + (["stages.tiny.optim.base_lr=1e-7"] if stage == "tiny" else [])


def args(shards, runs, name, *extra, stages=(*STAGES, "tiny")):
    out = small_overrides(shards, runs, name) + [
        "deepspeed.precision=bf16", "optim.micro_batch=16", "optim.ema_decay=0.9", "schedule.epochs=1",
        "optim.nonfinite=skip", "checkpoint.every_steps=4", UNTRACKED,
    ]  # fmt: skip
    for stage in stages:
        out += stage_overrides(stage)
    return out + list(extra)


@pytest.fixture(scope="module")
def bf16_runs(fm_shards, module_dir):
    nan = {"FFSCALE_FAULT_NAN_STEPS": "5"}
    out = {
        "dir": module_dir,
        "ref": check(launch(args(fm_shards, module_dir, "ref"), env=nan, script=NAN_TRAIN)),
    }
    # z2 alone, stopped and resumed: every stage starts from scratch and draws its seeds from run.seed
    # alone (ffscale/util/seeds.py), so it must end on the ref pipeline's z2 weights
    cut = args(fm_shards, module_dir, "cut", "stages.z2.schedule.stop_at_step=10", stages=("z2",))
    out["cut"] = check(launch(cut, env=nan, script=NAN_TRAIN))
    resumed = args(fm_shards, module_dir, "cut", stages=("z2",))
    out["resumed"] = check(launch(resumed, env=nan, script=NAN_TRAIN))
    return out


def done(runs, name, stage) -> dict:
    return json.loads((runs["dir"] / name / stage / "DONE").read_text())


def test_bf16_trains_every_zero_stage_and_skips_the_nan_step(bf16_runs):
    text = bf16_runs["ref"].stdout
    for st in STAGES:
        assert f"stage {st}: loss not finite at step 5: step skipped (1/10)" in text
        d = done(bf16_runs, "ref", st)
        assert d["last_eval"]["val_samples"] == 512 and d["last_eval"]["val_top1"] > 20, (st, d)
        assert d["steps"] == 32  # 2048 images / 64 per step (2 ranks x 2 micro-batches of 16, in fp32)
    assert "stage z0: ff_tiny" in text and ", bf16, ZeRO-1 (asked: 0)," in text  # DeepSpeed's fast bf16 path
    assert "ffscale all-reduces per optimizer step: 1.00" in text


def test_a_stopped_bf16_stage_resumes_to_the_same_weights_and_ema(bf16_runs):
    assert "resumed from" in bf16_runs["resumed"].stdout
    ref, cut = done(bf16_runs, "ref", "z2"), done(bf16_runs, "cut", "z2")
    assert cut["weights_digest"] == ref["weights_digest"] and cut["ema_digest"] == ref["ema_digest"]


def test_the_ema_averages_the_fp32_masters_not_the_bf16_weights(bf16_runs):
    ema = load_file(bf16_runs["dir"] / "ref" / "tiny" / "weights_ema.safetensors")
    big = [t for t in ema.values() if t.numel() > 1000]
    off_grid = sum(int((t != t.to(torch.bfloat16).float()).sum()) for t in big) / sum(t.numel() for t in big)
    assert off_grid > 0.5, off_grid  # an average of bf16 weights that never moved would lie on bf16's grid
