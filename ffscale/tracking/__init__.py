"""Experiment tracking, MLflow only: the one package that imports it.

Rank 0 tracks (`runs.MlflowTracker`); every other rank, and every rank with tracking.enabled=false,
gets the NullTracker, whose methods are the whole interface the training run sees.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ffscale.tracking.store import (
    REGISTRY_URIS,
    ensure_store,  # noqa: F401  (the run creates the store before ranks)
)


class NullTracker:
    def pipeline_started(self, cfg) -> None: ...
    def stage_started(self, stage, train_manifest, val_manifest, n_params, lineage) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def config_changed(self, stage, step: int, diff: dict, what: str, history: Path) -> None: ...
    def stage_ended(self, stage, status: str, summary: dict | None = None) -> None: ...
    def model_ready(self, final, stages) -> None: ...
    def pipeline_ended(self, status: str) -> None: ...


def uses_mlflow(cfg, rank: int) -> bool:
    """Whether this rank's process talks to MLflow: rank 0 when it tracks, and every rank whose
    stage learns from a teacher kept in MLflow (models:/..., runs:/...)."""
    from ffscale import config

    if rank == 0 and cfg.tracking.enabled:
        return True
    return any(str(st.cfg.distill.teacher or "").startswith(REGISTRY_URIS) for st in config.stages(cfg))


def keep_mlflow_out(cfg, rank: int) -> None:
    """A rank that does not use MLflow does not import it. `import deepspeed` imports MLflow wherever it
    is installed, for its autotuner, which a training rank never runs (deepspeedai/DeepSpeed @ 66b6fcc,
    deepspeed/autotuning/autotuner.py: `try: import mlflow`, reached from deepspeed/runtime/config.py);
    MLflow's import is most of DeepSpeed's (`ffscale bench startup`'s rank imports). A None in
    sys.modules makes that import raise ImportError (the import system's rule for a None entry),
    which DeepSpeed catches. Called before DeepSpeed is imported."""
    if not uses_mlflow(cfg, rank):
        block_mlflow()


def block_mlflow() -> None:
    """This process does not import MLflow (a process that never tracks; see keep_mlflow_out)."""
    sys.modules.setdefault("mlflow", None)


def create(cfg, run_dir: Path, rank: int):
    """Rank 0 tracks in MLflow unless tracking.enabled=false; every other rank gets the null tracker."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    from ffscale.tracking.runs import MlflowTracker

    return MlflowTracker(cfg, run_dir)
