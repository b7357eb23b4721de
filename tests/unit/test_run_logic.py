"""The run's pure logic: the non-finite policy, step arithmetic, the progress meter, lineage, which ranks import MLflow."""

from __future__ import annotations

import pytest

from ffscale import config as C
from ffscale import errors
from ffscale.run import nonfinite
from ffscale.run.progress import Meter, fmt_time
from ffscale.run.schedule import plan_steps


def stage_cfg(*overrides: str) -> C.StageCfg:
    return C.stages(C.load(None, list(overrides)))[0].cfg


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
    monkeypatch.setattr("ffscale.run.progress.time.perf_counter", lambda: now[0])
    m = Meter(total_steps=100, images_per_step=64, flops_per_image=1e9, peak_flops=1e12)
    assert m.update(10) == {}  # the first call only starts the clock
    now[0] += 2.0
    r = m.update(20)  # 10 steps x 64 images in 2 s
    assert r["img_per_s"] == pytest.approx(320.0)
    assert r["mfu"] == pytest.approx(100 * 320 * 1e9 / 1e12)
    assert r["eta_s"] == pytest.approx(80 / 5.0)  # 80 steps left at 5 steps/s
    assert (fmt_time(16), fmt_time(3725)) == ("0m16s", "1h02m")
    now[0] += 8.0  # an evaluation and a checkpoint at the epoch's end
    m.new_window()
    now[0] += 2.0
    r = m.update(30)
    assert r["img_per_s"] == pytest.approx(320.0)  # the training alone
    assert r["eta_s"] == pytest.approx(70 / (20 / 12.0))  # the ETA counts the evaluation: it recurs
    m = Meter(total_steps=100, images_per_step=64, flops_per_image=1e9, peak_flops=1e12)
    m.update(0)
    now[0] += 30.0  # the carried weights' evaluation, once
    m.new_window(before_training=True)
    now[0] += 2.0
    assert m.update(10)["eta_s"] == pytest.approx(90 / 5.0)


def test_lineage_says_where_a_stages_weights_came_from(tmp_path):
    from ffscale.run.pipeline import init_weights_for
    from ffscale.util.weights import file_digest

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
    # a student of the previous stage starts from scratch unless init_from says otherwise (as DeiT's)
    cfg = C.load(None, ["stages.teacher.model.name=vit_tiny", "stages.student.distill.teacher=teacher",
                        "stages.carried.distill.teacher=teacher", "stages.carried.init_from=teacher",
                        "stages.later.distill.teacher=teacher"])  # fmt: skip
    teacher, student, carried, later = C.stages(cfg)
    assert init_weights_for(student, [teacher]) == (None, "scratch")
    assert init_weights_for(carried, [teacher, student])[1] == "stage:teacher"
    # a student of an earlier stage that is not the previous one starts from the previous one
    assert init_weights_for(later, [teacher, student, carried])[1] == "stage:carried"
    missing = C.load(None, ["stages.x.init_from=nowhere.safetensors"])
    with pytest.raises(
        C.ConfigError, match="stages.x.init_from='nowhere.safetensors': neither an earlier stage nor a file"
    ):
        init_weights_for(C.stages(missing)[0], [pre])


def test_the_nodes_launcher_numbers_ranks_node_major_and_stops_the_rest_when_one_fails(tmp_path):
    """ffscale/run/ranks.py: the variables torch's env:// rendezvous and DeepSpeed read, as DeepSpeed's
    launch.py sets them for node 1 of 2; a failed rank's exit code, the other rank stopped, not waited for; a rank's crash said in a line."""
    import json
    import subprocess
    import sys

    entry = tmp_path / "entry.py"
    entry.write_text(
        "import json, os, sys, time\n"
        "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CROSS_RANK', 'CROSS_SIZE', "
        "'LOCAL_SIZE', 'LOCAL_WORLD_SIZE')\n"
        "out = {k: os.environ[k] for k in keys}\n"
        "open(sys.argv[-1] + os.environ['RANK'], 'w').write(json.dumps([sys.argv[1:-1], out]))\n"
        "if sys.argv[-2] == 'fail' and os.environ['LOCAL_RANK'] == '1': sys.exit(3)\n"
        "if sys.argv[-2] == 'crash' and os.environ['LOCAL_RANK'] == '1': import signal; os.kill(os.getpid(), signal.SIGSEGV)\n"
        "if sys.argv[-2] in ('fail', 'crash'): time.sleep(120)\n"
    )
    launcher = [sys.executable, "-m", "ffscale.run.ranks", "--nproc=2", "--nnodes=2", "--node-rank=1",
                "--master-addr=10.0.0.1", "--master-port=1234", str(entry)]  # fmt: skip
    assert subprocess.run([*launcher, "ok", str(tmp_path / "r")], timeout=60).returncode == 0
    args, env = json.loads((tmp_path / "r3").read_text())
    assert args == ["--local_rank=1", "ok"]
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "1234", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2",
                   "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
    assert json.loads((tmp_path / "r2").read_text())[1]["LOCAL_RANK"] == "0"
    # rank 0 sleeps 120 s: the launcher stops it rather than waits (else the timeout raises)
    assert subprocess.run([*launcher, "fail", str(tmp_path / "f")], timeout=60).returncode == 3
    # a crash in native code: the shell's 128 + SIGSEGV, and the one line that says what can cause it
    crashed = subprocess.run(
        [*launcher, "crash", str(tmp_path / "c")], timeout=60, capture_output=True, text=True
    )
    assert crashed.returncode == 139
    assert "rank 1 of this node crashed in native code (SIGSEGV). With data.loader=dali" in crashed.stderr


# -- which ranks import MLflow -----------------------------------------------------------------
@pytest.mark.parametrize(
    "rank, overrides, uses",
    [
        (0, [], True),  # rank 0 tracks
        (1, [], False),
        (0, ["tracking.enabled=false"], False),
        (1, ["stages.a.model.name=ff_tiny", "stages.b.distill.teacher=models:/ff/3"], True),  # downloads it
        (1, ["stages.a.model.name=ff_tiny", "stages.b.distill.teacher=a"], False),
    ],
)
def test_only_a_rank_that_tracks_or_downloads_a_teacher_imports_mlflow(monkeypatch, rank, overrides, uses):
    import sys

    from ffscale import tracking

    cfg = C.load(None, overrides)
    assert tracking.uses_mlflow(cfg, rank) is uses
    monkeypatch.setitem(sys.modules, "mlflow", None)  # undone after the test, as the deletion below
    monkeypatch.delitem(sys.modules, "mlflow")
    tracking.keep_mlflow_out(cfg, rank)
    # DeepSpeed's `try: import mlflow` then fails as it does where MLflow is not installed
    assert ("mlflow" in sys.modules and sys.modules["mlflow"] is None) is not uses
