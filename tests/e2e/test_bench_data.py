"""`ffscale bench data` end to end: both loaders timed, each round a fresh process."""

from argparse import Namespace

from ffscale.tools.bench.data import bench_data


def test_bench_data_reports_both_loaders_and_their_ratio(fm_shards):
    a = Namespace(shards=str(fm_shards / "train"), images=0, img_size=64, batch=32,
                  workers=0, rounds=1, warmup=1, crop_scale=[0.08, 1.0], no_rand_augment=True)  # fmt: skip
    res = bench_data(a)
    for kind in ("webdataset", "dali"):
        assert res[kind]["images"] >= 1900 and res[kind]["img_per_s"] > 0 and res[kind]["cpu_ms_per_img"] > 0
    assert res["ratio_dali_over_webdataset"] > 0
