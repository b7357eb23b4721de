"""Our config -> DeepSpeed's dict: every surprising default written out."""

from __future__ import annotations

import pytest

from ffscale import config as C
from ffscale.engine import ds_config


def stage_cfg(*overrides: str) -> C.StageCfg:
    return C.stages(C.load(None, list(overrides)))[0].cfg


# -- DeepSpeed config and schedule -------------------------------------------------------------
def test_deepspeed_config_writes_every_surprising_default():
    s = stage_cfg(
        "optim.global_batch=256", "optim.micro_batch=32", "optim.base_lr=5e-4", "deepspeed.zero_stage=2"
    )
    cfg = ds_config.build(s, world=2, accum=4, precision="bf16", n_params=10**6)
    assert (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    ) == (
        256,
        32,
        4,
    )
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed would default to 1.0
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert ds_config.peak_lr(s) == pytest.approx(5e-4 * 256 / 512)
    assert "scheduler" not in cfg  # the lr is ffscale's (engine/lr.py), not DeepSpeed's WarmupCosineLR
    assert cfg["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in cfg["zero_optimization"]


def test_deepspeed_extra_is_merged_last_and_deeply():
    s = stage_cfg("deepspeed.extra.zero_optimization.overlap_comm=false", "deepspeed.extra.foo=1")
    cfg = ds_config.build(s, 1, 1, "fp32")
    assert cfg["zero_optimization"]["overlap_comm"] is False and cfg["foo"] == 1
    assert cfg["zero_optimization"]["stage"] == s.deepspeed.zero_stage  # the rest kept


def test_offload_puts_the_optimizer_on_the_cpu_with_torch_adamw():
    s = stage_cfg("deepspeed.offload_optimizer=true", "deepspeed.zero_stage=1")
    cfg = ds_config.build(s, 1, 1, "fp32")
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_bf16_accumulates_in_fp32_and_zero0_takes_the_fused_bf16_optimizer():
    s = stage_cfg("deepspeed.zero_stage=0", "deepspeed.comm_dtype=bf16")
    cfg = ds_config.build(s, 8, 4, "bf16")
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["communication_data_type"] == "bf16"
    assert cfg["zero_optimization"]["stage"] == 1  # DeepSpeed's ZeRO-0 bf16 path is per-tensor and bf16-only
    fp32 = ds_config.build(s, 8, 4, "fp32")
    assert fp32["zero_optimization"]["stage"] == 0 and "data_types" not in fp32
    assert ds_config.build(stage_cfg(), 8, 4, "bf16")["communication_data_type"] == "fp32"  # default
    with pytest.raises(C.ConfigError, match="deepspeed.comm_dtype='int8': must be one of fp32, bf16, fp16"):
        stage_cfg("deepspeed.comm_dtype=int8")
