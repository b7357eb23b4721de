"""DeiT's distillation end to end, 2 CPU ranks: one config trains a ViT teacher, an FF student
distilled from it under ZeRO-3 (no init_from: a student of the previous stage starts from scratch,
as DeiT's), and a fine-tune of the student at a larger size. Launches:
- `pipe` stopped mid-epoch in the student (schedule.stop_at_step), then rerun to the end;
- `ref`: the student alone, uninterrupted, taught by `pipe`'s teacher directory.
The final model is registered in MLflow, where a later config can name it as a teacher."""

import json
from pathlib import Path

import pytest
import torch
from helpers.launch import UNTRACKED, check, launch, small_overrides
from PIL import Image

from ffscale import config
from ffscale.data.ingest.sources import fashion_mnist_arrays
from ffscale.data.transforms import eval_transform
from ffscale.errors import ConfigError
from ffscale.inference.evaluate import evaluate_weights, find_stage
from ffscale.inference.predict import Classifier
from ffscale.run import preflight
from ffscale.util.weights import load_weights

pytestmark = pytest.mark.e2e
MODEL = "ffscale-distill-test"
STOP = 45  # of 64 student steps: inside its second epoch (32 steps an epoch)


def student(prefix: str = "stages.student.") -> list[str]:
    return [f"{prefix}model.name=ff_tiny", f"{prefix}deepspeed.zero_stage=3",
            f"{prefix}schedule.epochs=2", f"{prefix}optim.ema_decay=0.9", f"{prefix}distill.mode=soft",
            f"{prefix}distill.tau=2.0"]  # fmt: skip


def pipe_args(shards, runs, *extra) -> list[str]:
    return small_overrides(shards, runs, "pipe") + [
        "stages.teacher.model.name=vit_tiny", "stages.teacher.model.heads=2", "stages.teacher.schedule.epochs=3",
        *student(), "stages.student.distill.teacher=teacher",
        "stages.finetune.model.name=ff_tiny", "stages.finetune.data.img_size=35", "stages.finetune.schedule.epochs=1",
        f"tracking.register_as={MODEL}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(fm_shards, module_dir):
    d, out = module_dir, {"dir": module_dir}
    out["cut"] = check(launch(pipe_args(fm_shards, d, f"stages.student.schedule.stop_at_step={STOP}")))
    out["resumed"] = check(launch(pipe_args(fm_shards, d)))
    ref = (
        small_overrides(fm_shards, d, "ref")
        + student()
        + [f"stages.student.distill.teacher={d / 'pipe' / 'teacher'}"]
    )
    out["ref"] = check(launch(ref))
    return out


def rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def done(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "DONE").read_text())


def test_teacher_student_finetune_run_in_one_config_and_the_log_names_the_teacher_and_its_cost(runs):
    pipe, text = runs["dir"] / "pipe", runs["cut"].stdout
    assert "stage student: ff_tiny" in text and "ZeRO-3" in text
    # the pipeline: the ViT's weights are not carried into the FF student, which says so
    (line,) = [ln for ln in text.splitlines() if "stage student: ff_tiny" in ln]
    assert line.endswith(
        "; starts from scratch, as DeiT trains its students (init_from names weights to start from)"
    )
    assert done(pipe / "student")["init_from"] == "scratch"
    assert done(pipe / "finetune")["init_from"] == "stage:student"
    assert (
        f"stage student: distilling from vit_tiny (stage teacher: {pipe / 'teacher' / 'weights.safetensors'}, digest"
        in text
    )
    assert "frozen in eval mode without gradients, float32, on every rank; soft, alpha 0.5, tau 2.0" in text
    assert "img/s per rank" in text.split("teacher forward alone")[1].splitlines()[0]
    assert "% of the time (~" in text  # progress lines: the teacher's share and the rate without it
    assert any("teacher_share" in r for r in rows(pipe / "student"))
    assert "weights: dropping dist_token (not in this model)" in runs["resumed"].stdout  # finetune: plain FF
    assert done(pipe / "teacher")["last_eval"]["val_top1"] > 20  # chance: 10%
    assert (
        done(pipe / "student")["last_eval"]["val_top1"] > 30
        and done(pipe / "finetune")["last_eval"]["val_top1"] > 30
    )


def test_a_distilled_stage_stopped_mid_epoch_resumes_to_the_uninterrupted_run(runs):
    assert f"stopped at schedule.stop_at_step={STOP}" in runs["cut"].stdout
    assert (
        "stage teacher: already finished" in runs["resumed"].stdout
        and "resumed from" in runs["resumed"].stdout
    )
    loss = {name: {r["step"]: r["loss"] for r in rows(runs["dir"] / name / "student") if "loss" in r}
            for name in ("pipe", "ref")}  # fmt: skip
    after = [s for s in sorted(loss["ref"]) if s > STOP]
    assert len(after) == 64 - STOP
    assert all(loss["pipe"][s] == pytest.approx(loss["ref"][s], rel=1e-5, abs=1e-6) for s in after)
    a, b = done(runs["dir"] / "pipe" / "student"), done(runs["dir"] / "ref" / "student")
    assert a["weights_digest"] == b["weights_digest"] and a["ema_digest"] == b["ema_digest"]


def test_a_distilled_model_exports_its_token_and_eval_and_predict_average_the_heads(runs):
    stage_dir = runs["dir"] / "pipe" / "student"
    w = load_weights(stage_dir / "weights.safetensors")
    assert w["dist_token"].shape == (1, 1, 32) and w["head_dist.weight"].shape == (10, 32)
    card = json.loads((stage_dir / "model.json").read_text())
    assert card["kwargs"]["distilled"] is True
    res = evaluate_weights(find_stage(runs["dir"] / "pipe", "student"))  # `ffscale eval`, no DeepSpeed
    assert res["top1"] == pytest.approx(done(stage_dir)["last_eval"]["val_top1"], abs=1e-6)

    images = [Image.fromarray(im, "L").convert("RGB") for im in fashion_mnist_arrays("val")[0][:8]]
    clf = Classifier(stage_dir)  # `ffscale predict`

    x = torch.stack([eval_transform(im, clf.size, clf.crop_pct, clf.interpolation) for im in images]).float()
    x = (x - clf.mean) / clf.std
    with torch.no_grad():
        f = clf.model.forward_features(x)
        deit = ((clf.model.head(f[:, 0]) + clf.model.head_dist(f[:, 1])) / 2).softmax(-1)  # DeiT models.py:59
    assert torch.allclose(clf.probabilities(images), deit, atol=1e-6)


def test_a_registered_model_can_teach_and_must_fit(runs, fm_shards, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{runs['dir'] / 'mlflow.db'}")
    base = small_overrides(fm_shards, runs["dir"], "later") + [f"distill.teacher=models:/{MODEL}/1"]
    preflight.check_job(config.load(None, [*base, "data.img_size=35"]), 1, 2)  # the 35 px fine-tune fits
    with pytest.raises(ConfigError, match=rf"distill.teacher=models:/{MODEL}/1: the teacher \(ff_tiny, 10 classes, 35 px\) "
                       r"does not fit the student train \(ff_tiny, 10 classes, 28 px\)"):  # fmt: skip
        preflight.check_job(config.load(None, base), 1, 2)


def test_a_family_of_the_users_own_teaches_from_its_directory(fm_shards, tmp_path):
    """docs/recipe.md's way to a convnet teacher, with a small convnet for timm's RegNetY: the family
    registered on every rank by an entry script, its weights beside the smallest card the note
    gives (family, arguments, classes, image size)."""
    from entries import convnet_teacher
    from safetensors.torch import save_file

    from ffscale.data.manifest import load_manifest

    teacher = tmp_path / "convnet"
    teacher.mkdir()
    classes = load_manifest(str(fm_shards / "train"))[0].classes
    card = {"model": "tiny_convnet", "kwargs": {"num_classes": 10}, "num_classes": 10, "classes": classes,
            "preprocessing": {"img_size": 28}}  # fmt: skip
    (teacher / "model.json").write_text(json.dumps(card))
    save_file(convnet_teacher.convnet(10).state_dict(), teacher / "weights.safetensors")
    args = small_overrides(fm_shards, tmp_path, "convnet") + [
        f"distill.teacher={teacher}",
        "schedule.stop_at_step=3",
        UNTRACKED,
    ]
    out = check(launch(args, nproc=1, script=Path(convnet_teacher.__file__))).stdout
    assert f"distilling from tiny_convnet ({teacher}: {teacher / 'weights.safetensors'}, digest" in out
    assert [r["step"] for r in rows(tmp_path / "convnet" / "train") if "loss" in r] == [1, 2, 3]
