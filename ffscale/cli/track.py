"""`ffscale compare | track sync | register`: what MLflow holds of the runs, a run directory
replayed into it, a model package registered in it."""

from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="compare stage runs tracked in MLflow (Table 1 layout)")
    c.add_argument("--runs", default="runs", help="run.dir whose mlflow.db to read (default: runs)")
    c.add_argument("--uri", help="tracking URI instead (default: $MLFLOW_TRACKING_URI or <runs>/mlflow.db)")
    c.add_argument("--experiment", default="ffscale")
    c.add_argument("--filter", help="MLflow search filter, e.g. \"params.\\`optim.base_lr\\` = '0.001'\"")
    c.add_argument("--model", help="only models whose name contains this (filtered by the server)")
    c.add_argument("--plot", metavar="FILE.png", help="draw loss and top-1 curves")
    c.set_defaults(fn=compare)

    t = sub.add_parser("track", help="MLflow and a run directory: `ffscale track sync RUN_DIR`")
    tsub = t.add_subparsers(dest="track_cmd", required=True)
    s = tsub.add_parser(
        "sync", help="replay a run directory into MLflow (after an outage, or a run with tracking off)",
        description="Makes MLflow hold what the run directory holds: the pipeline's and stages' runs (created, "
        "or found again), params, tags, every metric step of metrics.jsonl the server lacks, the config "
        "history, summaries, artifacts, final statuses and, for a finished pipeline, its model (registered "
        "under tracking.register_as). Idempotent: a second sync sends nothing. Takes the run's lock: it stops "
        "(exit 2) while a job holds the run, and no job starts on it meanwhile.",
    )  # fmt: skip
    s.add_argument("run_dir", help="a run directory (runs/<name>, holding config.yaml)")
    s.add_argument("--uri", help="tracking URI (default: the run's tracking.uri, $MLFLOW_TRACKING_URI, or "
                                 "<run.dir>/mlflow.db)")  # fmt: skip
    s.add_argument("--status", choices=["KILLED", "FAILED"], default="KILLED",
                   help="for stages that did not finish (default KILLED: a rerun resumes them)")  # fmt: skip
    s.set_defaults(fn=sync)

    r = sub.add_parser(
        "register", help="register a model directory in MLflow (an `ffscale import` output, a stage or run)",
        description="Logs the model package (model.json + weights) as an MLflow pyfunc model in a run of its own "
        "(tag ffscale.kind=package) and registers it as NAME; the version is tagged with its data (or import "
        "source) and preprocessing, as a pipeline's registration is. Load it with "
        "`ffscale predict --model models:/NAME/VERSION` or `mlflow models predict`.",
    )  # fmt: skip
    r.add_argument("package", help="an `ffscale import` output, a finished stage or a run directory")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument(
        "--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else <dir's parent>/mlflow.db)"
    )
    r.add_argument("--experiment", default="ffscale")
    r.set_defaults(fn=register)


def compare(args) -> int:
    from ffscale.tools.compare import main

    return main(args)


def sync(args) -> int:
    from ffscale import config
    from ffscale.errors import ConfigError
    from ffscale.inference.stagedir import CONFIG
    from ffscale.run.runlock import RunLock
    from ffscale.tracking.replay import Replay
    from ffscale.tracking.store import tracking_uri
    from ffscale.util.secrets import redact

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG} (not an ffscale run directory)")
    cfg = config.load([str(run_dir / CONFIG)])
    uri = args.uri or tracking_uri(cfg, run_dir)
    with RunLock(run_dir):  # no job writes the directory (or tracks it) meanwhile
        rep = Replay(run_dir, uri).all(args.status)
    stages = ", ".join(f"{name} {status}" for name, (_, status) in rep["stages"].items()) or "none started"
    print(f"{run_dir} -> MLflow at {redact(uri)}: pipeline run {rep['parent']} {rep['status']}; stages: {stages}; "
          f"{rep['sent']} metric values sent, {len(rep['uploaded'])} artifacts uploaded"
          + (f"; model {rep['model']}" if rep.get("model") else ""))  # fmt: skip
    return 0


def register(args) -> int:
    from ffscale.tracking.registry import package_run_dir, register_package
    from ffscale.tracking.store import default_store

    path = Path(args.package)
    run_dir = package_run_dir(path)[1].resolve()
    uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store(run_dir.parent)
    ref = register_package(path, args.name, uri, args.experiment)
    print(f"{path}: registered as {ref}")
    return 0
