"""`ffscale bench data` end to end: both loaders timed, each round a fresh process; `ffscale bench
startup-scale`: ranks' data set-up started together, each a fresh process."""

from argparse import Namespace

from ffscale.tools.bench.data import bench_data, print_data, table


def test_bench_data_reports_both_loaders_and_their_ratio(fm_shards):
    a = Namespace(shards=str(fm_shards / "train"), images=0, img_size=64, batch=32,
                  workers=0, rounds=1, warmup=1, crop_scale=[0.08, 1.0], no_rand_augment=True,
                  dali_batch=0)  # fmt: skip
    res = bench_data(a)
    for kind in ("webdataset", "dali"):
        r = res[kind]
        # 64 batches of 32, after the warm-up: 1 batch, or DALI's whole first iteration (16 batches)
        assert r["images"] == (64 - (16 if kind == "dali" else 1)) * 32
        assert r["img_per_s"] > 0 and r["cpu_ms_per_img"] > 0
        assert r["feed_img_per_s"] > 0 and "MainThread" in r["py_threads"]
        assert 0 < r["host_resize_us_per_img"] <= r["main_thread_us_per_img"] if kind == "dali" else True
        assert 0 < r["py_threads_us_per_img"] and 0 < r["feed_py_threads_us_per_img"]
        assert 0 < r["ahead_py_threads_us_per_img"]
    assert res["target_py_threads_us_per_img"] == 5
    # DALI at data.dali_batch's 512 images per iteration (16 batches), and its baseline of one batch
    dali = res["dali"]
    assert dali["iteration_images"] == 512 and 0 < dali["ahead_one_batch_py_threads_us_per_img"]
    assert 0 < dali["one_batch_img_per_s"]
    # the graph built once before the epoch's pipeline is made from it, and that the cheaper
    assert dali["graph_build_cpu_s"] * 1e3 > dali["pipeline_cpu_ms"] > 0
    assert res["webdataset"]["graph_build_cpu_s"] is None
    print_data(res)
    assert table(res)[2][:3] == ["dali", 32, 512]
    assert res["ratio_dali_over_webdataset"] > 0


def test_bench_startup_scale_starts_ranks_together_and_counts_their_opens(tmp_path, capsys):
    from ffscale.tools.bench.startup_scale import print_table, run

    a = Namespace(
        ranks="1,2", samples=3000, shard_size=1000, images=64, small_shard_size=16, batch=4, tmp=str(tmp_path)
    )
    res = run(a)
    assert set(res["ranks"]) == {"1", "2"}
    for r in res["ranks"].values():
        # the big split: manifest twice (plan, index) and one index file; the small one: its manifest,
        # its index and the shard(s) of the rank's first 4 samples, opened once each and held
        assert r["opens"]["manifest"] == 3 and r["opens"]["index"] == 2
        assert 1 <= r["opens"]["shards"] <= 4
        assert r["private_dirty_mb"]["median"] > 0 and r["total_s"]["max"] >= r["total_s"]["median"] > 0
    assert res["at_scale"]["job_opens"] == 4096 * sum(res["ranks"]["1"]["opens"].values())
    print_table(res)
    assert "extrapolated" in capsys.readouterr().out
