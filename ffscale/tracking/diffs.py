"""What a run lacks of the run directory's params and tags, sent. Params are immutable in MLflow
(a second value raises), so only the ones it lacks are logged; a tag is set where its value differs.
A resumed stage's allowed config changes become tags (`ffscale.change.<key>`), never params."""

from __future__ import annotations

PARAMS_PER_BATCH = 100  # log_batch takes at most 100 params


def log_missing(client, run, params: dict, tags: dict, created: bool) -> None:
    """The params the run lacks, and (unless it was just created with them) the tags that differ."""
    from mlflow.entities import Param, RunTag

    run_id = run.info.run_id
    missing = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    for i in range(0, len(missing), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=missing[i : i + PARAMS_PER_BATCH])
    changed = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
    if changed and not created:
        client.log_batch(run_id, tags=changed)


def change_tags(history: list[dict]) -> list:
    """A stage's config history as tags: `ffscale.change.<key>` = `old -> new @ step N` per change,
    and every change, one line per resume, in `ffscale.changes` (none when it never changed)."""
    from mlflow.entities import RunTag

    tags, lines = [], []
    for row in history[1:]:  # the first row is the config the stage started with
        diff = row.get("changes", {})
        described = [(key, f"{old!r} -> {new!r}") for key, (old, new) in diff.items()]
        lines.append(f"step {row['step']}: " + "; ".join(f"{key}: {what}" for key, what in described))
        tags += [RunTag(f"ffscale.change.{key}", f"{what} @ step {row['step']}") for key, what in described]
    return tags + [RunTag("ffscale.changes", "\n".join(lines))] if lines else []
