import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.launch import ROOT

from ffscale import config as C
from ffscale.run import world as W


def test_unknown_key_names_the_full_key_and_suggests():
    with pytest.raises(C.ConfigError, match=r"schedule.epoch.*Did you mean|Did you mean.*schedule.epoch"):
        C.load(None, ["schedule.epoch=3"])
    with pytest.raises(C.ConfigError, match=r"stages\.ft\.optim\.lrr"):
        C.load(None, ["stages.ft.optim.lrr=1"])


def test_wrong_type_and_bad_values_name_the_key():
    with pytest.raises(C.ConfigError, match=r"optim\.base_lr"):
        C.load(None, ["optim.base_lr=fast"])
    with pytest.raises(C.ConfigError, match=r"deepspeed\.zero_stage=4"):
        C.load(None, ["deepspeed.zero_stage=4"])
    with pytest.raises(C.ConfigError, match=r"img_size=30 is not divisible by model.patch_size=7"):
        C.load(None, ["data.img_size=30", "model.patch_size=7"])
    with pytest.raises(C.ConfigError, match="not of the form key=value"):
        C.load(None, ["optim.base_lr"])
    with pytest.raises(C.ConfigError, match=r"stages\.a\.model\.heads=3: ff_tiny has no attention heads"):
        C.load(None, ["model.heads=3", "stages.a.model.name=ff_tiny", "stages.b.model.name=vit_tiny"])
    with pytest.raises(C.ConfigError, match=r"distill\.mode='sharp': must be one of hard, soft"):
        C.load(None, ["distill.mode=sharp"])


def test_world_size_must_divide_the_global_batch():
    cfg = C.load(None, ["optim.global_batch=96", "optim.micro_batch=32"])
    s = C.stages(cfg)[0].cfg
    assert W.check_world(s, 1) == 3
    with pytest.raises(C.ConfigError, match="not divisible by ranks x micro_batch = 2 x 32"):
        W.check_world(s, 2)


def test_yaml_composes_with_base_and_cli_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  base_lr: 0.1\n  weight_decay: 0.3\n")
    (tmp_path / "child.yaml").write_text("_base_: [base.yaml]\noptim:\n  base_lr: 0.2\n")
    cfg = C.load([str(tmp_path / "child.yaml")], ["optim.weight_decay=0.4"])
    assert (cfg.optim.base_lr, cfg.optim.weight_decay) == (0.2, 0.4)
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load([str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("optim:\n  nope: 1\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml.*optim.nope"):
        C.load([str(tmp_path / "bad.yaml")])


def test_stages_are_keyed_by_name_and_inherit_defaults():
    cfg = C.load(None, ["optim.base_lr=1e-3", "stages.pre.schedule.epochs=3", "stages.ft.optim.base_lr=1e-5"])
    pre, ft = C.stages(cfg)
    assert (pre.name, ft.name) == ("pre", "ft")
    assert pre.cfg.optim.base_lr == 1e-3 and pre.cfg.schedule.epochs == 3
    assert ft.cfg.optim.base_lr == 1e-5 and ft.cfg.schedule.epochs == 300
    assert ft.dir == Path("runs/default/ft")


def test_a_later_config_file_with_stages_replaces_the_pipeline(tmp_path):
    (tmp_path / "ft.yaml").write_text("stages:\n  ft:\n    init_from: w.safetensors\n")
    cfg = C.load([str(ROOT / "configs/demo.yaml"), str(tmp_path / "ft.yaml")])
    (ft,) = C.stages(cfg)  # demo's pretrain + finetune are gone; its top-level sections stay
    assert ft.name == "ft" and ft.cfg.init_from == "w.safetensors" and ft.cfg.model.dim == 96


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = C.load([str(path)])
    assert C.stages(cfg)


NEVER_BEFORE_LAUNCH = ("torch", "deepspeed", "mlflow", "nvidia")  # nvidia: DALI's namespace (and CUDA's)


@pytest.mark.parametrize(
    "override, expect",
    [
        ("optim.lrr=1", r"config error: .*Key 'lrr' not in 'OptimCfg' \(key: optim\.lrr\)"),
        ("model.name=ff_huge", r"config error: stages\.pretrain\.model\.name='ff_huge': unknown; known: \[.*'ff_tiny'"),
        ("data.train={tmp}/nowhere", r"data error: stages\.pretrain\.data\.train=.*/nowhere: no shard manifest"),
    ],
    ids=["unknown key", "unknown model", "no data folder"],
)  # fmt: skip
def test_ffscale_train_rejects_bad_input_in_one_line_before_importing_torch(tmp_path, override, expect):
    """`ffscale train` as a user runs it, with PYTHONPROFILEIMPORTTIME=1: Python then writes one
    "import time:" line to stderr for every module the process imports, so the list says whether torch,
    DeepSpeed, MLflow or DALI were imported before the mistake was found (they cost seconds)."""
    from ffscale.util.hostenv import gpus_may_be_visible

    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    if gpus_may_be_visible():  # torch would count them for --nproc (ffscale/cli/train.py): hide them
        env["CUDA_VISIBLE_DEVICES"] = ""
    cli = Path(sys.executable).with_name("ffscale")
    r = subprocess.run([str(cli), "train", "--config", str(ROOT / "configs" / "demo.yaml"), f"run.dir={tmp_path}",
                        override.format(tmp=tmp_path)], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = r.stderr.splitlines()
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in lines if ln.startswith("import time:")]
    said = [ln for ln in lines if not ln.startswith("import time:")]
    assert r.returncode == 2, said
    assert len(said) == 1 and re.search(expect, said[0]), said  # one line naming the key, no traceback
    assert "ffscale.config" in imported and "omegaconf" in imported  # the list is the process's imports
    early = sorted({m.split(".")[0] for m in imported} & set(NEVER_BEFORE_LAUNCH))
    assert not early, f"imported before the one line: {early}"
    assert "deepspeed" not in r.stdout  # the launcher never ran


def test_a_job_that_carries_no_weights_between_stages_is_checked_without_importing_torch(fm_shards, tmp_path):
    """The preflight builds models (on the meta device, ffscale/run/carry.py) only for a stage that
    starts from an earlier stage's weights; a pipeline of fresh stages is checked without torch."""
    code = (
        "import sys; from ffscale import config; from ffscale.run import preflight; "
        "preflight.check_job(config.load(None, sys.argv[1:]), 1, 2); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({NEVER_BEFORE_LAUNCH!r})))"
    )
    args = [f"data.train={fm_shards / 'train'}", f"data.val={fm_shards / 'val'}", f"run.dir={tmp_path}",
            "data.img_size=28", "model.patch_size=7", "stages.a.model.name=vit_tiny", "stages.b.init_from=scratch"]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


@pytest.mark.parametrize("n_params", [28_901, 1_000_003, 61_940_000, 0])
def test_zero_buckets_are_aligned_and_never_bigger_than_needed(n_params):
    from ffscale.config import StageCfg
    from ffscale.engine.ds_config import zero

    s = StageCfg()
    s.deepspeed.zero_stage = 3
    z = zero(s, n_params)
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        assert z[key] % 256 == 0 and z[key] >= 256, (key, z[key])  # DeepSpeed asserts NCCL alignment
        assert z[key] <= max(256, n_params // 4) if n_params else z[key] == 50 * 2**20 // 4


def test_a_model_image_size_other_than_the_data_s_stops_at_load_naming_both_keys():
    with pytest.raises(C.ConfigError, match=r"stages.ft.model.img_size=32 but stages.ft.data.img_size=28"):
        C.load(None, ["data.img_size=28", "stages.ft.model.img_size=32"])
    assert C.image_size(C.stages(C.load(None, ["data.img_size=28", "model.img_size=28"]))[0].cfg) == 28
