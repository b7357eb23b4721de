"""A run directory made true in MLflow, idempotently: the pipeline's parent run and a run per
stage (created or found), their params and tags, every metric step of `metrics.jsonl` the server
lacks, the config history's changes, the summary, the artifacts, the final status and the model.

The run directory is the record (rank 0 writes it whatever MLflow does); MLflow is brought up to it.
The live tracker (ffscale/tracking/runs.py) goes through the same steps, so a stage that ends during
an outage is caught up by the code that `ffscale track sync RUN_DIR` runs later, and a run trained
with tracking.enabled=false is imported by it. Each step is a module of its own: the ids
(ids.py), finding runs (search.py), params and tags (diffs.py), metric values (metrics.py), the
status (status.py), the wall-clock times of runs it creates (walltime.py), the model (registry.py);
this module runs them in order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ffscale import config
from ffscale.inference.stagedir import CONFIG, StageDir
from ffscale.tracking.diffs import change_tags, log_missing
from ffscale.tracking.facts import StageFacts
from ffscale.tracking.ids import RunIds
from ffscale.tracking.metrics import send_missing
from ffscale.tracking.search import find_run
from ffscale.tracking.status import end_run, stage_status
from ffscale.tracking.store import client, credentials_to_env, experiment_id, flatten
from ffscale.tracking.walltime import pipeline_span, wall_span
from ffscale.util.secrets import redact


def artifact_files(files: StageDir) -> list[Path]:
    """A finished stage's files kept with its run (the weights are also in the logged model)."""
    return [files.done, files.metrics, files.weights, files.history]


class Replay:
    """The steps, each idempotent; `all` runs them for the whole directory."""

    def __init__(self, run_dir: Path, uri: str, cfg: config.Config | None = None):
        self.run_dir, self.uri = Path(run_dir), credentials_to_env(uri)
        if cfg is None:  # the directory where it is now, wherever it was trained
            cfg = config.load([str(self.run_dir / CONFIG)])
            cfg.run.dir, cfg.run.name = str(self.run_dir.resolve().parent), self.run_dir.resolve().name
        self.cfg = cfg
        self.run_ids = RunIds(self.run_dir, redact(self.uri.rstrip("/")))
        self._client = None
        self.exp_id: str | None = None
        self.sent = 0  # metric values sent
        self.created: set[str] = set()  # runs this replay created: timed from the run directory
        self.uploaded: list[str] = []

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    @property
    def ids(self) -> dict:
        return self.run_ids.ids

    # -- runs --------------------------------------------------------------------------------
    def experiment(self) -> str:
        if self.exp_id is None:
            self.exp_id = experiment_id(self.client, self.cfg.tracking.experiment, self.uri)
        return self.exp_id

    def _run(self, run_id, kind, stage, name, tags, params, start_ms=None) -> tuple[str, bool]:
        """(run id, created) of the run with these tags; params it lacks logged."""
        run = find_run(self.client, self.experiment(), run_id, self.ids["pipeline_id"], kind, stage)
        created = run is None
        if created:
            run = self.client.create_run(self.experiment(), start_time=start_ms, run_name=name, tags=tags)
            self.created.add(run.info.run_id)
        log_missing(self.client, run, params, tags, created)
        return run.info.run_id, created

    def pipeline_run(self) -> str:
        cfg = self.cfg
        params = flatten({k: v for k, v in dataclasses.asdict(cfg).items() if k != "stages"})
        params["stages"] = ",".join(cfg.stages or ["train"])
        tags = {"ffscale.pipeline": cfg.run.name, "ffscale.kind": "pipeline",
                "ffscale.pipeline_id": self.ids["pipeline_id"]}  # fmt: skip
        start = pipeline_span([st.dir for st in config.stages(cfg)])[0]
        rid, _ = self._run(self.ids.get("parent"), "pipeline", None, cfg.run.name, tags, params, start)
        if rid != self.ids.get("parent"):
            self.ids["parent"] = rid
            self.run_ids.save()
        self._artifacts(rid, [self.run_dir / CONFIG])
        return rid

    def stage_run(self, stage: config.Stage, facts: StageFacts) -> str:
        parent = self.ids.get("parent") or self.pipeline_run()
        tags = {
            "mlflow.parentRunId": parent,
            "ffscale.pipeline": self.cfg.run.name,
            "ffscale.pipeline_id": self.ids["pipeline_id"],
            "ffscale.kind": "stage",
            "ffscale.stage": stage.name,
            "ffscale.model": stage.cfg.model.name,
            "ffscale.dataset": facts.dataset,
            "ffscale.init_from": facts.lineage,
        }
        params = flatten(dataclasses.asdict(stage.cfg))
        if facts.n_params is not None:
            params["model.params"] = str(facts.n_params)
        old = self.ids["stages"].get(stage.name)
        start = wall_span(stage.dir)[0]
        rid, created = self._run(
            old, "stage", stage.name, f"{self.cfg.run.name}/{stage.name}", tags, params, start
        )
        if rid != old:
            self.ids["stages"][stage.name] = rid
            self.run_ids.save()
        if created and (inputs := facts.dataset_inputs(stage)):
            self.client.log_inputs(rid, datasets=inputs)
        return rid

    # -- what a stage run holds ----------------------------------------------------------------
    def metrics(self, stage: config.Stage, rid: str) -> int:
        """Every (name, step) of metrics.jsonl that the run lacks, sent; how many were sent."""
        sent = send_missing(self.client, rid, StageDir(stage.dir).metrics)
        self.sent += sent
        return sent

    def changes(self, stage: config.Stage, rid: str) -> None:
        """A resumed stage's allowed changes as tags (params are immutable); the history as an artifact."""
        files = StageDir(stage.dir)
        tags = change_tags(files.history_rows())
        if not tags:
            return
        self.client.log_batch(rid, tags=tags)
        self._artifacts(rid, [files.history])

    def summary(self, stage: config.Stage, rid: str) -> None:
        """A finished stage: its best figures as `best_*` metrics, its files as artifacts."""
        from mlflow.entities import Metric

        files = StageDir(stage.dir)
        done = files.summary()
        if not done:
            return
        t = int(files.finished_at() * 1000)
        have = self.client.get_run(rid).data.metrics
        best = [Metric(f"best_{k}", float(v), t, done.get("steps", 0)) for k, v in done.get("best", {}).items()
                if k != "epoch" and isinstance(v, (int, float)) and have.get(f"best_{k}") != float(v)]  # fmt: skip
        if best:
            self.client.log_batch(rid, metrics=best)
        self._artifacts(rid, artifact_files(files))

    def _artifacts(self, rid: str, files: list[Path]) -> None:
        """The files the run lacks, or holds at another size, uploaded."""
        files = [f for f in files if f.is_file()]
        if not files:
            return
        have = {a.path: a.file_size for a in self.client.list_artifacts(rid)}
        for f in files:
            if have.get(f.name) != f.stat().st_size:
                self.client.log_artifact(rid, str(f))
                self.uploaded.append(f.name)

    def end(self, rid: str, status: str, only_running: bool = False, end_ms: int | None = None) -> None:
        """Mark a run ended (ffscale/tracking/status.py). `end_ms` (from the run directory) is used for
        a run this replay created; one the job created was live, and ends now."""
        end_run(self.client, rid, status, only_running, end_ms if rid in self.created else None)

    # -- whole stages and pipelines ------------------------------------------------------------
    def stage(self, stage: config.Stage, facts: StageFacts, status: str, only_running: bool = False) -> str:
        """A stage caught up entirely: its run, metrics, changes, summary and status."""
        files = StageDir(stage.dir)
        rid = self.stage_run(stage, facts)
        self.metrics(stage, rid)
        self.changes(stage, rid)
        if files.finished():
            self.summary(stage, rid)
        self.end(rid, *stage_status(files, status, only_running), wall_span(stage.dir)[1])
        return rid

    def model(self, final: config.Stage, stages: list[config.Stage]) -> str | None:
        """The final stage's model logged (and registered with tracking.register_as), once; its
        models:/ URI or the run's, or None when there is none to log."""
        from ffscale.tracking.registry import publish, published

        rid = self.ids["stages"].get(final.name)
        if not rid or not StageDir(final.dir).holds_package():
            return None
        name = self.cfg.tracking.register_as
        if ref := published(self.client, rid, name, self.ids.get("model_run")):
            return ref
        runs = {s.name: self.ids["stages"].get(s.name) for s in stages}
        ref = publish(
            self.client, self.uri, self.cfg.run.name, final.dir, rid, self.ids.get("parent"), runs, name
        )
        if rid in self.created:  # logging the model started and ended the run again, timed now
            self.client.set_terminated(rid, "FINISHED", end_time=wall_span(final.dir)[1])
        self.ids["model_run"] = rid
        self.run_ids.save()
        return ref

    def all(self, status: str | None = None) -> dict:
        """The whole directory: every stage that started, the parent, the model when every stage is
        done. `status`: of a stage that did not finish and of the pipeline (default KILLED: stopped;
        a rerun resumes it). What was done, for the report."""
        stages = config.stages(self.cfg)
        parent = self.pipeline_run()
        report, done = {"parent": parent, "stages": {}}, []
        for st in stages:
            files = StageDir(st.dir)
            if not files.started():
                continue
            rid = self.stage(st, StageFacts.from_files(st), status or "KILLED", only_running=True)
            report["stages"][st.name] = (rid, self.client.get_run(rid).info.status)
            if files.finished():
                done.append(st)
        finished = len(done) == len(stages)
        if finished:
            report["model"] = self.model(done[-1], done)
        end = pipeline_span([st.dir for st in stages])[1]
        self.end(
            parent, "FINISHED" if finished else (status or "KILLED"), only_running=not finished, end_ms=end
        )
        report["status"] = self.client.get_run(parent).info.status
        report["sent"], report["uploaded"] = self.sent, self.uploaded
        return report
