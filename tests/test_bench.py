"""`ffscale bench ...` report what users compare; figures are measured, never asserted as speed."""

from argparse import Namespace

import pytest

from ffscale.bench_data import bench_cfg, bench_data
from ffscale.models import create_model


def test_bench_data_reports_both_loaders_and_their_ratio(fm_shards):
    a = Namespace(shards=str(fm_shards / "train"), images=0, img_size=64, batch=32,
                  workers=0, rounds=1, warmup=1, crop_scale=[0.08, 1.0])  # fmt: skip
    res = bench_data(a)
    for kind in ("webdataset", "dali"):
        assert res[kind]["images"] >= 1900 and res[kind]["img_per_s"] > 0 and res[kind]["cpu_ms_per_img"] > 0
    assert res["ratio_dali_over_webdataset"] > 0


def test_bench_data_gives_both_loaders_the_same_augmentation():
    from dataclasses import asdict

    web, dali = (asdict(bench_cfg(kind, 224, 2)) for kind in ("webdataset", "dali"))
    assert {k for k in web if web[k] != dali[k]} == {"loader"}
    assert not web["rand_augment"] and web["color_jitter"] == 0  # only DALI implements these


def test_imagenet_like_input_has_imagenet_sizes():
    import random

    from ffscale.bench_data import imagenet_like_size, mosaic_jpeg
    from ffscale.data.shards import fashion_mnist_arrays

    rng = random.Random(0)
    sizes = [imagenet_like_size(rng) for _ in range(400)]
    assert 0.5 < sum(s in ((500, 375), (375, 500)) for s in sizes) / len(sizes) < 0.8
    assert all(200 <= min(s) and max(s) <= 800 for s in sizes)
    pictures, _ = fashion_mnist_arrays("val")
    kb = [len(mosaic_jpeg(pictures, random.Random(i), sizes[i])) / 1024 for i in range(20)]
    assert 60 < sum(kb) / len(kb) < 180  # ImageNet's JPEGs average about 110 KB


@pytest.mark.e2e
def test_bench_train_measures_both_loops_and_zero3_halves_model_states_on_two_ranks():
    from ffscale.bench_train import run

    a = Namespace(config=[], nproc=2, zero="0,2,3", steps=1, warmup=1, rounds=1,
                  overrides=["model.dim=192", "model.depth=3", "data.img_size=32", "model.patch_size=8",
                             "optim.micro_batch=4", "model.num_classes=10", "deepspeed.precision=fp32"])  # fmt: skip
    z0, z2, z3 = run(a)["runs"]
    for r in (z0, z2, z3):
        assert (
            r["ranks"] == 2 and r["plain_step_s"] > 0 and r["ffscale_step_s"] > 0 and 0 < r["mfu_pct"] < 100
        )
    m0, m2, m3 = z0["model_states_mib"], z2["model_states_mib"], z3["model_states_mib"]
    model = create_model("ff_tiny", dim=192, depth=3, img_size=32, patch_size=8, num_classes=10)
    mib = 4 * sum(p.numel() for p in model.parameters()) / 2**20  # the model in fp32
    # ZeRO-0, fp32: params, grads, Adam's two moments (+ step counts); no master copy
    assert m0["params"] == pytest.approx(mib) and m0["grads"] == pytest.approx(mib)
    assert m0["optimizer"] == pytest.approx(2 * mib, rel=1e-3)
    # ZeRO-2: whole params, half the moments, and the fp32 master is the params (no duplicate)
    assert m2["params"] == pytest.approx(mib, rel=0.01) and m2["optimizer"] == pytest.approx(mib, rel=0.01)
    # ZeRO-3 on 2 ranks: half the parameters (small norms and biases stay whole), and in all
    assert 0.5 * mib < m3["params"] < 0.6 * mib
    assert m3["total"] < 0.6 * m0["total"]  # issue 6's bar, on a small model


@pytest.mark.e2e
def test_bench_train_runs_compiled_checkpointed_and_offloaded():
    from ffscale.bench_train import run

    a = Namespace(config=[], nproc=1, zero="2", steps=4, warmup=2, rounds=1,
                  overrides=["model.dim=64", "model.depth=2", "data.img_size=32", "model.patch_size=8",
                             "optim.micro_batch=8", "model.num_classes=10", "optim.base_lr=0.3",
                             "model.compile=true", "model.grad_ckpt=true", "deepspeed.offload_optimizer=true"])  # fmt: skip
    (r,) = run(a)["runs"]
    assert r["compiled"] and r["grad_ckpt"] and r["offload_optimizer"]
    first, last = r["loss_first_last"]
    assert last < first - 0.5  # the engine still learns its one batch


def test_fixed_token_mlp_width_makes_ff_cost_linear_in_patches():
    from ffscale.bench_scaling import scaling

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
    from ffscale import hostenv

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
