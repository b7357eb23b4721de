"""Where runs are kept: the tracking URI, a quiet MLflow client, the experiment (with an artifact
root the job can write), queries and model downloads."""

from __future__ import annotations

import os
from pathlib import Path

from ffscale.config import dotted
from ffscale.errors import ConfigError
from ffscale.util.secrets import MASK, redact, secret_key

MLFLOW_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # a dead server must not block training for minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
REGISTRY_URIS = ("models:/", "runs:/")  # MLflow's names of logged and registered models
ARTIFACTS = "mlartifacts"  # beside a SQLite store: its experiments' artifacts
PAGE = 1000  # runs per search request (`ffscale compare` pages through any number)


def quiet() -> None:
    """MLflow's settings, set before it is imported (it reads them at import)."""
    for k, v in MLFLOW_ENV.items():
        os.environ.setdefault(k, v)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = credentials_to_env(os.environ["MLFLOW_TRACKING_URI"])


def credentials_to_env(uri: str) -> str:
    """An http(s) URI without its `user:password@`, which go to MLFLOW_TRACKING_USERNAME/PASSWORD
    unless those are set (MLflow sends those, and its errors and warnings print the URL it calls)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    if parts.username is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def client(uri: str):
    quiet()
    from mlflow import MlflowClient

    return MlflowClient(credentials_to_env(uri))


def flatten(values: dict) -> dict[str, str]:
    """Nested config -> {'optim.base_lr': '0.0005', ...}; secret-looking keys and credentials
    never leave the machine (ffscale/util/secrets.py)."""
    return {k: redact(str(v))[:6000] for k, v in dotted(values).items() if not secret_key(k)}


def default_store(runs_root: Path) -> str:
    """One SQLite store for every pipeline under `run.dir`, so `ffscale compare` sees them all."""
    return f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def tracking_uri(cfg, run_dir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else SQLite beside the run directory. A URI whose
    credential was masked when its config.yaml was written is replaced by $MLFLOW_TRACKING_URI."""
    uri = cfg.tracking.uri
    if uri and MASK in uri:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return credentials_to_env(os.environ["MLFLOW_TRACKING_URI"])
        raise ConfigError(
            f"tracking.uri={uri!r}: its credential was masked when the config was saved; give the URI with "
            "--uri or MLFLOW_TRACKING_URI, or the credentials in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
        )
    return credentials_to_env(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store(run_dir.parent))


def sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts. For SQLite, beside the database: MLflow's default
    is ./mlruns in the working directory, which in the image is /opt/ffscale, not writable by the
    job's user (uid 1000). A server decides for itself (`--serve-artifacts`: mlflow-artifacts:/)."""
    db = sqlite_file(uri)
    return (db.parent / ARTIFACTS).resolve().as_uri() if db else None


def experiment_id(c, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # created meanwhile by another job
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ensure_store(cfg, run_dir: Path) -> None:
    """Create the default SQLite store before ranks start: concurrent creation races. A store on a
    network filesystem is named once (several jobs stall on its locks: `ffscale doctor` refuses it)."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg, run_dir)
    db = sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        client(uri).search_experiments(max_results=1)
        why = sqlite_unsafe(db)
        if why:
            print(f"ffscale: warning: {why}", flush=True)


def sqlite_unsafe(db: Path) -> str | None:
    """Why a SQLite store at `db` is unsafe for several jobs (a network filesystem), or None."""
    from ffscale.util.fsinfo import network_fs

    fs = network_fs(db.parent)
    if fs is None:
        return None
    kind, mount = fs
    return (f"the MLflow store {db} is SQLite on a network filesystem ({kind} at {mount}), where its locking is "
            "unsafe and jobs stall on 'database is locked': point tracking.uri (or MLFLOW_TRACKING_URI) at an "
            "MLflow server (cluster/README.md), or put the store on a local disk "
            "(tracking.uri=sqlite:////local/path/mlflow.db)")  # fmt: skip


def stage_runs(uri: str, experiment: str, filter_string: str = "", model: str = "") -> list:
    """Every stage run of an experiment, filtered on the server, in pages of PAGE runs (one request
    each: a run comes with its params, latest metrics and tags, so nothing is fetched per run)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = "tags.`ffscale.kind` = 'stage'"
    if model:  # a substring, any case, on every backend (MLflow's ILIKE; `_` and `%` match any character)
        flt += " and tags.`ffscale.model` ILIKE '%" + model.replace("'", "") + "%'"
    if filter_string:
        flt += f" and {filter_string}"
    out, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], flt, max_results=PAGE, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def log_values(c, run_id: str, params: dict | None = None, tags: dict | None = None,
               metrics: list[tuple[str, float, int, int]] | None = None) -> None:  # fmt: skip
    """Plain values into a run, in MLflow's batch sizes: params {k: v}, tags {k: v}, metrics
    (key, value, timestamp ms, step)."""
    from mlflow.entities import Metric, Param, RunTag

    ps = [Param(k, str(v)) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    ms = [Metric(k, float(v), t, s) for k, v, t, s in metrics or []]
    for i in range(0, max(len(ps), len(ts), len(ms)), 100):  # log_batch: 100 params, 1,000 values in all
        c.log_batch(run_id, params=ps[i : i + 100], tags=ts[i : i + 100], metrics=ms[i : i + 100])


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def metric_histories(uri: str, wanted: list[tuple[str, str]], threads: int = 8) -> list:
    """metric_history of each (run id, key), `threads` requests at a time (a request each: overlapping
    their round trips is what makes curves of many runs fast on a server)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda rk: metric_history(uri, *rk), wanted))


def new_run(c, experiment_id: str, name: str, tags: dict) -> str:
    """A new run's id."""
    return c.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def end_run(c, run_id: str, status: str) -> None:
    c.set_terminated(run_id, status)


def runs_one_by_one(uri: str, run_ids: list[str]) -> list:
    """Each run fetched by its own request (the slow way `ffscale bench compare` measures against)."""
    c = client(uri)
    return [c.get_run(i) for i in run_ids]


def delete_experiment(uri: str, name: str) -> None:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        c.delete_experiment(exp.experiment_id)


def download_model(uri: str) -> Path:
    """A models:/ or runs:/ model's artifacts (model.json and weights) in a local directory."""
    quiet()
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/")))
    except Exception as e:
        raise ConfigError(
            f"{uri}: cannot download it from MLflow at {redact(mlflow.get_tracking_uri())} ({redact(str(e))})"
        ) from None
    return local / "artifacts" if (local / "artifacts").is_dir() else local
