"""The benchmarks' inputs and their like-for-like setup (the figures live in docs/performance.md)."""

from argparse import Namespace

from ffscale.tools.bench.data import bench_cfg


def test_bench_data_gives_both_loaders_the_same_augmentation():
    from dataclasses import asdict

    web, dali = (asdict(bench_cfg(kind, 224, 2)) for kind in ("webdataset", "dali"))
    assert {k for k in web if web[k] != dali[k]} == {"loader"}
    assert web["rand_augment"] and web["color_jitter"] == 0  # RandAugment in both; colour jitter DALI-only


def test_imagenet_like_input_has_imagenet_sizes():
    import random

    from ffscale.data.ingest.sources import fashion_mnist_arrays
    from ffscale.tools.bench.data import imagenet_like_size, mosaic_jpeg

    rng = random.Random(0)
    sizes = [imagenet_like_size(rng) for _ in range(400)]
    assert 0.5 < sum(s in ((500, 375), (375, 500)) for s in sizes) / len(sizes) < 0.8
    assert all(200 <= min(s) and max(s) <= 800 for s in sizes)
    pictures, _ = fashion_mnist_arrays("val")
    kb = [len(mosaic_jpeg(pictures, random.Random(i), sizes[i])) / 1024 for i in range(20)]
    assert 60 < sum(kb) / len(kb) < 180  # ImageNet's JPEGs average about 110 KB


def test_fixed_token_mlp_width_makes_ff_cost_linear_in_patches():
    from ffscale.tools.bench.scaling import scaling

    a = Namespace(sizes="64,128", dim=48, depth=1, token_hidden=64, batch=2, steps=1)
    res = scaling(a)
    growth = {k: g[1] / g[0] for k, g in res["gflops"].items()}  # 4x the patches
    quad, lin, vit = (
        growth["ff (token MLP 4 x tokens)"],
        growth["ff (token MLP 64)"],
        growth["vit (attention)"],
    )
    assert lin < 4.5 < quad and vit > lin  # linear ~4x; 4 x tokens and attention grow faster
    assert all(t > 0 for ts in res["step_s"].values() for t in ts)


def test_cpu_ranks_get_jemalloc_unless_opted_out_or_preloaded(monkeypatch):
    from ffscale.util import hostenv

    monkeypatch.setattr(hostenv, "jemalloc", lambda: "libjemalloc.so.2")
    monkeypatch.setattr(hostenv, "gpu_host", lambda: False)
    env = hostenv.rank_env({"PATH": "/bin"})
    assert env["LD_PRELOAD"] == "libjemalloc.so.2" and "dirty_decay_ms:-1" in env["MALLOC_CONF"]
    assert hostenv.rank_env({"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"  # the user's wins
    for env in ({"FFSCALE_JEMALLOC": "0"}, {"LD_PRELOAD": "libtcmalloc.so"}):
        assert hostenv.rank_env(env) == env
    monkeypatch.setattr(hostenv, "gpu_host", lambda: True)  # a GPU host: ranks left as they are
    assert "LD_PRELOAD" not in hostenv.rank_env({})
    monkeypatch.setattr(hostenv, "gpu_host", lambda: False)
    monkeypatch.setattr(hostenv, "jemalloc", lambda: None)  # not installed: nothing changes
    assert hostenv.rank_env({}) == {}


def test_bench_index_opens_a_synthetic_split_in_fresh_processes(tmp_path, capsys):
    from ffscale.tools.bench.index import bench_index, print_index

    a = Namespace(samples=3000, shard_size=1250, runs=2, compare=True, tmp=str(tmp_path))
    res = bench_index(a)
    assert (res["samples"], res["shards"], res["runs"]) == (3000, 3, 2)
    assert 0 < round(res["index_mb"] * 1e6) - 3000 * 36 < 4096  # the .npy header, then 36 bytes a sample
    assert {"median", "min", "max"} <= set(res["open_s"]) and "parsed_in_memory" in res
    print_index(res)
    assert "| index opened (sha256 checked, mapped) |" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # the synthetic split is removed


def test_python_thread_cpu_counts_each_python_thread_from_its_own_clock():
    import threading
    import time

    from ffscale.tools.bench.data import PythonThreadCpu

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    cpu = PythonThreadCpu()
    t = threading.Thread(target=spin, args=(0.2,), name="spinner")
    t.start()
    time.sleep(0.01)
    cpu.sample()  # the thread is seen while it runs: counted from here
    t.join(timeout=0.01)
    while t.is_alive():
        cpu.sample()
        time.sleep(0.01)
    assert "spinner" in cpu.names() and "MainThread" in cpu.names()
    assert (
        0.1 < cpu.seconds() < 0.2 + 0.15
    )  # the spinner's time after it was first seen, and the main thread's
