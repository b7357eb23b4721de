"""Training on other tools' shards, indexed in place, under both loaders."""

from __future__ import annotations

import json

import pytest
from helpers.launch import check, launch, small_overrides

LOADERS = ["webdataset", "dali"]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", LOADERS)
def test_training_runs_on_indexed_third_party_shards(foreign, tmp_path, kind):
    args = small_overrides(foreign, tmp_path, "foreign") + [
        f"data.loader={kind}", "data.img_size=32", "model.patch_size=8", "schedule.epochs=1",
        "optim.global_batch=16", "optim.micro_batch=16", "tracking.enabled=false",
    ]  # fmt: skip
    r = check(launch(args, nproc=1))
    rows = [
        json.loads(x) for x in (tmp_path / "foreign" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("val_top1" in r for r in rows) and f"{kind} loader" in r.stdout
