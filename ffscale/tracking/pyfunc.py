"""The trained classifier as an MLflow pyfunc model: logged and registered at the end of a pipeline,
served by `mlflow models predict` / `mlflow models serve`, read back by `ffscale predict`.

Its artifacts are the final stage's directory in small: `model.json` (model, preprocessing, class
names, data digests: ffscale/inference/predict.py), `weights.safetensors` and, when trained, the EMA's.
Input: a column `image` holding image file paths or base64-encoded image bytes. Output per image:
the top class (index, name, probability) and the top 5 as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from ffscale.inference.predict import Classifier, open_image
from ffscale.inference.stagedir import StageDir

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema(
        [
            ColSpec("long", "class_index"),
            ColSpec("string", "class_name"),
            ColSpec("double", "probability"),
            ColSpec("string", "top5"),
        ]
    ),  # fmt: skip
)


class FfscaleClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        ema = bool((context.model_config or {}).get("ema", False))
        self.clf = Classifier(Path(context.artifacts["card"]).parent, ema=ema)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = self.clf.top([open_image(v) for v in model_input["image"]], k=5)
        return pd.DataFrame({
            "class_index": [r[0][0] for r in rows],
            "class_name": [r[0][1] for r in rows],
            "probability": [r[0][2] for r in rows],
            "top5": [json.dumps([{"index": i, "class": c, "prob": p} for i, c, p in r]) for r in rows],
        })  # fmt: skip


def log(stage_dir: Path, register_as: str | None):
    """Log the stage's model into the active run; register it when `register_as` is set."""
    files = StageDir(stage_dir)
    artifacts = {"card": str(files.card), "weights": str(files.weights)}
    if files.ema_weights.is_file():
        artifacts["weights_ema"] = str(files.ema_weights)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=FfscaleClassifier(),
        artifacts=artifacts,
        signature=SIGNATURE,
        registered_model_name=register_as,
        # ffscale itself must be importable where the model is loaded (`--env-manager local`, or an
        # environment with ffscale installed); listing what it needs keeps MLflow from inferring
        # requirements by importing the model (slow)
        pip_requirements=["ffscale", "torch", "safetensors", "pillow", "numpy", "pandas"],
        model_config={"ema": False},
    )
