"""Carrying an FF-only model to another image size (pipeline stages): the token MLPs are resampled
on the patch grid, so the carried model is useful before any fine-tuning."""

import pytest
import torch

from ffscale.config import DataCfg
from ffscale.data.augment import DeviceOps
from ffscale.data.loader import build_loader
from ffscale.models import create_model
from ffscale.models.resize import adapt_state_dict

CPU = torch.device("cpu")


def cfg(size: int) -> DataCfg:
    return DataCfg(loader="webdataset", img_size=size, crop_pct=1.0, scale=[0.8, 1.0], workers=0,
                   rand_augment=False, mixup=0, cutmix=0, reprob=0, mean=[0.286] * 3, std=[0.353] * 3)  # fmt: skip


def small(size: int, classes: int = 10):
    return create_model(
        "ff_tiny", img_size=size, patch_size=7, dim=64, depth=3, num_classes=classes, drop_path=0
    )


@torch.no_grad()
def top1(model, shards, size) -> float:
    loader, _ = build_loader(cfg(size), str(shards / "val"), False, 0, 1, 128, 0, None, CPU)
    ops = DeviceOps(cfg(size), 10, CPU, torch.float32)
    right = n = 0
    for x, y in loader.epoch(0):
        x, y = ops.eval_batch(x, y)
        right += int((model.eval()(x).argmax(1) == y).sum())
        n += len(y)
    return 100 * right / n


@pytest.fixture(scope="module")
def trained_28px(fm_shards):
    torch.manual_seed(0)
    model = small(28)
    loader, _ = build_loader(cfg(28), str(fm_shards / "train"), True, 0, 1, 64, 0, None, CPU)
    ops = DeviceOps(cfg(28), 10, CPU, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    for epoch in range(4):
        for x, y in loader.epoch(epoch):
            x, t = ops.train_batch(x, y, 0.1)
            loss = torch.sum(-t * torch.log_softmax(model(x), -1), -1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def test_token_mlp_carry_keeps_the_model_useful_at_a_new_resolution(trained_28px, fm_shards):
    base = top1(trained_28px, fm_shards, 28)
    assert base > 50
    for size in (42,):  # 16 -> 36 patches
        carried, fresh = small(size), small(size)
        carried.load_state_dict(adapt_state_dict(trained_28px.state_dict(), carried, log=lambda m: None))
        fresh.load_state_dict(
            adapt_state_dict(trained_28px.state_dict(), fresh, log=lambda m: None, carry_token_mlp=False)
        )
        acc, acc_fresh = top1(carried, fm_shards, size), top1(fresh, fm_shards, size)
        assert acc > 35 and acc > acc_fresh + 20, (size, base, acc, acc_fresh)


def test_head_reinitialised_when_classes_change_and_shapes_checked(trained_28px):
    other = small(28, classes=3)
    state = adapt_state_dict(trained_28px.state_dict(), other, log=lambda m: None)
    assert state["head.weight"].shape == (3, 64)
    assert torch.equal(
        state["blocks.0.mlp_tokens.fc1.weight"], trained_28px.state_dict()["blocks.0.mlp_tokens.fc1.weight"]
    )
    vit = create_model("vit_tiny", img_size=28, patch_size=7, dim=64, depth=3, num_classes=10, heads=2)
    with pytest.raises(ValueError, match="another architecture|do not fit"):
        adapt_state_dict(trained_28px.state_dict(), vit, log=lambda m: None)


def test_carry_is_function_preserving_for_the_same_size(trained_28px):
    same = small(28)
    same.load_state_dict(adapt_state_dict(trained_28px.state_dict(), same, log=lambda m: None))
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(same.eval()(x), trained_28px.eval()(x))


def test_resuming_a_checkpoint_of_another_model_names_the_tensor(tmp_path):
    import json

    from ffscale.engine.checkpoint import CheckpointMismatch, check_model, model_signature

    old = create_model("ff_tiny", img_size=28, patch_size=7, dim=32, depth=2, num_classes=10)
    (tmp_path / "step8").mkdir()
    (tmp_path / "step8" / "ffscale.json").write_text(json.dumps({"params": model_signature(old)}))
    (tmp_path / "latest").write_text("step8")
    check_model(tmp_path, old)  # the same model resumes
    new = create_model("ff_tiny", img_size=35, patch_size=7, dim=32, depth=2, num_classes=10)
    with pytest.raises(
        CheckpointMismatch, match=r"step8 holds another model: blocks\.0\.mlp_tokens\.fc1\.bias"
    ):
        check_model(tmp_path, new)
