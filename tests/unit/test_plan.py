"""ShardPlan: which shards each rank reads, per epoch."""

from __future__ import annotations

import pytest
import torch

from ffscale import errors
from ffscale.data.plan import ShardPlan, pad_eval


def test_shard_plan_gives_ranks_disjoint_shards_that_change_per_epoch(tmp_path):
    files = [tmp_path / f"s{i}.tar" for i in range(8)]
    plans = [ShardPlan(files, [100] * 8, rank, 2, seed=0) for rank in (0, 1)]
    for epoch in (0, 1):
        a, b = (p.train_shards(epoch) for p in plans)
        assert not set(a) & set(b) and sorted(a + b) == list(range(8))
    assert plans[0].train_shards(0) != plans[0].train_shards(1)
    assert plans[0].train_steps(batch=32, held_back=2) == 400 // 32 - 2
    assert plans[0].eval_steps(batch=32, workers=1) == -(-400 // 32)
    with pytest.raises(errors.DataError, match="3 shard\\(s\\) for 4 ranks"):
        ShardPlan(files[:3], [1] * 3, 0, 4, 0)
    pads = list(pad_eval(2, 5, 8, torch.device("cpu")))
    assert len(pads) == 3 and all(y.tolist() == [-1] and x.shape == (1, 3, 8, 8) for x, y in pads)
