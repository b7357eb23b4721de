"""Carrying a trained FF-only model to another image size: the token MLPs resampled on the patch
grid keep it useful before any fine-tuning, fresh ones do not (4 epochs of training: minutes, so
not in the unit tier)."""

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


def trained(fm_shards):
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


def test_token_mlp_carry_keeps_the_model_useful_at_a_new_resolution(fm_shards):
    trained_28px = trained(fm_shards)
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
