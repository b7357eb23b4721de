"""`ffscale bench train`: both loops measured in real (multi-rank) jobs; `ffscale bench startup` on a real launch."""

from argparse import Namespace

import pytest

from ffscale.models import create_model


@pytest.mark.e2e
def test_bench_train_measures_both_loops_and_zero3_halves_model_states_on_two_ranks():
    from ffscale.tools.bench.train import run

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
    from ffscale.tools.bench.train import run

    a = Namespace(config=[], nproc=1, zero="2", steps=4, warmup=2, rounds=1,
                  overrides=["model.dim=64", "model.depth=2", "data.img_size=32", "model.patch_size=8",
                             "optim.micro_batch=8", "model.num_classes=10", "optim.base_lr=0.3",
                             "model.compile=true", "model.grad_ckpt=true", "deepspeed.offload_optimizer=true"])  # fmt: skip
    (r,) = run(a)["runs"]
    assert r["compiled"] and r["grad_ckpt"] and r["offload_optimizer"]
    first, last = r["loss_first_last"]
    assert last < first - 0.5  # the engine still learns its one batch


@pytest.mark.e2e
def test_bench_startup_times_each_part_of_a_real_launch_in_order(fm_shards):
    from helpers.launch import ROOT

    from ffscale.tools.bench.startup import PARTS, run

    a = Namespace(config=[str(ROOT / "configs" / "demo.yaml")], nproc=2, rounds=1, warmup=0,
                  overrides=[f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}"])  # fmt: skip
    parts = {k: p["median_s"] for k, p in run(a)["parts"].items()}  # one round, no warm-up
    assert all(v >= 0 for v in parts.values()), parts  # every mark came after the one before it
    top = [k for k, *_ in PARTS if k != "total" and "." not in k]
    assert sum(parts[k] for k in top) == pytest.approx(parts["total"]) and parts["launcher"] > 0
