"""What a stage run is tagged with and takes as inputs: known live at the stage's start (the loop
passes them), or read back from the stage's files by a replay."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ffscale import config
from ffscale.data.manifest import dataset_name, load_manifest
from ffscale.inference.card import train_tag
from ffscale.inference.stagedir import UNKNOWN_LINEAGE, StageDir, read_json


@dataclass
class StageFacts:
    dataset: str = "?"  # the train shards' dataset:digest (Manifest.dataset)
    n_params: int | None = None
    lineage: str = UNKNOWN_LINEAGE  # where its weights came from (ffscale/run/pipeline.py: init_weights_for)
    train_m: object = None  # manifests, for MLflow's dataset inputs
    val_m: object = None

    @classmethod
    def from_files(cls, stage: config.Stage) -> StageFacts:
        stage_cfg, files, facts = stage.cfg, StageDir(stage.dir), cls()
        card = read_json(files.card)
        facts.lineage = files.lineage()
        num_classes = card.get("num_classes") or stage_cfg.model.num_classes
        try:
            facts.train_m = load_manifest(stage_cfg.data.train)[0]
            facts.val_m = load_manifest(stage_cfg.data.val)[0]
            num_classes = num_classes or facts.train_m.num_classes
        except Exception:  # shards moved or gone: the tags come from the card or the history
            facts.train_m = facts.val_m = None
        facts.dataset = train_tag(card, facts.train_m) or (
            facts.train_m.tag if facts.train_m else _history_tag(stage)
        )
        if num_classes:
            facts.n_params = _count_params(stage_cfg, num_classes)
        return facts

    def dataset_inputs(self, stage: config.Stage) -> list:
        """The train and val shard sets as MLflow dataset inputs (none when the shards are gone)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        if self.train_m is None:
            return []
        inputs = []
        for manifest, context, root in (
            (self.train_m, "training", stage.cfg.data.train),
            (self.val_m, "validation", stage.cfg.data.val),
        ):
            source = json.dumps({"uri": str(Path(root).resolve()), "origin": manifest.source})
            schema = json.dumps({"samples": manifest.num_samples, "classes": manifest.num_classes,
                                 "shards": len(manifest.shards)})  # fmt: skip
            dataset = Dataset(name=manifest.name, digest=manifest.digest, source_type="local", source=source,
                              schema=schema)  # fmt: skip
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
        return inputs


def _history_tag(stage: config.Stage) -> str:
    """A stage that wrote no card and whose shards are gone: its config's first digest of them."""
    history = StageDir(stage.dir).history_rows()
    digest = history[0].get("digests", {}).get("data.train") if history else None
    return f"{dataset_name('', stage.cfg.data.train)}:{digest or '?'}"


def _count_params(stage_cfg, num_classes: int) -> int | None:
    try:
        import torch

        from ffscale.inference.build import build_model

        with torch.device("meta"):
            return sum(p.numel() for p in build_model(stage_cfg, num_classes).parameters())
    except Exception:
        return None
