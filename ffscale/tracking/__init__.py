"""Experiment tracking, MLflow only: the one package that imports it.

Rank 0 tracks (`runs.MlflowTracker`); every other rank, and every rank with tracking.enabled=false,
gets the NullTracker, whose methods are the whole interface the training run sees.
"""

from __future__ import annotations

from pathlib import Path

from ffscale.tracking.store import ensure_store  # noqa: F401  (the run creates the store before ranks)


class NullTracker:
    def pipeline_started(self, cfg) -> None: ...
    def stage_started(self, stage, train_manifest, val_manifest, n_params, lineage) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def config_changed(self, stage, step: int, diff: dict, what: str, history: Path) -> None: ...
    def stage_ended(self, stage, status: str, summary: dict | None = None) -> None: ...
    def model_ready(self, final, stages) -> None: ...
    def pipeline_ended(self, status: str) -> None: ...


def create(cfg, run_dir: Path, rank: int):
    """Rank 0 tracks in MLflow unless tracking.enabled=false; every other rank gets the null tracker."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    from ffscale.tracking.runs import MlflowTracker

    return MlflowTracker(cfg, run_dir)
