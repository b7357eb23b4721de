"""Trained models as classifiers: `ffscale predict --model <run dir | models:/name/version> IMAGES`.

A finished stage writes `model.json` beside its weights: the model's name and arguments, the
preprocessing it was evaluated with (image size, centre-crop share, mean/std) and its class names.
That directory is the whole model: `ffscale predict` reads it from a run directory, and the MLflow
model the pipeline registers carries it as its artifact (ffscale/tracking.py), so both classify alike.
No DeepSpeed, no MLflow here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import torch
from PIL import Image

from .build import model_kwargs
from .data.transforms import eval_transform
from .errors import ConfigError, DataError
from .models import create_model
from .weights import load_weights

CARD = "model.json"


def write_card(path: Path, s, num_classes: int, train_m, val_m) -> None:
    """`s`: the stage's config; the manifests give class names and the data's digests."""
    from .atomic import write_atomic

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


class Classifier:
    def __init__(self, package: Path, ema: bool = False, device: str = "cpu"):
        card_file = package / CARD
        if not card_file.is_file():
            raise ConfigError(
                f"{package}: no {CARD} (a finished stage's directory, or a registered ffscale model)"
            )
        self.card = json.loads(card_file.read_text())
        weights = package / ("weights_ema.safetensors" if ema else "weights.safetensors")
        if not weights.is_file():
            raise ConfigError(
                f"{weights} does not exist" + (" (this stage trained without an EMA)" if ema else "")
            )
        self.device = torch.device(device)
        self.model = create_model(self.card["model"], **self.card["kwargs"])
        self.model.load_state_dict(load_weights(weights))
        self.model.to(self.device).eval()
        p = self.card["preprocessing"]
        self.size, self.crop_pct = p["img_size"], p["crop_pct"]
        self.mean = torch.tensor(p["mean"], device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(p["std"], device=self.device).view(1, -1, 1, 1) * 255
        self.classes = self.card["classes"]

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.stack([eval_transform(img, self.size, self.crop_pct) for img in images]).to(self.device)
        x = (x.float() - self.mean) / self.std
        return self.model(x).float().softmax(-1).cpu()

    def top(
        self, images: list[Image.Image], k: int = 5, batch: int = 64
    ) -> list[list[tuple[int, str, float]]]:
        p = torch.cat([self.probabilities(images[i : i + batch]) for i in range(0, len(images), batch)])
        vals, idx = p.topk(min(k, p.shape[1]), dim=1)
        return [
            [(int(i), self.classes[int(i)], float(v)) for v, i in zip(vr, ir)] for vr, ir in zip(vals, idx)
        ]


def open_image(source: str | bytes) -> Image.Image:
    """A path, raw bytes, or base64 of an image (what `mlflow models predict` passes in a column)."""
    try:
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source)).convert("RGB")
        if len(source) < 4096 and os.path.isfile(source):  # base64 would be too long a name (ENAMETOOLONG)
            return Image.open(source).convert("RGB")
        import base64

        return Image.open(io.BytesIO(base64.b64decode(source, validate=True))).convert("RGB")
    except Exception as e:
        shown = source[:60] if isinstance(source, str) else f"{len(source)} bytes"
        raise DataError(f"{shown}: not an image file, nor base64 of one ({e})") from None


def package_of(ref: str) -> Path:
    """A run directory (its last finished stage), a stage directory, or a models:/ URI."""
    if ref.startswith(("models:/", "runs:/")):
        from .tracking import download_model

        return download_model(ref)
    path = Path(ref)
    if (path / CARD).is_file():
        return path
    if (path / "config.yaml").is_file():
        from .evaluate import find_stage

        stage = find_stage(path, None)
        if (stage.dir / CARD).is_file():
            return stage.dir
        raise ConfigError(
            f"{stage.dir}: finished before ffscale wrote {CARD}; rerun its last stage to export it"
        )
    raise ConfigError(f"{ref}: not a run directory, a stage directory or a models:/ URI")


def main(a) -> int:
    clf = Classifier(package_of(a.model), a.ema, a.device)
    images = [open_image(f) for f in a.images]
    rows = clf.top(images, a.top)
    for f, row in zip(a.images, rows):
        if a.json:
            print(json.dumps({"image": f, "top": [{"index": i, "class": c, "prob": p} for i, c, p in row]}))
        else:
            print(f"{f}: " + ", ".join(f"{c} ({i}) {100 * p:.1f}%" for i, c, p in row))
    return 0
