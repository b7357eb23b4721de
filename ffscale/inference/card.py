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

from ffscale.errors import ConfigError
from ffscale.inference.build import model_kwargs
from ffscale.util.atomic import write_atomic

CARD = "model.json"


def write_card(path: Path, s, num_classes: int, train_m, val_m) -> None:
    """`s`: the stage's config; the manifests give class names and the data's digests."""
    kw = model_kwargs(s, num_classes) | {"drop_path": 0.0, "grad_ckpt": False}
    card = {
        "model": s.model.name, "kwargs": kw, "num_classes": num_classes,
        "classes": train_m.classes if len(train_m.classes) == num_classes else [str(k) for k in range(num_classes)],
        "class_ids": train_m.class_ids,
        "preprocessing": {"img_size": kw["img_size"], "crop_pct": s.data.crop_pct, "mean": s.data.mean,
                          "std": s.data.std, "resize": "shorter side to img_size / crop_pct, bilinear; centre crop"},
        "data": {"train": {"path": s.data.train, "name": train_m.name, "digest": train_m.digest},
                 "val": {"path": s.data.val, "name": val_m.name, "digest": val_m.digest}},
        "config": dataclasses.asdict(s),
    }  # fmt: skip
    write_atomic(path, json.dumps(card, indent=1))


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
    if (path / "config.yaml").is_file():
        from ffscale.inference.evaluate import find_stage

        stage = find_stage(path, None)
        if (stage.dir / CARD).is_file():
            return stage.dir
        raise ConfigError(
            f"{stage.dir}: finished before ffscale wrote {CARD}; rerun its last stage to export it"
        )
    raise ConfigError(f"{path}: not a run directory, a stage directory or a models:/ URI")
