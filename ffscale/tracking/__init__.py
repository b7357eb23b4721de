"""Experiment tracking in MLflow: a parent run per pipeline, a child run per stage.

The only module that talks to MLflow. Rank 0 tracks; every other rank gets a NullTracker.
Run ids live in `<run dir>/mlflow_runs.json`, so a rerun continues the same runs; params are
logged once, when a run is created (MLflow params are immutable). Metrics are buffered and
written with `log_batch`; a tracking server that is down costs one warning, not the training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

from ..atomic import write_atomic
from ..config import dotted
from ..errors import ConfigError

SECRET = re.compile(r"(token|password|passwd|secret|credential|api_?key)", re.I)
URI_CREDS = re.compile(r"(//)[^/@\s]+@")
MLFLOW_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # a dead server must not block training for minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _client(uri: str):
    """An MlflowClient, MLflow configured quietly first (its settings are read at import)."""
    for k, v in MLFLOW_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow import MlflowClient

    return MlflowClient(uri)


def redact(value: str) -> str:
    return URI_CREDS.sub(r"\1***@", value)


def flatten(d: dict) -> dict[str, str]:
    """Nested config -> {'optim.base_lr': '0.0005', ...}; secret-looking keys and URI credentials
    never leave the machine."""
    return {k: redact(str(v))[:6000] for k, v in dotted(d).items() if not SECRET.search(k)}


def default_store(runs_root: Path) -> str:
    """One SQLite store for every pipeline under `run.dir`, so `ffscale compare` sees them all."""
    return f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def tracking_uri(cfg, run_dir: Path) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store(run_dir.parent)


class _Down(Exception):
    """The tracking server failed recently; the call was not made."""


class NullTracker:
    def pipeline_started(self, cfg) -> None: ...
    def stage_started(self, stage, train_manifest, val_manifest, n_params, lineage) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def config_changed(self, stage, step: int, diff: dict) -> None: ...
    def stage_ended(self, stage, status: str, summary: dict | None = None) -> None: ...
    def model_ready(self, final, stages) -> None: ...
    def pipeline_ended(self, status: str) -> None: ...


class MlflowTracker:
    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = tracking_uri(cfg, run_dir)
        self.client = _client(self.uri)
        self.ids_file = run_dir / "mlflow_runs.json"
        self.ids = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {"stages": {}}
        self.parent: str | None = None
        self.child: str | None = None
        self.buffer: list = []
        self.monitor = None
        self.failed_once = False
        self.down_until = 0.0

    # -- helpers ---------------------------------------------------------------------------
    def _call(self, fn, *a, **kw):
        """Tracking must not stop training: after a failure, calls are skipped for a minute
        (metrics stay buffered and are written when the server answers again); one warning."""
        if time.monotonic() < self.down_until:
            raise _Down
        try:
            return fn(*a, **kw)
        except Exception as e:
            self.down_until = time.monotonic() + 60
            if not self.failed_once:
                print(f"ffscale: MLflow at {redact(self.uri)} failed ({type(e).__name__}: {str(e)[:200]}); "
                      "training continues, metrics are kept and retried", flush=True)  # fmt: skip
                self.failed_once = True
            raise _Down from None

    def _try(self, fn, *a, **kw):
        try:
            return self._call(fn, *a, **kw)
        except _Down:
            return None

    def _save_ids(self) -> None:
        write_atomic(self.ids_file, json.dumps(self.ids, indent=1))

    def _resume_or_create(
        self, run_id: str | None, exp_id: str, name: str, tags: dict, params: dict
    ) -> str | None:
        from mlflow.entities import Param

        if run_id and self._try(self.client.get_run, run_id) is not None:
            self._try(self.client.update_run, run_id, status="RUNNING")
            return run_id
        run = self._try(self.client.create_run, exp_id, run_name=name, tags=tags)
        if run is None:
            return None
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self._try(self.client.log_batch, run.info.run_id, params=items[i : i + 100])
        return run.info.run_id

    # -- the tracker interface ---------------------------------------------------------------
    def pipeline_started(self, cfg) -> None:
        exp = self._try(self.client.get_experiment_by_name, cfg.tracking.experiment)
        self.exp_id = (
            exp.experiment_id if exp else self._try(self.client.create_experiment, cfg.tracking.experiment)
        )
        if self.exp_id is None:
            return
        params = flatten({k: v for k, v in dataclasses.asdict(cfg).items() if k != "stages"})
        params["stages"] = ",".join(cfg.stages or ["train"])
        tags = {"ffscale.pipeline": cfg.run.name, "ffscale.kind": "pipeline"}
        self.parent = self._resume_or_create(self.ids.get("parent"), self.exp_id, cfg.run.name, tags, params)
        if self.parent:
            self.ids["parent"] = self.parent
            self._save_ids()
            if (self.run_dir / "config.yaml").is_file():
                self._try(self.client.log_artifact, self.parent, str(self.run_dir / "config.yaml"))

    def stage_started(self, stage, train_manifest, val_manifest, n_params, lineage: str) -> None:
        """`lineage`: where the stage's weights came from (pipeline.init_weights_for)."""
        if not self.parent:
            return
        s = stage.cfg
        tags = {
            "mlflow.parentRunId": self.parent,
            "ffscale.pipeline": self.cfg.run.name,
            "ffscale.kind": "stage",
            "ffscale.stage": stage.name,
            "ffscale.model": s.model.name,
            "ffscale.dataset": train_manifest.name + ":" + train_manifest.digest,
            "ffscale.init_from": lineage,
        }
        params = flatten(dataclasses.asdict(s))
        params["model.params"] = str(n_params)
        old = self.ids["stages"].get(stage.name)
        self.child = self._resume_or_create(
            old, self.exp_id, f"{self.cfg.run.name}/{stage.name}", tags, params
        )
        if not self.child:
            return
        self.ids["stages"][stage.name] = self.child
        self._save_ids()
        if not old:
            self._log_datasets(train_manifest, val_manifest, s)
        self._start_system_metrics()

    def _log_datasets(self, train_m, val_m, s) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for m, ctx, root in ((train_m, "training", s.data.train), (val_m, "validation", s.data.val)):
            src = json.dumps({"uri": str(Path(root).resolve()), "origin": m.source})
            schema = json.dumps({"samples": m.num_samples, "classes": m.num_classes, "shards": len(m.shards)})
            ds = Dataset(name=m.name, digest=m.digest, source_type="local", source=src, schema=schema)
            inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", ctx)]))
        self._try(self.client.log_inputs, self.child, datasets=inputs)

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.child, sampling_interval=10, tracking_uri=self.uri, resume_logging=True
            )
            self.monitor.start()
        except Exception:
            self.monitor = None

    def config_changed(self, stage, step: int, diff: dict) -> None:
        """Params are immutable: a resumed stage's allowed change is a tag per key with its step
        (`ffscale.change.<key>` = `old -> new @ step N`, every change in `ffscale.changes`), and the
        stage's config history as an artifact."""
        if not self.child:
            return
        from ..changes import HISTORY, describe

        run = self._try(self.client.get_run, self.child)
        past = run.data.tags.get("ffscale.changes", "") if run else ""
        line = f"step {step}: {describe(diff)}"
        self._try(self.client.set_tag, self.child, "ffscale.changes", f"{past}\n{line}".strip())
        for k, (old, new) in diff.items():
            self._try(
                self.client.set_tag, self.child, f"ffscale.change.{k}", f"{old!r} -> {new!r} @ step {step}"
            )
        if (stage.dir / HISTORY).is_file():
            self._try(self.client.log_artifact, self.child, str(stage.dir / HISTORY))

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        if not self.child:
            return
        now = int(time.time() * 1000)
        self.buffer += [
            Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))
        ]
        if len(self.buffer) >= self.cfg.tracking.flush_every:
            self.flush()

    def flush(self) -> None:
        while self.child and self.buffer:
            try:
                self._call(self.client.log_batch, self.child, metrics=self.buffer[:1000])
            except _Down:
                self.buffer = self.buffer[-200_000:]  # keep (bounded) until the server is back
                return
            self.buffer = self.buffer[1000:]

    def stage_ended(self, stage, status: str, summary: dict | None = None) -> None:
        self.flush()
        if self.monitor is not None:
            self._try(self.monitor.finish)
            self.monitor = None
        if not self.child:
            return
        if summary is not None:
            from mlflow.entities import Metric

            best = summary.get("best", {})
            now = int(time.time() * 1000)
            final = [
                Metric(f"best_{k}", float(v), now, summary.get("steps", 0))
                for k, v in best.items()
                if k != "epoch"
            ]
            self._try(self.client.log_batch, self.child, metrics=final)
            for f in ("DONE", "metrics.jsonl", "weights.safetensors"):
                if (stage.dir / f).is_file():
                    self._try(self.client.log_artifact, self.child, str(stage.dir / f))
        if status != "RUNNING":
            self._try(self.client.set_terminated, self.child, status)
        self.child = None

    def model_ready(self, final, stages) -> None:
        """The final stage's weights as an MLflow model in its stage run, registered under
        tracking.register_as, the version tagged with the runs and the data it came from."""
        run_id = self.ids["stages"].get(final.name)
        from ..predict import CARD

        if not run_id or not (final.dir / CARD).is_file() or self.ids.get("model_run") == run_id:
            return  # a rerun of a finished pipeline logs (and registers) no second copy
        try:
            info = self._call(self._log_model, final, run_id)
        except _Down:
            return
        self.ids["model_run"] = run_id
        self._save_ids()
        name, version = self.cfg.tracking.register_as, getattr(info, "registered_model_version", None)
        if not name or version is None:
            return
        card = json.loads((final.dir / CARD).read_text())
        tags = {
            "ffscale.pipeline": self.cfg.run.name,
            "ffscale.pipeline_run": self.parent or "",
            "ffscale.stage_run": run_id,
            "ffscale.stage_runs": json.dumps({s.name: self.ids["stages"].get(s.name) for s in stages}),
            "ffscale.data": json.dumps(card["data"]),
            "ffscale.preprocessing": json.dumps(card["preprocessing"]),
        }
        for k, v in tags.items():
            self._try(self.client.set_model_version_tag, name, str(version), k, v)
        self._try(
            self.client.update_model_version, name, str(version),
            description=f"{card['model']} from pipeline {self.cfg.run.name}, stage {final.name} "
            f"(run {run_id}); trained on {card['data']['train']['name']}:{card['data']['train']['digest']}",
        )  # fmt: skip
        print(f"ffscale: registered models:/{name}/{version} (stage run {run_id})", flush=True)

    def _log_model(self, final, run_id: str):
        import mlflow

        from .pyfunc import log

        mlflow.set_tracking_uri(self.uri)
        mlflow.start_run(run_id=run_id)  # the stage finished: a failure to log must not mark it FAILED
        try:
            return log(final.dir, self.cfg.tracking.register_as)
        finally:
            mlflow.end_run("FINISHED")

    def pipeline_ended(self, status: str) -> None:
        self.flush()
        if self.child:
            self.stage_ended(None, status)
        if self.parent and status != "RUNNING":
            self._try(self.client.set_terminated, self.parent, status)


def download_model(uri: str) -> Path:
    """A models:/ or runs:/ model's artifacts (model.json and weights) in a local directory."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/")))
    except Exception as e:
        raise ConfigError(
            f"{uri}: cannot download it from MLflow at {redact(mlflow.get_tracking_uri())} ({e})"
        ) from None
    return local / "artifacts" if (local / "artifacts").is_dir() else local


def create(cfg, run_dir: Path, rank: int):
    """Rank 0 tracks in MLflow unless tracking.enabled=false; every other rank gets the null tracker."""
    return MlflowTracker(cfg, run_dir) if rank == 0 and cfg.tracking.enabled else NullTracker()


def ensure_store(cfg, run_dir: Path) -> None:
    """Create the default SQLite store before ranks start: concurrent creation races."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg, run_dir)
    if uri.startswith("sqlite:"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        _client(uri).search_experiments(max_results=1)


def reachable(cfg, run_dir: Path) -> tuple[str, str | None]:
    """(the tracking URI, None) when MLflow answers there, else (URI, the reason)."""
    uri = tracking_uri(cfg, run_dir)
    try:
        if uri.startswith("sqlite:"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        _client(uri).search_experiments(max_results=1)
    except Exception as e:
        return redact(uri), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return redact(uri), None


def stage_runs(uri: str, experiment: str, filter_string: str = "") -> list:
    """Finished or not, every stage run of an experiment (for `ffscale compare`)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = "tags.`ffscale.kind` = 'stage'" + (f" and {filter_string}" if filter_string else "")
    return client.search_runs([exp.experiment_id], flt, max_results=5000)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))
