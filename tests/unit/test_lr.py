"""The learning rate of every step, held against timm's own CosineLRScheduler stepped as DeiT's
main.py steps it (once per epoch, after the epoch: main.py @ 2f76ec6 lines 375-382)."""

from __future__ import annotations

import pytest
import torch
from helpers.timm_stub import timm_module

from ffscale.engine.lr import Cosine

KW = dict(epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)


def timm_cosine(opt):
    mod = timm_module("timm.scheduler.cosine_lr")
    return mod.CosineLRScheduler(opt, t_initial=300, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6,
                                 cycle_limit=1, t_in_epochs=True)  # fmt: skip


def test_per_epoch_lr_is_what_deits_loop_over_timms_scheduler_trains_at():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = timm_cosine(opt)
    ours = Cosine(1e-3, steps_per_epoch=7, per_epoch=True, **KW)
    for epoch in range(300):
        lr = opt.param_groups[0]["lr"]  # what this epoch trains at
        assert [ours(epoch * 7 + i) for i in range(7)] == pytest.approx([lr] * 7, rel=1e-12), epoch
        sched.step(epoch)
    assert ours(0) == ours(7) == 1e-6  # epochs 0 and 1 both at warmup_lr


def test_per_step_lr_samples_the_same_curve_at_every_step():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = timm_cosine(opt)
    ours = Cosine(1e-3, steps_per_epoch=10, per_epoch=False, **KW)
    for step in (0, 3, 49, 50, 51, 1234, 2999, 3000):
        assert ours(step) == pytest.approx(sched._get_lr(step / 10)[0], rel=1e-12), step
