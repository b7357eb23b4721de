"""A run found again: by its id when the store still has it active, else by the tags every run of a
pipeline carries (`ffscale.pipeline_id`, `ffscale.kind`, `ffscale.stage`) in the experiment."""

from __future__ import annotations


def active_run(client, run_id: str | None):
    """The run of this id, or None when there is none or it was deleted."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def find_run(
    client, experiment: str, run_id: str | None, pipeline_id: str, kind: str, stage: str | None = None
):
    """The pipeline's run of this kind (and stage): by id, else by its tags; None when neither finds it."""
    run = active_run(client, run_id)
    if run is not None:
        return run
    query = f"tags.`ffscale.pipeline_id` = '{pipeline_id}' and tags.`ffscale.kind` = '{kind}'"
    if stage:
        query += f" and tags.`ffscale.stage` = '{stage}'"
    found = client.search_runs([experiment], query, max_results=1)
    return found[0] if found else None
