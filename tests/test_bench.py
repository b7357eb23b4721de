"""`ffscale bench data` measures both loaders on the same shards in one run (no timing asserted)."""

from argparse import Namespace

from ffscale.bench import bench_data


def test_bench_data_reports_both_loaders_and_their_ratio(fm_shards):
    a = Namespace(shards=str(fm_shards / "train"), shards_given=True, images=0, source_size=0, img_size=64,
                  batch=32, workers=0, rand_augment=False)  # fmt: skip
    res = bench_data(a)
    for kind in ("webdataset", "dali"):
        assert res[kind]["images"] >= 1900 and res[kind]["img_per_s"] > 0 and res[kind]["cpu_ms_per_img"] > 0
    assert res["ratio_dali_over_webdataset"] > 0
