"""`ffscale import`: the paper's, DeiT's and timm's checkpoints become ffscale packages whose logits
are the source model's, and no code runs from a checkpoint file."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from helpers.paper_ff import Note, PaperFF, timm_distilled_vit, timm_vit
from safetensors.torch import save_file

from ffscale.cli import main
from ffscale.inference.predict import Classifier


def deit_checkpoint(path, model: torch.nn.Module, name: str):
    """As DeiT's main.py (@ 2f76ec6) saves it each epoch: main.py:383-394."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    torch.save({
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "lr_scheduler": {"t_initial": 300, "warmup_t": 5, "base_values": [1e-3]}, "epoch": 299,
        "model_ema": ema, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(model=name, lr=1e-3, batch_size=128, drop=0.1, nb_classes=10),
    }, path)  # fmt: skip
    return ema


def logits_after_import(tmp_path, ckpt, *args):
    out = tmp_path / ("imported-ema" if "--ema" in args else "imported")
    assert main(["import", str(ckpt), "--out", str(out), *args]) == 0
    clf = Classifier(out / "imported")  # --ema: the EMA weights became the package's weights
    return clf, lambda x: clf.model(x)


@torch.no_grad()
@pytest.mark.parametrize("grid", [None, 8], ids=["tiny/base grid", "large: 14x14 grid on 7x7 patches"])
def test_the_papers_checkpoint_imports_to_the_same_logits(tmp_path, grid):
    src = PaperFF(img_size=64, patch=16, dim=48, depth=2, classes=10, grid=grid).eval()
    ema = deit_checkpoint(tmp_path / "linear-tiny-checkpoint.pth", src, "linear_tiny")
    clf, ours = logits_after_import(tmp_path, tmp_path / "linear-tiny-checkpoint.pth")
    x = torch.randn(4, 3, 64, 64)
    assert (ours(x) - src(x)).abs().max() <= 1e-5
    assert torch.equal(ours(x).argmax(1), src(x).argmax(1))
    assert clf.card["model"] == "ff_tiny" and clf.card["kwargs"]["img_size"] == 64
    assert (
        clf.card["preprocessing"]["interpolation"] == "bicubic"
        and clf.card["preprocessing"]["crop_pct"] == 0.875
    )
    src.load_state_dict(ema)
    _, ours_ema = logits_after_import(tmp_path, tmp_path / "linear-tiny-checkpoint.pth", "--ema")
    assert (ours_ema(x) - src(x)).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["deit", "safetensors"])
def test_a_timm_vit_imports_to_the_same_logits(tmp_path, fmt):
    src = timm_vit(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10).eval()
    for p in src.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    if fmt == "deit":
        ckpt = tmp_path / "deit.pth"
        deit_checkpoint(ckpt, src, "deit_tiny_patch16_224")
    else:
        ckpt = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ckpt))
    clf, ours = logits_after_import(tmp_path, ckpt, "model.heads=3")
    x = torch.randn(4, 3, 32, 32)
    assert (ours(x) - src(x)).abs().max() <= 1e-5
    assert clf.card["model"].startswith("vit_") and clf.card["kwargs"]["heads"] == 3


def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": PaperFF().state_dict(), "extra": Planted()}, tmp_path / "evil.pth")
    assert main(["import", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "untrusted file" in err[0] and "evil.pth" in err[0] and "system" in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trust_pickle_loads_an_unknown_type_and_says_so(tmp_path, capsys):
    torch.save({"model": PaperFF().state_dict(), "note": Note("hello")}, tmp_path / "noted.pth")
    assert main(["import", str(tmp_path / "noted.pth"), "--out", str(tmp_path / "a")]) == 2
    capsys.readouterr()
    assert main(["import", str(tmp_path / "noted.pth"), "--out", str(tmp_path / "b"), "--trust-pickle"]) == 0
    assert "WARNING: --trust-pickle" in capsys.readouterr().err


def test_the_imported_package_works_as_a_finished_stage(tmp_path, fm_shards):
    """predict, eval and init_from read it; config keys override the source's preprocessing."""
    src = PaperFF(img_size=28, patch=7, dim=32, depth=1, classes=10)
    torch.save({"model": src.state_dict()}, tmp_path / "ff.pth")
    out = tmp_path / "pkg"
    args = ["data.crop_pct=1.0", f"data.val={fm_shards / 'val'}", f"data.train={fm_shards / 'train'}"]
    assert main(["import", str(tmp_path / "ff.pth"), "--out", str(out), *args]) == 0
    assert Classifier(out / "imported").card["preprocessing"]["crop_pct"] == 1.0
    assert main(["eval", "--run", str(out), "--device", "cpu"]) == 0
    from ffscale import config
    from ffscale.run.pipeline import init_weights_for

    (stage,) = config.stages(config.load(None, [f"init_from={out}", f"run.dir={tmp_path}"]))
    weights, lineage = init_weights_for(stage, [])
    assert weights == out / "imported" / "weights.safetensors" and lineage.startswith(f"package:{out}")


@torch.no_grad()
def test_a_distilled_deit_imports_to_its_logits_and_teaches_evaluates_and_starts_a_stage(tmp_path, fm_shards):
    """DeiT's distilled ViT (dist_token, head_dist, 2 prefix positions) against timm's own class: the
    package's eval output is the source's, the average of its two heads (DeiT models.py:51-59), and the
    card says `distilled`, so predict, eval, a teacher and init_from build it with both."""
    from ffscale import config
    from ffscale.inference.build import build_model
    from ffscale.inference.evaluate import evaluate_weights, find_stage
    from ffscale.models.resize import adapt_state_dict
    from ffscale.run import teacher
    from ffscale.run.pipeline import init_weights_for
    from ffscale.util.weights import load_weights

    src = timm_distilled_vit(img_size=28, patch_size=7, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    for p in src.parameters():  # the two heads and both prefix tokens differ, as after training
        p.add_(torch.randn_like(p) * 0.05)
    deit_checkpoint(tmp_path / "deit.pth", src.eval(), "deit_tiny_distilled_patch16_224")
    data = [f"data.val={fm_shards / 'val'}", f"data.train={fm_shards / 'train'}", "data.crop_pct=1.0"]
    clf, ours = logits_after_import(
        tmp_path, tmp_path / "deit.pth", "model.heads=3", *data
    )  # predict's model
    x = torch.randn(4, 3, 28, 28)
    f = src.forward_features(x)
    both = (src.head(f[:, 0]) + src.head_dist(f[:, 1])) / 2
    assert torch.equal(src(x), both) and not torch.allclose(src.head(f[:, 0]), both)
    assert (ours(x) - src(x)).abs().max() <= 1e-5
    assert clf.card["model"] == "vit_tiny" and clf.card["kwargs"]["distilled"] is True

    pkg = tmp_path / "imported"
    assert evaluate_weights(find_stage(pkg, None))["samples"] == 512  # `ffscale eval`
    student = config.load(None, [*data, "data.img_size=28", "model.patch_size=7", f"run.dir={tmp_path}",
                                 f"distill.teacher={pkg}", f"init_from={pkg}"])  # fmt: skip
    teacher.check(student)  # 10 classes at 28 px: it fits
    (stage,) = config.stages(student)
    taught = teacher.load(stage.cfg, tmp_path, torch.device("cpu"))
    assert (taught.distiller.teacher_logits(x) - src(x)).abs().max() <= 1e-5
    weights, _ = init_weights_for(stage, [])  # its weights start a plain ViT stage at another size
    plain = config.load(None, ["model.name=vit_tiny", "model.dim=48", "model.depth=2", "model.heads=3",
                               "model.patch_size=7", "data.img_size=35"])  # fmt: skip
    model = build_model(config.stages(plain)[0].cfg, 10)
    model.load_state_dict(adapt_state_dict(load_weights(weights), model, lambda _: None))
