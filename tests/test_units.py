"""Fast tests of pure logic: no launches, no DeepSpeed engine, no shards on disk (seconds)."""

from __future__ import annotations

import pytest
import torch

from ffscale import config as C
from ffscale import errors, nonfinite
from ffscale.atomic import atomic_path, write_atomic
from ffscale.data.dali import parse_labels
from ffscale.data.plan import ShardPlan, pad_eval
from ffscale.data.samples import parse_label
from ffscale.engine import ds_config
from ffscale.metrics import summarize, topk_counts
from ffscale.progress import Meter, fmt_time
from ffscale.schedule import plan_steps


def stage_cfg(*overrides: str) -> C.StageCfg:
    return C.stages(C.load(None, list(overrides)))[0].cfg


# -- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [(b"7", 7), (b"  12\n", 12), (b"0", 0)],
)
def test_cls_label_parses_ascii_digits(raw, expected):
    assert parse_label({"cls": raw, "__key__": "k", "__url__": "s.tar"}, 100) == expected


@pytest.mark.parametrize(
    "sample, message",
    [
        ({}, "no .cls label"),
        ({"cls": b"seven"}, "label b'seven' is not an integer"),
        ({"cls": b"100"}, r"label 100 out of range \[0, 100\)"),
        ({"cls": b"-1"}, "label -1 out of range"),
    ],
)
def test_bad_cls_labels_name_shard_and_key(sample, message):
    with pytest.raises(errors.DataError, match=rf"shard s.tar sample k: {message}"):
        parse_label({"__key__": "k", "__url__": "s.tar", **sample}, 100)


def test_dali_label_bytes_parse_like_the_host_parser():
    texts = [b"7", b"123", b" 42\n", b"0", b"x1", b"", b"1 2", b"99999999999999999"]
    raw = torch.zeros(len(texts), 16, dtype=torch.uint8)
    for i, t in enumerate(texts):
        raw[i, : min(len(t), 16)] = torch.tensor(list(t[:16]), dtype=torch.uint8)
    lengths = torch.tensor([len(t) for t in texts])
    assert parse_labels(raw, lengths).tolist() == [7, 123, 42, 0, -2, -2, -2, -2]


# -- the non-finite policy ---------------------------------------------------------------------
def test_nonfinite_stop_names_the_step_and_the_checkpoint(tmp_path):
    o = stage_cfg().optim
    with pytest.raises(
        errors.NonFiniteLoss, match=r"step 7 \(optim.nonfinite=stop\).*ck/step4.*nonfinite=skip"
    ):
        nonfinite.check(o, 7, 1, tmp_path / "ck" / "step4", "stage x")


def test_nonfinite_skip_goes_on_until_past_the_limit():
    o = stage_cfg("optim.nonfinite=skip", "optim.max_skipped=2").optim
    nonfinite.check(o, 5, 1, None, "stage x")
    nonfinite.check(o, 6, 2, None, "stage x")
    with pytest.raises(
        errors.NonFiniteLoss, match="3 steps skipped, more than optim.max_skipped=2.*none yet"
    ):
        nonfinite.check(o, 9, 3, None, "stage x")


# -- DeepSpeed config and schedule -------------------------------------------------------------
def test_deepspeed_config_writes_every_surprising_default():
    s = stage_cfg(
        "optim.global_batch=256", "optim.micro_batch=32", "optim.base_lr=5e-4", "deepspeed.zero_stage=2"
    )
    cfg = ds_config.build(
        s, world=2, accum=4, total_steps=1000, warmup_steps=50, precision="bf16", n_params=10**6
    )
    assert (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    ) == (
        256,
        32,
        4,
    )
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed would default to 1.0
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    sched = cfg["scheduler"]["params"]
    lr = 5e-4 * 256 / 512
    assert ds_config.peak_lr(s) == pytest.approx(lr)
    assert sched["warmup_min_ratio"] == pytest.approx(1e-6 / lr)  # warmup starts at warmup_lr, not 0
    assert sched["cos_min_ratio"] == pytest.approx(1e-5 / lr)
    assert (sched["total_num_steps"], sched["warmup_num_steps"]) == (1000, 50)
    assert cfg["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in cfg["zero_optimization"]


def test_deepspeed_extra_is_merged_last_and_deeply():
    s = stage_cfg("deepspeed.extra.zero_optimization.overlap_comm=false", "deepspeed.extra.foo=1")
    cfg = ds_config.build(s, 1, 1, 10, 1, "fp32")
    assert cfg["zero_optimization"]["overlap_comm"] is False and cfg["foo"] == 1
    assert cfg["zero_optimization"]["stage"] == s.deepspeed.zero_stage  # the rest kept


def test_offload_puts_the_optimizer_on_the_cpu_with_torch_adamw():
    s = stage_cfg("deepspeed.offload_optimizer=true", "deepspeed.zero_stage=1")
    cfg = ds_config.build(s, 1, 1, 10, 1, "fp32")
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_steps_per_epoch_end_on_an_optimizer_step_and_warmup_scales():
    s = stage_cfg(
        "optim.global_batch=128", "optim.micro_batch=16", "schedule.epochs=3", "schedule.warmup_epochs=0.5"
    )
    st = plan_steps(s, world=2, loader_steps=37)  # accum 4: 37 micro-batches -> 36, 9 steps
    assert (st.accum, st.micro_per_epoch, st.per_epoch, st.total, st.warmup) == (4, 36, 9, 27, 4)
    assert st.epoch_of(18) == 0.5
    with pytest.raises(
        C.ConfigError, match="stage train: one epoch of .* is smaller than optim.global_batch"
    ):
        plan_steps(s, world=2, loader_steps=3)
    with pytest.raises(
        C.ConfigError,
        match=r"stages.train.optim.global_batch=128 is not divisible by ranks x micro_batch = 3 x 16",
    ):
        plan_steps(s, world=3, loader_steps=37)


# -- progress ------------------------------------------------------------------------------------
def test_meter_reports_throughput_mfu_and_eta(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("ffscale.progress.time.perf_counter", lambda: now[0])
    m = Meter(total_steps=100, images_per_step=64, flops_per_image=1e9, peak_flops=1e12)
    assert m.update(10) == {}  # the first call only starts the clock
    now[0] += 2.0
    r = m.update(20)  # 10 steps x 64 images in 2 s
    assert r["img_per_s"] == pytest.approx(320.0)
    assert r["mfu"] == pytest.approx(100 * 320 * 1e9 / 1e12)
    assert r["eta_s"] == pytest.approx(80 / 5.0)  # 80 steps left at 5 steps/s
    assert (fmt_time(16), fmt_time(3725)) == ("0m16s", "1h02m")


# -- evaluation counts, shard plans ---------------------------------------------------------
def test_topk_counts_skip_padding_and_sum_across_batches():
    ranks = torch.tensor([6.0, 5, 4, 3, 2, 1, 0])  # class c has the (c+1)-th highest logit
    logits = ranks.repeat(4, 1)
    y = torch.tensor([0, 3, 6, -1])  # top-1 hit, top-5 hit only, miss, padding
    sums = topk_counts(logits, y)
    assert sums[:3].tolist() == [3, 1, 2]
    assert sums[3].item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:3], y[:3], reduction="sum")
    )
    r = summarize(sums + topk_counts(logits[:1], y[:1]))
    assert (r["val_samples"], r["val_top1"], r["val_top5"]) == (4, 50.0, 75.0)


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


# -- atomic writes and error reporting -----------------------------------------------------------
def test_a_failed_write_leaves_the_previous_file(tmp_path):
    f = tmp_path / "latest"
    write_atomic(f, "step8")
    with pytest.raises(OSError), atomic_path(f) as tmp:
        tmp.write_text("ste")
        raise OSError("no space left on device")
    assert f.read_text() == "step8" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_errors_print_one_line_on_the_rank_that_should(capsys):
    assert errors.report(errors.ConfigError("optim.lrr: unknown"), rank=1) == 2
    assert capsys.readouterr().err == ""  # every rank has it: rank 0 says it
    assert errors.report(errors.ConfigError("optim.lrr: unknown"), rank=0) == 2
    assert capsys.readouterr().err == "ffscale: config error: optim.lrr: unknown\n"
    assert errors.report(errors.DataError("shard a.tar sample 3: bad"), rank=1) == 2  # found by this rank
    assert capsys.readouterr().err == "ffscale: data error: shard a.tar sample 3: bad\n"
    assert errors.guarded(lambda: (_ for _ in ()).throw(errors.Preempted("SIGTERM"))) == 143
    assert errors.CheckpointWriteError().exit_code == 1 and errors.CheckpointMismatch().exit_code == 2


def test_tracking_off_makes_no_store_and_logs_nothing(tmp_path):
    from ffscale import tracking

    cfg = C.load(None, ["tracking.enabled=false", f"run.dir={tmp_path}"])
    tracking.ensure_store(cfg, tmp_path / "default")
    tracker = tracking.create(cfg, tmp_path / "default", rank=0)
    assert isinstance(tracker, tracking.NullTracker) and not any(tmp_path.iterdir())


def test_bf16_accumulates_in_fp32_and_zero0_takes_the_fused_bf16_optimizer():
    s = stage_cfg("deepspeed.zero_stage=0", "deepspeed.comm_dtype=bf16")
    cfg = ds_config.build(s, 8, 4, 100, 10, "bf16")
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["communication_data_type"] == "bf16"
    assert cfg["zero_optimization"]["stage"] == 1  # DeepSpeed's ZeRO-0 bf16 path is per-tensor and bf16-only
    fp32 = ds_config.build(s, 8, 4, 100, 10, "fp32")
    assert fp32["zero_optimization"]["stage"] == 0 and "data_types" not in fp32
    assert ds_config.build(stage_cfg(), 8, 4, 100, 10, "bf16")["communication_data_type"] == "fp32"  # default
    with pytest.raises(C.ConfigError, match="deepspeed.comm_dtype='int8': must be one of fp32, bf16, fp16"):
        stage_cfg("deepspeed.comm_dtype=int8")


def test_lineage_says_where_a_stages_weights_came_from(tmp_path):
    from ffscale.pipeline import init_weights_for
    from ffscale.weights import file_digest

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights")
    cfg = C.load(None, ["stages.pre.init_from=null", "stages.ft.init_from=null", f"stages.file.init_from={w}",
                        "stages.named.init_from=pre", "stages.fresh.init_from=scratch", f"run.dir={tmp_path}"])  # fmt: skip
    pre, ft, file, named, fresh = C.stages(cfg)
    assert init_weights_for(pre, []) == (None, "scratch")  # a first stage trains from scratch
    assert init_weights_for(ft, [pre]) == (pre.dir / "weights.safetensors", "stage:pre")
    assert init_weights_for(file, [pre, ft]) == (w, f"file:{w.resolve()}@{file_digest(w)}")
    assert init_weights_for(named, [pre, ft, file])[1] == "stage:pre"
    assert init_weights_for(fresh, [pre])[1] == "scratch"
    missing = C.load(None, ["stages.x.init_from=nowhere.safetensors"])
    with pytest.raises(
        C.ConfigError, match="stages.x.init_from='nowhere.safetensors': neither an earlier stage nor a file"
    ):
        init_weights_for(C.stages(missing)[0], [pre])
