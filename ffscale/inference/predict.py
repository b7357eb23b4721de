"""A finished stage (ffscale/inference/card.py) as a classifier: images in, top-k classes out.

`ffscale predict` and the registered MLflow model (ffscale/tracking/pyfunc.py) both classify
through `Classifier`. No DeepSpeed, no MLflow here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from PIL import Image

from ffscale.data.transforms import eval_transform
from ffscale.errors import ConfigError, DataError
from ffscale.inference.card import read_card
from ffscale.inference.stagedir import EMA_WEIGHTS, WEIGHTS
from ffscale.models import create_model
from ffscale.util.weights import load_weights


def load_model(package: Path, ema: bool = False) -> tuple[torch.nn.Module, dict, Path]:
    """A finished stage's model as its card describes it (a distilled one with its distillation
    token and head, averaging them in eval mode), its weights loaded: (model, card, weights file)."""
    card = read_card(package)
    weights = package / (EMA_WEIGHTS if ema else WEIGHTS)
    if not weights.is_file():
        raise ConfigError(
            f"{weights} does not exist" + (" (this stage trained without an EMA)" if ema else "")
        )
    model = create_model(card["model"], **card["kwargs"])
    model.load_state_dict(load_weights(weights))
    return model, card, weights


class Classifier:
    def __init__(self, package: Path, ema: bool = False, device: str = "cpu"):
        self.model, self.card, _ = load_model(package, ema)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        p = self.card["preprocessing"]
        self.size, self.crop_pct = p["img_size"], p["crop_pct"]
        self.interpolation = p.get("interpolation", "bilinear")  # cards before data.interpolation: bilinear
        self.mean = torch.tensor(p["mean"], device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(p["std"], device=self.device).view(1, -1, 1, 1) * 255
        self.classes = self.card["classes"]

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.stack(
            [eval_transform(img, self.size, self.crop_pct, self.interpolation) for img in images]
        ).to(self.device)
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
