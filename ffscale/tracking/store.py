"""Where runs are kept: the tracking URI, a quiet MLflow client, queries and model downloads."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ffscale.errors import ConfigError

URI_CREDS = re.compile(r"(//)[^/@\s]+@")
MLFLOW_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # a dead server must not block training for minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def client(uri: str):
    """An MlflowClient, MLflow configured quietly first (its settings are read at import)."""
    for k, v in MLFLOW_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow import MlflowClient

    return MlflowClient(uri)


def redact(value: str) -> str:
    return URI_CREDS.sub(r"\1***@", value)


def default_store(runs_root: Path) -> str:
    """One SQLite store for every pipeline under `run.dir`, so `ffscale compare` sees them all."""
    return f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def tracking_uri(cfg, run_dir: Path) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store(run_dir.parent)


def ensure_store(cfg, run_dir: Path) -> None:
    """Create the default SQLite store before ranks start: concurrent creation races."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg, run_dir)
    if uri.startswith("sqlite:"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client(uri).search_experiments(max_results=1)


def reachable(cfg, run_dir: Path) -> tuple[str, str | None]:
    """(the tracking URI, None) when MLflow answers there, else (URI, the reason)."""
    uri = tracking_uri(cfg, run_dir)
    try:
        if uri.startswith("sqlite:"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client(uri).search_experiments(max_results=1)
    except Exception as e:
        return redact(uri), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return redact(uri), None


def stage_runs(uri: str, experiment: str, filter_string: str = "") -> list:
    """Finished or not, every stage run of an experiment (for `ffscale compare`)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = "tags.`ffscale.kind` = 'stage'" + (f" and {filter_string}" if filter_string else "")
    return c.search_runs([exp.experiment_id], flt, max_results=5000)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def download_model(uri: str) -> Path:
    """A models:/ or runs:/ model's artifacts (model.json and weights) in a local directory."""
    for k, v in MLFLOW_ENV.items():
        os.environ.setdefault(k, v)
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/")))
    except Exception as e:
        raise ConfigError(
            f"{uri}: cannot download it from MLflow at {redact(mlflow.get_tracking_uri())} ({e})"
        ) from None
    return local / "artifacts" if (local / "artifacts").is_dir() else local
