"""`ffscale doctor`'s arithmetic that needs no launch (the checks themselves: tests/e2e/test_doctor.py)."""

from ffscale.config import StageCfg
from ffscale.data.manifest import Manifest, ShardInfo
from ffscale.tools.doctor import shm_check


def test_dev_shm_is_checked_against_nccl_and_what_dalis_feed_holds_per_rank():
    # ImageNet-like: 1,000 samples of 110 KB in a shard; 6 slots of 512 images per loader (train and
    # val), 8 ranks: 8 x 2 x 6 x 512 x 110 KB = 5.4 GB, beside NCCL's 1 GiB
    m = Manifest("s", ["a", "b"], [ShardInfo("s-0.tar", 1000, "0" * 64, size=110_000_000)])
    manifests = {"train": (m, []), "val": (m, [])}
    cfg = StageCfg()
    short = shm_check(cfg, manifests, 8, shm=6 * 2**30)
    assert not short.ok and not short.fatal
    assert (
        short.figure
        == "6.0 GiB; NCCL wants 1 GiB and DALI's feed about 5.0 GiB for 8 ranks at 512 images per iteration"
    )
    assert shm_check(cfg, manifests, 8, shm=7 * 2**30).ok
    assert not shm_check(cfg, manifests, 1, shm=2**30).ok and shm_check(cfg, manifests, 1, shm=2 * 2**30).ok
