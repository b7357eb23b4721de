"""DeiT's distillation for every family: the distillation token and head, carried across image sizes;
the hard and soft losses against their formulas; a teacher that never changes; a teacher that does
not fit its student stops the job before launch (exit 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ffscale import config
from ffscale.cli import main
from ffscale.engine.distill import Distiller, frozen, hard_distillation, soft_distillation
from ffscale.errors import ConfigError
from ffscale.inference.card import write_card
from ffscale.models import create_model
from ffscale.models.resize import adapt_state_dict
from ffscale.run import preflight

FAMILIES = ("ff_tiny", "vit_tiny", "attn_only_tiny")
CPU = torch.device("cpu")


def small(name: str, size: int = 28, **kw):
    heads = {} if name.startswith("ff_") else {"heads": 2}
    return create_model(
        name, img_size=size, patch_size=7, dim=32, depth=2, num_classes=10, drop_path=0, **heads, **kw
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_gets_a_distillation_token_and_head_and_predicts_their_average(name):
    torch.manual_seed(0)
    m = small(name, distilled=True)
    state = m.state_dict()
    assert state["dist_token"].shape == (1, 1, 32) and state["head_dist.weight"].shape == (10, 32)
    assert m.num_tokens == 16 + 2 and state["pos_embed"].shape == (1, 18, 32)  # cls, dist, 4x4 patches
    token_sized = {
        "ff_tiny": "blocks.0.mlp_tokens.fc1.weight",
        "attn_only_tiny": "blocks.0.attn_features.qkv.weight",
    }
    if name in token_sized:  # the token-mixing layers are sized with the extra token
        assert state[token_sized[name]].shape[1] == 18
    x = torch.randn(3, 3, 28, 28)
    cls, dist = m.train()(x)
    with torch.no_grad():
        feats = m.eval().forward_features(x)
        both = (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2
        assert torch.allclose(m.eval()(x), both)  # DeiT models.py:55-59
    assert cls.shape == dist.shape == (3, 10) and not torch.allclose(cls, dist)
    assert "dist_token" not in small(name).state_dict()


def test_the_distillation_token_carries_across_image_sizes_and_in_and_out_of_a_model():
    torch.manual_seed(0)
    src = small("ff_tiny", 28, distilled=True)
    s = src.state_dict()
    big = small("ff_tiny", 42, distilled=True)  # 16 -> 36 patches, 2 prefix tokens
    state = adapt_state_dict(s, big, log=lambda m: None)
    big.load_state_dict(state)
    assert torch.equal(state["dist_token"], s["dist_token"]) and torch.equal(
        state["head_dist.weight"], s["head_dist.weight"]
    )
    assert torch.equal(state["pos_embed"][:, :2], s["pos_embed"][:, :2])  # cls and dist positions kept
    w1 = state["blocks.0.mlp_tokens.fc1.weight"]
    assert w1.shape == (4 * 38, 38) and torch.equal(w1[:72, :2], s["blocks.0.mlp_tokens.fc1.weight"][:, :2])
    # the grid is resampled: a smooth image upsampled 28 -> 42 px gives nearly the same prediction
    x = F.interpolate(torch.randn(4, 3, 4, 4), size=28, mode="bicubic")
    with torch.no_grad():
        p28 = src.eval()(x).softmax(-1)
        p42 = big.eval()(F.interpolate(x, size=42, mode="bicubic")).softmax(-1)
    assert (p28 - p42).abs().max() < 0.1, (p28 - p42).abs().max()

    plain = small("ff_tiny", 35)  # a fine-tune without distillation: token, its position and head dropped
    plain.load_state_dict(adapt_state_dict(s, plain, log=lambda m: None))
    back = small("ff_tiny", 28, distilled=True)  # weights without a token: it starts as the cls token
    back.load_state_dict(adapt_state_dict(small("ff_tiny", 28).state_dict(), back, log=lambda m: None))
    cls, dist = back.train()(torch.randn(2, 3, 28, 28))
    assert torch.equal(cls, dist)


def test_hard_and_soft_losses_equal_deits_formulas_on_fixed_logits():
    s = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])  # distillation head
    t = torch.tensor([[0.0, 4.0, 1.0], [1.0, 0.0, -2.0]])  # teacher: argmax 1, 0
    hard = -(math.log(math.exp(-1.0) / sum(map(math.exp, (2.0, -1.0, 0.5))))
             + math.log(math.exp(0.1) / sum(map(math.exp, (0.1, 0.2, 3.0))))) / 2  # fmt: skip
    assert hard_distillation(s, t).item() == pytest.approx(hard, rel=1e-6)
    for tau in (1.0, 3.0):  # sum over the batch of KL(teacher || student) at tau, x tau^2 / (batch x classes)
        ps, pt = (s / tau).softmax(1), (t / tau).softmax(1)
        kl = sum(float(pt[i, k] * (pt[i, k].log() - ps[i, k].log())) for i in range(2) for k in range(3))
        assert soft_distillation(s, t, tau).item() == pytest.approx(kl * tau * tau / 6, rel=1e-6)

    teacher = torch.nn.Linear(4, 3)
    x, target = torch.randn(2, 4), torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])
    with torch.no_grad():
        t = teacher(x)
    cls = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
    base = -(target * cls.log_softmax(1)).sum(1).mean()  # the labels' loss: soft targets after mixup
    for mode, kd in (("hard", hard_distillation(s, t)), ("soft", soft_distillation(s, t, 2.0))):
        d = Distiller(frozen(teacher, CPU, torch.float32), mode, alpha=0.3, tau=2.0)
        assert d(x, (cls, s), target).item() == pytest.approx((0.7 * base + 0.3 * kd).item(), rel=1e-6)


def test_the_teacher_never_changes_while_its_student_learns():
    torch.manual_seed(0)
    teacher = frozen(small("vit_tiny"), CPU, torch.float32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = small("ff_tiny", distilled=True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    distiller = Distiller(teacher, "soft")
    for _ in range(3):
        teacher.train()  # whatever a caller does, the teacher runs in eval mode (no dropout, no drop path)
        x = torch.randn(4, 3, 28, 28)
        loss = distiller(x, student.train()(x), torch.randint(10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(
        student.state_dict()["dist_token"], small("ff_tiny", distilled=True).state_dict()["dist_token"]
    )


def pipeline(shards, run_dir, teacher_size: int = 28, extra=()) -> config.Config:
    return config.load(None, [
        f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", f"run.dir={run_dir}", "run.name=p",
        "data.img_size=28", "model.patch_size=7", "model.dim=32", "model.depth=2", "optim.global_batch=64",
        "stages.teacher.model.name=vit_tiny", "stages.teacher.model.heads=2",
        f"stages.teacher.data.img_size={teacher_size}",
        "stages.student.model.name=ff_tiny", "stages.student.init_from=scratch",
        "stages.student.distill.teacher=teacher", *extra,
    ])  # fmt: skip


def test_a_teacher_that_does_not_fit_its_student_stops_the_job_before_launch(fm_shards, tmp_path, capsys):
    preflight.check_job(pipeline(fm_shards, tmp_path), 1, 2)  # same classes and size: fits
    with pytest.raises(ConfigError) as e:  # a stage teacher not trained yet: judged by its config
        preflight.check_job(pipeline(fm_shards, tmp_path, teacher_size=35), 1, 2)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert str(e.value).startswith(
        "stages.student.distill.teacher=teacher: the teacher (vit_tiny, 10 classes, 35 px)"
    )
    assert "does not fit the student student (ff_tiny, 10 classes, 28 px)" in str(e.value)

    pkg = tmp_path / "three"  # a finished model directory (what a stage or `ffscale import` writes)
    pkg.mkdir()
    (stage,) = config.stages(config.load(None, ["model.name=vit_tiny", "data.img_size=28"]))
    write_card(pkg / "model.json", stage.cfg, 3, ["a", "b", "c"], None, {})
    cfg = pipeline(fm_shards, tmp_path, extra=[f"stages.student.distill.teacher={pkg}"])
    with pytest.raises(ConfigError, match=r"the teacher \(vit_tiny, 3 classes, 28 px\) does not fit"):
        preflight.check_job(cfg, 1, 2)
    args = [f"stages.student.distill.teacher={tmp_path / 'nowhere'}"]
    with pytest.raises(
        ConfigError, match="neither an earlier stage, a directory holding model.json, nor models:/"
    ):
        preflight.check_job(pipeline(fm_shards, tmp_path, extra=args), 1, 2)
    with pytest.raises(ConfigError, match="a teacher must be an earlier stage, and student is this one"):
        pipeline(fm_shards, tmp_path, extra=["stages.student.distill.teacher=student"])

    # `ffscale train` stops in its preflight, before any launcher or rank: one line, exit 2
    argv = ["train", "--nproc", "2", f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}",
            f"run.dir={tmp_path}", "data.img_size=28", "model.patch_size=7", f"distill.teacher={pkg}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "distill.teacher=" in err and "does not fit the student train" in err


def test_starting_weights_that_do_not_fit_the_model_stop_the_job_before_launch(fm_shards, tmp_path, capsys):
    """The issue's pipeline (a ViT teacher, then an FF student) starts its student from scratch; carrying
    the ViT's weights into the FF model is found from the two configs (the teacher has not trained yet)."""
    student_from_scratch = pipeline(fm_shards, tmp_path, extra=["stages.student.init_from=null"])
    preflight.check_job(student_from_scratch, 1, 2)
    for how, tokens, extra in (
        ("init_from=teacher", 18, ["stages.student.init_from=teacher"]),  # 16 patches, cls and dist
        ("by default, the previous stage's", 17, ["stages.student.distill.teacher=null", "stages.student.init_from=null"]),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            preflight.check_job(pipeline(fm_shards, tmp_path, extra=extra), 1, 2)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
        assert str(e.value).startswith(
            f"stages.student: its starting weights ({how}: stage teacher, vit_tiny) do not fit its model "
            f"(ff_tiny): blocks.0.norm2.weight is (32,), model wants ({tokens},)"
        ), e.value
        assert str(e.value).endswith("set stages.student.init_from=scratch to train it from scratch")
    # weights the carry rules fit: FF into a distilled FF (the token added), FF at 28 px into FF at 35 px
    # with another class count
    ff = ["stages.teacher.model.name=ff_tiny", "stages.teacher.model.heads=null",
          "stages.student.init_from=teacher"]  # fmt: skip
    preflight.check_job(pipeline(fm_shards, tmp_path, extra=ff), 1, 2)
    other = ["stages.student.distill.teacher=null", "stages.student.data.img_size=35",
             "stages.student.model.num_classes=12"]  # fmt: skip
    preflight.check_job(pipeline(fm_shards, tmp_path, extra=ff + other), 1, 2)

    argv = ["train", "--nproc", "2", f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}",
            f"run.dir={tmp_path / 'job'}", "data.img_size=28", "model.patch_size=7", "stages.vit.model.name=vit_tiny",
            "stages.ff.model.name=ff_tiny"]  # fmt: skip
    # `ffscale train`: the torch checks run beside the launch (ffscale/run/verdict.py); the launcher and
    # ranks it started are killed before they wrote anything of the run
    assert main(argv) == 2
    assert not [p for p in (tmp_path / "job").rglob("*") if p.name != ".lock" and p.is_file()]
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("ffscale: config error: stages.ff: its starting weights"), err
