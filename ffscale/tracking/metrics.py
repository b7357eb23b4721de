"""A stage run's metric values: one per (name, step), whoever sends them.

MLflow keeps every value logged, several at one step included, and its client cannot delete one. So
nothing is sent for a (name, step) the run already holds: the live tracker sends no step at or
below the last one the run held when the stage (re)started (ffscale/tracking/runs.py), and the
catch-up from metrics.jsonl sends only the (name, step) pairs the run lacks. A stage resumed from a
checkpoint older than its last logged step retrains those steps: metrics.jsonl holds the retrained
values (ffscale/run/record.py), MLflow keeps the first ones (the same where the resume reproduces the
run, as it does on one host; wall-clock figures such as img/s differ).
"""

from __future__ import annotations

import time
from pathlib import Path

from ffscale.util import jsonl

NOT_METRICS = ("step", "time")  # a row's axes in MLflow: the step, and the value's timestamp
BATCH = 1000  # log_batch takes at most 1,000 metrics


def metric_values(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's numbers, as MLflow metrics (the step and the wall time are its axes)."""
    return {k: float(v) for k, v in row.items() if k not in NOT_METRICS and isinstance(v, (int, float))}


def last_steps(client, run_id: str) -> dict[str, int]:
    """{name: the last step the run holds a value at}, for every metric the run has."""
    names = client.get_run(run_id).data.metrics
    return {name: max(m.step for m in client.get_metric_history(run_id, name)) for name in names}


def send_missing(client, run_id: str, metrics_file: Path) -> int:
    """Every (name, step) of metrics.jsonl that the run lacks, sent; how many were sent. A step that
    appears twice (files written before rows were kept one per step) is sent as its last row has it."""
    from mlflow.entities import Metric

    latest: dict[tuple[str, int], tuple[float, int]] = {}
    now = int(time.time() * 1000)
    for row in jsonl.read(metrics_file):
        stamp = int(row["time"] * 1000) if isinstance(row.get("time"), (int, float)) else now
        for name, value in metric_values(row).items():
            latest[(name, int(row.get("step", 0)))] = (value, stamp)
    names = {name for name, _ in latest}
    have = {(name, m.step) for name in names for m in client.get_metric_history(run_id, name)}
    todo = [Metric(name, value, stamp, step) for (name, step), (value, stamp) in sorted(latest.items())
            if (name, step) not in have]  # fmt: skip
    for i in range(0, len(todo), BATCH):
        client.log_batch(run_id, metrics=todo[i : i + BATCH])
    return len(todo)
