"""A finished stage as files: `model.json` (the card) beside `weights.safetensors` and, when trained,
`weights_ema.safetensors`.

The card holds the model's name and arguments, the preprocessing it was evaluated with (image size,
centre-crop share, mean/std, resize), its class names and the data's digests. That directory is the
whole model: `ffscale predict` reads it from a run directory, and the MLflow model the pipeline
registers carries it as its artifact (ffscale/tracking/pyfunc.py), so both classify alike.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ffscale.data.manifest import dataset_name
from ffscale.errors import ConfigError
from ffscale.inference.build import model_kwargs
from ffscale.inference.stagedir import CARD, CONFIG, StageDir
from ffscale.util.atomic import write_atomic
from ffscale.util.secrets import scrub


def write_card(
    path: Path,
    stage_cfg,
    num_classes: int,
    classes: list[str] | None,
    class_ids,
    data: dict,
    distilled: bool | None = None,
) -> None:
    """`s`: the stage's config; `classes` (names, or None: the indices), `class_ids` (synsets) and
    `data` (what trained it: `trained_on`, or an import's source) describe the rest; `distilled`:
    as `model_kwargs` (an import says it from the weights). `ffscale predict`, a teacher and the
    registered model build from the card's kwargs, so `distilled: true` rebuilds the second head."""
    kw = model_kwargs(stage_cfg, num_classes, distilled) | {"drop_path": 0.0, "drop": 0.0, "grad_ckpt": False}
    interp = stage_cfg.data.interpolation
    card = {
        "model": stage_cfg.model.name, "kwargs": kw, "num_classes": num_classes,
        "classes": classes if classes and len(classes) == num_classes else [str(k) for k in range(num_classes)],
        "class_ids": class_ids,
        "preprocessing": {"img_size": kw["img_size"], "crop_pct": stage_cfg.data.crop_pct, "mean": stage_cfg.data.mean,
                          "std": stage_cfg.data.std, "interpolation": interp,
                          "resize": f"shorter side to img_size / crop_pct, {interp}; centre crop"},
        "data": data,
        "config": scrub(dataclasses.asdict(stage_cfg)),
    }  # fmt: skip
    write_atomic(path, json.dumps(card, indent=1))


def trained_on(stage_cfg, train_m, val_m) -> dict:
    """The card's `data` of a trained stage: its shards' paths, names and digests."""
    return {"train": {"path": stage_cfg.data.train, "name": train_m.name, "dataset": train_m.dataset, "digest": train_m.digest},
            "val": {"path": stage_cfg.data.val, "name": val_m.name, "digest": val_m.digest}}  # fmt: skip


def train_tag(card: dict, manifest=None) -> str | None:
    """A card's train set as "dataset:digest" (`Manifest.tag`), None for a card of no trained stage. Cards
    written before they named the dataset: from `manifest` (its shards, where still there), else the
    shard folder's path."""
    train = card.get("data", {}).get("train")
    if train is None:
        return None
    name = train.get("dataset") or (manifest.dataset if manifest else dataset_name("", train.get("path", "")))
    return f"{name or train.get('name', '?')}:{train.get('digest', '?')}"


def read_card(package: Path) -> dict:
    card_file = package / CARD
    if not card_file.is_file():
        raise ConfigError(
            f"{package}: no {CARD} (a finished stage's directory, or a registered ffscale model)"
        )
    return json.loads(card_file.read_text())


def find_package(path: Path) -> Path:
    """A stage directory holding a card, or a run directory (its last finished stage)."""
    if (path / CARD).is_file():
        return path
    if (path / CONFIG).is_file():
        from ffscale.inference.evaluate import find_stage

        stage = find_stage(path, None)
        if StageDir(stage.dir).holds_package():
            return stage.dir
        raise ConfigError(
            f"{stage.dir}: finished before ffscale wrote {CARD}; rerun its last stage to export it"
        )
    raise ConfigError(f"{path}: not a run directory, a stage directory or a models:/ URI")
