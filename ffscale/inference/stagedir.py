"""A run's and a stage's files: the one owner of their names and of what they say about a stage.

    runs/<pipeline>/            config.yaml, mlflow_runs.json
    runs/<pipeline>/<stage>/    checkpoints/, metrics.jsonl, config-history.jsonl,
                                weights.safetensors, weights_ema.safetensors, model.json, DONE

A stage is finished when it has its DONE, and only then: the pipeline writes it (rank 0, atomically)
once the weights and model.json are written, with the stage's summary and lineage. A finished stage
is skipped by the pipeline, never resumed, and ends FINISHED in MLflow. Weights or model.json alone
say less: an `ffscale import` directory holds both and trained nothing (a package, not a finished
stage), and a stage killed between its export and its DONE holds weights but runs again to its end.

It sits in inference/ because both the training run and the tracker (which may not import the run)
read a stage's files, and inference/ is what a finished stage is as files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ffscale.engine.ckpt_files import LATEST
from ffscale.util import jsonl
from ffscale.util.atomic import write_atomic

CONFIG = "config.yaml"  # a run's resolved config, as run
IDS = "mlflow_runs.json"  # a run's MLflow ids (ffscale/tracking/ids.py)
DONE = "DONE"
CARD = "model.json"  # ffscale/inference/card.py
WEIGHTS = "weights.safetensors"
EMA_WEIGHTS = "weights_ema.safetensors"
METRICS = "metrics.jsonl"  # ffscale/run/record.py
HISTORY = "config-history.jsonl"  # ffscale/run/changes.py
CHECKPOINTS = "checkpoints"  # ffscale/engine/checkpoint.py owns what is inside
UNKNOWN_LINEAGE = "?"  # a stage whose files do not say where its weights came from


class StageDir:
    """One stage's directory: its files by name, and what they say."""

    def __init__(self, path: Path):
        self.path = Path(path)
        names = (DONE, CARD, WEIGHTS, EMA_WEIGHTS, METRICS, HISTORY, CHECKPOINTS)
        self.done, self.card, self.weights, self.ema_weights, self.metrics, self.history, self.checkpoints = (
            self.path / name for name in names
        )

    # -- what the files say --------------------------------------------------------------------
    def finished(self) -> bool:
        """The stage trained to its end (the module docstring: DONE, and nothing else, says so)."""
        return self.done.is_file()

    def started(self) -> bool:
        """The stage recorded something: a row, or its end."""
        return self.metrics.is_file() or self.finished()

    def resumable(self) -> bool:
        """A complete checkpoint to continue from, and not finished (a finished stage is skipped,
        whatever its config says)."""
        return (self.checkpoints / LATEST).is_file() and not self.finished()

    def holds_package(self) -> bool:
        """A model package that inference reads: a finished stage's or an import's weights and card
        (the card is written after the weights)."""
        return self.card.is_file()

    def summary(self) -> dict:
        """What the stage's DONE says ({} when it did not finish)."""
        return read_json(self.done)

    def finished_at(self) -> float | None:
        """When the stage finished (DONE's time), None when it did not."""
        return self.done.stat().st_mtime if self.finished() else None

    def finish(self, summary: dict) -> None:
        """The stage's DONE, with its summary (rank 0, once its weights and card are written)."""
        write_atomic(self.done, json.dumps(summary, indent=1))

    def rows(self) -> list[dict]:
        return jsonl.read(self.metrics)

    def history_rows(self) -> list[dict]:
        return jsonl.read(self.history)

    def lineage(self) -> str:
        """Where the stage's weights came from, as the pipeline named them when it started the stage
        (ffscale/run/pipeline.py: init_weights_for, the one place that works it out): DONE's
        `init_from`, else the config history's first row."""
        history = self.history_rows()
        started_from = history[0].get("init_from") if history else None
        return self.summary().get("init_from") or started_from or UNKNOWN_LINEAGE


def read_json(path: Path) -> dict:
    """A JSON object file ({} when missing or unreadable)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
