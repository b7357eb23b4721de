"""`ffscale register`: an imported package in the MLflow registry (SQLite store), served from models:/."""

from __future__ import annotations

import os

import torch
from helpers.paper_ff import PaperFF

from ffscale.cli import main


def test_an_imported_package_registers_in_mlflow_and_predicts_from_models_uri(tmp_path, monkeypatch, capsys):
    """`ffscale register` logs the package as a pyfunc and registers it, tagged as a pipeline's
    registration is; models:/NAME/1 predicts exactly as the directory does."""
    import json

    from mlflow import MlflowClient
    from PIL import Image

    src = PaperFF(img_size=28, patch=7, dim=32, depth=1, classes=10)
    torch.save({"model": src.state_dict()}, tmp_path / "ff.pth")
    out = tmp_path / "pkg"
    assert main(["import", str(tmp_path / "ff.pth"), "--out", str(out), "data.crop_pct=1.0"]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    assert main(["register", str(out), "--name", "ff-imported", "--uri", uri]) == 0
    # jobs this process launches afterwards log where they would have before, not into this store
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    assert "registered as models:/ff-imported/1" in capsys.readouterr().out
    v = MlflowClient(uri).get_model_version("ff-imported", "1")
    assert json.loads(v.tags["ffscale.data"])["imported"]["layout"] == "paper"
    assert json.loads(v.tags["ffscale.preprocessing"])["crop_pct"] == 1.0
    assert v.tags["ffscale.stage_run"] == v.run_id

    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(28, 28) * 255).byte().numpy(), "L").save(img)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    answers = []
    for model in (str(out), "models:/ff-imported/1"):
        assert main(["predict", "--model", model, "--json", "--device", "cpu", str(img)]) == 0
        answers.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert answers[0] == answers[1] and len(answers[0]["top"]) == 5
