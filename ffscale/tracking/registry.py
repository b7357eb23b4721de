"""The final stage's model in MLflow: logged as a pyfunc into its stage run and, with
tracking.register_as, registered, the version tagged with the runs and the data it came from."""

from __future__ import annotations

import json

from ffscale.inference.card import read_card
from ffscale.tracking.breaker import Breaker, Down


def publish(
    client, breaker: Breaker, uri: str, cfg, final, run_id: str, parent: str | None, stage_runs: dict
) -> bool:
    """Log (and register) `final`'s model into its stage run `run_id`; False when MLflow was down."""
    try:
        info = breaker.call(_log_model, uri, final, run_id, cfg.tracking.register_as)
    except Down:
        return False
    name, version = cfg.tracking.register_as, getattr(info, "registered_model_version", None)
    if not name or version is None:
        return True
    card = read_card(final.dir)
    tags = {
        "ffscale.pipeline": cfg.run.name,
        "ffscale.pipeline_run": parent or "",
        "ffscale.stage_run": run_id,
        "ffscale.stage_runs": json.dumps(stage_runs),
        "ffscale.data": json.dumps(card["data"]),
        "ffscale.preprocessing": json.dumps(card["preprocessing"]),
    }
    for k, v in tags.items():
        breaker.attempt(client.set_model_version_tag, name, str(version), k, v)
    breaker.attempt(
        client.update_model_version, name, str(version),
        description=f"{card['model']} from pipeline {cfg.run.name}, stage {final.name} "
        f"(run {run_id}); trained on {card['data']['train']['name']}:{card['data']['train']['digest']}",
    )  # fmt: skip
    print(f"ffscale: registered models:/{name}/{version} (stage run {run_id})", flush=True)
    return True


def _log_model(uri: str, final, run_id: str, register_as: str | None):
    import mlflow

    from ffscale.tracking.pyfunc import log

    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id)  # the stage finished: a failure to log must not mark it FAILED
    try:
        return log(final.dir, register_as)
    finally:
        mlflow.end_run("FINISHED")
