"""`ffscale bench data` end to end: both loaders timed, each round a fresh process."""

from argparse import Namespace

from ffscale.tools.bench.data import bench_data


def test_bench_data_reports_both_loaders_and_their_ratio(fm_shards):
    a = Namespace(shards=str(fm_shards / "train"), images=0, img_size=64, batch=32,
                  workers=0, rounds=1, warmup=1, crop_scale=[0.08, 1.0], no_rand_augment=True)  # fmt: skip
    res = bench_data(a)
    for kind in ("webdataset", "dali"):
        r = res[kind]
        assert r["images"] >= 1900 and r["img_per_s"] > 0 and r["cpu_ms_per_img"] > 0
        assert r["feed_img_per_s"] > 0 and "MainThread" in r["py_threads"]
        assert 0 < r["host_resize_us_per_img"] <= r["main_thread_us_per_img"] if kind == "dali" else True
        assert 0 < r["py_threads_us_per_img"] and 0 < r["feed_py_threads_us_per_img"]
    assert res["target_py_threads_us_per_img"] == 5
    assert res["ratio_dali_over_webdataset"] > 0
