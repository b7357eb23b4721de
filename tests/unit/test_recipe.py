"""Every shipped config that claims to be the paper's runs the recipe docs/recipe.md states, key by
key, and the doc states every key this test holds the configs to."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from helpers.launch import ROOT

from ffscale import config as C
from ffscale.config import dotted

# docs/recipe.md's "ffscale" column: in every Table-1 config
RECIPE = {
    "model.drop_path": 0.1, "data.interpolation": "bicubic", "data.img_size": 224, "data.crop_pct": 0.875,
    "data.scale": [0.08, 1.0], "data.rand_augment": True, "data.reprob": 0.25, "data.mixup": 0.8,
    "data.cutmix": 1.0, "data.mix_prob": 1.0, "data.mix_switch": 0.5, "optim.label_smoothing": 0.1,
    "optim.global_batch": 1024, "optim.base_lr": 5e-4, "optim.lr_batch_base": 512, "optim.weight_decay": 0.05,
    "optim.eps": 1e-8, "optim.betas": [0.9, 0.999], "optim.clip_grad": 0.0, "optim.ema_decay": 0.99996,
    "schedule.epochs": 300, "schedule.warmup_epochs": 5, "schedule.warmup_lr": 1e-6, "schedule.min_lr": 1e-5,
    "schedule.lr_per": "epoch", "data.repeats": 3,
}  # fmt: skip
PER_CONFIG = {
    "ff_tiny": {"model.drop": 0.1}, "ff_base": {"model.drop": 0.1}, "ff_large": {"model.drop": 0.1},
    "vit_tiny": {"model.drop": 0.0}, "vit_base": {"model.drop": 0.0},
    "attn_only_tiny": {"model.drop": 0.1, "schedule.stop_at_epoch": 100},
}  # fmt: skip


def doc_pairs() -> dict[str, object]:
    text = (ROOT / "docs" / "recipe.md").read_text()
    out = {}
    for key, raw in re.findall(r"`((?:model|data|optim|schedule)\.\w+): ([^`]+)`", text):
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name", sorted(PER_CONFIG))
def test_each_table1_config_runs_the_recipe_in_the_doc(name):
    (stage,) = C.stages(C.load([str(ROOT / "configs" / f"{name}.yaml")]))
    flat = dotted(dataclasses.asdict(stage.cfg))
    want = RECIPE | PER_CONFIG[name]
    wrong = {k: (flat[k], v) for k, v in want.items() if flat[k] != pytest.approx(v) and flat[k] != v}
    assert not wrong, wrong
    assert stage.cfg.model.name == name


def test_the_doc_states_every_value_the_configs_are_held_to():
    pairs = doc_pairs()
    for key, value in [*RECIPE.items(), *((k, v) for d in PER_CONFIG.values() for k, v in d.items())]:
        assert key in pairs, f"docs/recipe.md does not state `{key}: ...`"
        assert any(v == pytest.approx(value) if not isinstance(value, str) else v == value for v in pairs[key]), (
            key, pairs[key], value)  # fmt: skip


def test_every_config_built_on_the_imagenet_recipe_is_held_here():
    claimed = {
        p.stem
        for p in (ROOT / "configs").glob("*.yaml")
        if "imagenet_deit.yaml" in str(yaml.safe_load(p.read_text()).get("_base_"))
    }
    assert claimed == set(PER_CONFIG), claimed
