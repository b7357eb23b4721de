"""A finished model in MLflow: logged as a pyfunc (ffscale/tracking/pyfunc.py) into a run and,
with a name, registered, the version tagged with the runs and the data it came from. The same for
the final stage of a pipeline (tracking.register_as) and for any model package on disk
(`ffscale register DIR --name NAME`: an `ffscale import` output, a finished stage or run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ffscale.inference.card import find_package, read_card, train_tag
from ffscale.inference.stagedir import CONFIG
from ffscale.tracking.store import client, credentials_to_env, experiment_id, flatten
from ffscale.util.secrets import redact

LOGGED = "ffscale.logged_model"  # the stage run's tag: the logged model's URI (logged once)


def published(c, run_id: str, register_as: str | None, model_run: str | None) -> str | None:
    """The reference of the model already logged from the run `run_id` (and, with `register_as`,
    registered), or None when it has yet to be: a model is logged and registered once.
    `model_run`: the run the run directory's ids say its model was logged from."""
    run = c.get_run(run_id)
    if not (run.data.tags.get(LOGGED) or model_run == run_id):
        return None
    if not register_as:
        return run.data.tags.get(LOGGED)
    versions = c.search_model_versions(f"name = '{register_as}' and run_id = '{run_id}'")
    return f"models:/{register_as}/{versions[0].version}" if versions else None


def publish(c, uri: str, pipeline: str, stage_dir: Path, run_id: str, parent: str | None, stage_runs: dict,
            register_as: str | None) -> str:  # fmt: skip
    """Log (and register) the model of `stage_dir` into the run `run_id`; the models:/ URI (or the
    logged model's). Raises when MLflow fails: the caller retries or reports."""
    info = _log_model(uri, stage_dir, run_id, register_as)
    c.set_tag(run_id, LOGGED, info.model_uri)
    version = getattr(info, "registered_model_version", None)
    if not register_as or version is None:
        return info.model_uri
    card = read_card(stage_dir)
    tags = {
        "ffscale.pipeline": pipeline,
        "ffscale.pipeline_run": parent or "",
        "ffscale.stage_run": run_id,
        "ffscale.stage_runs": json.dumps(stage_runs),
        "ffscale.data": json.dumps(card["data"]),
        "ffscale.preprocessing": json.dumps(card["preprocessing"]),
    }
    for k, v in tags.items():
        c.set_model_version_tag(register_as, str(version), k, v)
    c.update_model_version(register_as, str(version), description=redact(
        f"{card['model']} from pipeline {pipeline}, stage {stage_dir.name} (run {run_id}); {_origin(card)}"))  # fmt: skip
    print(f"ffscale: registered models:/{register_as}/{version} (stage run {run_id})", flush=True)
    return f"models:/{register_as}/{version}"


def _origin(card: dict) -> str:
    data = card.get("data", {})
    if "train" in data:
        return f"trained on {train_tag(card)}"
    if "imported" in data:
        src = data["imported"]
        return f"imported from {Path(src['path']).name} ({src['layout']} layout, sha256 {src['digest']})"
    return "origin not recorded"


def _log_model(uri: str, stage_dir: Path, run_id: str, register_as: str | None):
    import mlflow
    from mlflow.tracking._tracking_service import utils as uri_state

    from ffscale.tracking.pyfunc import log

    # mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI for child processes (mlflow 3.17,
    # tracking/_tracking_service/utils.py:109-116): both are restored after, or every job this
    # process launches later (`ffscale register` called from Python, then a training) would log into
    # this store. The module global, not get_tracking_uri(): that resolves the environment and the
    # default, and setting it back would pin them
    before_env, before_uri = os.environ.get("MLFLOW_TRACKING_URI"), uri_state._tracking_uri
    mlflow.set_tracking_uri(credentials_to_env(uri))
    mlflow.start_run(run_id=run_id)  # the stage finished: a failure to log must not mark it FAILED
    try:
        return log(stage_dir, register_as)
    finally:
        mlflow.end_run("FINISHED")
        mlflow.set_tracking_uri(before_uri)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def package_run_dir(path: Path) -> tuple[Path, Path]:
    """(the package directory holding model.json, the run directory it belongs to: the package
    itself when it is no stage of a run, e.g. an `ffscale import` output)."""
    package = find_package(Path(path))
    return package, package.parent if (package.parent / CONFIG).is_file() else package


def register_package(path: Path, name: str, uri: str, experiment: str) -> str:
    """A model package on disk (a finished stage, a run directory or an `ffscale import` output)
    registered as `name`: a run of kind `package` in `experiment` holds it; its version is tagged
    as a pipeline's is. Returns models:/NAME/VERSION."""
    from mlflow.entities import Param

    package, run_dir = package_run_dir(path)
    card = read_card(package)
    c = client(uri)
    tags = {"ffscale.kind": "package", "ffscale.pipeline": run_dir.name, "ffscale.stage": package.name,
            "ffscale.model": card["model"], "ffscale.package": str(package.resolve())}  # fmt: skip
    run = c.create_run(
        experiment_id(c, experiment, uri), run_name=f"{run_dir.name}/{package.name}", tags=tags
    )
    rid = run.info.run_id
    params = [Param(k, v) for k, v in flatten({"model": {"name": card["model"], **card["kwargs"]}}).items()]
    c.log_batch(rid, params=params[:100])
    return publish(c, uri, run_dir.name, package, rid, None, {package.name: rid}, name)
