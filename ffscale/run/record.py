"""A stage's rows (progress, eval, skipped steps, config changes): appended to metrics.jsonl by rank 0
and sent to the tracker, with the optimizer step as the x axis. Each row carries its wall time:
metrics.jsonl is the record that `ffscale track sync` replays into MLflow (ffscale/tracking/replay.py).

The record holds one value per (stage, step, name). A stage resumed from a checkpoint at step N
trains on from N, so the rows past N describe steps the checkpoint does not hold (a job killed after
it, or a resume from an older checkpoint when the newest was damaged): they are cut from
metrics.jsonl as the stage resumes, and written again as the steps are retrained. Rows at N itself
were written before the checkpoint was (the loop records, then saves), so they stand, and a name
recorded at a step is not recorded at that step again (the evaluation a resume repeats at N, the
`epoch` that both the progress row and the evaluation row of an epoch's last step carry).
`epoch` (like `step` and `time`) is the row's position: each row keeps it, the tracker gets it once
per step. MLflow cannot delete a value: its side is ffscale/tracking/metrics.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from ffscale.util import jsonl

POSITION = ("step", "epoch", "time")  # where a row stands, not a value recorded at a step


def resume_rows(path: Path, step: int) -> set[str]:
    """metrics.jsonl cut back to the rows up to `step`, the resumed one (rank 0, once per stage
    start); the names already recorded at `step`."""
    rows = jsonl.read(path)
    kept = [row for row in rows if row.get("step", 0) <= step]
    if len(kept) != len(rows) or (path.is_file() and len(path.read_text().splitlines()) != len(rows)):
        jsonl.rewrite(path, kept)  # also drops a line a kill cut short
    return {name for row in kept if row.get("step", 0) == step for name in row} - {"step", "time"}


class Recorder:
    """Rows in step order (the loop's): one value per name and step, in the file and the tracker."""

    def __init__(self, path: Path, tracker, rank: int, resumed_step: int = 0):
        self.path, self.tracker, self.rank = path, tracker, rank
        self.step = resumed_step
        self.recorded: set[str] = resume_rows(path, resumed_step) if rank == 0 else set()

    def __call__(self, row: dict) -> None:
        step = row["step"]
        if step != self.step:
            self.step, self.recorded = step, set()
        new = {name: row[name] for name in row if name not in POSITION and name not in self.recorded}
        if not new:
            return
        position = {name: row[name] for name in ("step", "epoch") if name in row}
        # the tracker takes `epoch` as a metric: once per step, like every other name
        tracked = ({"epoch": row["epoch"]} if "epoch" in row and "epoch" not in self.recorded else {}) | new
        self.recorded |= set(tracked)
        if self.rank == 0:
            jsonl.append(self.path, {**position, **new, "time": round(time.time(), 3)})
        self.tracker.log_metrics(tracked, step)
