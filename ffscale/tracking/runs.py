"""The MLflow tracker: a parent run per pipeline, a child run per stage.

Run ids live in `<run dir>/mlflow_runs.json`, so a rerun continues the same runs; params are
logged once, when a run is created (MLflow params are immutable). Metrics are buffered and
written with `log_batch`; a tracking server that is down costs one warning, not the training
(ffscale/tracking/breaker.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from ffscale.config import dotted
from ffscale.inference.card import CARD
from ffscale.tracking.breaker import Breaker, Down
from ffscale.tracking.registry import publish
from ffscale.tracking.store import client, redact, tracking_uri
from ffscale.util.atomic import write_atomic

SECRET = re.compile(r"(token|password|passwd|secret|credential|api_?key)", re.I)


def flatten(d: dict) -> dict[str, str]:
    """Nested config -> {'optim.base_lr': '0.0005', ...}; secret-looking keys and URI credentials
    never leave the machine."""
    return {k: redact(str(v))[:6000] for k, v in dotted(d).items() if not SECRET.search(k)}


class MlflowTracker:
    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.uri = tracking_uri(cfg, run_dir)
        self.client = client(self.uri)
        self.ids_file = run_dir / "mlflow_runs.json"
        self.ids = json.loads(self.ids_file.read_text()) if self.ids_file.is_file() else {"stages": {}}
        self.parent: str | None = None
        self.child: str | None = None
        self.buffer: list = []
        self.monitor = None
        self.breaker = Breaker(self.uri)
        self._try = self.breaker.attempt

    # -- helpers ---------------------------------------------------------------------------
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

    def config_changed(self, stage, step: int, diff: dict, what: str, history: Path) -> None:
        """Params are immutable: a resumed stage's allowed change is a tag per key with its step
        (`ffscale.change.<key>` = `old -> new @ step N`, every change in `ffscale.changes`), and the
        stage's config history (`history`) as an artifact. `what`: the change in words."""
        if not self.child:
            return
        run = self._try(self.client.get_run, self.child)
        past = run.data.tags.get("ffscale.changes", "") if run else ""
        line = f"step {step}: {what}"
        self._try(self.client.set_tag, self.child, "ffscale.changes", f"{past}\n{line}".strip())
        for k, (old, new) in diff.items():
            self._try(
                self.client.set_tag, self.child, f"ffscale.change.{k}", f"{old!r} -> {new!r} @ step {step}"
            )
        if history.is_file():
            self._try(self.client.log_artifact, self.child, str(history))

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
                self.breaker.call(self.client.log_batch, self.child, metrics=self.buffer[:1000])
            except Down:
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
        """The final stage's model logged and registered (ffscale/tracking/registry.py), once."""
        run_id = self.ids["stages"].get(final.name)
        if not run_id or not (final.dir / CARD).is_file() or self.ids.get("model_run") == run_id:
            return  # a rerun of a finished pipeline logs (and registers) no second copy
        runs = {s.name: self.ids["stages"].get(s.name) for s in stages}
        if publish(self.client, self.breaker, self.uri, self.cfg, final, run_id, self.parent, runs):
            self.ids["model_run"] = run_id
            self._save_ids()

    def pipeline_ended(self, status: str) -> None:
        self.flush()
        if self.child:
            self.stage_ended(None, status)
        if self.parent and status != "RUNNING":
            self._try(self.client.set_terminated, self.parent, status)
