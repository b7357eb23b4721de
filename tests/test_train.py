"""End to end through the real `deepspeed` launcher with 2 CPU ranks (gloo), grouped into few
launches: a ZeRO-2 -> ZeRO-3 pipeline run straight through, the same run stopped mid-stage and
resumed, and the exported weights evaluated without DeepSpeed."""

import json
from pathlib import Path

import pytest
from conftest import launch, small_overrides

from ffscale.evaluate import evaluate, find_stage


def read_metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def losses(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def pipeline_args(shards, runs, name, *extra):
    return small_overrides(shards, runs, name) + [
        "stages.z2.deepspeed.zero_stage=2",
        "stages.z2.schedule.epochs=2",
        "stages.z3.deepspeed.zero_stage=3",
        "stages.z3.schedule.epochs=2",
        "stages.z3.init_from=scratch",
        "stages.z3.checkpoint.every_steps=10",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(fm_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    ref = launch(pipeline_args(fm_shards, d, "ref"))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    cut = launch(pipeline_args(fm_shards, d, "cut", "stages.z3.schedule.stop_at_step=17"))
    assert cut.returncode == 0, cut.stdout[-3000:] + cut.stderr[-3000:]
    resumed = launch(pipeline_args(fm_shards, d, "cut"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"dir": d, "ref": ref, "cut": cut, "resumed": resumed}


def test_zero2_and_zero3_train_and_ranks_agree(runs):
    for stage in ("z2", "z3"):
        done = json.loads((runs["dir"] / "ref" / stage / "DONE").read_text())
        assert done["ranks"] == 2 and done["weights_digest"]  # digests matched on both ranks
        rows = losses(read_metrics(runs["dir"] / "ref" / stage))
        steps = sorted(rows)
        first, last = sum(rows[s] for s in steps[:3]) / 3, sum(rows[s] for s in steps[-3:]) / 3
        assert last < first - 0.2, (stage, first, last)
    done = json.loads((runs["dir"] / "ref" / "z3" / "DONE").read_text())
    assert done["last_eval"]["val_samples"] == 512
    assert done["last_eval"]["val_top1"] > 40  # 10 classes: chance is 10%
    assert "img/s" in runs["ref"].stdout and "ETA" in runs["ref"].stdout


def test_stopped_then_resumed_run_continues_the_same_trajectory(runs):
    assert "stopped at schedule.stop_at_step=17" in runs["cut"].stdout
    assert "stage z2: already finished" in runs["resumed"].stdout
    assert "resumed from" in runs["resumed"].stdout
    ref = losses(read_metrics(runs["dir"] / "ref" / "z3"))
    cut = losses(read_metrics(runs["dir"] / "cut" / "z3"))
    after = [s for s in sorted(ref) if s > 17]
    assert after and all(cut[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6) for s in after)
    d_ref = json.loads((runs["dir"] / "ref" / "z3" / "DONE").read_text())
    d_cut = json.loads((runs["dir"] / "cut" / "z3" / "DONE").read_text())
    assert d_cut["last_eval"]["val_top1"] == pytest.approx(d_ref["last_eval"]["val_top1"], abs=0.2)


def test_exported_weights_reproduce_the_final_eval_without_deepspeed(runs):
    run_dir = runs["dir"] / "ref"
    stage = find_stage(run_dir, None)
    assert stage.name == "z3"
    res = evaluate(stage)
    done = json.loads((stage.dir / "DONE").read_text())
    assert res["samples"] == 512
    assert res["top1"] == pytest.approx(done["last_eval"]["val_top1"], abs=1e-6)
