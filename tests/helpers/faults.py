"""What the fault modules' jobs share (tests/e2e/test_faults.py, tests/e2e/test_faults_numeric.py):
2 ranks, ZeRO-2, two epochs, a checkpoint every 8 steps."""

from __future__ import annotations

from helpers.launch import small_overrides

STAGE = "train"  # a config without `stages` has one stage of this name


def args(shards, runs, name, *extra):
    return small_overrides(shards, runs, name) + [
        "schedule.epochs=2",
        "checkpoint.every_steps=8",
        "deepspeed.zero_stage=2",
        *extra,
    ]
