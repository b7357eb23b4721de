"""A run directory made true in MLflow, idempotently: the pipeline's parent run and a run per
stage (created or found), their params and tags, every metric step of `metrics.jsonl` the server
lacks, the config history's changes, the summary, the artifacts, the final status and the model.

The run directory is the record (rank 0 writes it whatever MLflow does); MLflow is brought up to it.
The live tracker (ffscale/tracking/runs.py) goes through the same steps, so a stage that ends during
an outage is caught up by the code that `ffscale track sync RUN_DIR` runs later, and a run trained
with tracking.enabled=false is imported by it. Runs are found by the ids in `mlflow_runs.json` (the
store the job tracked to) or by their `ffscale.pipeline_id` tag (any other store); metric steps
already on the server are not sent again, artifacts of the same size are not uploaded again, and
a model version of the stage run is not registered twice.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from ffscale import config
from ffscale.data.manifest import dataset_name, load_manifest
from ffscale.inference.card import CARD, train_tag
from ffscale.tracking.metrics import send_missing
from ffscale.tracking.store import client, credentials_to_env, experiment_id, flatten
from ffscale.util.atomic import write_atomic
from ffscale.util.secrets import redact

IDS = "mlflow_runs.json"
HISTORY = "config-history.jsonl"  # ffscale/run/changes.py writes it
DONE = "DONE"
ARTIFACTS = ("DONE", "metrics.jsonl", "weights.safetensors", HISTORY)


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill mid-append
            continue
    return rows


def wall_span(stage_dir: Path) -> tuple[int | None, int | None]:
    """(start, end) of a stage in epoch ms, read from its files, for a run the replay creates (else
    MLflow would time it by the sync: `ffscale compare` showed 0.0 min). The first row comes
    `log_every` steps in, so the start is set back by those steps at the rate between the rows; the
    end is DONE's time, else the last row's. Rows written before they carried their time: from the
    stage's first config-history row to DONE. None where neither says."""
    rows = [r for r in read_rows(stage_dir / "metrics.jsonl") if isinstance(r.get("time"), (int, float))]
    done = (stage_dir / DONE).stat().st_mtime if (stage_dir / DONE).is_file() else None
    if not rows:
        hist = [r for r in read_rows(stage_dir / HISTORY) if isinstance(r.get("time"), (int, float))]
        if not hist or done is None:
            return None, None
        return int(hist[0]["time"] * 1000), int(max(done, hist[0]["time"]) * 1000)
    first, last = rows[0], rows[-1]
    start = first["time"]
    steps = last.get("step", 0) - first.get("step", 0)
    if steps > 0 and last["time"] > first["time"]:
        start -= first.get("step", 0) * (last["time"] - first["time"]) / steps
    end = done if done is not None else last["time"]
    return int(start * 1000), int(max(end, start) * 1000)


@dataclass
class StageFacts:
    """What a stage run is tagged with: known live at its start (the loop passes them), or read back
    from the stage's files by `from_files`."""

    dataset: str = "?"  # the train shards' dataset:digest (Manifest.dataset)
    n_params: int | None = None
    lineage: str = "?"  # where its weights came from (ffscale/run/pipeline.py: init_weights_for)
    train_m: object = None  # manifests, for MLflow's dataset inputs
    val_m: object = None

    @classmethod
    def from_files(cls, stage: config.Stage, previous: list[str]) -> StageFacts:
        s, f = stage.cfg, cls()
        done = _json(stage.dir / DONE)
        card = _json(stage.dir / CARD)
        f.lineage = done.get("init_from") or _lineage(s.init_from, previous)
        num_classes = card.get("num_classes") or s.model.num_classes
        try:
            f.train_m, f.val_m = load_manifest(s.data.train)[0], load_manifest(s.data.val)[0]
            num_classes = num_classes or f.train_m.num_classes
        except Exception:  # shards moved or gone: the tags come from the card or the history
            f.train_m = f.val_m = None
        f.dataset = train_tag(card, f.train_m) or (f.train_m.tag if f.train_m else _history_tag(stage))
        if num_classes:
            f.n_params = _count_params(s, num_classes)
        return f


def _history_tag(stage: config.Stage) -> str:
    """A stage that wrote no card and whose shards are gone: its config's first digest of them."""
    hist = read_rows(stage.dir / HISTORY)
    digest = hist[0].get("digests", {}).get("data.train") if hist else None
    return f"{dataset_name('', stage.cfg.data.train)}:{digest or '?'}"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _lineage(ref: str | None, previous: list[str]) -> str:
    """The lineage the pipeline gives a stage that did not finish (a finished one records its own)."""
    if ref == "scratch" or (ref is None and not previous):
        return "scratch"
    if ref is None:
        return f"stage:{previous[-1]}"
    return f"stage:{ref}" if ref in previous else f"path:{ref}"


def _count_params(s, num_classes: int) -> int | None:
    try:
        import torch

        from ffscale.inference.build import build_model

        with torch.device("meta"):
            return sum(p.numel() for p in build_model(s, num_classes).parameters())
    except Exception:
        return None


class Replay:
    """The steps, each idempotent; `all` runs them for the whole directory."""

    def __init__(self, run_dir: Path, uri: str, cfg: config.Config | None = None):
        self.run_dir, self.uri = Path(run_dir), credentials_to_env(uri)
        if cfg is None:  # the directory where it is now, wherever it was trained
            cfg = config.load([str(self.run_dir / "config.yaml")])
            cfg.run.dir, cfg.run.name = str(self.run_dir.resolve().parent), self.run_dir.resolve().name
        self.cfg = cfg
        self.where = redact(self.uri.rstrip("/"))  # the store, as mlflow_runs.json names it
        self._client = None
        self.exp_id: str | None = None
        self.ids_file = self.run_dir / IDS
        ids = _json(self.ids_file) or {"stages": {}}
        ids.setdefault("stages", {})
        # ids of another store than the one named in the file are not this store's
        self.own = ids.get("uri") in (None, self.where)
        self.ids = ids if self.own else {"stages": {}, "pipeline_id": ids.get("pipeline_id")}
        if not self.ids.get("pipeline_id"):
            self.ids["pipeline_id"] = ids.get("pipeline_id") or uuid.uuid4().hex
        self.sent = 0  # metric values sent
        self.created: set[str] = set()  # runs this replay created: timed from the run directory
        self.uploaded: list[str] = []

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    # -- ids ---------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.own:
            write_atomic(self.ids_file, json.dumps({**self.ids, "uri": self.where}, indent=1))
        elif not self.ids_file.is_file():
            self.own = True
            self._save()

    def _get(self, run_id: str | None):
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return run if run.info.lifecycle_stage == "active" else None

    def _find(self, run_id: str | None, kind: str, stage: str | None = None):
        run = self._get(run_id)
        if run is not None:
            return run
        flt = f"tags.`ffscale.pipeline_id` = '{self.ids['pipeline_id']}' and tags.`ffscale.kind` = '{kind}'"
        if stage:
            flt += f" and tags.`ffscale.stage` = '{stage}'"
        found = self.client.search_runs([self.experiment()], flt, max_results=1)
        return found[0] if found else None

    # -- runs --------------------------------------------------------------------------------
    def experiment(self) -> str:
        if self.exp_id is None:
            self.exp_id = experiment_id(self.client, self.cfg.tracking.experiment, self.uri)
        return self.exp_id

    def _run(self, run_id, kind, stage, name, tags, params, start_ms=None) -> tuple[str, bool]:
        """(run id, created) of the run with these tags; params it lacks logged."""
        from mlflow.entities import Param, RunTag

        run = self._find(run_id, kind, stage)
        created = run is None
        if created:
            run = self.client.create_run(self.experiment(), start_time=start_ms, run_name=name, tags=tags)
            self.created.add(run.info.run_id)
        have = run.data.params
        items = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        missing = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
        if missing and not created:
            self.client.log_batch(run.info.run_id, tags=missing)
        return run.info.run_id, created

    def pipeline_run(self) -> str:
        cfg = self.cfg
        params = flatten({k: v for k, v in dataclasses.asdict(cfg).items() if k != "stages"})
        params["stages"] = ",".join(cfg.stages or ["train"])
        tags = {"ffscale.pipeline": cfg.run.name, "ffscale.kind": "pipeline",
                "ffscale.pipeline_id": self.ids["pipeline_id"]}  # fmt: skip
        starts = [wall_span(st.dir)[0] for st in config.stages(cfg)]
        start = min((t for t in starts if t is not None), default=None)
        rid, _ = self._run(self.ids.get("parent"), "pipeline", None, cfg.run.name, tags, params, start)
        if rid != self.ids.get("parent"):
            self.ids["parent"] = rid
            self._save()
        self._artifacts(rid, [self.run_dir / "config.yaml"])
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
            self._save()
        if created and facts.train_m is not None:
            self._datasets(rid, stage, facts)
        return rid

    def _datasets(self, rid: str, stage: config.Stage, facts: StageFacts) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        s, inputs = stage.cfg, []
        for m, ctx, root in (
            (facts.train_m, "training", s.data.train),
            (facts.val_m, "validation", s.data.val),
        ):
            src = json.dumps({"uri": str(Path(root).resolve()), "origin": m.source})
            schema = json.dumps({"samples": m.num_samples, "classes": m.num_classes, "shards": len(m.shards)})
            ds = Dataset(name=m.name, digest=m.digest, source_type="local", source=src, schema=schema)
            inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", ctx)]))
        self.client.log_inputs(rid, datasets=inputs)

    # -- what a stage run holds ----------------------------------------------------------------
    def metrics(self, stage: config.Stage, rid: str) -> int:
        """Every (name, step) of metrics.jsonl that the run lacks, sent; how many were sent."""
        sent = send_missing(self.client, rid, stage.dir / "metrics.jsonl")
        self.sent += sent
        return sent

    def changes(self, stage: config.Stage, rid: str) -> None:
        """A resumed stage's allowed changes as tags (params are immutable): `ffscale.change.<key>` =
        `old -> new @ step N`, and every change in `ffscale.changes`; the history as an artifact."""
        from mlflow.entities import RunTag

        rows = read_rows(stage.dir / HISTORY)[1:]
        if not rows:
            return
        tags, lines = [], []
        for r in rows:
            diff = r.get("changes", {})
            lines.append(
                f"step {r['step']}: " + "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in diff.items())
            )
            tags += [
                RunTag(f"ffscale.change.{k}", f"{o!r} -> {n!r} @ step {r['step']}")
                for k, (o, n) in diff.items()
            ]
        tags.append(RunTag("ffscale.changes", "\n".join(lines)))
        self.client.log_batch(rid, tags=tags)
        self._artifacts(rid, [stage.dir / HISTORY])

    def summary(self, stage: config.Stage, rid: str) -> None:
        """A finished stage: its best figures as `best_*` metrics, its files as artifacts."""
        from mlflow.entities import Metric

        done = _json(stage.dir / DONE)
        if not done:
            return
        t = int((stage.dir / DONE).stat().st_mtime * 1000)
        have = self.client.get_run(rid).data.metrics
        best = [Metric(f"best_{k}", float(v), t, done.get("steps", 0)) for k, v in done.get("best", {}).items()
                if k != "epoch" and isinstance(v, (int, float)) and have.get(f"best_{k}") != float(v)]  # fmt: skip
        if best:
            self.client.log_batch(rid, metrics=best)
        self._artifacts(rid, [stage.dir / f for f in ARTIFACTS])

    def _artifacts(self, rid: str, files: list[Path]) -> None:
        files = [f for f in files if f.is_file()]
        if not files:
            return
        have = {a.path: a.file_size for a in self.client.list_artifacts(rid)}
        for f in files:
            if have.get(f.name) != f.stat().st_size:
                self.client.log_artifact(rid, str(f))
                self.uploaded.append(f.name)

    def end(self, rid: str, status: str, only_running: bool = False, end_ms: int | None = None) -> None:
        """Mark a run ended; RUNNING (a stopped stage the rerun continues) changes nothing.
        `only_running`: end only a run still RUNNING (a replay does not know better than a FAILED
        the job itself set). `end_ms` (from the run directory) is used for a run this replay created;
        one the job created was live, and ends now."""
        now = self.client.get_run(rid).info.status
        if status != "RUNNING" and now != status and (now == "RUNNING" or not only_running):
            self.client.set_terminated(rid, status, end_time=end_ms if rid in self.created else None)

    # -- whole stages and pipelines ------------------------------------------------------------
    def stage(self, stage: config.Stage, facts: StageFacts, status: str, only_running: bool = False) -> str:
        """A stage caught up entirely: its run, metrics, changes, summary and status (FINISHED
        when it has its DONE)."""
        rid = self.stage_run(stage, facts)
        self.metrics(stage, rid)
        self.changes(stage, rid)
        if (stage.dir / DONE).is_file():
            self.summary(stage, rid)
            status, only_running = "FINISHED", False
        self.end(rid, status, only_running, wall_span(stage.dir)[1])
        return rid

    def model(self, final: config.Stage, stages: list[config.Stage]) -> str | None:
        """The final stage's model logged (and registered with tracking.register_as), once; its
        models:/ URI or the run's, or None when there is none to log."""
        from ffscale.tracking.registry import LOGGED, publish

        rid = self.ids["stages"].get(final.name)
        if not rid or not (final.dir / CARD).is_file():
            return None
        run = self.client.get_run(rid)
        name = self.cfg.tracking.register_as
        if run.data.tags.get(LOGGED) or self.ids.get("model_run") == rid:
            versions = (
                self.client.search_model_versions(f"name = '{name}' and run_id = '{rid}'") if name else []
            )
            if not name or versions:
                return f"models:/{name}/{versions[0].version}" if name else run.data.tags.get(LOGGED)
        runs = {s.name: self.ids["stages"].get(s.name) for s in stages}
        ref = publish(
            self.client, self.uri, self.cfg.run.name, final.dir, rid, self.ids.get("parent"), runs, name
        )
        if rid in self.created:  # logging the model started and ended the run again, timed now
            self.client.set_terminated(rid, "FINISHED", end_time=wall_span(final.dir)[1])
        self.ids["model_run"] = rid
        self._save()
        return ref

    def all(self, status: str | None = None) -> dict:
        """The whole directory: every stage that started, the parent, the model when every stage is
        done. `status`: of a stage that did not finish and of the pipeline (default KILLED: stopped;
        a rerun resumes it). What was done, for the report."""
        stages = config.stages(self.cfg)
        parent = self.pipeline_run()
        report, done = {"parent": parent, "stages": {}}, []
        for i, st in enumerate(stages):
            if not st.dir.is_dir() or not ((st.dir / "metrics.jsonl").is_file() or (st.dir / DONE).is_file()):
                continue
            facts = StageFacts.from_files(st, [s.name for s in stages[:i]])
            rid = self.stage(st, facts, status or "KILLED", only_running=True)
            report["stages"][st.name] = (rid, self.client.get_run(rid).info.status)
            if (st.dir / DONE).is_file():
                done.append(st)
        finished = len(done) == len(stages)
        if finished:
            report["model"] = self.model(done[-1], done)
        ends = [wall_span(st.dir)[1] for st in stages]
        end = max((t for t in ends if t is not None), default=None)
        self.end(
            parent, "FINISHED" if finished else (status or "KILLED"), only_running=not finished, end_ms=end
        )
        report["status"] = self.client.get_run(parent).info.status
        report["sent"], report["uploaded"] = self.sent, self.uploaded
        return report
